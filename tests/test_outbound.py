"""Data residency: through a full run (HTTP, gRPC and MQTT traffic), every network socket the daemon holds is one of
its configured listeners, a connection accepted by one of them, or the one outbound connection its config names
(the MQTT broker); no UDP at all. ``inferd doctor`` lists the same endpoints."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc
from conftest import DaemonProcess, KeySet, Site
from httpclient import request
from mqttclient import Broker, Requester
from support.mqtt import PREFIX, mlp_request, mqtt_site

LISTEN, ESTABLISHED = "0A", "01"


def sockets(pid: int) -> list[tuple[str, str, int, str, int, str]]:
    """(proto, local ip hex, local port, remote ip hex, remote port, state) of every inet socket ``pid`` holds."""
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
                (lip, lport), (rip, rport) = (a.split(":") for a in (f[1], f[2]))
                found.append((proto, lip, int(lport, 16), rip, int(rport, 16), f[3]))
    return found


def test_the_daemon_opens_only_what_its_config_names(site: Site, keyset: KeySet, mlp_onnx: bytes, broker: Broker,
                                                     start_daemon: Callable[..., DaemonProcess]) -> None:
    site.extra = {"grpc": {"enabled": True, "port": 0}}
    daemon = start_daemon(mqtt_site(site, keyset, mlp_onnx, broker))
    daemon.wait_for("mqtt_connected")
    grpc_port = int(daemon.wait_for("grpc_listening")["port"])
    listeners = {daemon.port, grpc_port}
    seen: set[tuple[str, int, str]] = set()

    def check() -> None:
        for proto, _, lport, _, rport, state in sockets(daemon.proc.pid):
            assert proto.startswith("tcp"), f"a {proto} socket (local port {lport})"
            if state == LISTEN:
                assert lport in listeners, f"listening on {lport}, not a configured port"
                seen.add(("listen", lport, proto))
            elif lport in listeners:
                seen.add(("inbound", lport, proto))
            else:
                assert rport == broker.port, f"an outbound connection to port {rport} (state {state})"
                seen.add(("outbound", rport, proto))

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
            assert request(daemon.url + "/metrics").status == 200
            check()
    finally:
        client.close()
        req.close()
    kinds = {kind for kind, _, _ in seen}
    assert kinds == {"listen", "inbound", "outbound"}, seen  # the check saw every kind it allows
