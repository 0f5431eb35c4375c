"""Integer model inputs in `inferd batch` and the Spark worker: exact, and refused when out of the input's range.

Going through float64 (the path for every other conversion) loses integers past 2**53 without a word, and numpy's
cast wraps a value outside the target type (3e9 into INT32, 300 into UINT8) just as silently: a score of the wrong
input with exit status 0. So integer sources go to integer inputs directly, and every value headed for an integer
(or boolean) input is checked against that type's range first; a row with a value outside it is rejected with the
value and the type in its reason, like a NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def int_range(dtype: np.dtype[Any]) -> tuple[int, int]:
    """The values an integer or boolean input holds (a boolean: 0 and 1)."""
    if dtype.kind == "b":
        return 0, 1
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def out_of_range(values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """Where ``values`` (integers, or floats already checked to be whole) do not fit ``dtype``."""
    lo, hi = int_range(dtype)
    if values.dtype.kind in "iub":
        have = int_range(values.dtype)
        low = values < lo if lo > have[0] else np.zeros(values.shape, bool)  # each bound compared in its own type
        return low | (values > hi) if hi < have[1] else low
    # floats: the bounds' neighbours lo and hi + 1 are powers of two, exact in float64
    return (values < float(lo)) | (values >= float(hi) + 1.0)


def exact(values: np.ndarray, dtype: np.dtype[Any], name: str) -> tuple[np.ndarray, dict[int, str]]:
    """Integer ``values`` (one per row) as ``dtype``, without float64; the rows out of range rejected."""
    bad = out_of_range(values, dtype)
    why = {int(i): reason(name, values[i], dtype) for i in np.flatnonzero(bad)}
    return (np.where(bad, 0, values) if why else values).astype(dtype), why


def reason(name: str, value: object, dtype: np.dtype[Any], at: int | None = None) -> str:
    where = f" at position {at}" if at is not None else ""
    lo, hi = int_range(dtype)
    return f"column {name!r}: {value}{where} is out of range for {dtype} ({lo} to {hi})"


def python_ints(items: list[Any], dtype: np.dtype[Any], name: str, parse: Any) -> tuple[np.ndarray, dict[int, str]]:
    """Values of a JSON line or a text column one by one, exactly: Python ints as they are, anything else through
    ``parse`` (a float, or the reason it is not a number) and then checked to be whole."""
    lo, hi = int_range(dtype)
    out = np.zeros(len(items), dtype)
    why: dict[int, str] = {}
    for i, v in enumerate(items):
        if isinstance(v, int) and not isinstance(v, bool):
            number: int | float | str = v
        elif isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            number = int(v)
        else:
            number = parse(v)
        if isinstance(number, str):
            why[i] = f"column {name!r}: {number}"
        elif isinstance(number, float) and not number.is_integer():
            why[i] = f"column {name!r}: {number} is not an integer"
        elif not lo <= number <= hi:
            why[i] = reason(name, number, dtype)
        else:
            out[i] = int(number)
    return out, why
