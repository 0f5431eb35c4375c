"""The daemon in-process: wiring, readiness from one aggregator, supervision of frontends, orderly shutdown.

Subprocess tests (test_serve) prove the same from outside; these reach what a subprocess cannot observe: the
Supervisor restarting a frontend whose run() raises, and Readiness reporting it meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from conftest import Site, mlp_reference, pack_model
from httpclient import infer, request

from daemon import supervise
from daemon.app import Daemon
from daemon.config import load_config
from daemon.frontend import Health, Readiness
from daemon.supervise import Supervisor


class FlakyFrontend:
    """A frontend whose run() fails a given number of times: the supervisor's own contract, nothing mocked below."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.starts = 0
        self.stops = 0
        self.running = asyncio.Event()
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        self.starts += 1
        self._stopped.clear()

    async def run(self) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("unexpected")
        self.running.set()
        await self._stopped.wait()

    async def stop(self, budget: float) -> None:
        self.stops += 1
        self._stopped.set()

    def health(self) -> Health:
        return Health("up", True)


def test_a_crashed_frontend_makes_the_daemon_unready_and_is_restarted(monkeypatch: Any) -> None:
    monkeypatch.setattr(supervise, "RESTART_MIN_S", 0.01)

    async def scenario() -> tuple[list[list[str]], FlakyFrontend, dict[str, int]]:
        readiness = Readiness(lambda: [])
        flaky = FlakyFrontend(failures=2)
        readiness.add(flaky)
        seen: list[list[str]] = []
        original = readiness.crashed

        def crashed(name: str, why: str) -> None:
            original(name, why)
            seen.append(readiness.reasons())

        readiness.crashed = crashed  # type: ignore[method-assign]
        supervisor = Supervisor(readiness)
        await flaky.start()
        supervisor.frontend(flaky)
        await asyncio.wait_for(flaky.running.wait(), 10)
        assert readiness.reasons() == []  # recovered
        await flaky.stop(0)
        await supervisor.close()
        return seen, flaky, supervisor.restarts

    seen, flaky, restarts = asyncio.run(scenario())
    assert seen[0] == ["flaky: crashed (RuntimeError: unexpected); restarting"]
    assert len(seen) == 2 and restarts == {"flaky": 2}
    assert flaky.starts == 3 and flaky.stops >= 2  # stopped (to release what it held) before each restart


def test_the_daemon_in_process_serves_reports_readiness_and_drains(site: Site, mlp_onnx: bytes) -> None:
    site.install(pack_model(site.keyset, mlp_onnx, name="mlp"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}, {"name": "absent", "runtime": "onnxruntime"}]
    daemon = Daemon(load_config(site.write_config()))

    async def scenario() -> tuple[Any, Any, Any, Any]:
        task = asyncio.create_task(daemon.run())
        while not daemon.frontends or daemon.manager is None or daemon.manager.entries["mlp"].status != "ready":
            if task.done():
                task.result()  # run() ended before serving: its error, not a timeout
                raise AssertionError("the daemon stopped before its model was ready")
            await asyncio.sleep(0.01)
        http = daemon.frontends[0]
        url = f"http://127.0.0.1:{http.port}"  # type: ignore[attr-defined]
        x = np.ones((2, 4), np.float32)
        doc = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
        answer = await asyncio.to_thread(infer, url, "mlp", doc)
        ready = await asyncio.to_thread(request, url + "/v2/health/ready")
        scraped = await asyncio.to_thread(request, url + "/metrics")
        daemon.request_stop("test")
        await asyncio.wait_for(task, 30)
        return answer, ready, scraped, daemon.manager.entries["mlp"].status

    answer, ready, scraped, status = asyncio.run(scenario())
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(scraped.body.decode())}
    depth = [(s.labels, s.value) for s in families["inferd_queue_depth"].samples]
    assert depth == [({"model": "mlp", "version": "1"}, 0.0)]  # every loaded version, read from its scheduler
    assert answer.status == 200
    np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"]).reshape(2, 3),
                               mlp_reference(np.ones((2, 4), np.float32)), rtol=1e-5, atol=1e-6)
    assert ready.status == 503 and "absent: failed" in ready.json()["error"]
    assert status == "unloaded"  # shut down: models released


def test_a_swap_while_a_request_body_arrives_loses_nothing(site: Site, mlp_onnx: bytes) -> None:
    """HTTP routes a request before it reads the body: a version retired meanwhile hands it to its successor."""
    import json

    site.install(pack_model(site.keyset, mlp_onnx, name="mlp", version="1"))
    site.install(pack_model(site.keyset, mlp_onnx, name="mlp", version="2"), activate=False)
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    daemon = Daemon(load_config(site.write_config()))
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1.0, 2.0, 3.0, 4.0]}]}).encode()

    async def scenario() -> tuple[bytes, str]:
        task = asyncio.create_task(daemon.run())
        while daemon.manager is None or daemon.manager.entries["mlp"].status != "ready":
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = daemon.frontends[0].port  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        await writer.drain()
        while daemon.activity.in_progress == 0:  # routed to version 1, now waiting for the rest of its body
            await asyncio.sleep(0.001)
        await daemon.manager.swap("mlp", "2")
        writer.write(body[10:])
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        answer = await reader.readexactly(length)
        writer.close()
        await writer.wait_closed()
        version = json.loads(answer).get("model_version", "")
        daemon.request_stop("test")
        await asyncio.wait_for(task, 30)
        return head, version

    head, version = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 200"), head
    assert version == "2"
