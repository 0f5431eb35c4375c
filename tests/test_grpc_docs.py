"""docs/grpc.md's Python client example, run as written against a real daemon serving the demo model of `make run`
(only the address differs: the daemon listens on a free port), so the page cannot drift from what the daemon does;
and what the page says of start-up: a gRPC port that cannot be bound stops it with one clear line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

from conftest import REPO, KeySet, Site

from daemon import demo


def example() -> str:
    text = (REPO / "docs" / "grpc.md").read_text(encoding="utf-8")
    section = text.split("## Python client example", 1)[1]
    match = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert match is not None, "docs/grpc.md has no Python example"
    return match.group(1)


def test_the_python_client_example_runs_as_documented(site: Site, keyset: KeySet, start_daemon) -> None:
    site.install(demo.build_artifact("demo", "1", keyset.kek, keyset.signing_key))
    site.models = [{"name": "demo", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"grpc": {"enabled": True, "port": 0}}
    daemon = start_daemon(site.write_config())
    port = daemon.wait_for("grpc_listening")["port"]
    code = example()
    assert "127.0.0.1:8001" in code
    res = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:8001", f"127.0.0.1:{port}")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "'name': 'demo'" in lines[0]
    probabilities = [float(v) for v in re.findall(r"[\d.e-]+", lines[1])]
    assert len(probabilities) == 3 and probabilities[0] > 0.9
    assert lines[2].startswith("StatusCode.INVALID_ARGUMENT input 'input': shape [1, 5] does not match")


def test_a_grpc_port_in_use_stops_start_up_with_a_clear_error(site: Site, keyset: KeySet, start_daemon) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        site.extra = {"grpc": {"enabled": True, "port": port}}
        daemon = start_daemon(site.write_config(), wait=False)
        assert daemon.proc.wait(timeout=60) != 0
    line = daemon.wait_for_event("inferd: error: ")["event"]
    assert line == f"inferd: error: grpc: cannot listen on 127.0.0.1:{port} (address in use or not available)"
