"""Hostile HTTP clients against a real daemon: a connection flood from one address, a slow-loris trickling its
headers, a body that stalls, oversized header lines, idle keep-alive connections. Each is cut with the documented
limit while a well-behaved client (from another loopback address) keeps being served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from httpclient import request
from support.daemon import served_daemon

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
KEEPALIVE = 0.5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[DaemonProcess]:
    site = Site(tmp_path_factory.mktemp("hostile") / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"server": {"limits": {"max_connections_per_client": 4, "header_timeout_s": HEADER_TIMEOUT,
                                        "body_timeout_s": BODY_TIMEOUT, "keepalive_timeout_s": KEEPALIVE,
                                        "max_field_size": 2048}}}
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def connect(port: int, source: str) -> socket.socket:
    """A raw connection from ``source`` (any 127/8 address is this machine: a second client address)."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def closed_by_server(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def good(daemon: DaemonProcess) -> None:
    assert request(daemon.url + "/v2/models/mlp/infer", "POST", BODY).status == 200


def test_a_connection_flood_from_one_address_is_cut(served: DaemonProcess) -> None:
    held = [connect(served.port, "127.0.0.2") for _ in range(4)]
    try:
        extra = connect(served.port, "127.0.0.2")
        with extra:
            assert closed_by_server(extra) == b""  # closed at once, before any byte of HTTP
        good(served)  # another address is not affected
        held[0].sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in held[0].recv(65536)  # and the four admitted connections work
    finally:
        for s in held:
            s.close()


def test_a_slow_loris_is_closed_after_the_header_timeout(served: DaemonProcess) -> None:
    with connect(served.port, "127.0.0.3") as slow:
        started = time.monotonic()
        slow.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        good(served)
        slow.sendall(b"a")  # still trickling: a byte now and then does not reset the deadline
        assert closed_by_server(slow) == b""
        assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9
    good(served)


def test_a_stalled_body_gets_408_and_the_connection_closes(served: DaemonProcess) -> None:
    with connect(served.port, "127.0.0.4") as s:
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"inputs\": ")
        answer = closed_by_server(s)
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer


def test_oversized_header_fields_are_refused(served: DaemonProcess) -> None:
    reply = request(served.url + "/v2/health/live", headers={"X-Big": "a" * 4096}, check=False)
    assert reply.status == 400 and b"Got more than 2048 bytes" in reply.body
    good(served)


def test_an_idle_keep_alive_connection_is_closed(served: DaemonProcess) -> None:
    with connect(served.port, "127.0.0.5") as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert b"200 OK" in first
        started = time.monotonic()
        assert closed_by_server(s) == b""
        assert time.monotonic() - started >= KEEPALIVE * 0.9


def test_cut_connections_and_refusals_are_counted(served: DaemonProcess) -> None:
    test_a_connection_flood_from_one_address_is_cut(served)
    text = request(served.url + "/metrics").body.decode()
    over = [line for line in text.splitlines() if line.startswith('inferd_http_connections_cut_total{reason="over_limit"}')]
    assert over and float(over[0].split()[-1]) >= 1, over
