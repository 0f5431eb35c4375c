"""What systemd/inferd.service relies on, on a real daemon: the watchdog pings (WatchdogSec= gives WATCHDOG_USEC, the
daemon pings at half of it over NOTIFY_SOCKET) and keys given as credentials (LoadCredential= fills
$CREDENTIALS_DIRECTORY; the config names them with ``{credential: NAME}``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, KeySet, Site, pack_model
from httpclient import infer, request

WATCHDOG_USEC = 100_000  # WatchdogSec=0.1s: pings every 50 ms, so a handful arrive quickly
INTERVAL_S = WATCHDOG_USEC / 2_000_000


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """The datagram socket systemd would listen on, bound by the test."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        yield sock, str(path)


def receive_until(sock: socket.socket, wanted: str) -> list[tuple[float, str]]:
    """Datagrams (arrival time, text) up to and including the first that contains ``wanted``."""
    got: list[tuple[float, str]] = []
    while not got or wanted not in got[-1][1]:
        got.append((time.monotonic(), sock.recv(4096).decode()))
    return got


def serving(site: Site, keyset: KeySet, mlp_onnx: bytes) -> Path:
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    return site.write_config()


def test_the_watchdog_is_pinged_at_half_its_interval(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon,
                                                     notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    daemon = start_daemon(serving(site, keyset, mlp_onnx), env={"NOTIFY_SOCKET": path,
                                                                "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    receive_until(sock, "READY=1")
    pings = [receive_until(sock, "WATCHDOG=1")[-1][0] for _ in range(11)]
    spacing = (pings[-1] - pings[0]) / (len(pings) - 1)
    # never faster than asked (a loop cannot run early); slower only by this machine's scheduling, and clearly
    # faster than the whole WatchdogSec (pinging at the full interval would let systemd kill a healthy daemon)
    assert INTERVAL_S * 0.8 <= spacing <= INTERVAL_S * 1.6, spacing
    daemon.proc.send_signal(signal.SIGTERM)
    receive_until(sock, "STOPPING=1")
    assert daemon.proc.wait(timeout=60) == 0


def test_a_watchdog_meant_for_another_process_is_not_pinged(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                            start_daemon,
                                                            notify_socket: tuple[socket.socket, str]) -> None:
    """WATCHDOG_PID names the process systemd watches; a child that inherits the variables must stay silent."""
    sock, path = notify_socket
    daemon = start_daemon(serving(site, keyset, mlp_onnx), env={
        "NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": str(os.getpid())})
    before_ready = receive_until(sock, "READY=1")
    sock.settimeout(40 * INTERVAL_S)  # forty intervals: the window in which the first test gets forty pings
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    assert not any("WATCHDOG=1" in text for _, text in before_ready)
    sock.settimeout(30)
    daemon.proc.send_signal(signal.SIGTERM)
    assert not any("WATCHDOG=1" in text for _, text in receive_until(sock, "STOPPING=1"))
    assert daemon.proc.wait(timeout=60) == 0


def credentials(keyset: KeySet, folder: Path) -> dict[str, str]:
    """The folder systemd fills from the unit's LoadCredential= lines: files readable by the service alone."""
    folder.mkdir()
    names = {"inferd-kek": keyset.kek_path, "inferd-signer.pub": keyset.public_path}  # as systemd/inferd.service
    for name, source in names.items():
        shutil.copyfile(source, folder / name)
        os.chmod(folder / name, 0o400)
    return {"CREDENTIALS_DIRECTORY": str(folder)}


def credential_config(site: Site) -> Path:
    doc = yaml.safe_load(site.config_path.read_text())
    doc["keys"] = {"kek": [{"credential": "inferd-kek"}], "signers": [{"credential": "inferd-signer.pub"}]}
    site.config_path.write_text(yaml.safe_dump(doc))
    return site.config_path


def test_keys_given_as_credentials_serve(site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
                                         start_daemon) -> None:
    serving(site, keyset, mlp_onnx)
    config = credential_config(site)
    daemon = start_daemon(config, env=credentials(keyset, tmp_path / "credentials"))
    assert request(daemon.url + "/v2/health/ready").status == 200
    r = infer(daemon.url, "mlp", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                               "data": [1, 2, 3, 4]}]})
    assert r.status == 200
    assert daemon.stop() == 0


def test_a_credential_without_credentials_directory_stops_start_up_with_one_line(site: Site, keyset: KeySet,
                                                                                mlp_onnx: bytes) -> None:
    serving(site, keyset, mlp_onnx)
    config = credential_config(site)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    res = subprocess.run([sys.executable, "-m", "daemon", "serve", "--config", str(config)], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "inferd: error: key credential 'inferd-kek' is configured but $CREDENTIALS_DIRECTORY is not set "
        "(run under systemd with LoadCredential=, or use 'path')"
    )


def test_a_credential_readable_by_others_is_refused(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                    tmp_path: Path) -> None:
    """The permission rule holds for credential files too (docs/artifact-format.md)."""
    serving(site, keyset, mlp_onnx)
    config = credential_config(site)
    env = {**os.environ, **credentials(keyset, tmp_path / "credentials")}
    os.chmod(tmp_path / "credentials" / "inferd-kek", 0o444)
    res = subprocess.run([sys.executable, "-m", "daemon", "serve", "--config", str(config)], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=60)
    assert res.returncode == 1
    kek = tmp_path / "credentials" / "inferd-kek"
    assert res.stderr.strip() == (f"inferd: error: key file {kek} is readable by group or others (mode 0444); "
                                  f"run: chmod 600 {kek}")
