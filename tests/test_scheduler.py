"""The scheduler in-process, with real ONNX Runtime sessions: batching is exact, bounded, shed, timed out, and
never blocks the event loop."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from conftest import mlp_reference
from support.contexts import lone
from support.gates import GatedSession
from support.models import build_slow_model

from adapters import SessionOptions, get_runtime
from daemon.batchqueue import batchable
from daemon.errors import Busy, Timeout
from daemon.metrics import VersionStats
from daemon.scheduler import BatchPolicy, Scheduler


def session(model: bytes):
    return get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1))


async def run_with(model: bytes, policy: BatchPolicy, workers: int, coro_factory):
    stats = VersionStats("m", "1")
    sched = Scheduler(session(model), workers, policy, stats, "m")
    sched.start()
    try:
        return await coro_factory(sched), stats
    finally:
        await sched.close()


def test_batched_results_equal_unbatched_for_mixed_sizes(mlp_onnx: bytes) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(int(rng.integers(1, 7)), 4)).astype(np.float32) for _ in range(60)]

    async def burst(sched: Scheduler) -> list[np.ndarray]:
        outs = await asyncio.gather(*(sched.submit({"input": x}) for x in xs))
        return [o["output"] for o in outs]

    batched, stats = asyncio.run(run_with(mlp_onnx, BatchPolicy(max_batch_size=16), 1, burst))
    unbatched, plain = asyncio.run(run_with(mlp_onnx, BatchPolicy(max_batch_size=0), 1, burst))
    for x, b, u in zip(xs, batched, unbatched):
        assert b.shape == (x.shape[0], 3)
        # ONNX Runtime's Gemm is not bit-exact across batch sizes (different kernels): float32 rounding only
        np.testing.assert_allclose(b, u, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b, mlp_reference(x), rtol=1e-5, atol=1e-5)
    assert max(stats.by_batch) <= 16  # batches respect max_batch_size
    assert stats.execution_count < len(xs)  # and batching really happened
    assert stats.inference_count == sum(x.shape[0] for x in xs)
    assert set(plain.by_batch) <= {1, 2, 3, 4, 5, 6} and plain.execution_count == len(xs)


def relu_rows_of_any_width() -> bytes:
    """Relu over [n, w] with both dims dynamic: rows of different widths cannot be concatenated, and a run costs
    what w says whatever n is."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_incompatible_shapes_are_never_mixed_in_one_batch() -> None:
    model = relu_rows_of_any_width()
    xs = [np.full((1, 2 + i % 3), i - 5, np.float32) for i in range(30)]

    async def burst(sched: Scheduler):
        return await asyncio.gather(*(sched.submit({"x": x}) for x in xs))

    outs, stats = asyncio.run(run_with(model, BatchPolicy(max_batch_size=8), 1, burst))
    for x, o in zip(xs, outs):
        np.testing.assert_array_equal(o["y"], np.maximum(x, 0))
    assert stats.execution_count < 30


def test_a_lone_request_waits_at_most_the_queue_delay(mlp_onnx: bytes) -> None:
    delay = 0.05

    async def lone(sched: Scheduler) -> float:
        t0 = time.monotonic()
        await sched.submit({"input": np.ones((1, 4), np.float32)})
        return time.monotonic() - t0

    elapsed, stats = asyncio.run(run_with(mlp_onnx, BatchPolicy(max_batch_size=8, max_queue_delay_s=delay), 1, lone))
    assert stats.by_batch.keys() == {1}
    # it waited for company (up to the delay) but not much longer; the margin absorbs a noisy 2-core machine
    assert stats.queue.ns / 1e9 <= delay + 0.25
    assert elapsed >= delay * 0.9


def test_full_queue_sheds_at_once_and_accepted_requests_complete() -> None:
    slow = build_slow_model(n=256, depth=8)
    x = np.ones((4, 256), np.float32)

    async def flood(sched: Scheduler):
        tasks = [asyncio.ensure_future(sched.submit({"input": x})) for _ in range(40)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results, stats = asyncio.run(run_with(slow, BatchPolicy(max_batch_size=0, queue_size=5), 1, flood))
    shed = [r for r in results if isinstance(r, Busy)]
    done = [r for r in results if isinstance(r, dict)]
    # the first is dispatched at once (one worker), five wait in the queue, the rest are refused
    assert len(shed) + len(done) == 40 and len(done) == 6 and len(shed) == 34
    first = done[0]["output"]
    assert all(np.array_equal(d["output"], first) for d in done)


def test_a_request_that_expires_in_the_queue_never_runs(mlp_onnx: bytes) -> None:
    gated = GatedSession(session(mlp_onnx))  # the busy run is held until the 1 ms timer has fired

    async def scenario() -> Scheduler:
        sched = Scheduler(gated, 1, BatchPolicy(max_batch_size=0), VersionStats("m", "1"), "m")
        sched.start()
        try:
            busy = asyncio.ensure_future(sched.submit({"input": np.ones((32, 4), np.float32)}))
            assert await asyncio.to_thread(gated.wait_running)
            with pytest.raises(Timeout, match="timed out after 1 ms in the queue"):
                await sched.submit({"input": np.ones((1, 4), np.float32)}, timeout_s=0.001)
            assert sched.queue_depth == 0
            gated.gate.set()
            assert (await busy)["output"].shape == (32, 3)
        finally:
            gated.gate.set()
            await sched.close()
        return sched

    asyncio.run(scenario())
    assert gated.runs == [32]  # the expired one never ran


async def worst_loop_lag(work) -> float:
    """The longest a 5 ms heartbeat on the event loop overslept while ``work`` ran: what a blocked loop shows."""
    worst = 0.0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal worst
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - t0 - 0.005)

    beat = asyncio.ensure_future(heartbeat())
    try:
        await work
    finally:
        stop.set()
        await beat
    return worst


def heavy_feed(model: bytes, at_least: float = 0.04) -> tuple[dict[str, np.ndarray], float]:
    """Rows of ``build_slow_model(n=512)`` whose run costs at least ``at_least`` seconds on this machine, and that
    cost (the fastest of three): a run that blocked the loop would show a lag of about that size, whatever the
    machine's speed (a fixed bound was met by a fast CPU whose runs took a millisecond)."""
    probe = session(model)
    rows = 16
    while True:
        feed = {"input": np.ones((rows, 512), np.float32)}
        cost = min(_timed(probe.run, feed) for _ in range(3))
        if cost >= at_least or rows >= 1 << 14:
            probe.close()
            return feed, cost
        rows *= 2


def test_the_event_loop_keeps_beating_during_heavy_inference() -> None:
    slow = build_slow_model(n=512, depth=24)
    feed, cost = heavy_feed(slow)

    async def scenario(sched: Scheduler) -> tuple[float, float]:
        baseline = await worst_loop_lag(asyncio.sleep(cost * 3))  # this machine's noise, nothing running
        worst = await worst_loop_lag(asyncio.gather(*(sched.submit(feed) for _ in range(12))))
        return baseline, worst

    (baseline, worst), stats = asyncio.run(run_with(slow, BatchPolicy(max_batch_size=0), 2, scenario))
    assert stats.execution_count == 12
    # a run on the loop (or one holding the interpreter lock) would show a lag of about a whole run
    assert worst < cost / 2 + baseline, (worst, cost, baseline)


def test_batchable_needs_a_dynamic_first_dimension(mlp_onnx: bytes) -> None:
    from onnx import TensorProto, helper

    assert batchable(session(mlp_onnx))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert not batchable(session(model.SerializeToString()))


def test_requests_whose_inputs_disagree_on_rows_are_never_split_by_another_request() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["ya"]), helper.make_node("Relu", ["b"], ["yb"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m", 2])],
        [helper.make_tensor_value_info("ya", TensorProto.FLOAT, ["n", 2]),
         helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["m", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = {"a": np.full((2, 2), 1, np.float32), "b": np.full((1, 2), 2, np.float32)}
    y = {"a": np.full((1, 2), 3, np.float32), "b": np.full((2, 2), 4, np.float32)}

    async def both(sched: Scheduler):
        return await asyncio.gather(*[sched.submit(d) for d in (x, y, x, y)])

    outs, _ = asyncio.run(run_with(model.SerializeToString(), BatchPolicy(max_batch_size=16), 1, both))
    for want, got in zip((x, y, x, y), outs):
        np.testing.assert_array_equal(got["ya"], want["a"])
        np.testing.assert_array_equal(got["yb"], want["b"])


class _ThreadRecorder:
    """A real session that notes which thread each run happened on (the scheduler's choice is what is tested)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.threads: list[int] = []

    def run(self, feed):
        import threading

        self.threads.append(threading.get_ident())
        return self._inner.run(feed)


async def _run_recorded(model: bytes, policy: BatchPolicy, workers: int, coro_factory):
    import threading

    stats = VersionStats("m", "1")
    recorder = _ThreadRecorder(session(model))
    sched = Scheduler(recorder, workers, policy, stats, "m")
    sched.start()
    try:
        out = await coro_factory(sched)
    finally:
        await sched.close()
    loop_thread = threading.get_ident()
    return out, stats, ["loop" if t == loop_thread else "worker" for t in recorder.threads]


def test_cheap_lone_runs_move_onto_the_loop_after_one_measured_run_per_batch_size_class(mlp_onnx: bytes) -> None:
    xs = [np.full((1 + i % 2, 4), i / 10, np.float32) for i in range(12)]  # alternately 1 and 2 rows

    async def one_by_one(sched: Scheduler):
        return [(await sched.submit({"input": x}, ctx=lone("client-a")))["output"] for x in xs]

    # a generous threshold: this checks where runs go, not how fast this machine is
    outs, stats, where = asyncio.run(
        _run_recorded(mlp_onnx, BatchPolicy(max_batch_size=8, inline_max_s=0.05), 1, one_by_one))
    for x, o in zip(xs, outs):
        np.testing.assert_allclose(o, mlp_reference(x), rtol=1e-5, atol=1e-5)
    # rows 1 and 2 are different size classes: each is measured once on a worker, then runs on the loop
    assert where[:2] == ["worker", "worker"] and set(where[2:]) == {"loop"}
    assert stats.inline_runs == len(xs) - 2 == stats.execution_count - 2


def test_runs_slower_than_the_threshold_stay_on_workers_and_the_loop_keeps_beating() -> None:
    slow = build_slow_model(n=512, depth=24)
    # The threshold is a quarter of this machine's own cost for the run (a fixed one was met by a fast CPU).
    feed, cost = heavy_feed(slow)

    async def scenario(sched: Scheduler) -> tuple[float, float]:
        async def one_at_a_time() -> None:
            for _ in range(4):
                await sched.submit(feed, ctx=lone("client-a"))

        baseline = await worst_loop_lag(asyncio.sleep(cost * 3))
        return baseline, await worst_loop_lag(one_at_a_time())

    (baseline, worst), stats, where = asyncio.run(
        _run_recorded(slow, BatchPolicy(max_batch_size=8, inline_max_s=cost / 4), 1, scenario))
    assert where == ["worker"] * 4 and stats.inline_runs == 0
    assert worst < cost / 2 + baseline, (worst, cost, baseline)


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def test_concurrent_requests_go_to_workers_and_batch_and_inline_can_be_turned_off(mlp_onnx: bytes) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(40)]

    async def lone_then_burst(sched: Scheduler):
        for _ in range(3):  # measured on a worker, then on the loop
            await sched.submit({"input": np.zeros((1, 4), np.float32)}, ctx=lone("client-a"))
        outs = await asyncio.gather(*(sched.submit({"input": x}, ctx=lone(f"client-{i % 4}")) for i, x in enumerate(xs)))
        return [o["output"] for o in outs]

    for threshold in (0.05, 0.0):
        outs, stats, where = asyncio.run(
            _run_recorded(mlp_onnx, BatchPolicy(max_batch_size=16, inline_max_s=threshold), 2, lone_then_burst))
        for x, o in zip(xs, outs):
            np.testing.assert_allclose(o, mlp_reference(x), rtol=1e-5, atol=1e-5)
        assert where[:3] == (["worker", "loop", "loop"] if threshold else ["worker"] * 3)
        burst = where[3:]
        assert set(burst) == {"worker"} and len(burst) < len(xs)  # the burst was batched, on the workers
        assert max(stats.by_batch) <= 16
        assert stats.inline_runs == (2 if threshold else 0)


def test_a_long_sequence_is_not_judged_by_short_ones() -> None:
    model = relu_rows_of_any_width()  # the cost follows w, which the row count does not show

    async def short_then_long(sched: Scheduler):
        for _ in range(4):
            await sched.submit({"x": np.ones((1, 16), np.float32)}, ctx=lone("client-a"))
        out = await sched.submit({"x": -np.ones((1, 4096), np.float32)}, ctx=lone("client-a"))
        return out["y"]

    y, stats, where = asyncio.run(
        _run_recorded(model, BatchPolicy(max_batch_size=8, inline_max_s=0.05), 1, short_then_long))
    assert np.array_equal(y, np.zeros((1, 4096), np.float32))
    # short ones: measured on a worker, then on the loop; the first long one is a new class, measured on a worker
    assert where == ["worker", "loop", "loop", "loop", "worker"]


def test_the_lone_client_rule_reads_the_daemon_wide_activity(mlp_onnx: bytes) -> None:
    """Same peer twice in a row, but another request in progress somewhere in the daemon: not a lone client."""
    from daemon.context import Activity, RequestContext

    async def scenario(sched: Scheduler) -> None:
        activity = Activity()
        ctx = RequestContext("test", activity, peer="client-a")
        activity.enter()
        for _ in range(3):  # alone: measured on a worker, then inline
            await sched.submit({"input": np.zeros((1, 4), np.float32)}, ctx=ctx)
        activity.enter()  # another frontend's request is in progress now
        for _ in range(3):
            await sched.submit({"input": np.zeros((1, 4), np.float32)}, ctx=ctx)

    _, stats, where = asyncio.run(
        _run_recorded(mlp_onnx, BatchPolicy(max_batch_size=8, inline_max_s=0.05), 1, scenario))
    assert where == ["worker", "loop", "loop", "worker", "worker", "worker"]
    assert stats.inline_runs == 2
