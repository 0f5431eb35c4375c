"""Integer inputs in `inferd batch` (daemon/batch_ints.py): exact past 2**53 from every format, and a value outside
the input's type rejected with its reason instead of wrapping (3e9 into INT32 became -2147483648, exit 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import KeySet, pack_model
from onnx import TensorProto, helper

from daemon import cli

BIG = [2**53 + 1, 2**62 + 7, -(2**63), 12345]


def _identity(keyset: KeySet, tmp_path: Path, elem: int, shape: list[int | None], name: str) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["v"], ["out"])], "g",
                              [helper.make_tensor_value_info("v", elem, shape)],
                              [helper.make_tensor_value_info("out", elem, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{name}.inferd"
    path.write_bytes(pack_model(keyset, model.SerializeToString(), name=name))
    return path


def _column(src: Path, values: list[int]) -> Path:
    """One int64 column ``v`` in the format ``src``'s suffix names."""
    if src.suffix == ".parquet":
        pq.write_table(pa.table({"v": pa.array(values, pa.int64())}), src)
    elif src.suffix == ".csv":
        src.write_text("v\n" + "\n".join(map(str, values)) + "\n")
    elif src.suffix == ".jsonl":
        src.write_text("".join(json.dumps({"v": v}) + "\n" for v in values))
    else:
        np.save(src, np.array(values, np.int64))
    return src


def _run(art: Path, keyset: KeySet, src: Path, out: Path) -> int:
    return cli.main(["batch", str(art), "--kek", str(keyset.kek_path), "--signer", str(keyset.public_path),
                     "--input", str(src), "--output", str(out)])


def _written(out: Path) -> list[object]:
    return [json.loads(line)["out"] for line in out.read_text().splitlines()]


def _rejects(out: Path) -> list[str]:
    path = out.with_name(out.name + ".rejects.jsonl")
    return [json.loads(line)["reason"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "npy"])
def test_int64_values_past_2_53_are_scored_exactly(tmp_path: Path, keyset: KeySet, fmt: str) -> None:
    art = _identity(keyset, tmp_path, TensorProto.INT64, [None], "i64")
    src = _column(tmp_path / f"in.{fmt}", BIG)
    out = tmp_path / "out.jsonl"
    assert _run(art, keyset, src, out) == 0
    assert _written(out) == BIG


@pytest.mark.parametrize(("elem", "dtype", "values", "kept"), [
    (TensorProto.INT32, "int32", [3_000_000_000, -1, 7, -(2**31) - 1], [-1, 7]),
    (TensorProto.UINT8, "uint8", [300, -1, 7, 255], [7, 255]),
])
@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "npy"])
def test_a_value_outside_the_inputs_type_is_rejected_not_wrapped(tmp_path: Path, keyset: KeySet, elem: int,
                                                                 dtype: str, values: list[int], kept: list[int],
                                                                 fmt: str) -> None:
    art = _identity(keyset, tmp_path, elem, [None], dtype)
    src = _column(tmp_path / f"in.{fmt}", values)
    out = tmp_path / "out.jsonl"
    assert _run(art, keyset, src, out) == 3
    assert _written(out) == kept
    reasons = _rejects(out)
    assert len(reasons) == len(values) - len(kept)
    assert all(f"is out of range for {dtype}" in r for r in reasons), reasons


def test_whole_rows_of_integers_are_checked_per_value(tmp_path: Path, keyset: KeySet) -> None:
    """A row-shaped input ([-1, 3] INT32) from an int64 .npy: exact, and a row with one value too big rejected."""
    art = _identity(keyset, tmp_path, TensorProto.INT32, [None, 3], "rows")
    x = np.array([[1, 2, 3], [4, 2**40, 6], [7, 8, -9]], np.int64)
    src = tmp_path / "rows.npy"
    np.save(src, x)
    out = tmp_path / "out.jsonl"
    assert _run(art, keyset, src, out) == 3
    assert _written(out) == [[1, 2, 3], [7, 8, -9]]
    assert _rejects(out) == [f"column 'rows': {2**40} at position 1 is out of range for int32 "
                             f"(-2147483648 to 2147483647)"]
