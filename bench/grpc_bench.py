"""gRPC beside HTTP on the same daemon: the V2 gRPC frontend against HTTP with binary tensors, in one run.

One inferd serves both (tabular model and the small CNN, one thread each), pinned to CPU 0; the load generators
(HTTP: daemon.loadgen over raw keep-alive connections; gRPC: grpc.aio on one channel, as a gRPC client multiplexes)
run on CPU 1, N requests in flight, alternating rounds, medians. gRPC sends raw_input_contents (what Triton's
clients send); HTTP sends the binary tensor extension. Appends its table to bench/RESULTS.md.

Usage: python bench/grpc_bench.py [--rounds 3] [--seconds 2] [--no-write]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import models  # noqa: E402
from run import (  # noqa: E402
    CLIENT_CPU,
    bench_args,
    bench_keys,
    binary_body,
    commit,
    cpu_seconds,
    free_port,
    machine,
    measure,
    pinned,
    publish,
    start_inferd,
)

from daemon import artifact  # noqa: E402
from daemon.store import Store  # noqa: E402

#: the transport's own limit: grpc.aio answering every ModelInfer with one fixed response of inferd's size, no model
BARE_GRPC = r"""
import asyncio, sys
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
port, size = int(sys.argv[1]), int(sys.argv[2])
reply = service_pb2.ModelInferResponse(model_name="m", model_version="1")
out = reply.outputs.add(); out.name, out.datatype = "y", "FP32"; out.shape.extend([1, size // 4])
reply.raw_output_contents.append(bytes(size))
class Echo(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        return reply
async def main():
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


def start_bare_grpc(size: int) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen(pinned([sys.executable, "-c", BARE_GRPC, str(port), str(size)]), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, port


async def grpc_load(port: int, model: str, name: str, xs: list[np.ndarray], clients: int,
                    seconds: float) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) of ModelInfer with raw contents, ``clients`` calls in flight on one channel."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    requests = []
    for x in xs:
        req = service_pb2.ModelInferRequest(model_name=model)
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = name, "FP32"
        tensor.shape.extend(x.shape)
        req.raw_input_contents.append(x.tobytes())
        requests.append(req)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(requests[0])
        latencies: list[float] = []
        stop = time.perf_counter() + 0.3  # warm-up, not counted

        async def client(i: int, until: float, record: bool) -> None:
            k = i
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                await stub.ModelInfer(requests[k % len(requests)])
                if record:
                    latencies.append(time.perf_counter() - t0)
                k += 1

        await asyncio.gather(*(client(i, stop, False) for i in range(clients)))
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, t0 + seconds, True) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return len(latencies) / elapsed, latencies[len(latencies) // 2] * 1e3, latencies[int(len(latencies) * 0.99)] * 1e3


def main() -> int:
    args = bench_args()
    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs (server and load generator pinned apart)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CPU})
    work = Path(tempfile.mkdtemp(prefix="inferd-grpc-bench-"))
    kek, signer = bench_keys(work)
    tab_model, tab_rows = models.tabular_classifier()
    store = Store(work / "state")
    for name, blob in (("tabular", tab_model), ("cnn", models.small_cnn())):
        store.install(artifact.pack({"model.onnx": blob}, name=name, version="1", runtime="onnxruntime", kek=kek,
                                    signing_key=signer), activate=True)
    rng = np.random.default_rng(0)
    inputs = {"tabular": ("X", [tab_rows[i: i + 1] for i in range(64)]),
              "cnn": ("input", [rng.random((1, 3, 96, 96), dtype=np.float32) for _ in range(8)])}
    base = {"runtime": "onnxruntime", "threads": 1, "workers": 1}
    grpc_port = free_port()
    server = start_inferd(work, "grpc", [{"name": "tabular", **base}, {"name": "cnn", **base}],
                          {"grpc": {"enabled": True, "host": "127.0.0.1", "port": grpc_port}})
    scenarios = [("tabular", 1), ("tabular", 16), ("cnn", 16)]
    raw: dict[tuple[str, int, str], list[tuple[float, float, float, float]]] = {}
    bare = {"tabular": start_bare_grpc(8), "cnn": start_bare_grpc(40)}  # outputs: 2 and 10 floats
    try:
        for r in range(args.rounds):
            for model, clients in scenarios:
                name, xs = inputs[model]
                for proto in (["http", "grpc", "bare-grpc"] if r % 2 == 0 else ["bare-grpc", "grpc", "http"]):
                    pid = bare[model][0].pid if proto == "bare-grpc" else server.proc.pid
                    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                    if proto == "bare-grpc":
                        row = asyncio.run(grpc_load(bare[model][1], model, name, xs, clients, args.seconds))
                    elif proto == "http":
                        res = measure(server.port, model, [binary_body(name, x) for x in xs], clients, args.seconds)
                        row = (res.throughput, res.percentile(50), res.percentile(99))
                    else:
                        row = asyncio.run(grpc_load(grpc_port, model, name, xs, clients, args.seconds))
                    # the server's share of its CPU over the measurement (warm-up included): under 100% means the
                    # load generator, not the server, set the rate
                    busy = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
                    raw.setdefault((model, clients, proto), []).append((*row, busy))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for proc in (server.proc, *(p for p, _ in bare.values())):
            proc.terminate()
            proc.wait(timeout=30)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## gRPC run of {now} (commit {commit()})", "",
             f"Machine: {machine()}. inferd pinned to CPU 0 (HTTP and gRPC on one daemon), load generators to CPU 1, "
             f"runtime threads 1; {args.rounds} alternating rounds of {args.seconds:g} s; medians. HTTP sends binary "
             "tensors; gRPC raw_input_contents. bare-grpc: grpc.aio answering a fixed response of the same size, no "
             "model (the gRPC transport's own limit on one CPU).", "",
             "| model | clients | protocol | req/s | p50 ms | p99 ms | server CPU | gRPC / HTTP req/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for model, clients in scenarios:
        med = {p: tuple(statistics.median(v[i] for v in raw[(model, clients, p)]) for i in range(4))
               for p in ("http", "grpc", "bare-grpc")}
        for proto in ("http", "grpc", "bare-grpc"):
            rate, p50, p99, busy = med[proto]
            ratio = f"{med[proto][0] / med['http'][0]:.2f}x" if proto != "http" else ""
            lines.append(f"| {model} | {clients} | {proto} | {rate:,.0f} | {p50:.3f} | {p99:.3f} | {busy:.0%} | "
                         f"{ratio} |")
    report = "\n".join(lines)
    publish(report, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
