"""Scoring one chunk of rows, shared by `inferd batch` and the Spark worker: the rows nothing rejected go to the
runtime as one batch; when the runtime refuses the batch, its rows run one by one so only the rows it refuses are
rejected (with its reason) and the others are still scored."""

from __future__ import annotations

import numpy as np

from adapters.base import Session


def score_rows(session: Session, inputs: dict[str, np.ndarray], rows: int, reasons: dict[int, str],
               one_row: bool, check_rows: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the row numbers scored, their outputs); ``reasons`` (row -> why it is rejected) gains the rows the runtime
    refused. ``one_row``: the model takes one row at a time (its first dimension is fixed at 1). ``check_rows``:
    refuse outputs without one row per input row here (`inferd batch` checks them where it writes them)."""
    from adapters import InputRejected
    from adapters.base import runtime_message

    keep = np.ones(rows, dtype=bool)
    keep[list(reasons)] = False
    good = np.flatnonzero(keep).astype(np.int64)
    if not len(good):
        return good, {}
    if not one_row:
        # a chunk without rejects goes to the runtime as it is (often a view of the file): no gathering copy
        picked = inputs if not reasons else {n: a[good] for n, a in inputs.items()}
        try:
            results = session.run(picked)
            return good, _one_row_each(results, len(good)) if check_rows else results
        except InputRejected:
            pass
    kept, outs = [], []
    for i in good:
        try:
            outs.append(session.run({n: a[i : i + 1] for n, a in inputs.items()}))
            kept.append(i)
        except InputRejected as exc:
            reasons[int(i)] = f"the model refused the row: {runtime_message(str(exc))}"
    if not kept:
        return np.array(kept, dtype=np.int64), {}
    joined = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return np.array(kept, dtype=np.int64), _one_row_each(joined, len(kept)) if check_rows else joined


def _one_row_each(results: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Outputs must have a row per input row, or they could not be written beside their rows' ids."""
    for name, arr in results.items():
        if arr.shape[:1] != (rows,):
            raise ValueError(f"output {name!r} has shape {list(arr.shape)} for {rows} rows: scoring needs one "
                             "output row per input row")
    return results


__all__ = ["score_rows"]
