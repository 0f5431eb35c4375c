"""Overload on a real daemon with a deliberately slow model (one worker, no batching), as docs/overload.md describes
it: a burst far past capacity gets fast 503s with ``Retry-After``, every accepted request answers correctly, and the
daemon's RSS (from /proc) stays under a stated bound; a request whose deadline cannot be met is refused before it
waits (over MQTT, which holds the broker back instead, it gets an error reply). Behaviour, not speed: the bounds
are relative to what the model's own runs cost on this machine."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from httpclient import Reply, infer, request
from mqttclient import Broker, Requester
from support.accepted import accepted, wait_until
from support.daemon import served_daemon
from support.models import build_slow_model, rows_for
from support.mqtt import PREFIX

from adapters import SessionOptions, get_runtime
from daemon.app import Daemon
from daemon.config import load_config

N, DEPTH = 1024, 24
#: one request's run on the single worker: long enough that a burst of CLIENTS is far past what it can serve
RUN_S = 0.15
CLIENTS = 64
#: the most the daemon's peak RSS may grow over the burst. Were every request queued, their tensors alone would take
#: CLIENTS x rows x N x 4 bytes (64 MB and more at RUN_S's rows here); admission keeps about two of them.
RSS_BOUND_KB = 32 * 1024


@dataclass
class Timed:
    reply: Reply
    seconds: float


@pytest.fixture(scope="module")
def model() -> bytes:
    return build_slow_model(n=N, depth=DEPTH)


@pytest.fixture(scope="module")
def sized(model: bytes) -> tuple[int, float]:
    """Rows per request and what their run costs here (at least RUN_S)."""
    return rows_for(RUN_S, model, N)


@pytest.fixture(scope="module")
def rows(sized: tuple[int, float]) -> int:
    return sized[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, model: bytes) -> Iterator[DaemonProcess]:
    site = Site(tmp_path_factory.mktemp("overload") / "site", keyset)
    site.install(pack_model(keyset, model, name="slow"))
    site.models = [{"name": "slow", "runtime": "onnxruntime", "threads": 1, "workers": 1, "max_batch_size": 0}]
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def body_of(x: np.ndarray, **parameters: object) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True, **parameters}}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def output_of(reply: Reply, shape: tuple[int, ...]) -> np.ndarray:
    length = int(reply.headers["inference-header-content-length"])
    return np.frombuffer(reply.body[length:], np.float32).reshape(shape)


def timed_infer(url: str, x: np.ndarray, **parameters: object) -> Timed:
    body, headers = body_of(x, **parameters)
    started = time.perf_counter()
    reply = infer(url, "slow", body, headers=headers, timeout=120)
    return Timed(reply, time.perf_counter() - started)


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def refusals(daemon: DaemonProcess) -> dict[str, float]:
    text = request(daemon.url + "/metrics").body.decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('inferd_refusals_total{model="slow"'):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = float(line.rsplit(" ", 1)[1])
    return found


def test_a_burst_far_past_capacity_gets_fast_503s_and_every_accepted_request_is_answered_right(
        served: DaemonProcess, model: bytes, sized: tuple[int, float]) -> None:
    rows, cost = sized
    url = served.url
    for _ in range(2):  # the scheduler measures what a run costs before it predicts anything
        assert timed_infer(url, np.full((rows, N), 0.001, np.float32)).reply.status == 200
    rng = np.random.default_rng(16)
    xs = [rng.normal(size=(rows, N)).astype(np.float32) for _ in range(CLIENTS)]
    pid = served.proc.pid
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS: the burst's peak is read afterwards
        peak_field = "VmHWM"
    except OSError:  # a kernel or sandbox without it: the RSS right after the burst, a weaker bound
        peak_field = "VmRSS"
    rss_before = status_kb(pid, "VmRSS")
    before = refusals(served)
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda x: timed_infer(url, x), xs))
    peak = status_kb(pid, peak_field)

    ok = [(x, r) for x, r in zip(xs, results) if r.reply.status == 200]
    refused = [r for r in results if r.reply.status == 503]
    assert len(ok) + len(refused) == CLIENTS and ok
    assert len(refused) >= CLIENTS // 2, f"only {len(refused)} of {CLIENTS} refused: the burst was queued"
    session = get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1))
    try:
        for x, r in ok:
            np.testing.assert_allclose(output_of(r.reply, x.shape), session.run({"input": x})["output"],
                                       rtol=1e-4, atol=1e-5)
    finally:
        session.close()
    for r in refused:
        retry = r.reply.headers["retry-after"]
        assert retry.isdigit() and int(retry) >= 1, retry  # RFC 9110 delay-seconds
        assert "retry" in r.reply.json()["error"]
    # fast: refused at once, not after the work queued ahead of them (the accepted ones waited runs long); what a
    # refusal does take here is the transport's: the daemon reads every refused body too (64 of ~1 MB at once)
    assert statistics.median(r.seconds for r in refused) < cost
    assert max(r.seconds for r in refused) < max(r.seconds for _, r in ok)
    after = refusals(served)
    assert sum(after.values()) - sum(before.values()) == len(refused)
    assert after.get("wait", 0) > before.get("wait", 0)  # by predicted wait, long before queue_size (256)
    assert peak - rss_before < RSS_BOUND_KB, (peak, rss_before)


def test_a_request_whose_deadline_cannot_be_met_is_refused_before_it_waits(served: DaemonProcess, rows: int) -> None:
    url = served.url
    long = np.full((rows * 8, N), 0.001, np.float32)  # about 8 x RUN_S of work
    assert timed_infer(url, long).reply.status == 200  # measured once
    with ThreadPoolExecutor(1) as pool:
        before = accepted(served)
        running = pool.submit(timed_infer, url, long)
        wait_until(lambda: accepted(served) > before, 60, "the long request accepted")
        wait_before = refusals(served).get("wait", 0)
        short = timed_infer(url, np.full((rows, N), 0.002, np.float32), timeout_ms=RUN_S * 1000)
        assert running.result().reply.status == 200
    assert short.reply.status == 503, short.reply.body
    assert "predicted wait" in short.reply.json()["error"] and "deadline (150 ms)" in short.reply.json()["error"]
    assert int(short.reply.headers["retry-after"]) >= 1
    assert short.seconds < running.result().seconds / 2  # answered at once, not after the long run ahead of it
    assert refusals(served).get("wait", 0) == wait_before + 1


def test_mqtt_holds_back_and_answers_a_refusal_with_an_error_reply(site: Site, keyset: KeySet, model: bytes,
                                                                    rows: int, broker: Broker, start_daemon) -> None:
    """MQTT is not refused for a busy queue (the broker is held back), but a request whose own timeout cannot be met
    still gets an answer: an error reply, status 503, its id and correlation echoed."""
    site.install(pack_model(keyset, model, name="slow"))
    site.models = [{"name": "slow", "runtime": "onnxruntime", "threads": 1, "workers": 1, "max_batch_size": 0}]
    site.extra = {"mqtt": {"enabled": True, "port": broker.port, "topic_prefix": PREFIX, "client_id": "inferd-ovl"}}
    daemon = start_daemon(site.write_config())
    daemon.wait_for("mqtt_connected")
    long = np.full((rows * 8, N), 0.001, np.float32)
    assert timed_infer(daemon.url, long).reply.status == 200  # measured once
    req = Requester(broker.port)
    try:
        with ThreadPoolExecutor(1) as pool:
            before = accepted(daemon)
            running = pool.submit(timed_infer, daemon.url, long)
            wait_until(lambda: accepted(daemon) > before, 60, "the long request accepted")
            x = np.full((1, N), 0.002, np.float32)
            body = json.dumps({"id": "late", "inputs": [{"name": "input", "shape": [1, N], "datatype": "FP32",
                                                         "data": x.ravel().tolist()}],
                               "parameters": {"timeout_ms": RUN_S * 1000}}).encode()
            req.request(f"{PREFIX}/models/slow/infer", body, correlation=b"c1")
            reply = req.wait(60)
            assert not running.done()  # answered while the long run still went on, not after it
            assert running.result().reply.status == 200
        assert reply.status == "503" and reply.correlation == b"c1"
        doc = json.loads(reply.payload)
        assert doc["id"] == "late" and "predicted wait" in doc["error"]
        assert refusals(daemon).get("wait", 0) >= 1
    finally:
        req.close()
    assert daemon.stop() == 0


def test_a_queued_json_request_holds_its_tensor_not_its_body(site: Site, keyset: KeySet, model: bytes,
                                                             sized: tuple[int, float]) -> None:
    """JSON requests queued behind a long run, in an in-process daemon traced by tracemalloc: none of them keeps its
    body (aiohttp's ``read()`` would keep each on its request object). RSS cannot show it: the heap's fragmentation
    after freeing bodies is about their size too (docs/overload.md)."""
    rows, cost = sized
    site.install(pack_model(keyset, model, name="slow"))
    site.models = [{"name": "slow", "runtime": "onnxruntime", "threads": 1, "workers": 1, "max_batch_size": 0,
                    "max_queue_wait_ms": 600_000}]
    daemon = Daemon(load_config(site.write_config()))
    x = np.random.default_rng(5).normal(size=(16, N)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    long = np.full((min(4096, rows * max(2, int(4 / cost))), N), 0.001, np.float32)  # seconds of work ahead
    long_body, long_headers = body_of(long)
    n = 8

    def http(payload: bytes, headers: dict[str, str]) -> bytes:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n{head}"
                "\r\n").encode() + payload

    async def answer(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        return head.split(b"\r\n", 1)[0]

    async def scenario() -> tuple[int, list[bytes]]:
        task = asyncio.create_task(daemon.run())
        while daemon.manager is None or daemon.manager.entries["slow"].status != "ready":
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        active = daemon.manager.entries["slow"].active
        assert active is not None
        scheduler = active.scheduler
        port = daemon.frontends[0].port  # type: ignore[attr-defined]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n + 1)]
        loop = asyncio.get_running_loop()
        conns[0][1].write(http(long_body, long_headers))
        deadline = loop.time() + 60
        while scheduler.queue_depth or active.stats.in_flight == 0:  # decoded and submitted: the long one runs
            assert loop.time() < deadline, "the long request never ran"
            await asyncio.sleep(0.005)
        tracemalloc.start()
        try:
            for _, writer in conns[1:]:
                writer.write(http(body, {"Content-Type": "application/json"}))
            while scheduler.queue_depth < n:  # all of them decoded and queued behind it
                if not (loop.time() < deadline and daemon.activity.in_progress):
                    early = [await answer(reader) for reader, _ in conns]
                    raise AssertionError(f"the JSON requests never queued: {early}")
                await asyncio.sleep(0.005)
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # blocks the size of a JSON body still alive (a bytes object of len(body) is one block a little larger)
        bodies = sum(1 for t in snapshot.traces if len(body) <= t.size < len(body) + 4096)
        statuses = [await answer(reader) for reader, _ in conns]
        for _, writer in conns:
            writer.close()
        daemon.request_stop("test")
        await asyncio.wait_for(task, 60)
        return bodies, statuses

    bodies, statuses = asyncio.run(scenario())
    assert statuses == [b"HTTP/1.1 200 OK"] * (n + 1)
    assert bodies == 0, f"{bodies} JSON bodies of {n} queued requests are still alive"
