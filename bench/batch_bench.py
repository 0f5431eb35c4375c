"""`inferd batch` against the in-process runtime on the same model, input file, library and threads, in one run.

The bench's tabular classifier (30 features) and small CNN. The in-process reference is what a user would write by
hand, run in a fresh process as inferd batch is (only its loop is timed): read the same file with the same library
(numpy's memory map for .npy, pyarrow's Parquet reader), feed the same chunks to ONNX Runtime with one intra-op
thread, keep the outputs. `inferd batch` (``--threads 1``, a real
subprocess) does the same plus what it promises: rejects, committed chunks for resume, and an atomic, fsynced output.
Both run cold (a fresh session; the first chunk's run is timed too) and may use every CPU; the reference's loop is
single-threaded, while inferd batch reads and writes on threads of its own beside the runtime's one, so its CPU
seconds are shown too. Rounds alternate reference and batch so both see the same load; medians are reported.

Beside each ratio: the time to only read and decode the input and to only write the output (same library, fsynced as
batch must), and the ratio a serial reader-runner-writer could reach at best, ``ref / (ref + write)``. The exit
status is 1 when a ratio is below the target (issue 15: 0.9).

Usage: python bench/batch_bench.py [--rounds 3] [--no-write]   (runs are sized by rows; --seconds is not used)
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import models  # noqa: E402
from harness import REPO, bench_args, bench_keys, commit, machine, publish  # noqa: E402

from adapters.base import TensorSpec  # noqa: E402
from daemon import artifact  # noqa: E402
from daemon.batch import default_chunk_rows  # noqa: E402
from daemon.batch_io import dictionary_columns  # noqa: E402

TARGET = 0.9
#: (rows, chunk rows) per model, the chunk being inferd batch's default (~16 MiB of model input): the tabular model
#: costs ~65 ns a row, so reading and writing weigh as much as the model; the CNN (1x3x96x96 a row) ~90 us, so the
#: runtime does
SIZES = {"tabular": (1_000_000, default_chunk_rows([TensorSpec("X", "FP32", (-1, 30))], "npy")),
         "cnn": (2_000, default_chunk_rows([TensorSpec("input", "FP32", (-1, 3, 96, 96))], "npy"))}
#: (model, input, output) as inferd batch runs them
CASES = [("tabular", "npy", "npz"), ("tabular", "parquet", "parquet"), ("cnn", "npy", "npz")]


def session(model: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1  # what the adapter sets for --threads 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def chunks(fmt: str, path: Path, chunk: int) -> Any:
    """The input's chunks as numpy arrays, read the way a user of the same library would."""
    if fmt == "npy":
        x = np.load(path, mmap_mode="r")
        for i in range(0, len(x), chunk):
            yield x[i:i + chunk]
        return
    import pyarrow.parquet as pq

    for b in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=chunk):
        col = b.column(0)
        yield col.flatten().to_numpy().reshape(len(col), -1)


def in_process(model: bytes, fmt: str, path: Path, chunk: int) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds to read, convert and score every chunk; and the outputs (for the write-only measurement)."""
    sess = session(model)
    name, names = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    outs = [sess.run(None, {name: x}) for x in chunks(fmt, path, chunk)]
    took = time.perf_counter() - t0
    return took, {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def pipelined(model: bytes, fmt: str, dst: str, path: Path, chunk: int, out: Path) -> float:
    """Seconds of the in-process loop with its outputs written as it goes by a second thread (row numbers and each
    output, one file, fsynced once at the end): what any batch scorer that must write its output durably could
    reach on this machine, with nothing for resume, rejects or atomic renames (the pipelined ceiling)."""
    import queue
    import threading

    sess = session(model)
    name, names = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
    q: queue.Queue[Any] = queue.Queue(1)

    def write() -> None:
        with out.open("wb") as f:
            writer: Any = None
            row = 0
            while (item := q.get()) is not None:
                n = len(item[0])
                cols = {"row": np.arange(row, row + n), **dict(zip(names, item))}
                row += n
                if dst == "parquet":
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    table = pa.table({k: v if v.ndim == 1 else pa.FixedSizeListArray.from_arrays(
                        pa.array(v.reshape(-1)), v.shape[1]) for k, v in cols.items()})
                    writer = writer or pq.ParquetWriter(f, table.schema)
                    writer.write_table(table)
                else:
                    for v in cols.values():
                        f.write(np.ascontiguousarray(v).data)
            if writer is not None:
                writer.close()
            f.flush()
            os.fsync(f.fileno())

    t0 = time.perf_counter()
    thread = threading.Thread(target=write)
    thread.start()
    for x in chunks(fmt, path, chunk):
        q.put(sess.run(None, {name: x}))
    q.put(None)
    thread.join()
    took = time.perf_counter() - t0
    out.unlink()
    return took


def reference_child(model: Path, fmt: str, path: Path, chunk: int) -> tuple[float, float]:
    """(seconds, CPU seconds) of ``in_process`` run in a fresh process, as a user's script would run: inferd batch
    is a fresh process too, so neither side finds the runtime's code and allocator warm from an earlier run."""
    # Arrow's allocator as inferd batch's (jemalloc: see docs/batch.md), so the two differ only in what batch does
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}
    done = subprocess.run([sys.executable, __file__, "--reference-child", str(model), fmt, str(path), str(chunk)],
                          check=True, capture_output=True, text=True, cwd=REPO, env=env)
    took, cpu = done.stdout.split()
    return float(took), float(cpu)


def _reference_child_main(model: str, fmt: str, path: str, chunk: str) -> int:
    blob = Path(model).read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF)
    took, _ = in_process(blob, fmt, Path(path), int(chunk))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime  # the session's load counts too
    print(took, cpu)
    return 0


def read_only(fmt: str, path: Path, chunk: int) -> float:
    """Seconds to read and decode the input: every page of a memory map touched, every Parquet chunk decoded."""
    t0 = time.perf_counter()
    for x in chunks(fmt, path, chunk):
        np.asarray(x).reshape(-1)[::1024].sum()  # one value per 4 KiB page of float32
    return time.perf_counter() - t0


def write_only(fmt: str, outputs: dict[str, np.ndarray], path: Path) -> float:
    """Seconds to write the output (row numbers and every output) with the same library, fsynced."""
    n = len(next(iter(outputs.values())))
    t0 = time.perf_counter()
    with path.open("wb") as f:
        if fmt == "npz":
            np.savez(f, row=np.arange(n), **outputs)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols: dict[str, Any] = {"row": np.arange(n)}
            for k, v in outputs.items():
                cols[k] = v if v.ndim == 1 else pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
            table = pa.table(cols)
            pq.write_table(table, f, use_dictionary=dictionary_columns(table.schema))  # as inferd batch writes it
        f.flush()
        os.fsync(f.fileno())
    took = time.perf_counter() - t0
    path.unlink()
    return took


def batch_run(work: Path, model: str, source: Path, out: Path) -> tuple[float, float, float]:
    """(seconds of the scoring run as inferd batch times it, seconds end to end with the process's start-up, CPU
    seconds of the process)."""
    for leftover in (out, out.with_name(out.name + ".inferd-batch")):
        subprocess.run(["rm", "-rf", str(leftover)], check=True)
    cmd = [sys.executable, "-m", "daemon", "batch", str(work / f"{model}.inferd"), "--input", str(source),
           "--output", str(out), "--kek", str(work / "bench.kek"), "--signer", str(work / "sign.key.pub"),
           "--threads", "1"]  # and the default --chunk-rows, which is `chunk`
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    # "scored N rows in 0.34s (2,941,176 rows/s)": the rate is from the unrounded time
    rows = int(done.stdout.split("scored ")[1].split(" rows")[0].replace(",", ""))
    rate = float(done.stdout.split(" (")[1].split(" rows/s")[0].replace(",", ""))
    return rows / rate if rows else 0.0, wall, cpu


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    args = bench_args()
    work = Path(tempfile.mkdtemp(prefix="inferd-batch-bench-"))
    kek, signer = bench_keys(work)
    tab_model, tab_rows = models.tabular_classifier()
    rng = np.random.default_rng(0)
    blobs = {"tabular": tab_model, "cnn": models.small_cnn()}
    data = {"tabular": tab_rows[rng.integers(0, len(tab_rows), SIZES["tabular"][0])],
            "cnn": rng.random((SIZES["cnn"][0], 3, 96, 96), dtype=np.float32)}
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, blob in blobs.items():
        (work / f"{name}.inferd").write_bytes(artifact.pack({"model.onnx": blob}, name=name, version="1",
                                                            runtime="onnxruntime", kek=kek, signing_key=signer))
        (work / f"{name}.onnx").write_bytes(blob)
        np.save(work / f"{name}.npy", data[name])
        np.save(work / f"{name}-empty.npy", data[name][:0])  # a run of nothing: the start-up's CPU alone
    x = data["tabular"]
    table = pa.table({"X": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])})
    pq.write_table(table, work / "tabular.parquet")
    pq.write_table(table.slice(0, 0), work / "tabular-empty.parquet")
    raw: dict[tuple[str, str, str], dict[str, list[float]]] = {c: {} for c in CASES}

    def note(case: tuple[str, str, str], key: str, value: float) -> None:
        raw[case].setdefault(key, []).append(value)

    steps: list[Callable[[], None]] = []
    for case in CASES:
        model, src, dst = case
        rows, chunk = SIZES[model]
        path = work / f"{model}.{src}"

        def reference(case: tuple[str, str, str] = case, model: str = model, src: str = src, dst: str = dst,
                      path: Path = path, chunk: int = chunk) -> None:
            took, cpu = reference_child(work / f"{model}.onnx", src, path, chunk)
            note(case, "ref", took)
            note(case, "ref_cpu", cpu)
            warm, outputs = in_process(blobs[model], src, path, chunk)  # and its outputs for the write-only one
            note(case, "ref_warm", warm)
            note(case, "read", read_only(src, path, chunk))
            note(case, "write", write_only(dst, outputs, work / f"ref-out.{dst}"))
            note(case, "pipelined", pipelined(blobs[model], src, dst, path, chunk, work / f"pipe-out.{dst}"))

        def inferd(case: tuple[str, str, str] = case, model: str = model, path: Path = path, dst: str = dst) -> None:
            own, wall, cpu = batch_run(work, model, path, work / f"out-{model}.{dst}")
            note(case, "batch", own)
            note(case, "wall", wall)
            note(case, "cpu", cpu)

        steps += [reference, inferd]

        def startup(case: tuple[str, str, str] = case, model: str = model, src: str = src, dst: str = dst) -> None:
            _, _, cpu = batch_run(work, model, work / f"{model}-empty.{src}", work / f"out-{model}-empty.{dst}")
            note(case, "startup_cpu", cpu)  # the same formats: their modules' imports are start-up too

        steps.append(startup)
    for r in range(args.rounds):
        for step in steps if r % 2 == 0 else steps[::-1]:  # alternate the order: neither side always goes first
            step()

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Batch run of {now} (commit {commit()})", "",
             f"Machine: {machine()}; load average {os.getloadavg()[0]:.2f} at the end (the CPUs are shared). The "
             f"tabular classifier ({SIZES['tabular'][0]:,} rows, chunks of {SIZES['tabular'][1]:,}) and the small "
             f"CNN ({SIZES['cnn'][0]:,} rows, chunks of {SIZES['cnn'][1]}), one runtime thread, every CPU allowed; "
             f"{args.rounds} rounds, medians. in-process: a fresh process (as inferd batch is, and with its Arrow allocator, "
             "jemalloc) reading the same file with the same library, the same chunks run cold, outputs kept in memory, "
             "its loop timed. inferd batch: rows/s as it times its own run (read, check, run, "
             "commit each chunk, write the output atomically); end to end adds the process's start-up (imports, "
             "decrypt, load); CPU s: the reference's loop, and the batch process's less its start-up (a run over an "
             "empty input, the same rounds). read and write: the input alone read and decoded, the "
             "output alone written (fsynced); serial ceiling = in-process / (in-process + write); pipelined ceiling: the "
             "in-process loop with a second thread writing its outputs as they come (one file, one fsync at the end: "
             "nothing for resume, rejects or renames), over in-process; of in-process in a warm process: the same loop run "
             "in the bench's own process, where the runtime and pyarrow have run before.", "",
             "| model | input -> output | in-process rows/s | inferd batch rows/s | of in-process | read ms | write ms "
             "| serial ceiling | pipelined ceiling | of pipelined | of in-process in a warm process | in-process CPU s "
             "| batch run CPU s | end to end rows/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    missed = []
    for case in CASES:
        model, src, dst = case
        rows = SIZES[model][0]
        m = {k: median(v) for k, v in raw[case].items()}
        ratio = m["ref"] / m["batch"]
        if ratio < TARGET:
            missed.append(f"{model} {src}: {ratio:.6f}")
        lines.append(f"| {model} | .{src} -> .{dst} | {rows / m['ref']:,.0f} | {rows / m['batch']:,.0f} | "
                     f"{ratio:.6f} | {1e3 * m['read']:.1f} | {1e3 * m['write']:.1f} | "
                     f"{m['ref'] / (m['ref'] + m['write']):.4f} | {m['ref'] / m['pipelined']:.4f} | "
                     f"{m['pipelined'] / m['batch']:.4f} | {m['ref_warm'] / m['batch']:.4f} | {m['ref_cpu']:.2f} | {m['cpu'] - m['startup_cpu']:.2f} | "
                     f"{rows / m['wall']:,.0f} |")
    publish("\n".join(lines), args)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    if missed:
        print(f"target {TARGET} of in-process missed: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reference-child"]:
        raise SystemExit(_reference_child_main(*sys.argv[2:6]))
    raise SystemExit(main())
