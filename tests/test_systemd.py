"""systemd/: the unit verifies and scores at most 1.5 with systemd's own tools (skipped, saying so, where they are
missing), says what the daemon relies on, and its sysusers/tmpfiles files make the account and folders; and keys given
as credentials serve on a real daemon (LoadCredential= fills $CREDENTIALS_DIRECTORY; the config names them with
``{credential: NAME}``). The notify protocol and the watchdog are tests/test_sdnotify.py's."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import REPO, DaemonProcess, KeySet, Site, pack_model
from httpclient import infer, request

UNIT = REPO / "systemd" / "inferd.service"
SYSUSERS = REPO / "systemd" / "inferd.sysusers.conf"
TMPFILES = REPO / "systemd" / "inferd.tmpfiles.conf"
TPM_DROPIN = REPO / "systemd" / "tpm-credentials.conf"
#: the most `systemd-analyze security` may score the unit (issue 13; it was 1.6)
EXPOSURE_MAX = 1.5
DOC_ROOT = "/usr/share/doc/inferd/"  # where packaging/build-deb.sh installs README.md and docs/


def systemd_tool(name: str) -> str:
    """The path of a systemd tool, or a skip saying how to get it (``make deps-system`` installs it on Debian)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install systemd; make deps-system does it)")
    return path


def directives(text: str) -> list[tuple[int, str, str]]:
    """(line index, key, value) of each setting in a unit file, in order."""
    out = []
    for i, line in enumerate(text.splitlines()):
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.append((i, key, value))
    return out


def unit_values(key: str) -> list[str]:
    return [value for _, k, value in directives(UNIT.read_text()) if k == key]


def test_the_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify``, with the TPM drop-in too. The one thing it may say is that the binaries it names
    are not installed here (/opt/inferd comes with the .deb) or the man page is not."""
    tool = systemd_tool("systemd-analyze")
    shutil.copyfile(UNIT, tmp_path / "inferd.service")
    (tmp_path / "inferd.service.d").mkdir()
    shutil.copyfile(TPM_DROPIN, tmp_path / "inferd.service.d" / "tpm-credentials.conf")
    for unit in (UNIT, tmp_path / "inferd.service"):
        res = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        complaints = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()
                      and "Command /opt/inferd/bin/inferd is not executable" not in line
                      and "Command 'man inferd(1)' failed" not in line]
        assert complaints == [], complaints


def test_the_unit_scores_at_most_the_exposure_target() -> None:
    tool = systemd_tool("systemd-analyze")
    res = subprocess.run([tool, "security", "--offline=true", f"--threshold={int(EXPOSURE_MAX * 10)}", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for inferd.service: ([0-9.]+)", res.stdout)
    assert score is not None, res.stdout + res.stderr
    assert float(score[1]) <= EXPOSURE_MAX, res.stdout


def test_what_the_unit_promises_the_daemon_does() -> None:
    """The settings the rest of inferd relies on (sd_notify, reload, restart, the folders, the keys), and a comment
    above each relaxed hardening setting saying why it is relaxed."""
    assert unit_values("Type") == ["notify"]
    assert unit_values("NotifyAccess") == ["main"]
    assert unit_values("Restart") == ["on-failure"]
    assert unit_values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert unit_values("WatchdogSec") == ["30s"]
    assert unit_values("User") == unit_values("Group") == ["inferd"]
    assert unit_values("StateDirectory") == unit_values("LogsDirectory") == ["inferd"]
    assert unit_values("UMask") == ["0077"]
    assert unit_values("LoadCredential") == ["inferd-kek:/etc/inferd/keys/site.kek",
                                             "inferd-signer.pub:/etc/inferd/keys/release.key.pub"]
    text = UNIT.read_text()
    lines = text.splitlines()
    relaxed = {"MemoryDenyWriteExecute": "no", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}
    for i, key, value in directives(text):
        if key in relaxed:
            assert value == relaxed[key]
            assert lines[i - 1].startswith("# "), f"{key}= relaxes the score: the line above must say why"
    for why in ("PrivateNetwork=", "IPAddressDeny=", "ProcSubset=", "RootDirectory="):
        assert why in text, f"{why} is left open: the unit must say why"


def test_the_tpm_drop_in_swaps_the_kek_for_an_encrypted_credential() -> None:
    values = [(k, v) for _, k, v in directives(TPM_DROPIN.read_text())]
    assert values == [("LoadCredential", ""),
                      ("LoadCredential", "inferd-signer.pub:/etc/inferd/keys/release.key.pub"),
                      ("LoadCredentialEncrypted", "inferd-kek:/etc/credstore.encrypted/inferd-kek")]
    assert "systemd-creds encrypt --with-key=tpm2 --name=inferd-kek" in TPM_DROPIN.read_text()


def test_documentation_names_docs_the_package_installs() -> None:
    """Documentation= points at /usr/share/doc/inferd, where packaging/build-deb.sh puts README.md and docs/."""
    urls = " ".join(unit_values("Documentation")).split()
    files = [url.removeprefix("file:") for url in urls if url.startswith("file:")]
    assert files, urls
    build = (REPO / "packaging" / "build-deb.sh").read_text()
    for path in files:
        assert path.startswith(DOC_ROOT), path
        source = REPO / path.removeprefix(DOC_ROOT)
        assert source.is_file(), f"{path}: {source} is not in the repository"
        assert f'"$doc/{source.parent.relative_to(REPO)}/"' in build or f'"$doc/{source.name}"' in build, path
    assert "man:inferd(1)" in urls and "usr/share/man/man1/inferd.1.gz" in build


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-sysusers and -tmpfiles set owners: root only")
def test_sysusers_and_tmpfiles_make_the_account_and_folders(tmp_path: Path) -> None:
    """Applied to a throw-away root, as the package's postinst applies them to the real one."""
    sysusers, tmpfiles = systemd_tool("systemd-sysusers"), systemd_tool("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}", str(SYSUSERS)], check=True, capture_output=True, timeout=60)
    user = next(line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
                if line.startswith("inferd:"))
    assert (user[5], user[6]) == ("/var/lib/inferd", "/usr/sbin/nologin")
    subprocess.run([tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES)], check=True, capture_output=True,
                   timeout=60)
    config, keys_dir = (tmp_path / "etc" / "inferd").stat(), (tmp_path / "etc" / "inferd" / "keys").stat()
    assert (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid) == (0o750, 0, int(user[3]))
    assert (stat.S_IMODE(keys_dir.st_mode), keys_dir.st_uid, keys_dir.st_gid) == (0o700, 0, 0)


def serving(site: Site, keyset: KeySet, mlp_onnx: bytes) -> Path:
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    return site.write_config()


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


def filtered_syscalls() -> list[str]:
    """The calls the unit's ``SystemCallFilter=~...`` line denies, as systemd itself lists them."""
    line = next(v for v in unit_values("SystemCallFilter") if v.startswith("~"))
    out = subprocess.run(["systemd-analyze", "syscall-filter", *line[1:].split()], capture_output=True, text=True,
                         check=True).stdout
    return [s.strip() for s in out.splitlines() if s.startswith("    ") and not s.strip().startswith(("#", "@"))]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed "
                    "(make deps-system installs it)")
def test_the_daemon_serves_under_the_units_system_call_filter(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                               start_daemon: Callable[..., DaemonProcess]) -> None:
    """Denied calls fail with the unit's SystemCallErrorNumber= and the daemon still serves; with systemd's default
    action (kill) the same filter stops it at once: the reason the unit sets EPERM."""
    assert unit_values("SystemCallErrorNumber") == ["EPERM"]
    denied = filtered_syscalls()
    assert {"mbind", "sched_setaffinity"} <= set(denied)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    config = site.write_config()
    wrapper = [sys.executable, str(REPO / "tests" / "support" / "seccomp.py"), "eperm", *denied, "--"]
    daemon = start_daemon(config, wrapper=wrapper)
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    assert request(daemon.url + "/v2/models/mlp/infer", "POST", body).status == 200
    assert daemon.stop() == 0
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "support" / "seccomp.py"), "kill", *denied, "--",
                             sys.executable, "-m", "daemon", "--version"], capture_output=True, cwd=REPO, timeout=60)
    assert killed.returncode < 0 or killed.returncode > 128, killed
