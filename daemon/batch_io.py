"""Streaming readers and writers for `inferd batch`: CSV, JSON lines, Parquet, .npy/.npz, a file or a folder of them.

Memory is bounded by the pieces read, never by the file: CSV through pyarrow's streaming reader, Parquet by record
batches, .npy memory-mapped; JSON lines are parsed line by line with orjson so a malformed line is one rejected row
rather than a failed run. The final output is streamed to a temp file beside its name, fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

# pyarrow takes its allocator when first imported: jemalloc, unless the user chose one, since mimalloc handles a chunk
# freed on another thread than the reader's badly (docs/batch.md, "Throughput"); no child inherits the variable
_CHOSEN = "ARROW_DEFAULT_MEMORY_POOL" in os.environ
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from daemon.batch_arrow import arrow_of, numpy_of  # noqa: E402
from daemon.fsutil import atomic_output  # noqa: E402

if not _CHOSEN:
    del os.environ["ARROW_DEFAULT_MEMORY_POOL"]

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".npy": "npy", ".npz": "npz"}


def format_of(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}") from None


@dataclass
class Piece:
    """Rows read in one go: columns by name and rows already known bad (a malformed JSON line)."""

    columns: dict[str, Any]
    n: int
    bad: dict[int, str] = field(default_factory=dict)

    def tail(self, start: int) -> Piece:
        return Piece({k: v[start:] for k, v in self.columns.items()}, self.n - start,
                     {i - start: r for i, r in self.bad.items() if i >= start})


def input_files(path: Path) -> list[Path]:
    """A file, or a folder's files of one format in name order (hidden and ``_`` files skipped, as Spark writes)."""
    if not path.is_dir():
        if not path.exists():
            raise ValueError(f"input {path} does not exist")
        format_of(path)
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
                   and p.suffix.lower() in FORMATS)
    if not files:
        raise ValueError(f"folder {path} holds no input file ({', '.join(FORMATS)})")
    kinds = {format_of(p) for p in files}
    if len(kinds) > 1:
        raise ValueError(f"folder {path} mixes formats ({', '.join(sorted(kinds))}); give one format per folder")
    return files


class Source:
    """The input: its column names (file order), the numeric ones, its row count where known, and its pieces."""

    def __init__(self, path: Path, piece_rows: int) -> None:
        self.files = input_files(path)
        self.format = format_of(self.files[0])
        self.piece_rows = piece_rows
        self.bytes_total = sum(p.stat().st_size for p in self.files)
        self.bytes_done = 0
        self.columns, self.numeric = self._schema(self.files[0])
        self.total_rows = count_rows(self.files)

    def _schema(self, path: Path) -> tuple[list[str], list[str]]:
        if self.format == "csv":
            # CSV has no types: every column counts as numeric, since a column whose first block held a bad value
            # would otherwise drop out of the features silently (its bad values are rejected row by row instead)
            names = pacsv.open_csv(path).schema.names  # reads the first block only
            return names, names
        if self.format == "parquet":
            schema = pq.ParquetFile(path).schema_arrow
            return schema.names, [f.name for f in schema if pa.types.is_integer(t := f.type) or pa.types.is_floating(t)]
        if self.format == "jsonl":
            with path.open("rb") as f:
                first = next((line for line in f if line.strip()), b"{}")
            try:
                row = orjson.loads(first)
            except orjson.JSONDecodeError:
                raise ValueError(f"{path}: the first line is not JSON") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: each line must be a JSON object")
            return list(row), [k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        arrays = self._arrays(path)
        return list(arrays), [k for k, a in arrays.items() if a.ndim == 1 and a.dtype.kind in "iuf"]

    def _arrays(self, path: Path) -> dict[str, np.ndarray]:
        if self.format == "npy":
            return {self.files[0].stem: np.load(path, mmap_mode="r", allow_pickle=False)}  # one name for a folder
        npz = np.load(path, allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}  # zip members cannot be memory-mapped: read one by one, whole
        lengths = {len(a) if a.ndim else 0 for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: the arrays have different numbers of rows")
        return arrays

    def fraction(self) -> float | None:
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total else None

    def pieces(self, wanted: Sequence[str]) -> Iterator[Piece]:
        done = 0
        for path in self.files:
            columns, _ = self._schema(path) if path != self.files[0] else (self.columns, None)
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise ValueError(f"{path} has no column {', '.join(map(repr, missing))}")
            yield from getattr(self, f"_read_{self.format}")(path, list(wanted))
            done += path.stat().st_size
            self.bytes_done = done

    def _read_csv(self, path: Path, wanted: list[str]) -> Iterator[Piece]:
        # every column as text: a bad value later in the file costs its row, not the run (inferred types would fail)
        convert = pacsv.ConvertOptions(column_types=dict.fromkeys(self.columns, pa.string()),
                                       include_columns=wanted, strings_can_be_null=False)
        with path.open("rb") as raw:
            counted = _Counting(raw, lambda n: setattr(self, "bytes_done", self.bytes_done + n))
            reader = pacsv.open_csv(counted, convert_options=convert)
            for batch in reader:
                for start in range(0, batch.num_rows, self.piece_rows):
                    part = batch.slice(start, self.piece_rows)
                    yield Piece({c: part.column(c) for c in wanted}, part.num_rows)

    def _read_parquet(self, path: Path, wanted: list[str]) -> Iterator[Piece]:
        # pre_buffer (pyarrow's default) reads ahead many row groups at once: memory would follow the file's size
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=self.piece_rows, columns=wanted):
            yield Piece({c: batch.column(c) for c in wanted}, batch.num_rows)

    def _read_jsonl(self, path: Path, wanted: list[str]) -> Iterator[Piece]:
        with path.open("rb") as f:
            while True:
                cols: dict[str, list[Any]] = {c: [] for c in wanted}
                bad: dict[int, str] = {}
                n = 0
                for line in f:
                    self.bytes_done += len(line)
                    if not line.strip():
                        continue
                    try:
                        row = orjson.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as exc:
                        bad[n] = f"malformed JSON line: {str(exc).splitlines()[0][:80]}"
                        row = {}
                    for c in wanted:
                        cols[c].append(row.get(c))
                    n += 1
                    if n == self.piece_rows:
                        break
                if n == 0:
                    return
                yield Piece(cols, n, bad)

    def _read_npy(self, path: Path, wanted: list[str]) -> Iterator[Piece]:
        arrays = self._arrays(path)
        total = len(next(iter(arrays.values())))
        for start in range(0, total, self.piece_rows):
            yield Piece({c: np.asarray(arrays[c][start:start + self.piece_rows]) for c in wanted},
                        min(self.piece_rows, total - start))

    _read_npz = _read_npy


def count_rows(files: Sequence[Path]) -> int | None:
    """The rows of these input files where their format records it (Parquet's metadata, the .npy headers), without
    reading their data; None for CSV and JSON lines, or a file whose header cannot be read."""
    fmt = format_of(files[0]) if files else None
    try:
        if fmt == "parquet":
            return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        if fmt == "npy":
            return sum(len(np.load(p, mmap_mode="r", allow_pickle=False)) for p in files)
        if fmt == "npz":
            return sum(_npz_rows(p) for p in files)
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return None


def _npz_rows(path: Path) -> int:
    """The rows of a .npz file: its first member's first dimension (the reader checks the others agree), read from
    that member's .npy header only."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if not names:
            return 0
        if not names[0].endswith(".npy"):
            raise ValueError(f"{path}: member {names[0]!r} is not a .npy array")
        with z.open(names[0]) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    return int(shape[0]) if shape else 0


class _Counting:
    """A file object that reports the bytes pyarrow reads from it (for the progress bar's ETA)."""

    def __init__(self, raw: IO[bytes], add: Callable[[int], None]) -> None:
        self.raw, self.add, self.closed = raw, add, False

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.add(len(data))
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


# --- writing -------------------------------------------------------------------------------------------------


#: the output formats written as the run goes, one batch at a time, whatever the input; .npy and .npz need the row
#: count first (the headers, the members' offsets): written as the run goes when the input records it
#: (daemon/batch_npz.py), else assembled from the parts at the end
STREAMED = ("parquet", "csv", "jsonl")
#: a streamed output is fdatasync'd whenever this much more was written (one small chunk at a time would not)
SYNC_BYTES = 8 << 20


def row_shapes(schema: pa.Schema) -> dict[str, tuple[int, ...]]:
    """Each output's shape per row, kept in the part files' schema metadata (lists there are flattened)."""
    meta = schema.metadata or {}
    return {f.name: tuple(orjson.loads(meta.get(f"shape:{f.name}".encode(), b"[]"))) for f in schema}


class OutputStream:
    """An output of a streamed format, written batch by batch to a temp file beside its name; ``close`` makes it
    the output (fsynced, renamed), ``abort`` removes the temp file. Nothing carries the output's name before."""

    def __init__(self, path: Path, fmt: str) -> None:
        if fmt not in STREAMED:
            raise ValueError(f"a {fmt} output is not written as a stream")
        self.path, self.fmt = path, fmt
        self._stack = contextlib.ExitStack()
        self._file: IO[bytes] | None = None
        self._writer: Any = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._synced = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self._file is None:
            self._open(batch.schema)
        if not batch.num_rows:
            return
        if self.fmt == "parquet":
            self._writer.write_batch(batch)
        elif self.fmt == "csv":
            self._writer.write_batch(_flatten(batch, self._shapes))
        else:
            cols = [(name, _numpy(batch.column(name), self._shapes[name])) for name in batch.schema.names]
            assert self._file is not None
            self._file.write(b"".join(orjson.dumps({k: v[i] for k, v in cols}, option=orjson.OPT_SERIALIZE_NUMPY
                                                   | orjson.OPT_APPEND_NEWLINE) for i in range(batch.num_rows)))

    def sync(self) -> None:
        """Put what was written so far on disk once a few MiB have gathered, so the final fsync has only the tail
        left to wait for (called on the writer thread, where the wait overlaps the scoring)."""
        if self._file is None:
            return
        self._file.flush()
        written = self._file.tell()
        if written - self._synced >= SYNC_BYTES:
            os.fdatasync(self._file.fileno())
            self._synced = written

    def _open(self, schema: pa.Schema) -> None:
        self._file = f = self._stack.enter_context(atomic_output(self.path))
        self._shapes = row_shapes(schema)
        if self.fmt == "parquet":
            self._writer = self._stack.enter_context(pq.ParquetWriter(f, schema.remove_metadata(),
                                                                      use_dictionary=dictionary_columns(schema)))
        elif self.fmt == "csv":
            empty = pa.RecordBatch.from_pylist([], schema=schema)
            self._writer = pacsv.CSVWriter(f, _flatten(empty, self._shapes).schema)
            self._stack.callback(self._writer.close)

    def close(self, schema: pa.Schema) -> None:
        """Finish the output (``schema`` gives an empty one its columns when no batch came)."""
        if self._file is None:
            self._open(schema)
        self._stack.close()  # the writers close (footer) before atomic_output fsyncs and renames

    def abort(self) -> None:
        with contextlib.suppress(_Aborted):
            self._stack.__exit__(_Aborted, _Aborted(), None)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The output columns worth Parquet's dictionary encoding: labels and other integer or text outputs. Not the ids
    (unique per row) nor floating outputs (scores, probabilities: hardly two alike), where building a dictionary
    per row group, then dropping it, costs more than all the rest of writing them."""

    def floating(t: pa.DataType) -> bool:
        return bool(pa.types.is_floating(t) or (pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)))

    return [f.name for f in list(schema)[1:] if not floating(f.type)]


class _Aborted(Exception):
    """Thrown into the temp file's context so that it is removed rather than renamed."""


def write_output(path: Path, fmt: str, batches: Callable[[], Iterator[pa.RecordBatch]], schema: pa.Schema,
                 rows: int) -> None:
    """Write the scored rows (an id column then each output; ``batches`` may be iterated more than once)."""
    if fmt in STREAMED:
        stream = OutputStream(path, fmt)
        try:
            for b in batches():
                stream.write(b)
        except BaseException:
            stream.abort()
            raise
        stream.close(schema)
        return
    shapes = row_shapes(schema)
    names = schema.names[1:] if fmt == "npy" else schema.names
    if fmt == "npy" and len(names) != 1:
        raise ValueError(f"a .npy output holds one array but the model has {len(names)} outputs: use .npz")
    with atomic_output(path) as f:
        if fmt == "npy":
            _stream_npy(f, schema.field(names[0]), batches, shapes, rows)
        else:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
                for name in names:
                    with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                        _stream_npy(member, schema.field(name), batches, shapes, rows)


def _numpy(col: pa.Array, shape: tuple[int, ...]) -> Any:
    if pa.types.is_fixed_size_list(col.type):
        return numpy_of(col.flatten()).reshape((len(col), *shape))
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.to_pylist()
    return numpy_of(col)


def _flatten(b: pa.RecordBatch, shapes: dict[str, tuple[int, ...]]) -> pa.RecordBatch:
    """CSV has no lists: an output of shape [K] per row becomes columns name_0 .. name_{K-1} (name_i_j for more)."""
    arrays, names = [], []
    for name in b.schema.names:
        col, shape = b.column(name), shapes[name]
        if not pa.types.is_fixed_size_list(col.type):
            arrays.append(col)
            names.append(name)
            continue
        values = col.flatten()
        width = int(np.prod(shape))
        for k, index in enumerate(np.ndindex(*shape)):
            arrays.append(arrow_of(numpy_of(values)[k::width]))
            names.append("_".join([name, *map(str, index)]))
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _stream_npy(f: IO[bytes], column: pa.Field, batches: Callable[[], Iterator[pa.RecordBatch]],
                shapes: dict[str, tuple[int, ...]], rows: int) -> None:
    """One array written without holding it: the header (its shape is known from the journal), then each batch."""
    name = column.name
    first = next((b for b in batches() if b.num_rows), None)  # none: the column's own type gives the dtype
    sample = _numpy(first.column(name) if first is not None else pa.array([], column.type), shapes[name])
    if isinstance(sample, list):  # string ids: fixed-width unicode of the longest
        width = max((len(str(s)) for b in batches() for s in b.column(name).to_pylist()), default=1)
        dtype = np.dtype(f"<U{width}")
    else:
        dtype = sample.dtype
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *shapes[name])}
    np.lib.format.write_array_header_2_0(f, header)
    for b in batches():
        values = np.ascontiguousarray(np.asarray(_numpy(b.column(name), shapes[name]), dtype=dtype))
        f.write(values.reshape(-1).view(np.uint8).data)  # the array's own bytes: no copy through tobytes()
