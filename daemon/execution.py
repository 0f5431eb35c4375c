"""One batch through the runtime, on a scheduler's worker thread: concatenate, run, split, and map failures.

Only numpy and the runtime here, nothing of the event loop, so a worker calls it without a hand-off.

- A runtime that refuses a run because of its inputs (``InputRejected``) answers ``InvalidInput``; any other runtime
  failure is ``InferenceFailed``, logged here with its traceback (transport-neutral, so HTTP and MQTT alike).
- When a batch of several requests is refused, each request runs again alone, so only the one at fault is refused
  and its batch-mates get their answers: the refusal may come from any row, and rows cannot be told apart after
  concatenation.
- Outputs are split back exactly by each request's rows; a model whose outputs do not follow the batch dimension
  cannot be batched, which the error says.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from adapters.base import AdapterError, InputRejected, Session
from daemon.batchqueue import Job, Outputs
from daemon.errors import InferenceFailed, InvalidInput

log = logging.getLogger("inferd.scheduler")

#: a run made: (the inputs of one request in it, rows run, seconds), for the stats and the inline estimates
Run = tuple[Outputs, int, float]
#: per request of the batch: its outputs or what its run raised; and the runs made
Outcome = tuple[list[Outputs | BaseException], list[Run]]


def run_one(session: Session, label: str, feed: dict[str, np.ndarray]) -> Outputs:
    """One runtime call, its failure mapped: the caller's (400) or the server's (500, logged with the trace)."""
    try:
        return session.run(feed)
    except InputRejected as exc:
        raise InvalidInput(str(exc)) from None
    except AdapterError as exc:
        log.error("model %s: run failed: %s", label, exc, exc_info=exc, extra={"event_kind": "run_failed"})
        raise InferenceFailed(str(exc)) from None


def execute(session: Session, label: str, batch: list[Job]) -> Outcome:
    started = time.perf_counter()
    if len(batch) == 1:
        job = batch[0]
        results = run_one(session, label, job.inputs)
        return [results], [(job.inputs, job.rows, time.perf_counter() - started)]
    feed = {name: np.concatenate([j.inputs[name] for j in batch]) for name in batch[0].inputs}
    try:
        results = run_one(session, label, feed)
    except InvalidInput:
        return one_by_one(session, label, batch)
    rows = sum(j.rows for j in batch)
    elapsed = time.perf_counter() - started
    for name, arr in results.items():
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise InferenceFailed(
                f"output {name!r} does not follow the batch dimension ({arr.shape}); set max_batch_size: 0"
            )
    split: list[Outputs | BaseException] = []
    offset = 0
    for job in batch:
        split.append({name: arr[offset : offset + job.rows] for name, arr in results.items()})
        offset += job.rows
    return split, [(batch[0].inputs, rows, elapsed)]


def one_by_one(session: Session, label: str, batch: list[Job]) -> Outcome:
    """A batch the runtime refused for its inputs: each request runs alone, and only those refused alone fail."""
    outputs: list[Outputs | BaseException] = []
    runs: list[Run] = []
    for job in batch:
        started = time.perf_counter()
        try:
            outputs.append(run_one(session, label, job.inputs))
        except (InvalidInput, InferenceFailed) as exc:
            outputs.append(exc)
            continue
        runs.append((job.inputs, job.rows, time.perf_counter() - started))
    return outputs, runs
