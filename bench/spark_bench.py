"""Spark scoring (daemon/spark.py) in local mode against the in-process runtime on the same model, rows and threads.

The bench's tabular classifier (30 features a row, ~70 ns a row in ONNX Runtime) over Parquet rows holding the
features in one array column, or in a column each: in-process ONNX Runtime in chunks of Spark's Arrow batch size,
with 1 and 2 threads; then Spark in local[1] and local[2] (one runtime thread per task), each measured three ways so
the cost is placed: the scan alone (Parquet into the JVM), the scan plus a Python identity that sends every column to
the Python workers and back, and the scoring (which sends back the id and the outputs). Every Spark figure runs once
to warm up (JVM, Python workers, each worker's one decryption), then the median of the rounds; the `noop` sink makes
Spark compute every column and write nothing. Appends its table to bench/RESULTS.md.

Usage: python bench/spark_bench.py [--rounds 3] [--rows 1000000] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import models  # noqa: E402
from harness import bench_keys, commit, machine, publish  # noqa: E402

from daemon import artifact  # noqa: E402

ARROW_BATCH = 10_000  # spark.sql.execution.arrow.maxRecordsPerBatch's default: one model run per Arrow batch
FILES = 8  # the input is this many Parquet files, so local[2] has partitions for both cores
#: the two ways a table holds the 30 features: one array column, or a column each (the model's input is [-1, 30])
LAYOUTS = {"array": "features in one array column", "columns": "30 feature columns"}


def bench_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=0.0, help="not used (runs are sized by rows)")
    parser.add_argument("--no-write", action="store_true", help="print the table without appending it to RESULTS.md")
    return parser.parse_args()


def in_process(model: bytes, x: np.ndarray, threads: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:ARROW_BATCH]})
    t0 = time.perf_counter()
    for i in range(0, len(x), ARROW_BATCH):
        sess.run(None, {name: x[i: i + ARROW_BATCH]})
    return len(x) / (time.perf_counter() - t0)


def identity(batches: Iterator[Any]) -> Iterator[Any]:
    yield from batches


def spark_session(cores: int, work: Path) -> Any:
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(f"local[{cores}]").appName("inferd-spark-bench")
    for key, value in {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                       "spark.sql.shuffle.partitions": str(cores), "spark.local.dir": str(work / "local"),
                       "spark.sql.warehouse.dir": str(work / "warehouse"), "spark.driver.memory": "2g"}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def timed(rows: int, run: Callable[[], None], rounds: int) -> float:
    run()  # warm-up: workers started, the model decrypted once per worker
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        rates.append(rows / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> int:
    args = bench_options()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    work = Path(tempfile.mkdtemp(prefix="inferd-spark-bench-"))
    kek, signer = bench_keys(work)
    model, sample = models.tabular_classifier()
    x = sample[np.random.default_rng(0).integers(0, len(sample), args.rows)]
    (work / "tabular.inferd").write_bytes(artifact.pack({"model.onnx": model}, name="tabular", version="1",
                                                        runtime="onnxruntime", kek=kek, signing_key=signer))
    import pyarrow as pa
    import pyarrow.parquet as pq

    for layout in LAYOUTS:
        (work / layout).mkdir()
        for k, part in enumerate(np.array_split(np.arange(args.rows), FILES)):
            rows = x[part]
            cols = {"id": pa.array(part)}
            if layout == "array":
                cols["X"] = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), rows.shape[1])
            else:
                cols.update({f"f{j}": pa.array(rows[:, j]) for j in range(rows.shape[1])})
            pq.write_table(pa.table(cols), work / layout / f"part-{k}.parquet")

    results: list[tuple[str, int, float, float]] = []  # (path, cores, rows/s, in-process rows/s on as many threads)
    base = {t: statistics.median(in_process(model, x, t) for _ in range(args.rounds)) for t in (1, 2)}
    for t in (1, 2):
        results.append(("in-process ONNX Runtime", t, base[t], base[t]))
    from daemon.spark import score_dataframe

    for cores in (1, 2):
        spark = spark_session(cores, work)
        try:
            for layout, words in LAYOUTS.items():
                df = spark.read.parquet(str(work / layout))
                scored = score_dataframe(df, str(work / "tabular.inferd"), kek=str(work / "bench.kek"),
                                         signers=str(work / "sign.key.pub"), keep=["id"], threads=1,
                                         batch_rows=ARROW_BATCH)
                echo = df.mapInArrow(identity, df.schema)
                runs = {f"Spark, {words}: Parquet scan only": df,
                        f"Spark, {words}: scan + Python identity (every column there and back)": echo,
                        f"Spark, {words}: scan + score (daemon/spark.py)": scored}
                for label, frame in runs.items():
                    rate = timed(args.rows, lambda f=frame: f.write.format("noop").mode("overwrite").save(),
                                 args.rounds)
                    results.append((label, cores, rate, base[cores]))
        finally:
            spark.stop()

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Spark run of {now} (commit {commit()})", "",
             f"Machine: {machine()}. The tabular classifier over {args.rows:,} Parquet rows ({FILES} files; the 30 "
             f"features in one array column, or in 30 columns), runs of {ARROW_BATCH:,} rows (Spark's Arrow batch); "
             "Spark in local mode with one runtime thread per task, so local[N] compares with the in-process runtime "
             "on N threads; "
             f"{args.rounds} rounds after a warm-up, medians; Spark's `noop` sink (everything computed, nothing "
             "written).", "",
             "| path | cores (threads) | rows/s | of in-process |", "|---|---:|---:|---:|"]
    for label, cores, rate, ref in results:
        lines.append(f"| {label} | {cores} | {rate:,.0f} | {rate / ref:.2f}x |")
    publish("\n".join(lines), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
