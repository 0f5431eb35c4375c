"""A model's scheduling settings, from config to the scheduler: one source of defaults, the model's timeout_ms,
Triton's microsecond ``parameters.timeout``, and preferred_batch_sizes. Real ONNX Runtime sessions; a gate
(tests/support/gates.py) holds the busy run wherever a request must wait behind one."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import REPO, mlp_reference
from support.gates import GatedSession

from adapters import SessionOptions, get_runtime
from daemon.batchpolicy import BatchPolicy
from daemon.config import LiteRtModelConfig, OnnxModelConfig, OpenVinoModelConfig
from daemon.errors import InferenceFailed, InvalidInput, Timeout
from daemon.metrics import VersionStats
from daemon.models import batch_policy
from daemon.scheduler import Scheduler
from daemon.service import request_timeout

SCHEDULING = ("max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "queue_size", "timeout_ms",
              "inline_max_ms")
CONFIGS = {"onnxruntime": OnnxModelConfig, "openvino": OpenVinoModelConfig, "litert": LiteRtModelConfig}


@pytest.mark.parametrize("runtime", sorted(CONFIGS))
def test_a_policy_built_with_no_arguments_is_what_an_unconfigured_model_gets(runtime: str) -> None:
    cfg = CONFIGS[runtime](name="m", runtime=runtime)
    assert BatchPolicy() == BatchPolicy.from_config(cfg) == batch_policy(cfg)
    assert BatchPolicy() == BatchPolicy(max_batch_size=32, max_queue_delay_s=0.0, preferred_batch_sizes=(),
                                        queue_size=256, timeout_s=None, inline_max_s=0.0005)


def test_the_daemons_mapping_and_the_policys_agree_on_every_setting() -> None:
    cfg = OnnxModelConfig(name="m", runtime="onnxruntime", max_batch_size=4, max_queue_delay_ms=2.5,
                          preferred_batch_sizes=[2, 4], queue_size=9, timeout_ms=250, inline_max_ms=1.5)
    policy = BatchPolicy.from_config(cfg)
    assert policy == batch_policy(cfg)
    assert policy == BatchPolicy(max_batch_size=4, max_queue_delay_s=0.0025, preferred_batch_sizes=(2, 4),
                                 queue_size=9, timeout_s=0.25, inline_max_s=0.0015)


def test_the_documented_defaults_are_the_configs() -> None:
    doc = (REPO / "docs" / "http-api.md").read_text()
    section = doc.split("## Queueing, batching, timeouts", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", section, re.MULTILINE))
    assert set(rows) == set(SCHEDULING)
    fields = OnnxModelConfig.model_fields
    for name, shown in rows.items():
        value = yaml.safe_load(shown.replace("`", "").replace("(none)", ""))
        assert value == fields[name].get_default(call_default_factory=True), name


def test_timeouts_in_request_parameters() -> None:
    assert request_timeout({}) is None
    assert request_timeout({"timeout_ms": 250}) == 0.25
    assert request_timeout({"timeout": 1500}) == pytest.approx(0.0015)  # Triton's unit: microseconds
    assert request_timeout({"timeout_ms": 2, "timeout": 9_000_000}) == 0.002  # inferd's own key wins
    assert request_timeout({"timeout_ms": 0}) is None and request_timeout({"timeout": 0}) is None  # the model's
    for bad in (-1, "5", True, None, [1]):
        with pytest.raises(InvalidInput, match="parameters.timeout must be a non-negative number"):
            request_timeout({"timeout": bad})


def _gated(model: bytes) -> GatedSession:
    return GatedSession(get_runtime("onnxruntime").load({"m.onnx": model}, SessionOptions(threads=1)))


def _with(gated: GatedSession, policy: BatchPolicy, scenario: Callable[[Scheduler], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        sched = Scheduler(gated, 1, policy, VersionStats("m", "1"), "m")  # type: ignore[arg-type]
        sched.start()
        try:
            return await scenario(sched)
        finally:
            gated.gate.set()
            await sched.close()

    return asyncio.run(main())


def _x(rows: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.full((rows, 4), 0.25, np.float32)}


def test_the_models_timeout_ms_applies_unless_a_request_gives_its_own(mlp_onnx: bytes) -> None:
    gated = _gated(mlp_onnx)
    policy = BatchPolicy.from_config(OnnxModelConfig(name="m", runtime="onnxruntime", timeout_ms=1,
                                                     max_batch_size=0))

    async def scenario(sched: Scheduler) -> None:
        busy = asyncio.ensure_future(sched.submit(_x(2)))
        assert await asyncio.to_thread(gated.wait_running)  # held until the timers below have fired
        patient = asyncio.ensure_future(sched.submit(_x(3), timeout_s=request_timeout({"timeout": 60_000_000})))
        await asyncio.sleep(0)  # queued first, so with the model's 1 ms it would expire first
        with pytest.raises(Timeout, match="timed out after 1 ms in the queue"):
            await sched.submit(_x())  # no timeout of its own: the model's 1 ms
        with pytest.raises(Timeout, match="timed out after 2 ms in the queue"):
            await sched.submit(_x(), timeout_s=request_timeout({"timeout": 2000}))  # Triton's 2000 us
        assert not patient.done()  # its own 60 s (Triton's 60,000,000 us) holds instead
        gated.gate.set()
        np.testing.assert_allclose((await patient)["output"], mlp_reference(_x(3)["input"]), rtol=1e-5, atol=1e-5)
        await busy

    _with(gated, policy, scenario)
    assert gated.runs == [2, 3]  # the expired ones never ran


def test_a_batch_reaching_a_preferred_size_goes_without_waiting_out_the_delay(mlp_onnx: bytes) -> None:
    gated = _gated(mlp_onnx)
    gated.gate.set()

    async def scenario(sched: Scheduler) -> list[dict[str, np.ndarray]]:
        # a minute of delay: only the preferred size can send these four rows in time
        return await asyncio.wait_for(asyncio.gather(*(sched.submit(_x()) for _ in range(4))), 30)

    outs = _with(gated, BatchPolicy(max_batch_size=32, max_queue_delay_s=60.0, preferred_batch_sizes=(4,)), scenario)
    assert gated.runs == [4] and all(o["output"].shape == (1, 3) for o in outs)


def test_a_short_batch_not_at_a_preferred_size_waits_out_the_delay(mlp_onnx: bytes) -> None:
    gated = _gated(mlp_onnx)
    gated.gate.set()

    async def scenario(sched: Scheduler) -> list[Any]:
        jobs = [asyncio.ensure_future(sched.submit(_x())) for _ in range(4)]
        for _ in range(5):
            await asyncio.sleep(0)  # every submit has been made and dispatch has run after each
        assert not any(j.done() for j in jobs) and gated.runs == []  # held, waiting for company
        await sched.close()  # fails what is held
        return await asyncio.gather(*jobs, return_exceptions=True)

    outs = _with(gated, BatchPolicy(max_batch_size=32, max_queue_delay_s=60.0, preferred_batch_sizes=(8,)), scenario)
    assert all(isinstance(o, InferenceFailed) for o in outs) and gated.runs == []
