"""The work folder of one `inferd batch` run: committed chunks and the final assembly (docs/batch.md, "Chunks").

A chunk is committed by one file: its part (Arrow IPC: the scored rows, and in the schema's metadata the rejected
rows with their reasons), written to a temp file, fsynced and renamed. The committed chunks are the longest run of
part files from chunk 0 without a gap, so one fsync per chunk is enough: a part's name never points at rows that are
not on disk, and a power cut that keeps a later rename but loses an earlier one only shortens the run (the later
parts are redone). A .npy/.npz output written at its offsets (daemon/batch_npz.py) holds the rows itself: its
chunks' parts carry only their counts, rejects and the output's state, written once the rows are on disk (``settle``).
``journal.json`` holds what the run was started with, written once. The output appears under its name only once
written whole: written as the run goes (Parquet, CSV, JSON lines; .npy and .npz when the input records its row
count), else assembled from the parts at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from adapters.base import TensorSpec
from daemon.batch_arrow import arrow_of
from daemon.batch_io import STREAMED, OutputStream, count_rows, write_output
from daemon.batch_npz import ArrayStream
from daemon.fsutil import atomic_write, fsync_dir

JOURNAL = "journal.json"
FORMAT = 3
#: a .npy/.npz output written at its offsets as the run goes; it becomes the output at the end
STREAM = "output.partial"
#: written once the output in progress is sealed (whole and fsynced), just before it is renamed to the output: a run
#: stopped after it only has to finish the rename
SEALED = "sealed.json"
#: chunks written to it before their parts must be settled, when the writer is behind the scoring and never idle
MAX_PENDING = 4
_PART = re.compile(r"^part-(\d{8})\.arrow$")
_CHUNK = b"chunk"  # the part's schema metadata key for its counts and rejects (outputs' shapes are "shape:NAME")


class WorkFolder:
    def __init__(self, output: Path, identity: Mapping[str, Any], fmt: str) -> None:
        self.output, self.identity, self.fmt = output, dict(identity), fmt
        self.path = output.with_name(output.name + ".inferd-batch")
        # a .npy/.npz output is laid out from the input's row count, where its files record it
        rows = count_rows([Path(p[0]) for p in self.identity.get("input", [])]) if fmt not in STREAMED else None
        self.stream: OutputStream | ArrayStream | None = (
            OutputStream(output, fmt) if fmt in STREAMED else ArrayStream(output, fmt, rows, self.path / STREAM)
            if rows is not None else None)
        self._streamed = 0  # parts already written to the stream
        # what this run's commits (chunks ``_start`` on) leave for ``finish`` to know without reading them back: the
        # first with scored rows and its schema, and which had rejected rows
        self._start = 0
        self._first: pa.Schema | None = None
        self._rejected: dict[int, str] = {}  # chunk -> its reject lines
        # chunks written to a .npy/.npz output in progress whose parts wait for ``settle`` (one fdatasync for them)
        self._pending: list[tuple[int, pa.Schema]] = []
        self._id_type: pa.DataType | None = None  # the ids' type, which every chunk of a typed output keeps

    def start(self, resume: bool) -> dict[str, Any]:
        """The counts to go on from: fresh ones, or (``resume``) the interrupted run's, its stale files removed."""
        journal_path = self.path / JOURNAL
        if self.path.exists() and not resume:
            raise ValueError(f"{self.path} holds an interrupted run: continue it with --resume, or delete the folder "
                             "to start over")
        if resume and journal_path.exists():
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            if journal.get("format") != FORMAT:
                raise ValueError(f"--resume: {self.path} was written by another version of inferd batch; delete the "
                                 "folder to start over")
            changed = [k for k, v in self.identity.items() if journal["identity"].get(k) != v]
            if changed:
                raise ValueError(f"--resume: the run in {self.path} was started with another {', '.join(changed)}; "
                                 "rerun with the same model, input and options, or delete the folder")
            if (self.path / SEALED).exists():
                return self._published()
            counts = self._committed()
            last = _chunk_info(self._part(counts["chunks"] - 1)) if counts["chunks"] else None
            stream = self.stream if isinstance(self.stream, ArrayStream) and last and "stream" in last else None
            for leftover in self.path.iterdir():  # not part of the committed run: redone now
                part = _PART.match(leftover.name)
                keep = leftover.name == JOURNAL or (leftover.name == STREAM and stream is not None)
                if not keep and (part is None or int(part[1]) >= counts["chunks"]):
                    leftover.unlink()
            if stream is not None and last:  # the committed chunks are in the output in progress: it goes on
                stream.reopen(_schema(self._part(counts["chunks"] - 1)), last["stream"])
                self._streamed = counts["chunks"]
            for temp in self.output.parent.glob(f".{self.output.name}.*.tmp"):  # an output cut short
                temp.unlink()
            self._start = counts["chunks"]
            return counts
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(journal_path, json.dumps({"format": FORMAT, "identity": self.identity}, indent=1).encode()
                     + b"\n")
        return {"chunks": 0, "scored": 0, "rejected": 0}

    def _published(self) -> dict[str, Any]:
        """An earlier run sealed its output (its rejects file already written) and stopped before the rename."""
        sealed = json.loads((self.path / SEALED).read_text(encoding="utf-8"))
        done = self.path / sealed["file"]
        if done.exists():
            os.replace(done, self.output)
            fsync_dir(self.output.parent)
        elif not self.output.exists():
            raise ValueError(f"--resume: the run in {self.path} had finished, but its output {self.output} is gone; "
                             "delete the folder to start over")
        self._remove()
        return {**sealed["counts"], "finished": True}

    def _remove(self) -> None:
        """The folder goes with its record of a sealed output last but the journal: a run stopped meanwhile is
        still finished by --resume (or, once that record is gone, redone whole), never stuck."""
        last = [self.path / SEALED, self.path / JOURNAL]
        for entry in self.path.iterdir():
            if entry not in last:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in last:
            entry.unlink(missing_ok=True)
        self.path.rmdir()

    def _committed(self) -> dict[str, int]:
        counts = {"chunks": 0, "scored": 0, "rejected": 0}
        while (info := _chunk_info(self._part(counts["chunks"]))) is not None:
            counts["chunks"] += 1
            counts["scored"] += info["scored"]
            counts["rejected"] += info["rejects"].count("\n")  # one JSON line a rejected row
        return counts

    def _part(self, k: int) -> Path:
        return self.path / f"part-{k:08d}.arrow"

    def write_chunk(self, k: int, id_name: str, ids: pa.Array, good: np.ndarray, outputs: Mapping[str, np.ndarray],
                    reasons: Mapping[int, str]) -> None:
        """Commit chunk ``k``: its scored rows (``good``, indices into ``ids``) and its rejected rows."""
        if self._id_type is None or pa.types.is_null(self._id_type):
            self._id_type = ids.type
        elif ids.type != self._id_type and not pa.types.is_null(ids.type) and self.fmt in ("parquet", "npz"):
            raise ValueError(f"--id-column {id_name!r}: the ids are {self._id_type} up to chunk {k} and {ids.type} "
                             "in it (text among numbers?): give every row an id of one type")
        for name, arr in outputs.items():
            if arr.shape[:1] != (len(good),):
                raise ValueError(f"output {name!r} has shape {list(arr.shape)} for {len(good)} rows: batch needs one "
                                 "output row per input row")
        rows = sorted(reasons)
        values = ids.take(arrow_of(np.array(rows, dtype=np.int64))).to_pylist() if rows else []
        rejects = b"".join(orjson.dumps({id_name: v, "reason": reasons[i]}, option=orjson.OPT_APPEND_NEWLINE)
                           for i, v in zip(rows, values)).decode()
        info: dict[str, Any] = {"scored": len(good), "rejects": rejects}
        batch = record_batch(id_name, ids.take(arrow_of(good)) if reasons else ids, outputs) if len(good) else None
        if isinstance(self.stream, ArrayStream):
            self._feed(k)
            self._to_stream(batch, len(reasons))
        if isinstance(self.stream, ArrayStream) and self.stream.schema is not None:
            # the rows are in the output in progress; their part (the chunk's counts, rejects and the stream's
            # state, no second copy of the rows) is written by ``settle`` once they are on disk
            info["stream"] = self.stream.state()
            meta = {**(self.stream.schema.metadata or {}), _CHUNK: json.dumps(info)}
            self._pending.append((k, self.stream.schema.with_metadata(meta)))
            self._done(k, self.stream.schema, rejects)
            self._streamed = k + 1
            if len(self._pending) >= MAX_PENDING:
                self.settle()
            return
        if batch is not None:
            batch = batch.replace_schema_metadata({**batch.schema.metadata, _CHUNK: json.dumps(info)})
            schema = batch.schema
        else:
            schema = pa.schema([], metadata={_CHUNK: json.dumps(info)})
        path = self._part(k)
        temp = path.with_name(f".{path.name}.tmp")
        with temp.open("wb") as f:
            with pa.ipc.new_file(f, schema) as w:
                if batch is not None:
                    w.write_batch(batch)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)  # the commit; the folder's fsync is left out (see the module's docstring)
        self._done(k, schema if len(good) else None, rejects)
        if isinstance(self.stream, OutputStream):
            self._feed(k)
            if batch is not None:
                self.stream.write(batch)
            self.stream.sync()
        self._streamed = k + 1

    def _done(self, k: int, schema: pa.Schema | None, rejects: str) -> None:
        """What ``finish`` needs of this run's chunk ``k`` without reading its part back."""
        if schema is not None and self._first is None:
            self._first = schema
        if rejects:
            self._rejected[k] = rejects

    def settle(self) -> None:
        """Commit the chunks written to the output in progress since the last call: one fdatasync, then their
        parts. A part is not fsynced: its chunk's rows are on disk before its name is, so a part a power cut
        tears or loses only ends the committed run early (those chunks are redone), never names missing rows."""
        if not self._pending:
            return
        assert isinstance(self.stream, ArrayStream)
        self.stream.commit()
        for k, schema in self._pending:
            path = self._part(k)
            temp = path.with_name(f".{path.name}.tmp")
            with temp.open("wb") as f, pa.ipc.new_file(f, schema):
                pass
            os.replace(temp, path)
        self._pending.clear()

    def _to_stream(self, batch: pa.RecordBatch | None, rejected: int) -> None:
        """One chunk to the output stream; a .npy/.npz stream that cannot take it (text ids: no fixed width) is
        dropped, and the output is assembled from the parts at the end instead."""
        if isinstance(self.stream, ArrayStream):
            # once rows are in it, the layout stays: a chunk of other columns is an error (ValueError), not a
            # reason to assemble from parts that hold none of those rows
            if self.stream.schema is not None or self.stream.accepts(batch.schema if batch is not None else None):
                self.stream.write(batch, rejected)
            else:
                self.stream.discard()
                self.stream = None
        elif self.stream is not None and batch is not None:
            self.stream.write(batch)

    def _feed(self, upto: int) -> None:
        """Parts committed by an earlier run (a resumed one) go to the stream first, in order."""
        for k in range(self._streamed, upto):
            if self.stream is None:
                break
            for b in _batches(self._part(k)):
                self._to_stream(b, 0)
            info = _chunk_info(self._part(k))
            self._to_stream(None, info["rejects"].count("\n") if info is not None else 0)
        self._streamed = max(self._streamed, upto)

    def abort(self) -> None:
        """The run stops before its end: a streamed Parquet/CSV/JSON lines temp file goes (a resumed run writes it
        again from the parts); a .npy/.npz output in progress stays in the folder, which --resume goes on with."""
        if isinstance(self.stream, ArrayStream):
            # what was scored is kept for --resume; a failing settle (a full disk) must not hide why the run stopped
            with contextlib.suppress(Exception):
                self.settle()
            self.stream.release()
        elif self.stream is not None:
            self.stream.abort()

    def finish(self, rejects: Path, counts: Mapping[str, int], id_name: str, outputs: list[TensorSpec]) -> None:
        """Complete the rejects file and the output from the committed chunks, then remove the folder."""
        # the chunks whose parts wait for a settle are in the output; from here a stop redoes them (the output's
        # file may be closed by now, so nothing may settle them)
        self._pending.clear()
        chunks, scored = counts["chunks"], counts["scored"]
        parts = [self._part(k) for k in range(chunks)]
        # the rejects file before the output: a run stopped between the two is finished by --resume
        earlier_rejects = (info["rejects"] for p in parts[:self._start] if (info := _chunk_info(p)) is not None)
        found = "".join([*earlier_rejects, *(self._rejected[k] for k in sorted(self._rejected))]).encode()
        if found:
            atomic_write(rejects, found)
        else:
            rejects.unlink(missing_ok=True)  # a stale one from an earlier run would be misread as this run's
        # only an earlier run's parts are read back (this run knows its own: finish runs on the scoring thread)
        earlier = (s for s in map(_schema, parts[:self._start]) if len(s))
        schema = next(earlier, None) or self._first or empty_schema(id_name, outputs)
        if self.stream is not None:
            self._feed(chunks)
        if isinstance(self.stream, ArrayStream) and not self.stream.accepts(schema):
            self.stream.discard()  # no row reached it, and its columns have no fixed width
            self.stream = None
        if isinstance(self.stream, ArrayStream):  # its parts hold no rows: once sealed, only the rename is left
            sealed = self.stream.seal(schema)
            atomic_write(self.path / SEALED, json.dumps({"file": sealed.name, "counts": dict(counts)}).encode())
            self.stream.publish(sealed)
        elif self.stream is not None:
            self.stream.close(schema)
        else:  # the parts, memory-mapped once, are read once per output (.npz members) without a copy
            maps = [pa.memory_map(str(p)) for p in parts]
            mapped: list[pa.RecordBatch] = []
            try:
                mapped += [b for m in maps for b in _read_all(m)]
                write_output(self.output, self.fmt, lambda: iter(mapped), schema, scored)
            finally:
                mapped.clear()  # the batches go before the maps they view
                for m in maps:
                    m.close()
        self._remove()


def _schema(part: Path) -> pa.Schema:
    with pa.memory_map(str(part)) as m:
        return pa.ipc.open_file(m).schema


def _chunk_info(part: Path) -> dict[str, Any] | None:
    """A committed part's counts and rejects; None when there is no (readable) part file."""
    try:
        meta = _schema(part).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(meta[_CHUNK]) if _CHUNK in meta else None


def _batches(part: Path) -> Iterator[pa.RecordBatch]:
    with pa.memory_map(str(part)) as m:
        yield from _read_all(m)


def _read_all(m: pa.MemoryMappedFile) -> list[pa.RecordBatch]:
    reader = pa.ipc.open_file(m)
    return [reader.get_batch(i) for i in range(reader.num_record_batches)]


def record_batch(id_name: str, ids: pa.Array, outputs: Mapping[str, np.ndarray], chunk: str = "{}"
                 ) -> pa.RecordBatch:
    """Ids then each output; an output with a shape per row is a fixed-size list, its shape in the metadata."""
    arrays, meta = [ids], {f"shape:{id_name}": "[]", "chunk": chunk}
    for name, arr in outputs.items():
        shape = arr.shape[1:]
        meta[f"shape:{name}"] = json.dumps(list(shape))
        flat = arrow_of(np.ascontiguousarray(arr).reshape(-1))
        arrays.append(flat if not shape else pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape))))
    names = [id_name, *outputs]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(
        [pa.field(n, a.type) for n, a in zip(names, arrays)], metadata=meta))


def empty_schema(id_name: str, outputs: list[TensorSpec]) -> pa.Schema:
    """The output's columns when no row was scored (every row rejected, or an empty input)."""
    fields, meta = [pa.field(id_name, pa.int64())], {f"shape:{id_name}": "[]"}
    for spec in outputs:
        shape = [d if d >= 0 else 1 for d in spec.shape[1:]]
        value = pa.from_numpy_dtype(spec.dtype)
        fields.append(pa.field(spec.name, pa.list_(value, int(np.prod(shape))) if shape else value))
        meta[f"shape:{spec.name}"] = json.dumps(shape)
    return pa.schema(fields, metadata=meta)
