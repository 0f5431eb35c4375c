"""`inferd-spark-score`: score Parquet, CSV or JSON lines with an artifact inside Spark and write Parquet.

Run it with ``spark-submit`` (the cluster's master, executors and ``--files``; this file is the application) or
directly for a local run (``--master local[4]``). The model work is daemon/spark.py's; this is arguments, reading,
writing and the summary line. docs/batch.md ("Spark") has the cluster recipe.
"""

# spark-submit runs this file as a script, which puts daemon/ itself first on sys.path, where its modules would shadow
# top-level packages of the same name: the package is imported from where it is installed instead
import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from typing import Any  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 3
#: an exception line of a Python trace: ``daemon.errors.WrongKey: the configured KEK ...``
_RAISED = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?P<name>[A-Z]\w*): (?P<message>.+)$")
READERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferd-spark-score", description="Score a table with an inferd artifact "
                                "inside Apache Spark; the results are written as Parquet.")
    p.add_argument("artifact", help="the artifact: a path on every executor, or a file name shipped with --files")
    p.add_argument("--input", "-i", required=True, help="a Parquet, CSV or JSON lines file or folder (any path "
                   "Spark reads: local, hdfs://, s3a://, ...)")
    p.add_argument("--output", "-o", required=True, help="the Parquet folder to write")
    p.add_argument("--input-format", choices=sorted(set(READERS.values())),
                   help="the input's format (default: from its suffix)")
    p.add_argument("--kek", action="append", default=[], help="KEK file: a path on every executor, or a file "
                   "name shipped with --files (repeatable)")
    p.add_argument("--kek-env", help="an environment variable that holds the KEK file's path on the executors")
    p.add_argument("--signer", action="append", default=[], help="trusted public key file, as --kek (repeatable)")
    p.add_argument("--map", action="append", default=[], metavar="COLUMN[,COLUMN...]=INPUT",
                   help="feed these columns (in this order) to this model input (repeatable)")
    p.add_argument("--keep", action="append", default=None, metavar="COLUMN", help="carry this column (a row id) "
                   "into the output (repeatable; default: every column that feeds no input)")
    p.add_argument("--outputs", action="append", default=None, metavar="NAME", help="write only these outputs")
    p.add_argument("--batch-rows", type=int, default=10_000, help="rows per model run at most (each Arrow batch "
                   "is one run or more)")
    p.add_argument("--threads", type=int, default=0, help="threads per model run (default: spark.task.cpus)")
    p.add_argument("--allow-nan", action="store_true", help="score NaN and inf inputs instead of rejecting them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--master", help="Spark master for a run without spark-submit (e.g. local[4])")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fmt = args.input_format or READERS.get(Path(args.input).suffix.lower())
    if fmt is None:
        return _fail(f"cannot tell the format of {args.input}: give --input-format")
    from pyspark.sql import SparkSession

    if args.master and args.master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # local workers: this very Python and its packages
    builder = SparkSession.builder.appName("inferd-spark-score")
    if args.master:
        builder = builder.master(args.master)
    spark = builder.getOrCreate()
    try:
        return _run(spark, args, fmt)
    except Exception as exc:  # Spark wraps an executor's error in a long trace: its last line says what went wrong
        return _fail(error_line(exc))
    finally:
        spark.stop()


def _run(spark: Any, args: argparse.Namespace, fmt: str) -> int:
    from pyspark.sql import functions as f

    from daemon.batch_rows import parse_maps
    from daemon.spark import REJECT_COLUMN, score_dataframe

    reader = spark.read
    if fmt == "csv":
        reader = reader.option("header", "true")
    df = reader.format(fmt).load(args.input)
    scored = score_dataframe(df, args.artifact, kek=args.kek, kek_env=args.kek_env, signers=args.signer,
                             inputs=parse_maps(args.map), outputs=args.outputs, keep=args.keep,
                             batch_rows=args.batch_rows, threads=args.threads, allow_nan=args.allow_nan,
                             csv_text=fmt == "csv")
    scored.write.mode("overwrite" if args.overwrite else "errorifexists").parquet(args.output)
    counts = spark.read.parquet(args.output).agg(
        f.count(f.lit(1)).alias("rows"), f.count(REJECT_COLUMN).alias("rejected")).collect()[0]
    note = f", {counts['rejected']:,} rejected (see column {REJECT_COLUMN})" if counts["rejected"] else ""
    print(f"scored {counts['rows'] - counts['rejected']:,} rows{note} into {args.output}")
    return EXIT_REJECTED if counts["rejected"] else EXIT_OK


def error_line(exc: BaseException) -> str:
    """The error itself: the last ``Name: message`` line of an executor's trace, without the module path."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [m for m in map(_RAISED.match, lines) if m]
    if raised:
        return f"{raised[-1]['name']}: {raised[-1]['message']}"
    return (lines or [type(exc).__name__])[-1]


def _fail(message: str) -> int:
    print(f"inferd-spark-score: error: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
