"""gRPC under load, on a real daemon with a slow model and one worker: a full queue answers UNAVAILABLE at once, so
does a deadline (gRPC's, or the request's ``timeout`` parameter) the queue is predicted not to meet, and SIGTERM
during a burst answers every accepted call before the process exits with status 0."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from httpclient import request
from support.accepted import accepted, wait_until
from support.daemon import served_daemon
from support.models import build_slow_model, rows_for
from tritonclient.grpc import service_pb2, service_pb2_grpc

N, DEPTH = 1024, 384  # the slow model of tests/test_drain.py
#: what one request should cost the single worker: long enough that the test acts while it runs
RUN_S = 1.0
QUEUE = 2


def slow_site(site: Site, keyset: KeySet, queue_size: int) -> Site:
    site.install(pack_model(keyset, build_slow_model(n=N, depth=DEPTH), name="slow"))
    site.models = [{"name": "slow", "runtime": "onnxruntime", "threads": 1, "workers": 1, "max_batch_size": 0,
                    "queue_size": queue_size}]
    site.extra = {"server": {"max_tensor_elements": 4096 * N},
                  "grpc": {"enabled": True, "port": 0, "max_message_bytes": 64 << 20}}
    return site


@pytest.fixture(scope="module")
def rows() -> int:
    return rows_for(RUN_S, build_slow_model(n=N, depth=DEPTH), N)[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Iterator[DaemonProcess]:
    site = slow_site(Site(tmp_path_factory.mktemp("grpc-load") / "site", keyset), keyset, QUEUE)
    with served_daemon(site.write_config()) as daemon:
        yield daemon


def connect(daemon: DaemonProcess) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.wait_for('grpc_listening')['port']}",
                                    options=[("grpc.max_send_message_length", -1)])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def slow_request(rows: int, **params: int) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="slow")
    req.inputs.add(name="input", datatype="FP32", shape=[rows, N])
    req.raw_input_contents.append(np.full((rows, N), 0.001, np.float32).tobytes())
    for key, value in params.items():
        req.parameters[key].int64_param = value
    return req


def grpc_outcomes(daemon: DaemonProcess, outcome: str) -> float:
    text = request(daemon.url + "/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("inferd_requests_total{") and 'protocol="grpc"' in line
               and f'outcome="{outcome}"' in line)


def test_a_full_queue_is_unavailable_at_once(served: DaemonProcess, rows: int) -> None:
    channel, stub = connect(served)
    try:
        before = accepted(served)
        busy = [stub.ModelInfer.future(slow_request(rows)) for _ in range(QUEUE + 1)]  # one runs, QUEUE wait
        wait_until(lambda: accepted(served) == before + QUEUE + 1, 60, "the queue filled")
        shed_before = grpc_outcomes(served, "shed")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(slow_request(1), timeout=30)
        took = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "model 'slow' is at capacity (queue full); retry shortly"
        assert ("grpc-retry-pushback-ms", "1000") in (err.value.trailing_metadata() or ())
        assert took < RUN_S / 2  # at once, not after the work ahead of it
        assert grpc_outcomes(served, "shed") == shed_before + 1
        assert all(f.result(timeout=120).raw_output_contents for f in busy)
    finally:
        channel.close()


def test_a_grpc_deadline_the_queue_cannot_meet_is_refused_at_once(served: DaemonProcess, rows: int) -> None:
    """Admission predicts the wait from the model's measured runs (the test before this one ran some): a deadline
    shorter than the run in progress is refused UNAVAILABLE with a retry hint, before it waits (docs/overload.md).
    A deadline that runs out in the queue all the same is DEADLINE_EXCEEDED (tests/test_scheduler.py)."""
    channel, stub = connect(served)
    try:
        before = accepted(served)
        running = stub.ModelInfer.future(slow_request(rows))
        wait_until(lambda: accepted(served) == before + 1, 60, "the first request accepted")
        shed = grpc_outcomes(served, "shed")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(slow_request(1), timeout=RUN_S / 4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "predicted wait in the queue" in err.value.details(), err.value.details()
        pushback = dict(err.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]
        assert int(pushback) >= 1
        # the request's own timeout parameter (microseconds, as tritonclient sends it) works the same way
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(slow_request(1, timeout=int(RUN_S / 4 * 1e6)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "predicted wait in the queue" in err.value.details(), err.value.details()
        assert time.monotonic() - started < RUN_S / 2  # both at once, not after the run ahead of them
        assert grpc_outcomes(served, "shed") == shed + 2
        assert running.result(timeout=120).raw_output_contents
    finally:
        channel.close()


def test_sigterm_during_a_burst_answers_every_accepted_call(site: Site, keyset: KeySet, start_daemon,
                                                            rows: int) -> None:
    n = 4
    daemon = start_daemon(slow_site(site, keyset, 64).write_config())
    channel, stub = connect(daemon)
    try:
        burst = [stub.ModelInfer.future(slow_request(rows)) for _ in range(n)]
        wait_until(lambda: accepted(daemon) == n, 60, f"{n} calls accepted")
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for_event("draining ")
        last_done = burst[-1].done()  # the drain has begun with work left; a new call is refused at once
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(slow_request(1), timeout=30)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        assert not last_done and not burst[-1].done()  # ... while the accepted calls still run
        daemon.wait_for("stopped")  # not before every accepted call was answered
        outputs = [f.result(timeout=120) for f in burst]
        assert all(len(o.raw_output_contents[0]) == rows * N * 4 for o in outputs)
        assert daemon.proc.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError) as err:  # and nothing is accepted after it
            stub.ModelInfer(slow_request(1), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
