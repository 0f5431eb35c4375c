"""The collector in-process: the queue-depth gauge comes from the schedulers' own count, not from the stats."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.gates import GatedSession

from adapters import SessionOptions, get_runtime
from daemon.metrics import InferdCollector, VersionStats, make_registry
from daemon.scheduler import BatchPolicy, Scheduler


def scrape(collector: InferdCollector) -> dict[str, dict[tuple[str, ...], float]]:
    text = generate_latest(make_registry(collector).inferd).decode()
    return {f.name: {tuple(s.labels.values()): s.value for s in f.samples} for f in text_string_to_metric_families(text)}


def test_the_queue_depth_gauge_reads_each_schedulers_waiting_requests(mlp_onnx: bytes) -> None:
    gated = GatedSession(get_runtime("onnxruntime").load({"m.onnx": mlp_onnx}, SessionOptions(threads=1)))
    stats = VersionStats("m", "1")
    sched = Scheduler(gated, 1, BatchPolicy(max_batch_size=0), stats, "m")  # type: ignore[arg-type]
    collector = InferdCollector(lambda: [stats], lambda: [], lambda: [],
                                queues=lambda: [("m", "1", sched.queue_depth), ("other", "7", 0)])

    async def depth() -> float:  # a scrape reads /proc files: in a thread, off the guarded loop
        return (await asyncio.to_thread(scrape, collector))["inferd_queue_depth"][("m", "1")]

    async def scenario() -> list[float]:
        sched.start()
        depths = [await depth()]
        try:
            jobs = [asyncio.ensure_future(sched.submit({"input": np.ones((1, 4), np.float32)})) for _ in range(3)]
            assert await asyncio.to_thread(gated.wait_running)  # one runs (held), two wait
            depths.append(await depth())
            gated.gate.set()
            await asyncio.gather(*jobs)
            depths.append(await depth())
        finally:
            gated.gate.set()
            await sched.close()
        return depths

    assert asyncio.run(scenario()) == [0, 2, 0]
    families = scrape(collector)
    assert families["inferd_queue_depth"][("other", "7")] == 0
    assert families["inferd_executions"][("m", "1", "worker")] == 3


def test_without_a_queue_source_the_gauge_is_declared_and_empty() -> None:
    stats = VersionStats("m", "1")
    families = scrape(InferdCollector(lambda: [stats], lambda: [], lambda: []))
    assert families["inferd_queue_depth"] == {}
    assert families["inferd_in_flight"] == {("m", "1"): 0}
