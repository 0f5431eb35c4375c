"""The version lifecycle and the shared inference path, in-process: real store, keys, artifacts and ONNX Runtime.

The hot-swap test is the seam the registry issue builds on: version 2 loads beside version 1 while a load generator
runs through the same service path the frontends use, the switch fails no request, and requests routed to version 1
finish on version 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import Site, mlp_reference, mlp_weights, pack_model
from tflite_builder import build_mlp_onnx

from daemon import artifact, keys, protocol, responses, service
from daemon.config import load_config
from daemon.context import Activity, RequestContext
from daemon.errors import ArtifactMismatch, InferdError, InvalidInput, SmokeTestFailed, VersionNotFound
from daemon.models import ModelManager

LIMITS = protocol.Limits(1 << 20)


def weights_times(k: float) -> tuple[np.ndarray, ...]:
    """Version k of the test MLP: the standard weights with the last layer scaled, so each version's answers differ."""
    w1, b1, w2, b2 = mlp_weights()
    return w1, b1, (w2 * k).astype(np.float32), (b2 * k).astype(np.float32)


def manager_for(site: Site, **model: Any) -> ModelManager:
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1, **model}]
    config = load_config(site.write_config())
    return ModelManager(config, site_store(site), keys.load_keks(list(config.keys.kek)),
                        keys.load_signers(list(config.keys.signers)))


def site_store(site: Site) -> Any:
    from daemon.store import Store

    return Store(site.state_dir)


def install_versions(site: Site, *versions: str, activate_first: bool = True) -> None:
    for i, v in enumerate(versions):
        blob = pack_model(site.keyset, build_mlp_onnx(*weights_times(float(v))), name="mlp", version=v)
        site.install(blob, activate=activate_first and i == 0)


async def infer_once(manager: ModelManager, x: np.ndarray, ctx: RequestContext) -> tuple[str, np.ndarray]:
    """The path every frontend takes: admit, decode, run, build + serialise, all under one counted call."""
    loaded = service.admit(manager, "mlp", None, ctx)
    doc = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    async with service.call(loaded, ctx) as call:
        request = protocol.decode_request(doc, loaded.session.inputs, loaded.session.outputs, LIMITS)
        results = await call.run(request)
        body, _ = responses.encode_response(loaded.name, loaded.version, request, results)
    import orjson

    answer = orjson.loads(body)
    return answer["model_version"], np.array(answer["outputs"][0]["data"], np.float32).reshape(x.shape[0], 3)


def run(coro_factory: Callable[[ModelManager], Any], manager: ModelManager) -> Any:
    async def main() -> Any:
        try:
            await manager.load_all()
            return await coro_factory(manager)
        finally:
            await manager.close()

    return asyncio.run(main())


def test_version_2_loads_beside_1_and_switches_under_load_without_failing_a_request(site: Site) -> None:
    install_versions(site, "1", "2")
    manager = manager_for(site, workers=2)
    rng = np.random.default_rng(0)
    activity = Activity()

    async def scenario(manager: ModelManager) -> tuple[list[tuple[str, bool, np.ndarray, np.ndarray]], int]:
        outcomes: list[tuple[str, bool, np.ndarray, np.ndarray]] = []
        switched = asyncio.Event()
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                x = rng.normal(size=(int(rng.integers(1, 5)), 4)).astype(np.float32)
                activity.enter()
                try:
                    after = switched.is_set()
                    version, y = await infer_once(manager, x, RequestContext("test", activity, peer=i))
                finally:
                    activity.leave()
                outcomes.append((version, after, x, y))

        clients = [asyncio.create_task(client(i)) for i in range(8)]
        while sum(1 for o in outcomes if o[0] == "1") < 200:
            await asyncio.sleep(0.001)
        loaded = await manager.load_version("mlp", "2")  # beside version 1, which keeps serving meanwhile
        assert manager.lookup("mlp").version == "1" and manager.lookup("mlp", "2") is loaded
        previous = manager.activate("mlp", "2")
        switched.set()
        assert previous is not None and previous.version == "1"
        in_flight_on_1 = previous.stats.in_flight
        await manager.retire("mlp", "1")  # its accepted work finishes first
        while sum(1 for o in outcomes if o[0] == "2") < 200:
            await asyncio.sleep(0.001)
        stop.set()
        await asyncio.gather(*clients)  # any failed request would raise here
        return outcomes, in_flight_on_1

    outcomes, in_flight_on_1 = run(scenario, manager)
    for version, _, x, y in outcomes:  # each answer is exactly its version's model
        np.testing.assert_allclose(y, mlp_reference(x, weights_times(float(version))), rtol=1e-5, atol=1e-5)
    assert in_flight_on_1 > 0, "no request was in flight on version 1 at the switch: the test proved nothing"
    # a request is routed synchronously when it starts: those started before the switch were answered by 1 (the ones
    # in flight at the switch included), every later one by 2
    assert all(version == ("2" if after else "1") for version, after, _, _ in outcomes)


def test_a_failed_reload_leaves_the_active_version_serving_and_names_its_error(site: Site) -> None:
    install_versions(site, "1")
    wrong_reference = artifact.smoke_files({"input": np.ones((1, 4), np.float32)},
                                           {"output": np.zeros((1, 3), np.float32)})
    bad = pack_model(site.keyset, build_mlp_onnx(*weights_times(2.0)), name="mlp", version="2",
                     extra_files=wrong_reference)
    site.install(bad, activate=False)
    wrong_runtime = pack_model(site.keyset, build_mlp_onnx(*weights_times(3.0)), name="mlp", version="3",
                               runtime="openvino")
    site.install(wrong_runtime, activate=False)
    manager = manager_for(site)

    async def scenario(manager: ModelManager) -> None:
        with pytest.raises(SmokeTestFailed, match="smoke test failed: output 'output' differs"):
            await manager.load_version("mlp", "2")
        with pytest.raises(ArtifactMismatch, match="configured for runtime onnxruntime but its artifact was packed"):
            await manager.load_version("mlp", "3")
        entry = manager.entry("mlp")
        assert entry.status == "ready" and manager.lookup("mlp").version == "1"
        assert set(entry.failures) == {"2", "3"} and list(entry.versions) == ["1"]
        version, _ = await infer_once(manager, np.ones((1, 4), np.float32), RequestContext("test", Activity()))
        assert version == "1"
        with pytest.raises(VersionNotFound):
            manager.activate("mlp", "2")
        with pytest.raises(InferdError, match="is active"):
            await manager.retire("mlp", "1")

    run(scenario, manager)


def test_a_staged_version_answers_only_when_named(site: Site) -> None:
    install_versions(site, "1", "2")
    manager = manager_for(site)

    async def scenario(manager: ModelManager) -> None:
        await manager.load_version("mlp", "2")
        ctx = RequestContext("test", Activity())
        assert manager.pick("mlp", None, ctx).version == "1"
        assert manager.pick("mlp", "2", ctx).version == "2"
        await manager.swap("mlp", "2")
        assert manager.pick("mlp", None, ctx).version == "2"
        with pytest.raises(VersionNotFound):
            manager.pick("mlp", "1", ctx)

    run(scenario, manager)


def test_service_counts_one_outcome_per_request(site: Site) -> None:
    install_versions(site, "1")
    manager = manager_for(site)

    async def scenario(manager: ModelManager) -> dict[tuple[str, str], int]:
        ctx = RequestContext("test", Activity())
        await infer_once(manager, np.ones((2, 4), np.float32), ctx)
        loaded = manager.lookup("mlp")
        with pytest.raises(InvalidInput):
            async with service.call(loaded, ctx):
                protocol.decode_request({"inputs": []}, loaded.session.inputs, loaded.session.outputs, LIMITS)
        with pytest.raises(RuntimeError):  # a bug in a frontend's own code still counts as a failed request
            async with service.call(loaded, ctx):
                raise RuntimeError("boom")
        task = asyncio.ensure_future(_cancelled_call(loaded, ctx))
        await asyncio.sleep(0)
        task.cancel()  # the client went away: not an outcome
        with pytest.raises(asyncio.CancelledError):
            await task
        assert loaded.stats.in_flight == 0
        return dict(loaded.stats.requests)

    requests = run(scenario, manager)
    assert requests == {("test", "success"): 1, ("test", "invalid"): 1, ("test", "failed"): 1}


async def _cancelled_call(loaded: Any, ctx: RequestContext) -> None:
    async with service.call(loaded, ctx):
        await asyncio.get_running_loop().create_future()  # never resolves


def test_two_loads_of_one_version_build_it_once(site: Site) -> None:
    install_versions(site, "1", "2")
    manager = manager_for(site)

    async def scenario(manager: ModelManager) -> None:
        a, b = await asyncio.gather(manager.load_version("mlp", "2"), manager.load_version("mlp", "2"))
        assert a is b and manager.entry("mlp").versions["2"] is a

    run(scenario, manager)


def test_a_version_being_retired_is_not_routed_but_still_counted(site: Site) -> None:
    install_versions(site, "1", "2")
    manager = manager_for(site)

    async def scenario(manager: ModelManager) -> None:
        await manager.load_version("mlp", "2")
        old = manager.activate("mlp", "2")
        assert old is not None
        ctx = RequestContext("test", Activity())
        retiring = asyncio.ensure_future(manager.retire("mlp", "1"))
        await asyncio.sleep(0)  # retire has begun: the version drains
        assert old.state in ("draining", "retired")
        with pytest.raises(VersionNotFound):
            manager.pick("mlp", "1", ctx)
        assert manager.serving("mlp") == ["2"]
        if old.state == "draining":  # its counters stay exported until it is gone
            assert old.stats in manager.all_stats()
        await retiring
        assert old.state == "retired" and old.stats not in manager.all_stats()

    run(scenario, manager)
