"""Rows of an input file -> model input tensors for `inferd batch`: the column mapping and per-row validation.

A bad value must cost one row, never the run: every column is converted with a vectorised fast path and, only when
that fails, re-read value by value so the rows at fault are named with their reason (docs/batch.md, "Rejects").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adapters.base import TensorSpec
from daemon import batch_ints
from daemon.batch_arrow import numpy_of

#: a column as a reader hands it over: an Arrow array (CSV, Parquet), a numpy array (.npy/.npz), or Python values
#: parsed from JSON lines (whose types are the JSON ones)
Column = Any


@dataclass(frozen=True)
class InputPlan:
    """Which columns feed one model input: one column holding whole rows (``whole``), or scalar columns stacked."""

    spec: TensorSpec
    columns: tuple[str, ...]
    whole: bool


def parse_maps(items: Sequence[str]) -> dict[str, list[str]]:
    """``--map a,b=input`` (repeatable) -> input name -> columns, in the order given."""
    maps: dict[str, list[str]] = {}
    for item in items:
        cols, sep, name = item.rpartition("=")
        if not sep or not cols or not name:
            raise ValueError(f"--map {item!r}: write COLUMN=INPUT (or COL1,COL2,...=INPUT)")
        maps.setdefault(name, []).extend(c for c in cols.split(",") if c)
    return maps


def plan_inputs(
    specs: Sequence[TensorSpec], columns: Sequence[str], numeric: Sequence[str], maps: Mapping[str, list[str]],
    id_column: str | None,
) -> list[InputPlan]:
    """The mapping rule of docs/batch.md: --map, else a column named as the input, else (one input) the numeric
    columns in file order."""
    known = {s.name for s in specs}
    for name, cols in maps.items():
        if name not in known:
            raise ValueError(f"--map names input {name!r}; the model's inputs are: {', '.join(sorted(known))}")
        missing = [c for c in cols if c not in columns]
        if missing:
            raise ValueError(f"--map: no column {', '.join(map(repr, missing))} in the input; it has: "
                             f"{', '.join(columns)}")
    plans = []
    for spec in specs:
        if spec.name in maps:
            mapped = tuple(maps[spec.name])
            plans.append(InputPlan(spec, mapped, whole=len(mapped) == 1 and _is_whole(spec, mapped[0], numeric)))
        elif spec.name in columns:
            plans.append(InputPlan(spec, (spec.name,), whole=_is_whole(spec, spec.name, numeric)))
        elif len(specs) == 1 and len(others := [c for c in columns if c != id_column]) == 1 and (
                others[0] not in numeric):
            plans.append(InputPlan(spec, (others[0],), whole=True))  # a lone array (.npy) or list column
        elif len(specs) == 1:
            features = tuple(c for c in numeric if c != id_column)
            if not features:
                raise ValueError(f"no numeric column to feed input {spec.name!r}; name the columns with --map")
            plans.append(InputPlan(spec, features, whole=False))
        else:
            raise ValueError(f"no column named {spec.name!r} for the model's input of that name; name the columns "
                             f"with --map COLUMN=INPUT (columns: {', '.join(columns)})")
        _check_width(plans[-1])
    return plans


def _is_whole(spec: TensorSpec, column: str, numeric: Sequence[str]) -> bool:
    """A scalar column feeds a per-row scalar or one feature; anything else (lists, arrays) holds whole rows."""
    return column not in numeric or len(spec.shape) > 2


def _check_width(plan: InputPlan) -> None:
    if plan.whole:
        return
    row = plan.spec.shape[1:]
    width = len(plan.columns)
    want = 1 if not row else row[0]
    if (not row and width != 1) or (len(row) == 1 and want not in (-1, width)):
        raise ValueError(f"input {plan.spec.name!r} takes {want} value(s) per row but {width} column(s) map to it "
                         f"({', '.join(plan.columns)}); choose them with --map COL1,COL2,...={plan.spec.name}")


@dataclass
class Converted:
    """One stretch of rows: ids, the inputs of every row (zeros where rejected) and the reasons, by row index."""

    ids: pa.Array
    inputs: dict[str, np.ndarray]
    reasons: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, k: int) -> tuple[Converted, Converted]:
        head = Converted(self.ids[:k], {n: a[:k] for n, a in self.inputs.items()},
                         {i: r for i, r in self.reasons.items() if i < k})
        tail = Converted(self.ids[k:], {n: a[k:] for n, a in self.inputs.items()},
                         {i - k: r for i, r in self.reasons.items() if i >= k})
        return head, tail

    @staticmethod
    def concat(parts: Sequence[Converted]) -> Converted:
        if len(parts) == 1:
            return parts[0]
        reasons: dict[int, str] = {}
        offset = 0
        for p in parts:
            reasons.update({i + offset: r for i, r in p.reasons.items()})
            offset += len(p)
        ids = pa.concat_arrays([_plain(p.ids) for p in parts])
        return Converted(ids, {n: np.concatenate([p.inputs[n] for p in parts]) for n in parts[0].inputs}, reasons)


def _plain(arr: pa.Array) -> pa.Array:
    return arr.cast(pa.string()) if pa.types.is_large_string(arr.type) else arr


def convert(columns: Mapping[str, Column], n: int, plans: Sequence[InputPlan], allow_nan: bool,
            bad: Mapping[int, str] | None = None) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """The model inputs for ``n`` rows and the reason each rejected row was rejected (first problem wins)."""
    reasons: dict[int, str] = dict(bad or {})
    inputs: dict[str, np.ndarray] = {}
    for plan in plans:
        dtype = plan.spec.dtype
        if plan.whole:
            arr, why = _whole_column(columns[plan.columns[0]], n, plan, dtype, allow_nan)
        else:
            stacked = []
            why = {}
            for col in plan.columns:
                values, col_why = _scalars(columns[col], n, dtype, allow_nan, col)
                stacked.append(values)
                for i, r in col_why.items():
                    why.setdefault(i, r)
            arr = np.stack(stacked, axis=1) if plan.spec.shape[1:] != () else stacked[0]
        for i, r in why.items():
            reasons.setdefault(i, r)
        inputs[plan.spec.name] = arr
    return inputs, reasons


def _scalars(col: Column, n: int, dtype: np.dtype[Any], allow_nan: bool,
             name: str) -> tuple[np.ndarray, dict[int, str]]:
    """One value per row as ``dtype``; the fast path is one Arrow cast, the slow one names each bad value."""
    integral = dtype.kind in "iub"
    if isinstance(col, np.ndarray):
        if col.ndim != 1 or col.dtype.kind not in "iufb":
            raise ValueError(f"array {name!r} has shape {col.shape[1:]} per row and dtype {col.dtype}: not a column "
                             "of numbers")
        if integral and col.dtype.kind in "iub":  # exact: float64 would lose what is past 2**53
            return batch_ints.exact(col, dtype, name)
        values = col.astype(np.float64)
    elif isinstance(col, pa.Array) and col.null_count == 0 and (
            pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raw = numpy_of(col)
        if integral and raw.dtype.kind in "iu":
            return batch_ints.exact(raw, dtype, name)
        values = raw.astype(np.float64)
    else:
        parsed = None
        if integral and isinstance(col, pa.Array) and pa.types.is_string(col.type) and col.null_count == 0:
            try:  # text of whole numbers, exactly
                return batch_ints.exact(numpy_of(pc.cast(col, pa.int64())), dtype, name)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # "1.0", a value past int64, or not a number: the float path or one by one says which
        if isinstance(col, pa.Array) and pa.types.is_string(col.type) and col.null_count == 0:
            try:
                parsed = numpy_of(pc.cast(col, pa.float64()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                parsed = None
        if parsed is None:
            return _slow_scalars(col.to_pylist() if isinstance(col, pa.Array) else list(col), dtype, allow_nan, name)
        values = parsed
    return _finish(values, dtype, allow_nan, integral, name)


def _finish(values: np.ndarray, dtype: np.dtype[Any], allow_nan: bool, integral: bool,
            name: str) -> tuple[np.ndarray, dict[int, str]]:
    why: dict[int, str] = {}
    finite = np.isfinite(values)
    if not finite.all() and (integral or not allow_nan):
        for i in np.flatnonzero(~finite):
            why[int(i)] = f"column {name!r}: {values[i]} is not allowed (pass --allow-nan to score NaN and inf)" \
                if not integral else f"column {name!r}: {values[i]} is not an integer"
        values = np.where(finite, values, 0.0)
    if integral:
        frac = values != np.floor(values)
        for i in np.flatnonzero(frac):
            why.setdefault(int(i), f"column {name!r}: {values[i]} is not an integer")
        values = np.where(frac, 0.0, values)
        big = batch_ints.out_of_range(values, dtype)
        for i in np.flatnonzero(big):
            why.setdefault(int(i), batch_ints.reason(name, values[i], dtype))
        values = np.where(big, 0.0, values)
    return values.astype(dtype), why


def _slow_scalars(items: list[Any], dtype: np.dtype[Any], allow_nan: bool,
                  name: str) -> tuple[np.ndarray, dict[int, str]]:
    if dtype.kind in "iub":
        return batch_ints.python_ints(items, dtype, name, _number)
    out = np.zeros(len(items), np.float64)
    why: dict[int, str] = {}
    for i, v in enumerate(items):
        number = _number(v)
        if isinstance(number, str):
            why[i] = f"column {name!r}: {number}"
        else:
            out[i] = number
    values, more = _finish(out, dtype, allow_nan, dtype.kind in "iub", name)
    for i, r in more.items():
        why.setdefault(i, r)
    return values, why


def _number(v: Any) -> float | str:
    """A float, or why the value is not a number (the reason text)."""
    if v is None or v == "":
        return "missing value"
    if isinstance(v, bool):
        return f"{str(v).lower()} is a boolean, not a number"
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return f"{v[:40]!r} is not a number"
    return f"a {type(v).__name__} is not a number"


def _whole_column(col: Column, n: int, plan: InputPlan, dtype: np.dtype[Any],
                  allow_nan: bool) -> tuple[np.ndarray, dict[int, str]]:
    """A column whose every value is one row of the input (a .npy array, a list column, a JSON list)."""
    name = plan.columns[0]
    row = plan.spec.shape[1:]
    if isinstance(col, np.ndarray):
        if not _fits(col.shape[1:], row):
            raise ValueError(f"array {name!r} has rows of shape {list(col.shape[1:])}; input {plan.spec.name!r} "
                             f"takes {list(row)}")
        if col.dtype == dtype and col.size and (dtype.kind in "iub" or allow_nan or np.isfinite(col).all()):
            return col, {}  # already the model's dtype and nothing to reject: no copy, one pass at most
        if dtype.kind in "iub" and col.dtype.kind in "iub" and col.size:  # exact, each value in the input's range
            rows = col.reshape(len(col), -1)
            bad = batch_ints.out_of_range(rows, dtype)
            found = {int(i): batch_ints.reason(name, rows[i, j], dtype, at=j)
                     for i in np.flatnonzero(bad.any(axis=1)) for j in [int(np.flatnonzero(bad[i])[0])]}
            return (np.where(bad, 0, rows) if found else rows).reshape(col.shape).astype(dtype), found
        flat = col.reshape(len(col), -1).astype(np.float64) if col.size else col.astype(np.float64)
        checked, found = _finish_rows(flat, dtype, allow_nan, name)
        return checked.reshape(col.shape).astype(dtype), found
    # a list column of numbers, all of one length: one copy, no per-row Python
    dense = _dense_lists(col, n) if len(row) == 1 else None
    if dense is not None and _fits(dense.shape[1:], row):
        return _whole_column(dense, n, plan, dtype, allow_nan)
    items = col.to_pylist() if isinstance(col, pa.Array) else list(col)
    shape = next((np.shape(v) for v in items if v is not None and not isinstance(v, str)), None)
    if shape is None or not _fits(shape, row):
        shape = tuple(d if d >= 0 else 1 for d in row)
    out = np.zeros((n, *shape), np.float64)
    why: dict[int, str] = {}
    for i, v in enumerate(items):
        try:
            arr = np.asarray(v, dtype=np.float64) if not isinstance(v, (str, bool)) and v is not None else None
        except (ValueError, TypeError):
            arr = None
        if arr is None:
            why[i] = f"column {name!r}: {_number(v) if not isinstance(_number(v), float) else 'not a list'}"
        elif arr.shape != shape:
            why[i] = f"column {name!r}: a row of shape {list(arr.shape)}, the input takes {list(shape)}"
        else:
            out[i] = arr
    values, more = _finish_rows(out.reshape(n, -1), dtype, allow_nan, name)
    for i, r in more.items():
        why.setdefault(i, r)
    return values.reshape((n, *shape)).astype(dtype), why


def _dense_lists(col: Column, n: int) -> np.ndarray | None:
    """A Parquet list column without nulls whose lists share one length, as an ``[n, width]`` array; else None."""
    if not isinstance(col, pa.Array) or col.null_count or not (
            pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        return None
    values = col.flatten()
    if values.null_count or not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        return None
    if not n or len(values) % n:
        return None
    width = len(values) // n
    if not pa.types.is_fixed_size_list(col.type):
        offsets = numpy_of(col.offsets)
        if not (np.diff(offsets) == width).all():
            return None
    return numpy_of(values).reshape(n, width)


def _finish_rows(flat: np.ndarray, dtype: np.dtype[Any], allow_nan: bool,
                 name: str) -> tuple[np.ndarray, dict[int, str]]:
    integral = dtype.kind in "iub"
    why: dict[int, str] = {}
    bad_value = ~np.isfinite(flat) if (integral or not allow_nan) else np.zeros(flat.shape, bool)
    if integral:
        bad_value |= np.isfinite(flat) & (flat != np.floor(flat))
        bad_value |= np.isfinite(flat) & batch_ints.out_of_range(np.nan_to_num(flat), dtype)
    bad_rows = np.flatnonzero(bad_value.any(axis=1))
    if not len(bad_rows):
        return flat, why  # nothing to blank: no copy
    for i in bad_rows:
        j = int(np.flatnonzero(bad_value[i])[0])
        v = flat[i, j]
        if integral and math.isfinite(v) and v == math.floor(v):
            why[int(i)] = batch_ints.reason(name, v, dtype, at=j)
        else:
            why[int(i)] = (f"column {name!r}: {v} at position {j} is not an integer" if integral and math.isfinite(v)
                           else f"column {name!r}: {v} at position {j} is not allowed (pass --allow-nan to score NaN "
                           "and inf)")
    return np.where(bad_value, 0.0, flat), why


def _fits(shape: tuple[int, ...], row: tuple[int, ...]) -> bool:
    return len(shape) == len(row) and all(d == r or r < 0 for d, r in zip(shape, row))
