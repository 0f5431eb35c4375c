"""`inferd batch`: score a file or folder offline with the artifact the daemon serves (docs/batch.md).

The run is a sequence of chunks of ``--chunk-rows`` rows, read, scored and committed by three overlapping stages
(daemon/batch_pipeline.py) so memory is bounded by a few chunks; each chunk's results are committed to a work folder
beside the output (one part file, written atomically: daemon/batch_work.py), and an interrupted run (Ctrl-C, SIGKILL,
power cut) continues with ``--resume`` from its last committed chunk. The final output is written to a temp file
(as the run goes, or from the parts at the end) and renamed: no half-written file ever carries the output's name.
The model is decrypted in memory only, as the daemon does.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.batch_score import score_rows

if TYPE_CHECKING:
    import pyarrow as pa

    from adapters.base import Session, TensorSpec
    from daemon.batch_io import Source
    from daemon.batch_rows import Converted, InputPlan

EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 3


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="a model name in the config's store (its active version) or an artifact file")
    s.add_argument("--input", "-i", required=True, type=Path, help="a .csv, .jsonl, .parquet, .npy or .npz file, "
                   "or a folder of such files (one format)")
    s.add_argument("--output", "-o", required=True, type=Path, help="the results; the format follows the suffix")
    s.add_argument("--config", "-c", type=Path, help="take keys, the store and the model's runtime options from here")
    s.add_argument("--kek", type=Path, action="append", default=[], help="KEK file (repeatable)")
    s.add_argument("--signer", type=Path, action="append", default=[], help="trusted public key (repeatable)")
    s.add_argument("--map", action="append", default=[], metavar="COLUMN[,COLUMN...]=INPUT",
                   help="feed these columns (in this order) to this model input (repeatable)")
    s.add_argument("--chunk-rows", type=int, default=0, help="rows per chunk: bounds memory, unit of resume "
                   "(default: about 16 MiB of model input a chunk, at most 10,000 rows for JSON lines)")
    s.add_argument("--id-column", default=None, help="the column whose values identify rows (default: row numbers)")
    s.add_argument("--rejects", type=Path, default=None, help="JSON lines of rejected rows and why "
                   "(default: OUTPUT.rejects.jsonl)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from its last committed chunk")
    s.add_argument("--threads", type=int, default=0, help="threads per inference (default: the config's, else the "
                   "usable CPUs)")
    s.add_argument("--allow-nan", action="store_true", help="score NaN and inf inputs instead of rejecting them")


def run_command(args: argparse.Namespace) -> int:
    if args.chunk_rows < 0 or args.threads < 0:
        raise ValueError("--chunk-rows must be at least 1 (0: the default) and --threads at least 0")
    from daemon import batch_io

    out_format = batch_io.format_of(args.output)
    blob, session, label = _load_model(args)
    try:
        return _Run(args, out_format, blob, session, label).run()
    finally:
        session.close()


def _load_model(args: argparse.Namespace) -> tuple[bytes, Session, str]:
    from adapters import SessionOptions, get_runtime
    from adapters.cpus import usable_cpus
    from daemon import keys
    from daemon.artifact import open_artifact
    from daemon.config import KeySource, load_config
    from daemon.store import Store

    config = load_config(args.config) if args.config else None
    keks: dict[str, Any] = {}
    signers: dict[str, Any] = {}
    if config and not (args.kek or args.signer):
        keks.update(keys.load_keks(list(config.keys.kek)))
        signers.update(keys.load_signers(list(config.keys.signers)))
    keks.update(keys.load_keks([KeySource(path=p) for p in args.kek]))
    signers.update(keys.load_signers([KeySource(path=p) for p in args.signer]))
    if not keks:
        raise ValueError("no KEK given: use --config or --kek")
    configured = {m.name: m for m in config.models} if config else {}
    path = Path(args.model)
    if path.is_file():
        blob = path.read_bytes()
    elif config is None:
        raise ValueError(f"{args.model!r} is not an artifact file; to score a model of the store, give --config")
    else:
        cfg = configured.get(args.model)
        version = (cfg.version if cfg else None) or Store(config.state_dir).state(args.model).active
        if version is None:
            raise ValueError(f"model {args.model!r} has no active version in {config.state_dir}")
        blob = Store(config.state_dir).read_artifact(args.model, version)
    opened = open_artifact(blob, keks, signers, require_signature=config.keys.require_signature if config else True)
    h = opened.header
    cfg = configured.get(h.name)
    if cfg is not None and cfg.runtime != h.runtime:
        cfg = None
    threads = args.threads or (cfg.threads if cfg and cfg.threads else usable_cpus())
    options = cfg.session_options(threads) if cfg else SessionOptions(threads=threads)
    session = get_runtime(h.runtime).load(opened.model_files(), options)
    return blob, session, f"{h.name}:{h.version}"


class _Run:
    def __init__(self, args: argparse.Namespace, out_format: str, blob: bytes, session: Session, label: str) -> None:
        from daemon import batch_io, batch_rows, batch_work

        self.args, self.out_format, self.session, self.label = args, out_format, session, label
        self.output: Path = args.output
        self.rejects: Path = args.rejects or self.output.with_name(self.output.name + ".rejects.jsonl")
        self.source: Source = batch_io.Source(args.input, args.chunk_rows or 1)
        self.chunk_rows: int = args.chunk_rows or default_chunk_rows(session.inputs, self.source.format)
        self.source.piece_rows = self.chunk_rows
        if self.output.resolve() in {p.resolve() for p in self.source.files}:
            raise ValueError(f"--output {self.output} is an input file: write the results elsewhere")
        self.plans: list[InputPlan] = batch_rows.plan_inputs(
            session.inputs, self.source.columns, self.source.numeric, batch_rows.parse_maps(args.map), args.id_column)
        if args.id_column is not None and args.id_column not in self.source.columns:
            names = ", ".join(self.source.columns)
            raise ValueError(f"--id-column {args.id_column!r} is not a column of the input ({names})")
        self.id_name: str = args.id_column or "row"
        if out_format == "npy" and len(session.outputs) != 1:
            raise ValueError(f"a .npy output holds one array but the model has {len(session.outputs)} outputs: "
                             "use .npz")
        self.one_row = any(s.shape[:1] != (-1,) for s in session.inputs)
        if any(s.shape[:1] not in ((-1,), (1,)) for s in session.inputs):
            raise ValueError("the model's inputs have a fixed batch size other than 1; batch needs a dynamic first "
                             "dimension (or 1)")
        self.work = batch_work.WorkFolder(self.output, {
            "model_sha256": hashlib.sha256(blob).hexdigest(), "chunk_rows": self.chunk_rows, "map": args.map,
            "id_column": args.id_column, "allow_nan": args.allow_nan, "output_format": out_format,
            "input": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.source.files],
        }, out_format)

    # -- the run ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.output.with_name(f".{self.output.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another inferd batch is writing {self.output}") from None
            return self._run()
        finally:
            os.close(lock_fd)

    def _run(self) -> int:
        from daemon import batch_pipeline

        counts = self.work.start(self.args.resume)
        if counts.pop("finished", False):  # stopped after its output and rejects were whole: now renamed
            self.output.with_name(f".{self.output.name}.lock").unlink(missing_ok=True)
            note = f", {counts['rejected']:,} rejected (see {self.rejects})" if counts["rejected"] else ""
            print(f"{self.label}: the interrupted run had already scored {counts['scored']:,} rows{note}; its output "
                  f"is now {self.output}")
            return EXIT_REJECTED if counts["rejected"] else EXIT_OK
        resumed_at = counts["chunks"]
        progress = _Progress(self.source, counts["chunks"] * self.chunk_rows)

        def commit(ids: pa.Array, reasons: dict[int, str], good: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
            self.work.write_chunk(counts["chunks"], self.id_name, ids, good, outputs, reasons)
            counts.update(chunks=counts["chunks"] + 1, scored=counts["scored"] + len(good),
                           rejected=counts["rejected"] + len(reasons))
            progress.add(len(ids))

        # reading and converting, scoring, and committing overlap (numpy, pyarrow, the runtime and fsync release
        # the GIL); the queues hold one chunk each, so memory stays a few chunks whatever the input's size
        try:
            with batch_pipeline.Pipeline(self._chunks(counts["chunks"] * self.chunk_rows), commit,
                                         self.work.settle) as pipe:
                for chunk in pipe:  # the writer gets the ids and reasons, not the inputs: they are freed here
                    pipe.put(chunk.ids, chunk.reasons, *self._score(chunk))
            progress.close()
            self.work.finish(self.rejects, counts, self.id_name, self.session.outputs)
        except BaseException:
            self.work.abort()
            raise
        self.output.with_name(f".{self.output.name}.lock").unlink(missing_ok=True)
        note = f", {counts['rejected']:,} rejected (see {self.rejects})" if counts["rejected"] else ""
        note += f", resumed after chunk {resumed_at}" if resumed_at else ""
        print(f"{self.label}: scored {counts['scored']:,} rows{note} in {progress.elapsed():.2f}s "
              f"({progress.rate():,.0f} rows/s) into {self.output}")
        return EXIT_REJECTED if counts["rejected"] else EXIT_OK

    def _chunks(self, skip: int) -> Iterator[Converted]:
        from daemon.batch_rows import Converted, convert

        wanted = list(dict.fromkeys([c for p in self.plans for c in p.columns]
                                    + ([self.args.id_column] if self.args.id_column else [])))
        row, pending, have, size = 0, [], 0, self.chunk_rows
        for piece in self.source.pieces(wanted):
            if row + piece.n <= skip:
                row += piece.n
                continue
            if row < skip:
                piece, row = piece.tail(skip - row), skip
            inputs, reasons = convert(piece.columns, piece.n, self.plans, self.args.allow_nan, piece.bad)
            ids = _ids(piece.columns[self.args.id_column]) if self.args.id_column else _row_numbers(row, piece.n)
            row += piece.n
            pending.append(Converted(ids, inputs, reasons))
            have += piece.n
            while have >= size:
                head, tail = Converted.concat(pending).split(size)
                yield head
                pending, have = ([tail] if len(tail) else []), len(tail)
        if have:
            yield Converted.concat(pending)

    def _score(self, chunk: Converted) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The rows scored and their outputs; rows the runtime refuses are found one by one and rejected."""
        return score_rows(self.session, chunk.inputs, len(chunk), chunk.reasons, self.one_row, check_rows=False)


#: the default chunk's size in model input bytes: per-chunk costs (a runtime call, a part file and its fsync, the
#: Python around them) vanish beside it even for a cheap tabular model, and a few chunks in flight stay ~100 MB
CHUNK_BYTES = 16 << 20


def default_chunk_rows(inputs: list[TensorSpec], fmt: str) -> int:
    """Rows per chunk when ``--chunk-rows`` is not given: ~16 MiB of model input (a dynamic dimension counts as 1),
    between 1 and 1,000,000 rows; at most 10,000 for JSON lines, whose rows are Python objects until converted."""
    row = sum(int(np.prod([d for d in s.shape[1:] if d > 0] or [1])) * s.dtype.itemsize for s in inputs)
    return max(1, min(CHUNK_BYTES // max(row, 1), 10_000 if fmt == "jsonl" else 1_000_000))


def _ids(col: Any) -> pa.Array:
    import pyarrow as pa

    if isinstance(col, pa.Array):
        return col
    if isinstance(col, np.ndarray) and col.ndim == 1 and col.dtype.kind in "iuf":
        from daemon.batch_arrow import arrow_of

        return arrow_of(col)
    try:
        return pa.array(col)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array([None if v is None else str(v) for v in col], type=pa.string())


def _row_numbers(start: int, n: int) -> pa.Array:

    from daemon.batch_arrow import arrow_of

    return arrow_of(np.arange(start, start + n, dtype=np.int64))


class _Progress:
    """A bar with rows/s and ETA on a terminal (stderr); nothing otherwise (the summary line follows the run)."""

    def __init__(self, source: Source, already: int) -> None:
        self.source, self.done, self.start = source, 0, time.monotonic()
        self.base, self.shown = already, 0.0
        self.tty = sys.stderr.isatty()

    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def rate(self) -> float:
        return self.done / self.elapsed()

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if not self.tty or now - self.shown < 0.2:
            return
        self.shown = now
        total = self.source.total_rows
        frac = (self.base + self.done) / total if total else self.source.fraction()
        bar = eta = ""
        if frac is not None and frac > 0:
            filled = int(30 * min(frac, 1.0))
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * frac:5.1f}% "
            left = self.elapsed() * (1 - frac) / max(frac - self.base / (total or 1e18), 1e-9)
            eta = f", ETA {int(left // 60)}:{int(left % 60):02d}"
        sys.stderr.write(f"\r{bar}{self.base + self.done:,} rows, {self.rate():,.0f} rows/s{eta} ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
