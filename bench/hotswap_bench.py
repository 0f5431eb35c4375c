"""A hot swap under load (issue #11): the small CNN switched between two versions every few seconds through the
updater (POST /admin/models/cnn/activate: load beside, smoke test, switch, drain, probation, commit) while 16 clients
send binary requests, against the same load without swaps.

Reported: failed requests (target: 0, with swaps and without), p99 during the swaps over p99 without (context), and
the daemon's peak RSS during the swaps over its peak in steady state (context; two versions are loaded at once for a
moment). Every sampled answer must name a version (1 or 2). The daemon is pinned to CPU 0, the load generator to
CPU 1. Appends its table to bench/RESULTS.md; exits 1 on a failed request.

Usage: python bench/hotswap_bench.py [--seconds 30] [--interval 3] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
from harness import (  # noqa: E402
    CLIENT_CPU,
    SERVER_CPU,
    bench_keys,
    binary_body,
    commit,
    machine,
    publish,
    rss_mb,
    set_affinity,
    start_inferd,
)

from daemon import artifact, loadgen  # noqa: E402
from daemon.store import Store  # noqa: E402

CLIENTS = 16
MODEL = "cnn"


class RssPeak:
    """The daemon's peak VmRSS, sampled every 50 ms until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Swapper:
    """Activates the other version every ``interval`` seconds; counts swaps and refusals (a swap asked while the last
    one is still on probation is refused with 409 and retried at the next tick)."""

    def __init__(self, port: int, interval: float) -> None:
        self.port, self.interval = port, interval
        self.swaps, self.refused = 0, 0
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swapper", daemon=True)
        self.version = "1"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            target = "2" if self.version == "1" else "1"
            req = urllib.request.Request(f"http://127.0.0.1:{self.port}/admin/models/{MODEL}/activate",
                                         data=json.dumps({"version": target}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            started = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - our own daemon
                    resp.read()
            except urllib.error.HTTPError as exc:
                self.refused += 1
                exc.read()
                continue
            self.seconds.append(time.monotonic() - started)
            self.swaps += 1
            self.version = target

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _version(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["model_version"])
    except (ValueError, KeyError):
        return None


def run_load(port: int, bodies: list[bytes], seconds: float) -> loadgen.Result:
    return asyncio.run(loadgen.run("127.0.0.1", port, bodies, CLIENTS, seconds, warmup_s=0.5, sample_every=50))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0, help="each phase (steady, then swapping: a minute)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between swaps")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    set_affinity(os.getpid(), {CLIENT_CPU})  # this process is the load generator
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-") as tmp:
        work = Path(tmp)
        kek, signer = bench_keys(work)
        store = Store(work / "state")
        x = np.random.default_rng(0).normal(size=(1, 3, 96, 96)).astype(np.float32)
        import onnxruntime as ort

        for version, seed in (("1", 0), ("2", 1)):
            model = models.small_cnn(seed)
            ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            files = {"model.onnx": model, **artifact.smoke_files({"input": x}, {"probabilities": ref})}
            store.install(artifact.pack(files, name=MODEL, version=version, runtime="onnxruntime", kek=kek,
                                        signing_key=signer), activate=(version == "1"))
        cfg = [{"name": MODEL, "runtime": "onnxruntime", "threads": 1,
                "probation": {"seconds": min(1.0, args.interval / 3), "min_requests": 50, "max_p99_ratio": 1000}}]
        server = start_inferd(work, "hotswap", cfg, {"audit": {"enabled": False}})
        try:
            body, headers = binary_body("input", x)
            reqs = [loadgen.build_request("127.0.0.1", server.port, f"/v2/models/{MODEL}/infer", body, headers)]
            with RssPeak(server.proc.pid) as steady_rss:
                steady = run_load(server.port, reqs, args.seconds)
            with RssPeak(server.proc.pid) as swap_rss, Swapper(server.port, args.interval) as swapper:
                swapping = run_load(server.port, reqs, args.seconds)
        finally:
            server.proc.terminate()
            server.proc.wait(timeout=60)
    failed = {name: sum(n for s, n in r.statuses.items() if s != 200) + r.errors
              for name, r in (("steady", steady), ("swapping", swapping))}
    versions = {_version(b) for _, status, b in swapping.samples if status == 200}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mean_swap = sum(swapper.seconds) / len(swapper.seconds) if swapper.seconds else float("nan")
    lines = [f"## Hot-swap run of {when} (commit {commit()})", "",
             f"Machine: {machine()}. Daemon on CPU {SERVER_CPU} (one runtime thread), {CLIENTS} clients on CPU "
             f"{CLIENT_CPU}; small CNN, binary requests; {args.seconds:g} s steady, then {args.seconds:g} s with a "
             f"swap (POST /admin/models/{MODEL}/activate: load beside, smoke test, switch, drain, probation) every "
             f"{args.interval:g} s: {swapper.swaps} swaps done ({mean_swap:.2f} s each on average), {swapper.refused} "
             "asked while the last was still on probation (refused, retried). Versions seen in sampled answers: "
             f"{', '.join(sorted(v for v in versions if v))}.", "",
             "| phase | requests | failed | req/s | p50 ms | p99 ms | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r, rss in (("steady", steady, steady_rss.peak), ("swapping", swapping, swap_rss.peak)):
        lines.append(f"| {name} | {r.count:,} | {failed[name]} | {r.throughput:,.0f} | {r.percentile(50):.2f} | "
                     f"{r.percentile(99):.2f} | {rss:.0f} |")
    ok = failed["steady"] == 0 and failed["swapping"] == 0 and swapper.swaps > 0
    lines += ["", "| target | measured | met |", "|---|---|---|",
              f"| no failed request, with swaps or without | {failed['steady'] + failed['swapping']} | "
              f"{'yes' if ok else 'no'} |",
              f"| p99 during swaps over p99 without (context) | {swapping.percentile(99) / steady.percentile(99):.3f}x "
              "| context |",
              f"| peak RSS during swaps over steady peak (context) | {swap_rss.peak / steady_rss.peak:.3f}x | context |"]
    publish("\n".join(lines), argparse.Namespace(no_write=args.no_write))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
