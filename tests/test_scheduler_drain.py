"""Retiring a scheduler: drain finishes what was accepted and refuses what is new; close is the immediate form.

Real ONNX Runtime sessions; a gate (tests/support/gates.py) holds the busy run, so "still running when the drain
began" is a fact of the test, not a timing guess."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from conftest import mlp_reference
from support.gates import GatedSession

from adapters import SessionOptions, get_runtime
from daemon.errors import InferenceFailed, NotReady
from daemon.metrics import VersionStats
from daemon.scheduler import BatchPolicy, Scheduler


def _rows(i: int, n: int = 1) -> np.ndarray:
    return np.full((n, 4), i / 10, np.float32)


def _threads(label: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"infer-{label}-")]


async def _with(model: bytes, policy: BatchPolicy, label: str,
                scenario: Callable[[Scheduler, GatedSession], Awaitable[Any]], workers: int = 1) -> Any:
    gated = GatedSession(get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1)))
    sched = Scheduler(gated, workers, policy, VersionStats("m", "1"), label)  # type: ignore[arg-type]
    sched.start()
    assert len(_threads(label)) == workers
    try:
        return await scenario(sched, gated)
    finally:
        gated.gate.set()
        await sched.close()
        gated.close()


async def _until_running(gated: GatedSession) -> None:
    assert await asyncio.to_thread(gated.wait_running)


async def _turns(n: int = 5) -> None:
    """Let every ready task take its next steps (each is one await away from where this test needs it)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_drain_finishes_running_queued_and_waiting_work_and_refuses_new_work(mlp_onnx: bytes) -> None:
    async def scenario(sched: Scheduler, gated: GatedSession) -> None:
        running = asyncio.ensure_future(sched.submit({"input": _rows(1)}))
        await _until_running(gated)
        queued = [asyncio.ensure_future(sched.submit({"input": _rows(i, i)})) for i in (2, 3)]  # the queue is full

        async def backpressured() -> dict[str, np.ndarray]:  # what MQTT does: wait for room, then submit
            await sched.wait_for_room()
            await body_read.wait()  # reading its body: it submits after everything else has finished
            return await sched.submit({"input": _rows(4)})

        body_read = asyncio.Event()

        waiting = asyncio.ensure_future(backpressured())
        await _turns()
        assert not waiting.done() and sched.queue_depth == 2  # it waits for room

        drain = asyncio.ensure_future(sched.drain(30))
        await _turns()
        with pytest.raises(NotReady, match="model 'm' version '1' is being retired"):
            await sched.submit({"input": _rows(5)})
        with pytest.raises(NotReady, match="being retired"):
            await sched.wait_for_room()
        assert not drain.done() and len(_threads("drain")) == 1  # the accepted work is still there

        gated.gate.set()
        await asyncio.wait(queued)
        await _turns(10)
        assert not drain.done()  # the caller admitted before the drain has not submitted yet
        body_read.set()
        await drain
        for i, job in zip((1, 2, 3, 4), [running, *queued, waiting]):
            np.testing.assert_allclose(job.result()["output"], mlp_reference(_rows(i, i if i in (2, 3) else 1)),
                                       rtol=1e-5, atol=1e-5)
        assert gated.runs == [1, 2, 3, 1]  # every accepted request ran, the refused one did not
        assert _threads("drain") == []
        with pytest.raises(NotReady):
            await sched.submit({"input": _rows(6)})

    asyncio.run(_with(mlp_onnx, BatchPolicy(max_batch_size=0, queue_size=2), "drain", scenario))


def test_a_batch_held_open_for_company_goes_at_once_when_the_drain_begins(mlp_onnx: bytes) -> None:
    async def scenario(sched: Scheduler, gated: GatedSession) -> None:
        gated.gate.set()
        held = asyncio.ensure_future(sched.submit({"input": _rows(7, 2)}))
        await _turns()
        assert not held.done() and gated.runs == []  # held for company for up to a minute
        await sched.drain(30)  # would fail it after 30 s if it stayed held
        np.testing.assert_allclose(held.result()["output"], mlp_reference(_rows(7, 2)), rtol=1e-5, atol=1e-5)
        assert gated.runs == [2] and _threads("held") == []

    asyncio.run(_with(mlp_onnx, BatchPolicy(max_batch_size=8, max_queue_delay_s=60.0), "held", scenario))


def test_a_drain_that_times_out_fails_what_is_queued_and_lets_the_running_run_finish(mlp_onnx: bytes) -> None:
    async def scenario(sched: Scheduler, gated: GatedSession) -> None:
        running = asyncio.ensure_future(sched.submit({"input": _rows(1)}))
        await _until_running(gated)
        queued = asyncio.ensure_future(sched.submit({"input": _rows(2)}))

        async def backpressured() -> None:
            await sched.wait_for_room()

        waiting = asyncio.ensure_future(backpressured())
        await _turns()
        drain = asyncio.ensure_future(sched.drain(0.05))
        with pytest.raises(InferenceFailed, match="unloaded before this request ran"):
            await queued  # failed when the drain's time ran out
        with pytest.raises(InferenceFailed, match="unloaded before this request ran"):
            await waiting
        await _turns()
        assert not drain.done() and not running.done()  # the drain now waits for the run it cannot interrupt
        gated.gate.set()
        await drain
        np.testing.assert_allclose(running.result()["output"], mlp_reference(_rows(1)), rtol=1e-5, atol=1e-5)
        assert gated.runs == [1] and _threads("late") == []

    asyncio.run(_with(mlp_onnx, BatchPolicy(max_batch_size=0, queue_size=1), "late", scenario))


def test_a_caller_that_waited_for_room_and_never_submits_does_not_hold_the_drain(mlp_onnx: bytes) -> None:
    async def scenario(sched: Scheduler, gated: GatedSession) -> None:
        running = asyncio.ensure_future(sched.submit({"input": _rows(1)}))
        await _until_running(gated)
        queued = asyncio.ensure_future(sched.submit({"input": _rows(2)}))

        async def bad_body() -> None:  # waits for room, then its body fails to decode: it never submits
            await sched.wait_for_room()

        waiting = asyncio.ensure_future(bad_body())
        await _turns()
        drain = asyncio.ensure_future(sched.drain(30))
        await _turns()
        gated.gate.set()
        await drain
        await waiting
        assert running.done() and queued.done() and gated.runs == [1, 1]

    asyncio.run(_with(mlp_onnx, BatchPolicy(max_batch_size=0, queue_size=1), "nosubmit", scenario))


def test_close_is_immediate_and_an_idle_drain_returns_at_once(mlp_onnx: bytes) -> None:
    async def scenario(sched: Scheduler, gated: GatedSession) -> None:
        gated.gate.set()
        assert (await sched.submit({"input": _rows(3)}))["output"].shape == (1, 3)
        await asyncio.wait_for(sched.drain(3600), 10)  # nothing accepted is left: no waiting out the timeout
        assert _threads("idle") == []
        await sched.close()  # a second stop is harmless
        with pytest.raises(NotReady):
            await sched.submit({"input": _rows(3)})

    asyncio.run(_with(mlp_onnx, BatchPolicy(), "idle", scenario, workers=2))
