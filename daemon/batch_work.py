"""The work folder of one `inferd batch` run: committed chunks, the journal, and the final assembly.

Each chunk's results are a part file (Arrow IPC) and its rejects, written atomically, then the journal that counts
them, written atomically too: whatever moment a run dies at, the journal names only complete chunks, and files of a
chunk it does not name are redone. The output appears under its name only once assembled whole.
"""

from __future__ import annotations

import json
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
from daemon.batch_io import write_output
from daemon.fsutil import atomic_output, atomic_write

JOURNAL = "journal.json"
_CHUNK_FILE = re.compile(r"^\.?(?:part|rejects)-(\d{8})\.")


class WorkFolder:
    def __init__(self, output: Path, identity: Mapping[str, Any]) -> None:
        self.output, self.identity = output, dict(identity)
        self.path = output.with_name(output.name + ".inferd-batch")

    def start(self, resume: bool) -> dict[str, Any]:
        """The journal to go on from: a fresh one, or (``resume``) the interrupted run's, its stale files removed."""
        journal_path = self.path / JOURNAL
        if self.path.exists() and not resume:
            raise ValueError(f"{self.path} holds an interrupted run: continue it with --resume, or delete the folder "
                             "to start over")
        if resume and journal_path.exists():
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            changed = [k for k, v in self.identity.items() if journal["identity"].get(k) != v]
            if changed:
                raise ValueError(f"--resume: the run in {self.path} was started with another {', '.join(changed)}; "
                                 "rerun with the same model, input and options, or delete the folder")
            for leftover in self.path.iterdir():  # written after the last commit: redone now
                chunk = _CHUNK_FILE.match(leftover.name)
                stale = chunk is None or int(chunk[1]) >= journal["chunks"] or leftover.name.endswith(".tmp")
                if stale and leftover.name != JOURNAL:
                    leftover.unlink()
            for temp in self.output.parent.glob(f".{self.output.name}.*.tmp"):  # a final write cut short
                temp.unlink()
            return dict(journal)
        self.path.mkdir(parents=True, exist_ok=True)
        return {"format": 1, "identity": self.identity, "chunks": 0, "scored": 0, "rejected": 0}

    def commit(self, journal: Mapping[str, Any]) -> None:
        atomic_write(self.path / JOURNAL, json.dumps(journal, indent=1).encode() + b"\n")

    def write_chunk(self, k: int, id_name: str, ids: pa.Array, good: np.ndarray, outputs: Mapping[str, np.ndarray],
                    reasons: Mapping[int, str]) -> None:
        """Chunk ``k``'s scored rows (``good``, indices into ``ids``) and its rejected rows, before its commit."""
        if len(good):
            for name, arr in outputs.items():
                if arr.shape[:1] != (len(good),):
                    raise ValueError(f"output {name!r} has shape {list(arr.shape)} for {len(good)} rows: batch "
                                     "needs one output row per input row")
            batch = record_batch(id_name, ids.take(arrow_of(good)) if reasons else ids, outputs)
            with atomic_output(self.path / f"part-{k:08d}.arrow") as f, pa.ipc.new_file(f, batch.schema) as w:
                w.write_batch(batch)
        if reasons:
            rows = sorted(reasons)
            values = ids.take(arrow_of(np.array(rows, dtype=np.int64))).to_pylist()
            with atomic_output(self.path / f"rejects-{k:08d}.jsonl") as f:
                f.write(b"".join(orjson.dumps({id_name: v, "reason": reasons[i]}, option=orjson.OPT_APPEND_NEWLINE)
                                 for i, v in zip(rows, values)))

    def finish(self, fmt: str, rejects: Path, scored: int, id_name: str, outputs: list[TensorSpec]) -> None:
        """Assemble the output and the rejects file from the committed chunks, then remove the folder."""
        parts = sorted(self.path.glob("part-*.arrow"))
        if parts:
            with pa.memory_map(str(parts[0])) as m:
                schema = pa.ipc.open_file(m).schema
        else:
            schema = empty_schema(id_name, outputs)

        def batches() -> Iterator[pa.RecordBatch]:
            for p in parts:
                with pa.memory_map(str(p)) as m:
                    reader = pa.ipc.open_file(m)
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i)

        write_output(self.output, fmt, batches, schema, scored)
        found = sorted(self.path.glob("rejects-*.jsonl"))
        if found:
            with atomic_output(rejects) as f:
                for p in found:
                    f.write(p.read_bytes())
        else:
            rejects.unlink(missing_ok=True)  # a stale one from an earlier run would be misread as this run's
        shutil.rmtree(self.path)


def record_batch(id_name: str, ids: pa.Array, outputs: Mapping[str, np.ndarray]) -> pa.RecordBatch:
    """Ids then each output; an output with a shape per row is a fixed-size list, its shape in the metadata."""
    arrays, meta = [ids], {id_name: "[]"}
    for name, arr in outputs.items():
        shape = arr.shape[1:]
        meta[name] = json.dumps(list(shape))
        flat = arrow_of(np.ascontiguousarray(arr).reshape(-1))
        arrays.append(flat if not shape else pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape))))
    names = [id_name, *outputs]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(
        [pa.field(n, a.type) for n, a in zip(names, arrays)], metadata=meta))


def empty_schema(id_name: str, outputs: list[TensorSpec]) -> pa.Schema:
    """The output's columns when no row was scored (every row rejected, or an empty input)."""
    fields, meta = [pa.field(id_name, pa.int64())], {id_name: "[]"}
    for spec in outputs:
        shape = [d if d >= 0 else 1 for d in spec.shape[1:]]
        value = pa.from_numpy_dtype(spec.dtype)
        fields.append(pa.field(spec.name, pa.list_(value, int(np.prod(shape))) if shape else value))
        meta[spec.name] = json.dumps(shape)
    return pa.schema(fields, metadata=meta)
