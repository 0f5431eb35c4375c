"""Score a Spark DataFrame with the encrypted artifact the daemon serves (docs/batch.md, "Spark").

The driver never opens the artifact nor reads a key: it asks one executor for the model's inputs and outputs (a
one-row job, whose worker then keeps the session), plans the column mapping with `inferd batch`'s rules
(daemon/batch_rows.py), and returns ``df.mapInArrow(...)`` whose function (daemon/spark_worker.py) opens the model once
per executor Python worker and scores each Arrow batch. The KEK stays a file reference all the way: what is pickled
into the plan names files, never their contents.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from daemon.spark_worker import OUTPUT_NUMPY, REJECT_COLUMN, ModelRef, Probe, Scorer

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import DataType, StructType

    from adapters.base import TensorSpec

__all__ = ["REJECT_COLUMN", "ModelRef", "score_dataframe", "model_specs", "output_schema"]


def score_dataframe(
    df: DataFrame,
    artifact: str,
    *,
    kek: str | Sequence[str] = (),
    kek_env: str | None = None,
    signers: str | Sequence[str] = (),
    require_signature: bool = True,
    inputs: Mapping[str, str | Sequence[str]] | None = None,
    outputs: Sequence[str] | None = None,
    keep: Sequence[str] | None = None,
    batch_rows: int = 10_000,
    threads: int = 0,
    allow_nan: bool = False,
    csv_text: bool = False,
) -> DataFrame:
    """``df`` scored: the ``keep`` columns (default: every column that feeds no input), each output, and
    ``reject_reason`` (null where the row was scored; the outputs are null where it was not).

    ``artifact``, ``kek`` and ``signers`` are paths that exist on every executor or names of files distributed with
    ``--files``; ``kek_env`` names an environment variable holding a KEK file's path on the executors. ``inputs``
    maps a model input to its column(s), as ``--map`` does for `inferd batch`; ``threads`` 0 gives each run the
    task's CPUs (``spark.task.cpus``). ``csv_text``: every column is text read from CSV, so each counts as numeric
    for the default mapping, as in `inferd batch`.
    """
    if batch_rows < 1 or threads < 0:
        raise ValueError("batch_rows must be at least 1 and threads at least 0")
    ref = ModelRef(artifact=str(artifact), keks=_names(kek), kek_env=kek_env, signers=_names(signers),
                   require_signature=require_signature, threads=threads)
    model_inputs, model_outputs = model_specs(df.sparkSession, ref)
    scorer = plan(df.schema, ref, model_inputs, model_outputs, inputs=inputs, outputs=outputs, keep=keep,
                  batch_rows=batch_rows, allow_nan=allow_nan, csv_text=csv_text)
    return df.mapInArrow(scorer, output_schema(df.schema, scorer))


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def model_specs(spark: Any, ref: ModelRef) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's inputs and outputs, as an executor that opened the artifact sees them."""
    from adapters.base import TensorSpec

    row = spark.range(0, 1, 1, 1).mapInArrow(Probe(ref), "spec string").collect()[0]
    doc = json.loads(row["spec"])

    def specs(key: str) -> list[TensorSpec]:
        return [TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in doc[key]]

    return specs("inputs"), specs("outputs")


def plan(
    schema: StructType, ref: ModelRef, model_inputs: Sequence[TensorSpec], model_outputs: Sequence[TensorSpec], *,
    inputs: Mapping[str, str | Sequence[str]] | None, outputs: Sequence[str] | None, keep: Sequence[str] | None,
    batch_rows: int, allow_nan: bool, csv_text: bool,
) -> Scorer:
    """The executors' function for this DataFrame's columns: `inferd batch`'s mapping rules, checked here so that a
    mapping that does not fit fails before any task runs."""
    from pyspark.sql.types import NumericType

    from daemon.batch_rows import plan_inputs

    names = list(schema.names)
    kept = list(keep or [])
    unknown = [c for c in kept if c not in names]
    if unknown:
        raise ValueError(f"keep: no column {', '.join(map(repr, unknown))} in the DataFrame; it has: "
                         f"{', '.join(names)}")
    maps = {name: [cols] if isinstance(cols, str) else list(cols) for name, cols in (inputs or {}).items()}
    mapped = {c for cols in maps.values() for c in cols}
    # kept columns are ids, not features, unless a mapping says otherwise
    candidates = [c for c in names if c not in kept or c in mapped]
    numeric = [f.name for f in schema.fields
               if f.name in candidates and (csv_text or isinstance(f.dataType, NumericType))]
    plans = plan_inputs(model_inputs, candidates, numeric, maps, None)
    if any(s.shape[:1] not in ((-1,), (1,)) for s in model_inputs):
        raise ValueError("the model's inputs have a fixed batch size other than 1; scoring needs a dynamic first "
                         "dimension (or 1)")
    if keep is None:
        fed = {c for p in plans for c in p.columns}
        kept = [c for c in names if c not in fed]
    by_name = {s.name: s for s in model_outputs}
    missing = [o for o in outputs or [] if o not in by_name]
    if missing:
        raise ValueError(f"outputs: the model has no output {', '.join(map(repr, missing))}; its outputs are: "
                         f"{', '.join(by_name)}")
    chosen = [by_name[o] for o in outputs] if outputs else list(model_outputs)
    clash = sorted({s.name for s in chosen} & set(kept) | ({REJECT_COLUMN} & set(kept)))
    if clash:
        raise ValueError(f"column(s) {', '.join(map(repr, clash))} of the DataFrame would be overwritten by the "
                         "scores: leave them out with keep=[...] or rename them")
    unsigned = [s.name for s in chosen if s.datatype not in OUTPUT_NUMPY]
    if unsigned:
        raise ValueError(f"output(s) {', '.join(unsigned)} have a datatype Spark cannot hold (UINT64, BYTES)")
    return Scorer(ref=ref, plans=tuple(plans), keep=tuple(kept), outputs=tuple(chosen), batch_rows=batch_rows,
                  allow_nan=allow_nan, one_row=any(s.shape[:1] != (-1,) for s in model_inputs))


def output_schema(schema: StructType, scorer: Scorer) -> StructType:
    """The kept columns as they were, then each output (an array per row where it has several values, its shape in
    the field's metadata), then ``reject_reason``."""
    from pyspark.sql.types import ArrayType, StringType, StructField, StructType

    fields = [schema[name] for name in scorer.keep]
    for spec in scorer.outputs:
        element = spark_type(spec.datatype)
        per_row = list(spec.shape[1:])
        fields.append(StructField(spec.name, ArrayType(element, containsNull=False) if per_row else element,
                                  nullable=True, metadata={"inferd_shape": per_row, "inferd_datatype": spec.datatype}))
    fields.append(StructField(REJECT_COLUMN, StringType(), nullable=True))
    return StructType(fields)


def spark_type(datatype: str) -> DataType:
    """A V2 datatype as the Spark type its column holds: unsigned types widen to the next signed one, FP16 to float."""
    from pyspark.sql import types as t

    table: dict[str, DataType] = {
        "BOOL": t.BooleanType(), "INT8": t.ByteType(), "INT16": t.ShortType(), "INT32": t.IntegerType(),
        "INT64": t.LongType(), "UINT8": t.ShortType(), "UINT16": t.IntegerType(), "UINT32": t.LongType(),
        "FP16": t.FloatType(), "FP32": t.FloatType(), "FP64": t.DoubleType(),
    }
    return table[datatype]
