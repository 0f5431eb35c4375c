"""One short GPU check: load a model on CUDA through inferd's ONNX Runtime adapter, compare with the CPU, time both.

Run it on a machine with an NVIDIA GPU and `onnxruntime-gpu` installed in place of `onnxruntime`:
    python bench/gpu_check.py [--seconds 3] [--batch 32]
Exit status: 0 when CUDA ran and matched the CPU, 1 on a mismatch, 2 when no usable CUDA provider was found (the
adapter's fallback is then shown, as a daemon would log it). Record its output in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import models  # noqa: E402

from adapters import DeviceUnavailable, SessionOptions, get_runtime  # noqa: E402


def rate(session, feed: dict[str, np.ndarray], seconds: float) -> tuple[float, float]:
    """(inferences per second, median latency in ms) of back-to-back runs."""
    session.run(feed)
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        session.run(feed)
        lat.append(time.perf_counter() - t0)
    return len(lat) / sum(lat), float(np.median(lat) * 1000)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    runtime = get_runtime("onnxruntime")
    model = {"model.onnx": models.small_cnn()}
    try:
        gpu = runtime.load(model, SessionOptions(device="gpu", fallback=False, threads=1))
    except DeviceUnavailable as exc:
        print(json.dumps({"cuda": False, "reason": str(exc)}))
        runtime.load(model, SessionOptions(device="gpu", fallback=True, threads=1)).close()  # shows the fallback line
        return 2
    cpu = runtime.load(model, SessionOptions(device="cpu", threads=1))
    feed = {"input": np.random.default_rng(0).random((args.batch, 3, 96, 96), dtype=np.float32)}
    want = cpu.run(feed)["probabilities"]
    got = gpu.run(feed)["probabilities"]
    max_diff = float(np.max(np.abs(want - got)))
    ok = bool(np.allclose(got, want, rtol=1e-4, atol=1e-5))
    results = {"cuda": True, "device": gpu.device, "batch": args.batch, "max_abs_diff": max_diff, "match": ok}
    for name, session in (("cpu_1_thread", cpu), ("cuda", gpu)):
        per_s, p50 = rate(session, feed, args.seconds)
        results[name] = {"batches_per_s": round(per_s, 1), "rows_per_s": round(per_s * args.batch),
                         "p50_ms": round(p50, 3)}
    print(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
