"""The executor side of Spark scoring: open the artifact once per Python worker process, then score Arrow batches.

Everything here runs inside Spark's Python workers, never on the driver: the KEK is read there from a file (a path
mounted on every executor, a file shipped with ``--files`` / ``SparkContext.addFile``, or a path named by an
environment variable), so neither the key nor the decrypted model ever travels in the plan, the pickled closure or
the driver's memory. The model is decrypted in memory and kept in a module-level cache keyed by the artifact's
sha256 and key id, so a worker that Spark reuses for many tasks (``spark.python.worker.reuse``, the default) decrypts
it once. docs/batch.md ("Spark") is the user's side of this.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.batch_score import score_rows

if TYPE_CHECKING:
    import pyarrow as pa

    from adapters.base import Session, TensorSpec
    from daemon.batch_rows import InputPlan

#: the column that says why a row was not scored (null for the rows that were)
REJECT_COLUMN = "reject_reason"

#: V2 datatypes -> the numpy type an output column is written as (Spark has no unsigned types and no FP16)
OUTPUT_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.int16, "UINT16": np.int32, "UINT32": np.int64, "FP16": np.float32, "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass(frozen=True)
class ModelRef:
    """Where an executor finds the artifact and its keys: references only (file names and paths), never key bytes,
    since this object is pickled into the plan Spark ships to every executor."""

    artifact: str
    keks: tuple[str, ...] = ()
    kek_env: str | None = None
    signers: tuple[str, ...] = ()
    require_signature: bool = True
    threads: int = 0  # 0: the task's CPUs (spark.task.cpus)


#: (artifact sha256, key id, the keys named, threads) -> the session this worker process opened: a hit needs the same
#: key references, so a call that names a wrong key or another signer opens (and fails) afresh. LOADS counts the
#: decryptions of each (sha256, key id), so a test (or an operator in a notebook) can see that a worker decrypted once
_CACHE: dict[tuple[Any, ...], Session] = {}
LOADS: Counter[tuple[str, str]] = Counter()
_IDENTITY: dict[tuple[str, int, int, int], tuple[str, str]] = {}
_LOCK = threading.Lock()


def resolve_file(name: str, secret: bool) -> Path:
    """A path that exists on this executor, else a file of that name distributed with ``--files``.

    Spark leaves its copy of a distributed file with mode 0711; a secret is tightened to 0600 (this worker's own
    copy) so that the daemon's rule for key files (no access for group or others) holds unchanged."""
    path = Path(name)
    if path.is_file():
        return path
    try:
        from pyspark import SparkFiles

        shipped = Path(SparkFiles.get(path.name))
    except Exception:  # no Spark context here (a plain Python process): only real paths can be meant
        shipped = None
    if shipped is None or not shipped.is_file():
        raise FileNotFoundError(f"{name}: no such file on this executor, and no file {path.name!r} distributed with "
                                "--files or SparkContext.addFile")
    if secret:
        # a copy not ours to change (a cluster manager's shared cache) stays as it is: the key file check decides
        with contextlib.suppress(OSError):
            os.chmod(shipped, 0o600)
    return shipped


def _kek_paths(ref: ModelRef) -> list[Path]:
    paths = [resolve_file(k, secret=True) for k in ref.keks]
    if ref.kek_env:
        value = os.environ.get(ref.kek_env)
        if not value:
            raise FileNotFoundError(f"${ref.kek_env} is not set on this executor: set it to the KEK file's path "
                                    f"(spark.executorEnv.{ref.kek_env}, or the executor pod's environment)")
        paths.append(resolve_file(value, secret=True))
    if not paths:
        raise ValueError("no KEK given: name a key file (kek=...) or an environment variable holding its path")
    return paths


def _identity(path: Path) -> tuple[str, str]:
    """(sha256, key id) of the artifact, read once per file version in this process: a cache hit costs a stat."""
    from daemon.artifact import read_header

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _IDENTITY:
        blob = path.read_bytes()
        header, _ = read_header(blob)
        _IDENTITY[key] = (hashlib.sha256(blob).hexdigest(), header.kek_id)
    return _IDENTITY[key]


def task_cpus() -> int:
    """The CPUs Spark gave the running task (``spark.task.cpus``); 1 outside a task."""
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        return max(1, int(context.cpus())) if context is not None else 1
    except Exception:
        return 1


def load_session(ref: ModelRef) -> Session:
    """This worker's session for the artifact: verified, decrypted and loaded in memory on first use only."""
    from adapters import SessionOptions, get_runtime
    from daemon import keys
    from daemon.artifact import open_artifact
    from daemon.config import KeySource

    path = resolve_file(ref.artifact, secret=False)
    digest, kek_id = _identity(path)
    threads = ref.threads or task_cpus()
    key = (digest, kek_id, ref.keks, ref.kek_env, ref.signers, ref.require_signature, threads)
    with _LOCK:
        session = _CACHE.get(key)
        if session is not None:
            return session
        keks = keys.load_keks([KeySource(path=p) for p in _kek_paths(ref)])
        signers = keys.load_signers([KeySource(path=resolve_file(s, secret=False)) for s in ref.signers])
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != digest:
            raise ValueError(f"{path} changed while it was being opened")
        opened = open_artifact(blob, keks, signers, require_signature=ref.require_signature)
        session = get_runtime(opened.header.runtime).load(opened.model_files(), SessionOptions(threads=threads))
        _CACHE[key] = session
        LOADS[(digest, kek_id)] += 1
        return session


def spec_doc(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


@dataclass(frozen=True)
class Probe:
    """mapInArrow over one row: the model's inputs and outputs as JSON, read on an executor (which keeps the session
    for the scoring tasks it runs next), so that the driver can plan the columns without the key."""

    ref: ModelRef

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        for _ in batches:
            pass
        session = load_session(self.ref)
        doc = {"inputs": [spec_doc(s) for s in session.inputs], "outputs": [spec_doc(s) for s in session.outputs]}
        yield pa.RecordBatch.from_pydict({"spec": [json.dumps(doc)]})


@dataclass(frozen=True)
class Scorer:
    """mapInArrow's function: each Arrow batch (at most ``batch_rows`` rows a run) in, kept columns + outputs out."""

    ref: ModelRef
    plans: tuple[InputPlan, ...]
    keep: tuple[str, ...]
    outputs: tuple[TensorSpec, ...]
    batch_rows: int
    allow_nan: bool
    one_row: bool

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        session = load_session(self.ref)
        for batch in batches:
            for start in range(0, batch.num_rows, self.batch_rows):
                yield self.score(session, batch.slice(start, self.batch_rows))

    def score(self, session: Session, batch: pa.RecordBatch) -> pa.RecordBatch:
        import pyarrow as pa

        from daemon.batch_rows import convert

        n = batch.num_rows
        columns = {}
        for name in {c for p in self.plans for c in p.columns}:
            col = batch.column(name)
            columns[name] = col.cast(pa.float64()) if pa.types.is_decimal(col.type) else col
        inputs, reasons = convert(columns, n, self.plans, self.allow_nan)
        good, results = score_rows(session, inputs, n, reasons, self.one_row)
        scored = np.zeros(n, dtype=bool)
        scored[good] = True
        arrays = [batch.column(k) for k in self.keep]
        for spec in self.outputs:
            arrays.append(_output_column(spec, results.get(spec.name), good, scored))
        arrays.append(pa.array([reasons.get(i) for i in range(n)], type=pa.string()) if reasons
                      else pa.nulls(n, pa.string()))
        return pa.RecordBatch.from_arrays(arrays, names=[*self.keep, *(s.name for s in self.outputs), REJECT_COLUMN])


def _output_column(spec: TensorSpec, values: np.ndarray | None, good: np.ndarray, scored: np.ndarray) -> pa.Array:
    """One output as a column: a value per row, or a flat array per row for an output of several values."""
    import pyarrow as pa

    dtype = OUTPUT_NUMPY[spec.datatype]
    n = len(scored)
    per_row = spec.shape[1:]
    width = int(np.prod(values.shape[1:])) if values is not None else int(np.prod([max(d, 1) for d in per_row]))
    full = np.zeros((n, width) if per_row else n, dtype=dtype)
    if values is not None:
        full[good] = values.reshape(len(good), -1) if per_row else values
    nulls = None if scored.all() else ~scored
    if not per_row:
        return pa.array(full, mask=nulls)
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    mask = None if nulls is None else pa.array(nulls)
    return pa.ListArray.from_arrays(offsets, pa.array(full.reshape(-1)), mask=mask)

