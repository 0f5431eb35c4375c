"""`inferd batch` against the in-process runtime on the same model, rows and threads, in one run.

The bench's tabular classifier (30 features) and small CNN: the same rows scored by ONNX Runtime in-process, chunk by
chunk (the runtime's own limit), and by `inferd batch` from Parquet or .npy. One thread, pinned to one CPU; the
median of the rounds. Appends its table to
bench/RESULTS.md.

Usage: python bench/batch_bench.py [--rounds 3] [--no-write]   (runs are sized by rows; --seconds is not used)
"""

from __future__ import annotations

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
from run import SERVER_CPU, bench_args, bench_keys, commit, machine, publish  # noqa: E402

from daemon import artifact  # noqa: E402

#: (rows, chunk rows) per model: the tabular model costs ~70 ns a row, so reading and writing dominate; the CNN
#: (1x3x96x96 a row) costs ~60 us, so the runtime does
SIZES = {"tabular": (1_000_000, 65_536), "cnn": (2_000, 256)}


def in_process(model: bytes, x: np.ndarray, chunk: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:chunk]})
    t0 = time.perf_counter()
    for i in range(0, len(x), chunk):
        sess.run(None, {name: x[i: i + chunk]})
    return len(x) / (time.perf_counter() - t0)


def batch_run(work: Path, model: str, source: Path, out: Path, rows: int, chunk: int) -> tuple[float, float]:
    """(rows/s of the scoring run as inferd batch times it, rows/s end to end including process start-up)."""
    for leftover in (out, out.with_name(out.name + ".inferd-batch")):
        subprocess.run(["rm", "-rf", str(leftover)], check=True)
    cmd = [sys.executable, "-m", "daemon", "batch", str(work / f"{model}.inferd"), "--input", str(source),
           "--output", str(out), "--kek", str(work / "bench.kek"), "--signer", str(work / "sign.key.pub"),
           "--threads", "1", "--chunk-rows", str(chunk)]
    t0 = time.perf_counter()
    done = subprocess.run(["taskset", "-c", str(SERVER_CPU), *cmd], check=True, cwd=REPO, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    own = float(done.stdout.split(" rows in ")[1].split("s")[0])  # "scored N rows in 0.34s (...)"
    return rows / own, rows / wall


def main() -> int:
    args = bench_args()
    os.sched_setaffinity(0, {SERVER_CPU})
    work = Path(tempfile.mkdtemp(prefix="inferd-batch-bench-"))
    kek, signer = bench_keys(work)
    tab_model, tab_rows = models.tabular_classifier()
    rng = np.random.default_rng(0)
    data = {"tabular": (tab_model, tab_rows[rng.integers(0, len(tab_rows), SIZES["tabular"][0])]),
            "cnn": (models.small_cnn(), rng.random((SIZES["cnn"][0], 3, 96, 96), dtype=np.float32))}
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, (blob, x) in data.items():
        (work / f"{name}.inferd").write_bytes(artifact.pack({"model.onnx": blob}, name=name, version="1",
                                                            runtime="onnxruntime", kek=kek, signing_key=signer))
        np.save(work / f"{name}.npy", x)
    x = data["tabular"][1]
    pq.write_table(pa.table({"X": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])}),
                   work / "tabular.parquet")
    runs = [("tabular", "in-process", None), ("tabular", "Parquet to Parquet", "parquet"),
            ("tabular", ".npy to .npz", "npy"), ("cnn", "in-process", None), ("cnn", ".npy to .npz", "npy")]
    raw: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for model, label, fmt in runs:
            rows, chunk = SIZES[model]
            blob, x = data[model]
            if fmt is None:
                rate = in_process(blob, x, chunk)
                raw.setdefault((model, label), []).append((rate, rate))
            else:
                out = work / f"out-{model}.{'parquet' if fmt == 'parquet' else 'npz'}"
                raw.setdefault((model, label), []).append(
                    batch_run(work, model, work / f"{model}.{fmt}", out, rows, chunk))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Batch run of {now} (commit {commit()})", "",
             f"Machine: {machine()}. The tabular classifier ({SIZES['tabular'][0]:,} rows, chunks of "
             f"{SIZES['tabular'][1]:,}) and the small CNN ({SIZES['cnn'][0]:,} rows, chunks of {SIZES['cnn'][1]}), "
             f"one runtime thread, everything on CPU {SERVER_CPU}; {args.rounds} rounds, medians. `inferd batch` "
             "rows/s as it times its own run (read, map, run, write, commit, assemble), and end to end with the "
             "process's start-up (imports, decrypt, load).", "",
             "| model | path | rows/s | of in-process | end to end rows/s |", "|---|---|---:|---:|---:|"]
    for model, label, _ in runs:
        own, wall = (statistics.median(v[i] for v in raw[(model, label)]) for i in range(2))
        base = statistics.median(v[0] for v in raw[(model, "in-process")])
        lines.append(f"| {model} | {label} | {own:,.0f} | {own / base:.2f}x | {wall:,.0f} |")
    report = "\n".join(lines)
    publish(report, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
