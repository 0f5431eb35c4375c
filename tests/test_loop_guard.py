"""The event-loop guard every test runs under (tests/conftest.py, tests/support/loop_guard.py) really fires, and
allows the scheduler's inline path, explicitly, and nothing else."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import mlp_reference
from support.contexts import lone
from support.loop_guard import INLINE, PENDING, BlockingError, resolve

from adapters import SessionOptions, get_runtime
from daemon.metrics import VersionStats
from daemon.scheduler import BatchPolicy, Scheduler


def test_a_sleep_inside_a_coroutine_fails() -> None:
    async def naps() -> None:
        time.sleep(0.001)

    with pytest.raises(BlockingError, match="time.sleep"):
        asyncio.run(naps())


def test_blocking_file_io_inside_a_coroutine_fails(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 64)  # no loop here: allowed

    async def reads() -> bytes:
        return path.read_bytes()

    with pytest.raises(BlockingError, match="io.BufferedReader.read"):
        asyncio.run(reads())


def test_the_same_calls_off_the_loop_pass(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 64)

    def blocking() -> bytes:
        time.sleep(0.001)
        return path.read_bytes()

    async def offloaded() -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, blocking)

    assert asyncio.run(offloaded()) == b"x" * 64


def test_the_inline_allowance_names_a_function_that_exists() -> None:
    """A rename or move of the inline path must fail here, not silently stop allowing it (nor a pending one go
    unnoticed once its function is gone)."""
    for module, qualname in INLINE + PENDING:
        function = resolve(module, qualname)
        assert inspect.isfunction(function), (module, qualname)
        assert function.__code__.co_filename.endswith(module.replace(".", "/") + ".py")


class ReadsAFile:
    """A real ORT session whose run() also reads a small file: a Python-level blocking call inside a runtime's run,
    which the guard can see (a runtime's native compute it cannot)."""

    def __init__(self, model: bytes, side: Path) -> None:
        self._inner = get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1))
        self._side = side
        self.inputs, self.outputs = self._inner.inputs, self._inner.outputs
        self.device, self.platform = self._inner.device, self._inner.platform
        self.reads = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._side.read_bytes()
        self.reads += 1
        return self._inner.run(inputs)

    def close(self) -> None:
        self._inner.close()


def test_the_schedulers_inline_path_may_block_the_loop_and_nothing_else_may(mlp_onnx: bytes, tmp_path: Path) -> None:
    side = tmp_path / "side.bin"
    side.write_bytes(b"labels")
    session = ReadsAFile(mlp_onnx, side)
    stats = VersionStats("m", "1")
    x = np.ones((1, 4), np.float32)

    async def scenario() -> list[np.ndarray]:
        sched = Scheduler(session, 1, BatchPolicy(max_batch_size=8, inline_max_s=0.05), stats, "m")
        sched.start()
        try:
            # the first run is measured on a worker; the second, from the same lone client, runs on the loop
            outs = [(await sched.submit({"input": x}, ctx=lone("client")))["output"] for _ in range(2)]
            with pytest.raises(BlockingError):
                side.read_bytes()  # the same call on the loop, outside the inline path
            return outs
        finally:
            await sched.close()

    outs = asyncio.run(scenario())
    assert stats.inline_runs == 1 and session.reads == 2  # the read really happened on the loop, and was allowed
    for out in outs:
        np.testing.assert_allclose(out, mlp_reference(x), rtol=1e-5, atol=1e-5)
