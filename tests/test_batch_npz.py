"""Streamed .npy and .npz outputs of `inferd batch` (daemon/batch_npz.py): written at their offsets as chunks are
committed when the input records its row count, assembled from the parts otherwise; what numpy and zipfile read
back, rejects (a .npy cut short, a .npz assembled), text ids, empty inputs, and resume after SIGKILL byte for byte."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, KeySet, SklearnModel, pack_model

from daemon import cli
from daemon.batch_io import count_rows
from daemon.batch_npz import ArrayStream, npy_header
from daemon.batch_work import record_batch


def _batch(art: Path, keyset: KeySet, *args: str) -> int:
    return cli.main(["batch", str(art), "--kek", str(keyset.kek_path), "--signer", str(keyset.public_path), *args])


def _artifact(tmp_path: Path, keyset: KeySet, model: bytes) -> Path:
    path = tmp_path / "model.inferd"
    path.write_bytes(pack_model(keyset, model))
    return path


def _ort(model: bytes, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _members(path: Path) -> list[tuple[str, int]]:
    """The archive's members and their compression, after zipfile checked every CRC."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        return [(i.filename, i.compress_type) for i in z.infolist()]


def test_a_multi_output_npz_is_streamed_with_each_dtype_and_read_back_by_numpy_and_zipfile(
        tmp_path: Path, keyset: KeySet, sklearn_model: SklearnModel) -> None:
    x = np.tile(sklearn_model.x_test, (3, 1))  # 513 rows of 30 features, in chunks of 100: the last one short
    src = tmp_path / "rows.npy"
    np.save(src, x)
    out = tmp_path / "out" / "scores.npz"
    assert _batch(_artifact(tmp_path, keyset, sklearn_model.onnx), keyset, "--input", str(src), "--output", str(out),
                  "--chunk-rows", "100") == 0
    assert _members(out) == [("row.npy", zipfile.ZIP_STORED), ("label.npy", zipfile.ZIP_STORED),
                             ("probabilities.npy", zipfile.ZIP_STORED)]
    label, proba = _ort(sklearn_model.onnx, x)
    with np.load(out, allow_pickle=False) as z:
        assert (z["row"].dtype, z["label"].dtype, z["probabilities"].dtype) == (np.int64, np.int64, np.float32)
        np.testing.assert_array_equal(z["row"], np.arange(len(x)))
        np.testing.assert_array_equal(z["label"], label)
        np.testing.assert_array_equal(z["probabilities"], proba)
    np.testing.assert_array_equal(label[:len(sklearn_model.x_test)], sklearn_model.sklearn_pred)
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.npz"]


def test_a_parquet_input_streams_a_npz_with_its_own_id_type(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    """Parquet records its row count too; an int32 id column stays int32 in the archive."""
    x = np.random.default_rng(2).normal(size=(130, 4)).astype(np.float32)
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"key": pa.array(np.arange(130, dtype=np.int32) * 7), **{c: x[:, k] for k, c in
                                                                                     enumerate("abcd")}}), src)
    out = tmp_path / "scores.npz"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out),
                  "--chunk-rows", "50", "--id-column", "key") == 0
    assert [name for name, _ in _members(out)] == ["key.npy", "output.npy"]
    with np.load(out, allow_pickle=False) as z:
        assert z["key"].dtype == np.int32
        np.testing.assert_array_equal(z["key"], np.arange(130) * 7)
        np.testing.assert_array_equal(z["output"], _ort(mlp_onnx, x)[0])


def test_text_ids_make_the_npz_assembled_from_the_parts_and_rejects_cut_each_member(tmp_path: Path, keyset: KeySet,
                                                                                   mlp_onnx: bytes) -> None:
    """Text ids have no width until the last row (the parts are assembled at the end); rejected rows leave each
    streamed member shorter than planned (the archive is copied tight at the end)."""
    x = np.random.default_rng(3).normal(size=(90, 4)).astype(np.float32)
    x[61, 0] = np.nan
    src = tmp_path / "rows.npz"
    np.savez(src, key=np.array([f"id-{i * i}" for i in range(90)]), **{c: x[:, k] for k, c in enumerate("abcd")})
    art = _artifact(tmp_path, keyset, mlp_onnx)
    keep = [i for i in range(90) if i != 61]
    for ids, status in ((["--id-column", "key"], 3), ([], 3)):
        out = tmp_path / f"scores{len(ids)}.npz"
        assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "20", *ids) == status
        with np.load(out, allow_pickle=False) as z:
            if ids:
                assert z["key"].dtype == np.dtype("<U7")
                assert z["key"].tolist() == [f"id-{i * i}" for i in keep]
            else:
                np.testing.assert_array_equal(z["row"], keep)
            np.testing.assert_array_equal(z["output"], _ort(mlp_onnx, x[keep])[0])
        assert _members(out)
        with zipfile.ZipFile(out) as archive:  # no gap where the rejected rows were planned
            ends = [i.header_offset + 30 + len(i.filename) + 20 + i.file_size for i in archive.infolist()]
            starts = [i.header_offset for i in archive.infolist()]
            assert starts[1:] == ends[:-1] or ids, (starts, ends)


def test_rejected_rows_cut_a_streamed_npy_short(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    """Chunk 0 wholly rejected (the layout waits for the first scored row) and one row of chunk 2: the array holds
    the rows scored, its header says so."""
    x = np.random.default_rng(4).normal(size=(100, 4)).astype(np.float32)
    x[:30, 1] = np.inf
    x[70, 3] = np.nan
    src = tmp_path / "rows.npy"
    np.save(src, x)
    out = tmp_path / "scores.npy"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out),
                  "--chunk-rows", "30") == 3
    keep = [i for i in range(100) if i >= 30 and i != 70]
    got = np.load(out, allow_pickle=False)
    assert got.shape == (69, 3)
    np.testing.assert_array_equal(got, _ort(mlp_onnx, x[keep])[0])
    assert out.stat().st_size == len(npy_header(np.dtype("f4"), (100, 3))) + 69 * 3 * 4, "no bytes beyond the rows"
    rejected = [json.loads(line)["row"] for line in (tmp_path / "scores.npy.rejects.jsonl").read_text().splitlines()]
    assert rejected == [*range(30), 70]


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_an_empty_array_input_gives_an_empty_output_with_the_models_types(tmp_path: Path, keyset: KeySet,
                                                                         mlp_onnx: bytes, suffix: str) -> None:
    src = tmp_path / "empty.npy"
    np.save(src, np.zeros((0, 4), np.float32))
    out = tmp_path / f"scores{suffix}"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out)) == 0
    if suffix == ".npy":
        got = np.load(out, allow_pickle=False)
        assert (got.shape, got.dtype) == ((0, 3), np.float32)
        return
    assert [name for name, _ in _members(out)] == ["row.npy", "output.npy"]
    with np.load(out, allow_pickle=False) as z:
        assert (z["row"].shape, z["row"].dtype) == ((0,), np.int64)
        assert (z["output"].shape, z["output"].dtype) == ((0, 3), np.float32)


def test_the_row_count_comes_from_the_headers_where_the_format_records_it(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((7, 2)))
    np.save(tmp_path / "b.npy", np.zeros((5, 2)))
    np.savez(tmp_path / "c.npz", x=np.zeros(11), y=np.ones(11))
    pq.write_table(pa.table({"x": np.zeros(13)}), tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text("x\n1\n")
    assert count_rows([tmp_path / "a.npy", tmp_path / "b.npy"]) == 12
    assert count_rows([tmp_path / "c.npz"]) == 11
    assert count_rows([tmp_path / "d.parquet"]) == 13
    assert count_rows([tmp_path / "e.csv"]) is None, "CSV records no count: its .npz output is assembled"


def test_an_array_stream_refuses_a_count_other_than_planned_and_is_discarded_without_a_trace(tmp_path: Path) -> None:
    def chunk(start: int, n: int) -> pa.RecordBatch:
        return record_batch("row", pa.array(np.arange(start, start + n)), {"wert_ä": np.ones((n, 2), np.float64)})

    out, work = tmp_path / "x.npz", tmp_path / "work"
    work.mkdir()
    stream = ArrayStream(out, "npz", 5, work / "partial")
    stream.write(chunk(0, 4))
    with pytest.raises(ValueError, match="more rows than the 5 the input holds"):
        stream.write(chunk(4, 2))
    stream.discard()
    assert list(work.iterdir()) == []
    stream = ArrayStream(out, "npz", 5, work / "partial")
    stream.write(chunk(0, 4))
    with pytest.raises(ValueError, match="the input held 5 rows but 4 were read"):
        stream.close(chunk(0, 0).schema)
    stream.release()  # a run that stops keeps its output in progress for --resume
    assert [p.name for p in work.iterdir()] == ["partial"]
    assert not out.exists()
    stream = ArrayStream(out, "npz", 4, work / "partial")
    stream.write(chunk(0, 4))
    stream.close(chunk(0, 0).schema)
    assert list(work.iterdir()) == []
    assert [name for name, _ in _members(out)] == ["row.npy", "wert_ä.npy"], "a UTF-8 name is flagged as such"
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["wert_ä"], np.ones((4, 2)))
    assert out.stat().st_mode & 0o777 == 0o640


def test_an_array_stream_reopened_at_a_commit_goes_on_to_the_same_bytes(tmp_path: Path) -> None:
    """What --resume relies on: the state a commit records reopens the file; bytes written after it (a chunk
    being written when the run was killed) are written again."""
    def chunk(start: int, n: int) -> pa.RecordBatch:
        return record_batch("row", pa.array(np.arange(start, start + n)),
                            {"y": np.arange(start, start + n, dtype=np.float32)[:, None] * [1, 2]})

    whole = ArrayStream(tmp_path / "whole.npz", "npz", 9, tmp_path / "whole.partial")
    for start in (0, 3, 6):
        whole.write(chunk(start, 3))
    whole.close(chunk(0, 0).schema)
    first = ArrayStream(tmp_path / "x.npz", "npz", 9, tmp_path / "x.partial")
    first.write(chunk(0, 3))
    first.commit()
    state, schema = first.state(), first.schema
    first.write(chunk(3, 3).slice(0, 2))  # past the commit: lost with the run
    first.release()
    again = ArrayStream(tmp_path / "x.npz", "npz", 9, tmp_path / "x.partial")
    assert schema is not None
    again.reopen(schema, state)
    again.write(chunk(3, 3))
    again.write(chunk(6, 3))
    again.close(schema)
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "y.partial").write_bytes(b"short")
    with pytest.raises(ValueError, match="does not hold the rows its commits record"):
        ArrayStream(tmp_path / "y.npz", "npz", 9, tmp_path / "y.partial").reopen(schema, state)
    with pytest.raises(ValueError, match="is missing"):
        ArrayStream(tmp_path / "z.npz", "npz", 9, tmp_path / "z.partial").reopen(schema, state)


def _parts(work: Path) -> int:
    k = 0
    while (work / f"part-{k:08d}.arrow").exists():
        k += 1
    return k


@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "bad"), [(".npz", [3, 2500, 149_999]), (".npy", [3, 2500, 149_999])])
def test_a_streamed_output_resumed_after_sigkill_is_the_uninterrupted_one_byte_for_byte(
        tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, suffix: str, bad: list[int]) -> None:
    x = np.random.default_rng(9).normal(size=(150_000, 4)).astype(np.float32)
    x[bad, 2] = np.nan
    src = tmp_path / "rows.npy"
    np.save(src, x)
    art = _artifact(tmp_path, keyset, mlp_onnx)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "daemon", "batch", str(art), "--kek", str(keyset.kek_path), "--signer",
                str(keyset.public_path), "--input", str(src), "--output", str(out), "--chunk-rows", "500",
                "--threads", "1"]

    status = 3 if bad else 0
    whole = tmp_path / "whole" / f"scores{suffix}"
    assert subprocess.run(command(whole), cwd=REPO, capture_output=True).returncode == status
    out = tmp_path / "resumed" / f"scores{suffix}"
    work = out.with_name(out.name + ".inferd-batch")
    proc = subprocess.Popen(command(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _parts(work) < 6:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk committed within 120 s"
            time.sleep(0.002)  # polling the work folder: the condition itself is what we wait for
        partial = (work / "output.partial").exists()
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert partial, "the output was being written during the run, not assembled at its end"
    assert sum(p.stat().st_size for p in work.glob("part-*.arrow")) < 100_000, "the parts hold no second copy"
    assert not out.exists()
    first = _parts(work)
    # a resumed run stopped by Ctrl-C: the chunks it wrote are committed (settled) before it exits, for the next
    proc = subprocess.Popen([*command(out), "--resume"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _parts(work) <= first + 2:
            assert proc.poll() is None, "the resumed run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no chunk committed within 120 s"
            time.sleep(0.002)  # polling the work folder: the condition itself is what we wait for
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _parts(work) > first + 2 and (work / "output.partial").exists() and not out.exists()
    resumed = subprocess.run([*command(out), "--resume"], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == status, resumed.stderr
    assert "resumed after chunk" in resumed.stdout
    if bad:  # two of them in the chunks committed before the kill: counted from the parts' reject lines
        assert "3 rejected" in resumed.stdout, resumed.stdout
    assert out.read_bytes() == whole.read_bytes()
    keep = np.setdiff1d(np.arange(len(x)), bad)
    if suffix == ".npz":
        assert [name for name, _ in _members(out)] == ["row.npy", "output.npy"]
        with np.load(out, allow_pickle=False) as z:
            np.testing.assert_array_equal(z["row"], keep)
            np.testing.assert_array_equal(z["output"], _ort(mlp_onnx, x[keep])[0])
    else:
        np.testing.assert_array_equal(np.load(out, allow_pickle=False), _ort(mlp_onnx, x[keep])[0])
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name] + ([f"{out.name}.rejects.jsonl"]
                                                                               if bad else []))
