"""systemd's notify protocol, on the real daemon over a real Unix datagram socket the test binds (as systemd does for
a ``Type=notify`` unit): what it is told at start, reload and stop, and the watchdog.

How the loop gets blocked, for the watchdog test: no test hook in the daemon. A lone sequential client's runs that
were measured cheap execute on the event loop itself (daemon/scheduler.py), and the estimate goes by the inputs'
sizes. A model whose cost depends on an input's *value* (an ONNX ``Loop`` whose trip count is an input) therefore
runs a request with a huge count inline and holds the loop for as long as it takes: a real request, the real code
path, the kind of fault the watchdog exists for. SIGSTOP would stop every thread (and says nothing about the loop).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import KeySet, Site, pack_model

WATCHDOG_USEC = 100_000  # WatchdogSec=0.1s: pings every 50 ms
INTERVAL_S = WATCHDOG_USEC / 2_000_000
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() when it arrived
    fields: dict[str, str]
    text: str


class NotifySocket:
    """The socket systemd would listen on, bound by the test, with a thread that reads every datagram as it arrives
    (a Unix datagram queue holds only a few: a reader that falls behind would block the daemon's sends)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self._got: list[Datagram] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket-reader")
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                raw = self._sock.recv(4096)
            except TimeoutError:
                continue
            text = raw.decode()
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self._cond:
                self._got.append(Datagram(time.monotonic(), fields, text))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, after: int = 0, timeout: float | None = None) -> int:
        """The index of the first datagram from ``after`` on that sets ``key`` (to ``value``), waiting for it; with
        ``timeout``, -1 when none came within it (without, that fails the test after DEADLINE_S)."""
        deadline = time.monotonic() + (DEADLINE_S if timeout is None else timeout)
        with self._cond:
            while True:
                for i in range(after, len(self._got)):
                    got = self._got[i].fields.get(key)
                    if got is not None and (value is None or got == value):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    if timeout is not None:
                        return -1
                    raise AssertionError(f"no {key}={value} within {DEADLINE_S}s; got {self.texts()}")
                self._cond.wait(left)

    def wait_count(self, key: str, count: int, after: int = 0) -> int:
        """Wait until ``count`` datagrams from ``after`` on set ``key``; the index of the last of them."""
        i = after - 1
        for _ in range(count):
            i = self.wait_for(key, after=i + 1)
        return i

    @property
    def got(self) -> list[Datagram]:
        with self._cond:
            return list(self._got)

    def texts(self, keep_pings: bool = False) -> list[str]:
        return [d.text for d in self.got if keep_pings or d.text != "WATCHDOG=1"]

    def close(self) -> None:
        self._closing.set()
        self._reader.join()
        self._sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def watched(notify: NotifySocket, **extra: str) -> dict[str, str]:
    """The environment systemd gives a Type=notify service with WatchdogSec=: the socket, the interval, the pid is
    filled in by the test (the daemon's pid is unknown before it starts, so WATCHDOG_PID is left out: all of it)."""
    return {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC), **extra}


def serving(site: Site, keyset: KeySet, mlp_onnx: bytes) -> Path:
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    return site.write_config()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_start_and_stop_are_told_in_order(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon,
                                          notify: NotifySocket) -> None:
    daemon = start_daemon(serving(site, keyset, mlp_onnx), env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", "1")
    assert notify.got[ready].fields["STATUS"] == f"serving mlp 1; http 127.0.0.1:{daemon.port} plaintext"
    daemon.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING", "1", after=ready + 1)
    assert daemon.proc.wait(timeout=DEADLINE_S) == 0
    assert notify.texts() == [
        "STATUS=loading 1 model(s)",
        f"READY=1\nSTATUS=serving mlp 1; http 127.0.0.1:{daemon.port} plaintext",
        "STOPPING=1\nSTATUS=draining: finishing accepted requests, then stopping",
    ]


def test_a_reload_is_told_between_reloading_and_ready(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon,
                                                      notify: NotifySocket) -> None:
    """SIGHUP (ExecReload=): RELOADING=1 with MONOTONIC_USEC on systemd's clock, then READY=1 whose STATUS= says what
    the reload did; a rejected config gets its READY=1 too (systemd waits for it), with the reason."""
    config = serving(site, keyset, mlp_onnx)
    daemon = start_daemon(config, env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", "1")
    serving_line = f"serving mlp 1; http 127.0.0.1:{daemon.port} plaintext"

    before = monotonic_usec()
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=ready + 1)
    reloaded = notify.wait_for("READY", "1", after=reloading + 1)
    assert before <= int(notify.got[reloading].fields["MONOTONIC_USEC"]) <= monotonic_usec()
    assert notify.got[reloaded].fields["STATUS"] == f"reloaded: no changes; {serving_line}"

    config.write_text(config.read_text() + "bogus_key: 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    rejected = notify.wait_for("READY", "1", after=notify.wait_for("RELOADING", "1", after=reloaded + 1) + 1)
    status = notify.got[rejected].fields["STATUS"]
    assert status.startswith("reload rejected, old config in force: ") and "bogus_key" in status, status
    assert status.endswith(f"; {serving_line}")

    assert daemon.stop() == 0
    kinds = [next(iter(d.fields)) for d in notify.got]
    assert kinds == ["STATUS", "READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], notify.texts()


def test_a_model_that_does_not_load_holds_back_ready_and_status_says_why(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                                         start_daemon, notify: NotifySocket) -> None:
    """Readiness never comes (the configured model is not in the store): no READY=1, and STATUS= says why. The
    watchdog pings are the clock: the daemon's loop demonstrably ran through many readiness checks meanwhile."""
    serving(site, keyset, mlp_onnx)
    site.models = [*site.models, {"name": "absent", "runtime": "onnxruntime", "threads": 1}]
    daemon = start_daemon(site.write_config(), env=watched(notify))
    why = notify.wait_for("STATUS", after=1)
    status = notify.got[why].fields["STATUS"]
    assert status.startswith("not ready: absent: "), status
    notify.wait_count("WATCHDOG", 20, after=why)  # a second: four readiness checks
    assert not any("READY" in d.fields for d in notify.got), notify.texts()
    assert daemon.stop() == 0
    assert "STOPPING" in notify.got[-1].fields


def test_no_models_configured_is_started_but_not_ready(site: Site, start_daemon, notify: NotifySocket) -> None:
    """systemd is told the start is complete (there is nothing to wait for: a fresh install starts), while the
    readiness probe refuses traffic and says why."""
    daemon = start_daemon(site.write_config(), env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait_for("READY", "1")
    assert notify.got[ready].fields["STATUS"] == f"serving no models; http 127.0.0.1:{daemon.port} plaintext"
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request("GET", "/v2/health/ready")
        reply = conn.getresponse()
        assert (reply.status, json.loads(reply.read())) == (503, {"error": "not ready: no models configured"})
    finally:
        conn.close()
    assert any(d.get("event") == "no models configured: readiness answers 503 until one is" for d in daemon.log)
    assert daemon.stop() == 0


def test_the_watchdog_is_pinged_at_half_its_interval(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon,
                                                     notify: NotifySocket) -> None:
    daemon = start_daemon(serving(site, keyset, mlp_onnx), env=watched(notify))
    first = notify.wait_for("READY", "1")
    start = notify.wait_for("WATCHDOG", after=first)
    last = notify.wait_count("WATCHDOG", 20, after=start + 1)
    window = notify.got[last].at - notify.got[start].at
    expected = window / INTERVAL_S  # pings in the measured window at the interval asked for
    # never more than asked (a loop cannot ping early; one extra for where the window starts), fewer only through
    # this machine's scheduling, and clearly more than at the whole WatchdogSec (which would let systemd kill it)
    assert 0.6 * expected <= 20 <= expected + 1, (window, expected)
    assert daemon.stop() == 0


def test_a_watchdog_meant_for_another_process_is_not_pinged(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                            start_daemon, notify: NotifySocket) -> None:
    """WATCHDOG_PID names the process systemd watches; a child that inherits the variables must stay silent."""
    daemon = start_daemon(serving(site, keyset, mlp_onnx), env=watched(notify, WATCHDOG_PID=str(os.getpid())))
    notify.wait_for("READY", "1")
    assert notify.wait_for("WATCHDOG", timeout=40 * INTERVAL_S) == -1  # forty intervals: forty pings if it were ours
    assert daemon.stop() == 0
    assert not any("WATCHDOG" in d.fields for d in notify.got), notify.texts(keep_pings=True)


def build_spin_model() -> bytes:
    """x [batch, 16] -> x @ I, repeated ``turns`` times (an input): the run's cost is the value of ``turns``, which
    no shape shows."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["y_in", "w"], ["y_out"])],
        "turn",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, ["batch", 16])],
        [w],
    )
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["turns"], ["m"], keepdims=0),
         helper.make_node("Loop", ["m", "", "input"], ["output"], body=body)],
        "spin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("turns", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def spin(conn: http.client.HTTPConnection, turns: int) -> float:
    """One request on the client's one connection (so the daemon sees a lone sequential client); its seconds."""
    body = json.dumps({"inputs": [
        {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        {"name": "turns", "shape": [1], "datatype": "INT64", "data": [turns]}]})
    started = time.monotonic()
    conn.request("POST", "/v2/models/spin/infer", body, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200, reply.read()
    reply.read()
    return time.monotonic() - started


def test_a_blocked_event_loop_stops_the_watchdog_pings(site: Site, keyset: KeySet, start_daemon,
                                                       notify: NotifySocket) -> None:
    site.install(pack_model(keyset, build_spin_model(), name="spin"))
    site.models = [{"name": "spin", "runtime": "onnxruntime", "threads": 1, "inline_max_ms": 10}]
    daemon = start_daemon(site.write_config(), env=watched(notify))
    notify.wait_for("READY", "1")
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
    try:
        for _ in range(4):  # measured cheap: from the second on, this client's runs go on the loop
            spin(conn, 1)
        turns, took = 1, 0.0
        while took < 20 * INTERVAL_S and turns < 1 << 32:  # grow the count until a run outlasts twenty pings
            turns *= 8
            began = time.monotonic()
            took = spin(conn, turns)
    finally:
        conn.close()
    pings = [d.at for d in notify.got if "WATCHDOG" in d.fields and began <= d.at <= began + took]
    edges = [began, *pings, began + took]
    silence = max(b - a for a, b in zip(edges, edges[1:]))
    assert silence >= 0.7 * took, (silence, took, len(pings))  # the pings stopped while the loop was held
    resumed = notify.wait_count("WATCHDOG", 5, after=len(notify.got))  # and came back once it was free
    assert notify.got[resumed].at > began + took
    assert daemon.stop() == 0
