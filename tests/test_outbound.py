"""Data residency: through a full run (HTTP, gRPC and MQTT traffic, a registry poll and a sync), the daemon connects
only to what its config names: the MQTT broker and the registry. Two witnesses: Python's audit hooks inside the
daemon (a sitecustomize the test puts on its path records every socket.connect, sendto and getaddrinfo, so a
short-lived connection or a DNS lookup is seen too), and its inet sockets sampled from /proc between requests
(listeners, accepted connections, the broker and registry connections; no UDP). ``inferd doctor`` lists the same."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc
from conftest import DaemonProcess, KeySet, Site
from httpclient import request
from mqttclient import Broker, Requester
from support.mqtt import PREFIX, mlp_request, mqtt_site
from support.registry import Central, inferd_serve

from daemon import keys

LISTEN = "0A"
HOOK = '''
import json, os, sys
_log = os.environ["INFERD_TEST_SOCKET_LOG"]
def _hook(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.getaddrinfo"):
        address = args[1] if event != "socket.getaddrinfo" else [args[0], args[1]]
        with open(_log, "a") as f:
            f.write(json.dumps([event, repr(address)]) + "\\n")
sys.addaudithook(_hook)
'''


def sockets(pid: int) -> list[tuple[str, int, int, str]]:
    """(proto, local port, remote port, state) of every inet socket ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes:
                found.append((proto, int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16), f[3]))
    return found


def test_the_daemon_connects_only_to_what_its_config_names(
        site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker, tmp_path: Path,
        start_daemon: Callable[..., DaemonProcess]) -> None:
    (tmp_path / "central").mkdir()
    keys.generate_signing_key(tmp_path / "central" / "index.key")
    central = Central(tmp_path / "central" / "registry", tmp_path / "central" / "index.key", keyset, mlp_onnx)
    central.publish("1")
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    log = tmp_path / "sockets.jsonl"
    with inferd_serve(central.root) as registry_url:
        registry_port = int(registry_url.rstrip("/").rsplit(":", 1)[1])
        site.extra = {"grpc": {"enabled": True, "port": 0},
                      "registry": {"url": registry_url, "poll_interval_s": 3600, "min_free_bytes": 0,
                                   "index_keys": [{"path": str(central.key_path.with_name("index.key.pub"))}]}}
        config = mqtt_site(site, keyset, mlp_onnx, broker)
        env = {"PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
               "INFERD_TEST_SOCKET_LOG": str(log)}
        daemon = start_daemon(config, env=env)
        daemon.wait_for("mqtt_connected")
        daemon.wait_for("registry_index")
        grpc_port = int(daemon.wait_for("grpc_listening")["port"])
        listeners = {daemon.port, grpc_port}
        outbound = {broker.port, registry_port}
        seen: set[str] = set()

        def check() -> None:
            for proto, lport, rport, state in sockets(daemon.proc.pid):
                assert proto.startswith("tcp"), f"a {proto} socket (local port {lport})"
                if state == LISTEN:
                    assert lport in listeners, f"listening on {lport}, not a configured port"
                    seen.add("listen")
                elif lport in listeners:
                    seen.add("inbound")
                else:
                    assert rport in outbound, f"an outbound connection to port {rport} (state {state})"
                    seen.add(f"outbound {rport}")

        x = np.array([[1, 2, 3, 4]], np.float32)
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        req = Requester(broker.port)
        try:
            for i in range(5):
                assert request(daemon.url + "/v2/models/mlp/infer", "POST", body).status == 200
                check()
                inp = tgrpc.InferInput("input", [1, 4], "FP32")
                inp.set_data_from_numpy(x)
                client.infer("mlp", [inp])
                check()
                req.request(f"{PREFIX}/models/mlp/infer", mlp_request(x), correlation=f"c{i}".encode())
                assert req.wait().status == "200"
                check()
            assert request(daemon.url + "/admin/registry/sync", "POST").status == 200
            check()
        finally:
            client.close()
            req.close()
        assert daemon.stop() == 0
    assert {"listen", "inbound", f"outbound {broker.port}"} <= seen, seen
    events = [json.loads(line) for line in log.read_text().splitlines()]
    connects = [address for event, address in events if event == "socket.connect"]
    assert connects, "the audit hook saw no connection at all: it is not watching"
    allowed = {f"('127.0.0.1', {port})" for port in outbound}
    for address in connects:
        assert address in allowed or address.startswith("'"), f"a connection to {address}"  # a str: AF_UNIX
    assert any(str(registry_port) in a for a in connects) and any(str(broker.port) in a for a in connects)
    assert not [a for event, a in events if event == "socket.sendto"], "a datagram was sent"
    looked_up = {a for event, a in events if event == "socket.getaddrinfo"}
    assert all("127.0.0.1" in a for a in looked_up), looked_up  # no name was resolved but the configured hosts
