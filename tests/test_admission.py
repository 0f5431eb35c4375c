"""Admission in-process, on real ONNX Runtime sessions: the predicted wait from measured runs, refusal by deadline,
by bytes (per model and process-wide) and by count, the retry hint, MQTT's holding back, and memory returned to the
system after a burst. The daemon-level behaviour (HTTP 503 + Retry-After, RSS) is tests/test_overload.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import REPO, mlp_reference
from support.gates import GatedSession

from adapters import SessionOptions, get_runtime
from daemon import memory as queue_memory
from daemon.admission import LOOP, MIN_QUEUE_WAIT_S, QUEUE_WAIT_BATCHES, Overloaded
from daemon.config import OnnxModelConfig, ServerConfig
from daemon.estimator import ServiceTimes
from daemon.metrics import VersionStats
from daemon.scheduler import BatchPolicy, Scheduler

X = np.ones((1, 4), np.float32)


def gated(model: bytes) -> GatedSession:
    return GatedSession(get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1)))


def run(session: Any, policy: BatchPolicy, scenario: Callable[[Scheduler, VersionStats], Awaitable[Any]],
        memory: queue_memory.QueueMemory | None = None, workers: int = 1) -> Any:
    async def main() -> Any:
        stats = VersionStats("m", "1")
        sched = Scheduler(session, workers, policy, stats, "m", memory or queue_memory.QueueMemory(1 << 40))
        sched.start()
        try:
            return await scenario(sched, stats)
        finally:
            session.gate.set()
            await sched.close()

    return asyncio.run(main())


async def measured(sched: Scheduler, session: GatedSession, feed: dict[str, np.ndarray], seconds: float) -> None:
    """One run of ``feed`` that takes ``seconds`` (its gate held that long: a deliberately slow run, not a wait for
    something to happen), so the scheduler's own measurement says that is what such runs cost."""
    task = asyncio.ensure_future(sched.submit(feed))
    assert await asyncio.to_thread(session.wait_running)
    await asyncio.sleep(seconds)
    session.gate.set()
    await task
    session.gate.clear()


async def occupy(sched: Scheduler, session: GatedSession, feed: dict[str, np.ndarray], n: int) -> list[asyncio.Task]:
    """One run held busy on the worker and ``n - 1`` requests queued behind it."""
    tasks = [asyncio.ensure_future(sched.submit(feed))]
    assert await asyncio.to_thread(session.wait_running)
    tasks += [asyncio.ensure_future(sched.submit(feed)) for _ in range(n - 1)]
    await asyncio.sleep(0)  # they reach the queue
    return tasks


def test_service_times_follow_the_runs_and_borrow_the_nearest_class() -> None:
    times = ServiceTimes()
    shapes = ((4,),)
    assert times.per_row(shapes, 8) is None  # nothing measured: nothing predicted
    times.note((1, (4,)), 1, 0.010)
    assert times.per_row(shapes, 8) == 0.010  # the only class of these shapes stands in for 8 rows
    times.note((5, (4,)), 16, 0.016)
    assert times.per_row(shapes, 16) == pytest.approx(0.001)
    assert times.per_row(shapes, 12) == pytest.approx(0.001)  # bucket 4 borrows bucket 5 (nearest)
    assert times.per_row(((8,),), 1) is None  # other per-row shapes are another model of cost
    for _ in range(40):
        times.note((5, (4,)), 16, 0.032)  # the model slowed down (contention): the average follows
    assert times.per_row(shapes, 16) == pytest.approx(0.002, rel=0.01)


def test_the_predicted_wait_counts_the_run_in_progress_and_the_rows_queued(mlp_onnx: bytes) -> None:
    session = gated(mlp_onnx)

    async def scenario(sched: Scheduler, stats: VersionStats) -> None:
        assert sched.predicted_wait() is None  # nothing measured yet
        await measured(sched, session, {"input": X}, 0.2)
        assert sched.predicted_wait() == 0.0  # an idle worker, an empty queue
        tasks = await occupy(sched, session, {"input": X}, 4)
        wait = sched.predicted_wait()
        assert wait is not None and 0.6 <= wait <= 0.8 + 0.2  # the rest of the run, then three more of 0.2 s
        session.gate.set()
        assert [(await t)["output"].shape for t in tasks] == [(1, 3)] * 4

    run(session, BatchPolicy(max_batch_size=0, queue_size=64, max_queue_wait_s=10.0), scenario)


def test_a_request_whose_deadline_cannot_be_met_is_refused_before_it_waits(mlp_onnx: bytes) -> None:
    session = gated(mlp_onnx)

    async def scenario(sched: Scheduler, stats: VersionStats) -> None:
        await measured(sched, session, {"input": X}, 0.5)
        busy = await occupy(sched, session, {"input": X}, 1)
        runs = len(session.runs)
        with pytest.raises(Overloaded) as refused:
            await sched.submit({"input": X}, timeout_s=0.1)  # half a second of run left ahead of it
        assert refused.value.reason == "wait" and refused.value.code == "busy"
        assert 0.1 < refused.value.retry_after_s <= 0.5 + 0.2  # the predicted drain time: the rest of the busy run
        assert "predicted wait in the queue" in str(refused.value) and "deadline (100 ms)" in str(refused.value)
        assert sched.queue_depth == 0 and len(session.runs) == runs  # it never queued, never ran
        assert stats.refusals == {"wait": 1}
        waits = asyncio.ensure_future(sched.submit({"input": X + 1}, timeout_s=5.0))  # a deadline it can meet
        await asyncio.sleep(0)
        assert sched.queue_depth == 1
        session.gate.set()
        np.testing.assert_allclose((await waits)["output"], mlp_reference(X + 1), rtol=1e-5, atol=1e-6)
        await busy[0]

    run(session, BatchPolicy(max_batch_size=0, queue_size=64), scenario)


def test_the_default_deadline_is_one_and_a_half_full_batches_and_caps_long_timeouts(mlp_onnx: bytes) -> None:
    session = gated(mlp_onnx)
    full = {"input": np.ones((8, 4), np.float32)}

    async def scenario(sched: Scheduler, stats: VersionStats) -> None:
        await measured(sched, session, full, 0.08)  # a full batch (8 rows) takes 80 ms: 10 ms a row
        admission = sched._admission
        assert admission.default_wait(1, ((4,),)) == pytest.approx(QUEUE_WAIT_BATCHES * 0.08, rel=0.5)
        tasks = await occupy(sched, session, full, 2)  # 80 ms running, 8 rows (80 ms) queued
        # the rest of the run and the 8 rows ahead: 160 ms, more than 1.5 batches (120 ms); refused at once
        with pytest.raises(Overloaded) as refused:
            await sched.submit({"input": np.ones((6, 4), np.float32)}, timeout_s=60.0)  # its long timeout is capped
        assert refused.value.reason == "wait"
        session.gate.set()
        await asyncio.gather(*tasks)

    run(session, BatchPolicy(max_batch_size=8, queue_size=64), scenario)
    assert MIN_QUEUE_WAIT_S == 0.05  # what docs/overload.md says


def test_byte_bounds_refuse_per_model_and_process_wide_but_never_an_empty_queue(mlp_onnx: bytes) -> None:
    session = gated(mlp_onnx)
    big = {"input": np.ones((256, 4), np.float32)}  # 4 KiB of tensor
    memory = queue_memory.QueueMemory(10_000)

    async def scenario(sched: Scheduler, stats: VersionStats) -> None:
        tasks = await occupy(sched, session, big, 2)  # one running (not counted), one queued: 4 KiB
        assert memory.queued == 4096
        with pytest.raises(Overloaded) as refused:
            await sched.submit(big)  # 8 KiB > queue_max_bytes 6000
        assert refused.value.reason == "queue_bytes" and "4096 bytes of tensors queued" in str(refused.value)
        assert refused.value.retry_after_s == 1.0  # nothing measured to predict from
        tasks.append(asyncio.ensure_future(sched.submit({"input": np.ones((1, 4), np.float32)})))  # 16 bytes fit
        await asyncio.sleep(0)
        assert memory.queued == 4096 + 16
        memory.limit = 4096  # the process budget shrinks below what is queued (another model's share, say)
        with pytest.raises(Overloaded) as refused:
            await sched.submit({"input": np.ones((1, 4), np.float32)})
        assert refused.value.reason == "memory"
        assert stats.refusals == {"queue_bytes": 1, "memory": 1}
        session.gate.set()
        await asyncio.gather(*tasks)
        assert memory.queued == 0 and sched.queue_depth == 0
        memory.limit = 16
        assert (await sched.submit(big))["output"].shape == (256, 3)  # alone in the queues: always admitted

    run(session, BatchPolicy(max_batch_size=0, queue_size=64, queue_max_bytes=6000), scenario, memory)


def test_queue_size_stays_a_hard_cap_and_mqtt_waits_are_held_back_not_refused(mlp_onnx: bytes) -> None:
    session = gated(mlp_onnx)

    async def scenario(sched: Scheduler, stats: VersionStats) -> None:
        await measured(sched, session, {"input": X}, 0.001)
        tasks = await occupy(sched, session, {"input": X}, 3)  # one runs, two wait: queue_size 2
        with pytest.raises(Overloaded) as refused:
            await sched.submit({"input": X})
        assert refused.value.reason == "queue_full" and "queue full" in str(refused.value)

        async def mqtt_like(i: int) -> np.ndarray:
            await sched.wait_for_room()  # held back (the broker stops at Receive Maximum meanwhile)
            return (await sched.submit({"input": X * i}))["output"]

        held = [asyncio.ensure_future(mqtt_like(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in held)
        session.gate.set()
        outs = await asyncio.gather(*held)  # each admitted in turn, none refused
        for i, out in enumerate(outs):
            np.testing.assert_allclose(out, mlp_reference(X * i), rtol=1e-5, atol=1e-6)
        await asyncio.gather(*tasks)
        assert stats.refusals == {"queue_full": 1}

    run(session, BatchPolicy(max_batch_size=0, queue_size=2), scenario)


def test_requests_on_their_way_count_for_every_model_until_they_submit_or_end(mlp_onnx: bytes) -> None:
    """Admitted before its body is read, a request is owed the loop's decoding: every model's predicted wait counts
    it (the loop is one) until it submits, or its task ends without submitting (a bad body, a client gone)."""
    load = get_runtime("onnxruntime").load

    async def main() -> None:
        a, b = (Scheduler(load({"m.onnx": mlp_onnx}, SessionOptions(threads=1)), 1,
                          BatchPolicy(max_batch_size=0, max_queue_wait_s=wait), VersionStats(name, "1"), name,
                          queue_memory.QueueMemory(1 << 40)) for name, wait in (("a", 10.0), ("b", None)))
        a.start()
        b.start()
        try:
            await a.submit({"input": X}, decoded_s=0.02)  # a's requests cost the loop 20 ms to decode
            await b.submit({"input": X})
            assert b.predicted_wait() == 0.0
            gate = asyncio.Event()

            async def on_its_way() -> None:
                assert a.refusal() is None  # admitted; its body is still being read
                await gate.wait()

            waiting = [asyncio.ensure_future(on_its_way()) for _ in range(5)]
            await asyncio.sleep(0)
            assert b.predicted_wait() == pytest.approx(5 * 0.02)  # model b waits for the loop too (past 50 ms)
            # ... but not a request already decoded (they queue behind it), nor MQTT's waiting for room, which only
            # the queue's own changes wake
            assert b.has_room()
            assert (await b.submit({"input": X}, timeout_s=0.05))["output"].shape == (1, 3)
            gate.set()
            await asyncio.gather(*waiting)  # they ended without submitting
            assert b.predicted_wait() == 0.0 and LOOP.requests == 0

            async def submits() -> np.ndarray:
                assert a.refusal() is None
                assert LOOP.requests == 1
                return (await a.submit({"input": X + 2}, decoded_s=0.01))["output"]

            np.testing.assert_allclose(await submits(), mlp_reference(X + 2), rtol=1e-5, atol=1e-6)
            assert LOOP.requests == 0 and LOOP.seconds == 0.0
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_memory_is_returned_to_the_system_once_a_burst_has_drained(mlp_onnx: bytes) -> None:
    session = gated(mlp_onnx)
    memory = queue_memory.QueueMemory(1 << 40, delay_s=0.2)
    if memory._trim is None:
        pytest.skip("no glibc malloc_trim here")
    chunk = {"input": np.ones((1 << 19, 4), np.float32)}  # 8 MiB each: five pass TRIM_AFTER_BYTES

    async def scenario(sched: Scheduler, stats: VersionStats) -> None:
        assert 5 * chunk["input"].nbytes > queue_memory.TRIM_AFTER_BYTES
        tasks = await occupy(sched, session, chunk, 5)
        assert memory.trims == 0  # not while the queue holds work
        session.gate.set()
        await asyncio.gather(*tasks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while memory.trims == 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert memory.trims == 1
        await sched.submit({"input": X})  # a small request after it: no new trim (little went through the queues)
        await asyncio.sleep(0.2 * 3)
        assert memory.trims == 1

    run(session, BatchPolicy(max_batch_size=0, queue_size=64, queue_max_bytes=1 << 30), scenario, memory)


def test_the_new_keys_have_their_defaults_in_one_place_and_the_example_mirrors_them() -> None:
    example = yaml.safe_load((REPO / "config.example.yaml").read_text())
    model = OnnxModelConfig.model_fields
    assert example["models"][0]["max_queue_wait_ms"] == model["max_queue_wait_ms"].default is None
    assert example["models"][0]["queue_max_bytes"] == model["queue_max_bytes"].default == BatchPolicy().queue_max_bytes
    server = ServerConfig.model_fields["queue_max_bytes"].default
    assert example["server"]["queue_max_bytes"] == server == queue_memory.PROCESS.limit
    assert BatchPolicy().max_queue_wait_s is None
    assert BatchPolicy.from_config(OnnxModelConfig(name="m", runtime="onnxruntime", max_queue_wait_ms=250,
                                                   queue_max_bytes=4096)) == BatchPolicy(max_queue_wait_s=0.25,
                                                                                         queue_max_bytes=4096)
