"""`inferd batch`: every format scores equal to in-process ONNX Runtime, mappings, ids, rejects and exit statuses.

The command runs in process through ``daemon.cli.main`` (the same argv a shell gives); test_batch_resume.py runs it
as a subprocess and kills it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import KeySet, Site, SklearnModel, pack_model

from daemon import cli


def _artifact(tmp_path: Path, keyset: KeySet, model: bytes, name: str = "mlp") -> Path:
    path = tmp_path / f"{name}.inferd"
    path.write_bytes(pack_model(keyset, model, name=name))
    return path


def _batch(artifact: Path, keyset: KeySet, *args: str) -> int:
    return cli.main(["batch", str(artifact), "--kek", str(keyset.kek_path), "--signer", str(keyset.public_path),
                     *args])


def _ort(model: bytes, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def _features(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def _write_input(path: Path, x: np.ndarray, names: list[str]) -> None:
    """``x`` [n, F] as the file ``path``'s suffix says: columns ``names`` (npy: one array; npz: one per name)."""
    suffix = path.suffix
    if suffix == ".csv":
        lines = [",".join(names)] + [",".join(repr(float(v)) for v in row) for row in x]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".jsonl":
        path.write_bytes(b"".join(orjson.dumps(dict(zip(names, map(float, row)))) + b"\n" for row in x))
    elif suffix == ".parquet":
        pq.write_table(pa.table({n: x[:, i] for i, n in enumerate(names)}), path, row_group_size=37)
    elif suffix == ".npy":
        np.save(path, x)
    else:
        np.savez(path, **{n: x[:, i] for i, n in enumerate(names)})


def _read_output(path: Path) -> dict[str, np.ndarray]:
    """Columns of an output file as arrays; CSV's flattened name_i columns stay flat."""
    suffix = path.suffix
    if suffix == ".csv":
        table = pacsv.read_csv(path)
        return {n: table.column(n).to_numpy() for n in table.column_names}
    if suffix == ".parquet":
        table = pq.read_table(path)
        return {n: np.array(table.column(n).to_pylist()) for n in table.column_names}
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]} if rows else {}
    if suffix == ".npy":
        return {"output": np.load(path)}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _output_matrix(cols: dict[str, np.ndarray], name: str, width: int) -> np.ndarray:
    if name in cols:
        return cols[name].astype(np.float32)
    return np.stack([cols[f"{name}_{k}"] for k in range(width)], axis=1).astype(np.float32)


@pytest.mark.parametrize("fmt", [".csv", ".jsonl", ".parquet", ".npy", ".npz"])
def test_every_format_scores_equal_to_onnx_runtime(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                   fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    x = _features(250)
    src = tmp_path / f"rows{fmt}"
    _write_input(src, x, ["a", "b", "c", "d"])
    out = tmp_path / "out" / f"scores{fmt}"
    art = _artifact(tmp_path, keyset, mlp_onnx)
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "64") == 0
    assert "scored 250 rows" in capsys.readouterr().out
    want = _ort(mlp_onnx, input=x)["output"]
    cols = _read_output(out)
    np.testing.assert_array_equal(_output_matrix(cols, "output", 3), want)
    if fmt != ".npy":  # the .npy output is one array; the others carry the row numbers
        np.testing.assert_array_equal(cols["row"], np.arange(250))
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "no work folder, rejects or temp file left"


@pytest.mark.parametrize("fmt", [".csv", ".parquet", ".npy", ".npz", ".jsonl"])
def test_a_folder_of_files_is_read_in_name_order_with_rows_numbered_across_files(
        tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, fmt: str) -> None:
    x = _features(90)
    folder = tmp_path / "in"
    folder.mkdir()
    for k, part in enumerate((x[:40], x[40:41], x[41:])):
        _write_input(folder / f"part-{k}{fmt}", part, ["a", "b", "c", "d"])
    (folder / "_SUCCESS").write_text("")
    out = tmp_path / "scores.jsonl"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(folder), "--output", str(out),
                  "--chunk-rows", "25") == 0
    cols = _read_output(out)
    np.testing.assert_array_equal(cols["row"], np.arange(90))
    np.testing.assert_array_equal(cols["output"].astype(np.float32), _ort(mlp_onnx, input=x)["output"])


def test_a_real_classifier_with_a_column_mapping_and_ids_kept(tmp_path: Path, keyset: KeySet,
                                                               sklearn_model: SklearnModel) -> None:
    """Breast-cancer features with an id and the label beside them: the label is numeric too, so the default rule
    (every numeric column but the id) finds 31 columns for 30 features and says to use --map."""
    x = sklearn_model.x_test
    ids = [f"inv-{i:04d}" for i in range(len(x))]
    names = [f"f{i}" for i in range(30)]
    table = pa.table({"invoice": ids, **{n: x[:, i] for i, n in enumerate(names)}, "y": sklearn_model.y_test})
    src = tmp_path / "cancer.parquet"
    pq.write_table(table, src)
    art = _artifact(tmp_path, keyset, sklearn_model.onnx, name="cancer")
    out = tmp_path / "scored.parquet"
    common = ["--input", str(src), "--output", str(out), "--id-column", "invoice", "--chunk-rows", "50"]
    assert _batch(art, keyset, *common) == 1
    assert not out.exists()
    assert _batch(art, keyset, *common, "--map", ",".join(names) + "=X") == 0
    got = pq.read_table(out)
    assert got.column_names == ["invoice", "label", "probabilities"]
    assert got.column("invoice").to_pylist() == ids
    want = _ort(sklearn_model.onnx, X=x)
    np.testing.assert_array_equal(got.column("label").to_numpy(), want["label"])
    np.testing.assert_array_equal(np.array(got.column("probabilities").to_pylist(), np.float32), want["probabilities"])
    np.testing.assert_array_equal(got.column("label").to_numpy(), sklearn_model.sklearn_pred)


def test_a_column_named_as_the_input_holds_whole_rows(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    """JSON lines whose "input" is a list of 4 numbers, beside a text column the rule ignores."""
    x = _features(30)
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"id": i * 7, "note": "x", "input": [float(v) for v in row]}) + b"\n"
                             for i, row in enumerate(x)))
    out = tmp_path / "scores.csv"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out),
                  "--id-column", "id") == 0
    cols = _read_output(out)
    assert list(cols) == ["id", "output_0", "output_1", "output_2"]
    np.testing.assert_array_equal(cols["id"], np.arange(30) * 7)
    np.testing.assert_array_equal(_output_matrix(cols, "output", 3), _ort(mlp_onnx, input=x)["output"])


def test_bad_rows_go_to_the_rejects_file_with_their_reason_and_exit_status_3(
        tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    x = _features(12)
    lines = ["key,a,b,c,d"] + [f"k{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(x)]
    lines[3] = "k2,abc,1,2,3"
    lines[5] = "k4,1,,2,3"
    lines[8] = "k7,1,2,nan,3"
    src = tmp_path / "rows.csv"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.jsonl"
    rejects = tmp_path / "bad.jsonl"
    art = _artifact(tmp_path, keyset, mlp_onnx)
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--id-column", "key", "--rejects",
                  str(rejects), "--chunk-rows", "5") == 3
    bad = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [b["key"] for b in bad] == ["k2", "k4", "k7"]
    assert "'abc' is not a number" in bad[0]["reason"] and "'a'" in bad[0]["reason"]
    assert "missing value" in bad[1]["reason"] and "'b'" in bad[1]["reason"]
    assert "nan is not allowed" in bad[2]["reason"]
    cols = _read_output(out)
    keep = [i for i in range(12) if i not in (2, 4, 7)]
    assert list(cols["key"]) == [f"k{i}" for i in keep]
    np.testing.assert_array_equal(cols["output"].astype(np.float32), _ort(mlp_onnx, input=x[keep])["output"])
    # --allow-nan scores the NaN row; a clean rerun removes the stale rejects file
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--id-column", "key", "--rejects",
                  str(rejects), "--allow-nan") == 3
    assert [json.loads(line)["key"] for line in rejects.read_text().splitlines()] == ["k2", "k4"]
    good = tmp_path / "good.csv"
    good.write_text("\n".join(lines[:3]) + "\n")
    assert _batch(art, keyset, "--input", str(good), "--output", str(out), "--rejects", str(rejects),
                  "--id-column", "key") == 0
    assert not rejects.exists()


def test_malformed_json_lines_and_wrong_types_are_rejected(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text('{"input": [1, 2, 3, 4]}\n{"input": [1, 2\n{"input": [1, 2, 3]}\n{"input": true}\n'
                   '{"input": [1, 2, 3, "x"]}\n\n{"input": [4, 3, 2, 1]}\n')
    out = tmp_path / "scores.npz"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out)) == 3
    bad = [json.loads(line) for line in (tmp_path / "scores.npz.rejects.jsonl").read_text().splitlines()]
    assert [b["row"] for b in bad] == [1, 2, 3, 4]
    assert bad[0]["reason"].startswith("malformed JSON line")
    assert "shape [3]" in bad[1]["reason"]
    assert "boolean" in bad[2]["reason"]
    assert "'input'" in bad[3]["reason"]
    with np.load(out) as z:
        np.testing.assert_array_equal(z["row"], [0, 5])
        x = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], np.float32)
        np.testing.assert_array_equal(z["output"], _ort(mlp_onnx, input=x)["output"])


def test_a_model_of_the_store_by_name_with_the_config_keys(tmp_path: Path, site: Site, mlp_onnx: bytes) -> None:
    site.install(pack_model(site.keyset, mlp_onnx, version="3"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    config = site.write_config()
    x = _features(20)
    src = tmp_path / "x.npy"
    np.save(src, x)
    out = tmp_path / "y.npy"
    assert cli.main(["batch", "mlp", "--config", str(config), "--input", str(src), "--output", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), _ort(mlp_onnx, input=x)["output"])


def test_errors_exit_1_with_a_precise_message(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    art = _artifact(tmp_path, keyset, mlp_onnx)
    src = tmp_path / "rows.csv"
    src.write_text("a,b,c\n1,2,3\n")
    out = tmp_path / "o.csv"
    assert _batch(art, keyset, "--input", str(src), "--output", str(out)) == 1
    assert "takes 4 value(s) per row but 3 column(s)" in capsys.readouterr().err
    assert _batch(art, keyset, "--input", str(src), "--output", str(tmp_path / "o.xlsx")) == 1
    assert "unknown format '.xlsx'" in capsys.readouterr().err
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--map", "a,b,c,zz=input") == 1
    assert "no column 'zz'" in capsys.readouterr().err
    assert _batch(art, keyset, "--input", str(src), "--output", str(src)) == 1
    assert "is an input file" in capsys.readouterr().err
    assert cli.main(["batch", "mlp", "--kek", str(keyset.kek_path), "--input", str(src), "--output", str(out)]) == 1
    assert "give --config" in capsys.readouterr().err
    assert not out.exists()


def test_rows_the_runtime_refuses_are_found_one_by_one_and_rejected(tmp_path: Path, keyset: KeySet) -> None:
    """A Gather whose indices are the rows: 7 is out of the table's range, so ORT refuses the chunk; the rows are then
    run alone and only the refused one is rejected, with the runtime's message (and 1.5 is no INT64)."""
    from refusing_models import TABLE, gather_onnx

    src = tmp_path / "idx.csv"
    src.write_text("idx\n0\n3\n7\n1.5\n4\n")
    out = tmp_path / "rows.parquet"
    art = _artifact(tmp_path, keyset, gather_onnx(), name="gather")
    assert _batch(art, keyset, "--input", str(src), "--output", str(out)) == 3
    bad = [json.loads(line) for line in (tmp_path / "rows.parquet.rejects.jsonl").read_text().splitlines()]
    assert [b["row"] for b in bad] == [2, 3]
    assert bad[0]["reason"].startswith("the model refused the row: ") and "indices" in bad[0]["reason"]
    assert "1.5 is not an integer" in bad[1]["reason"]
    got = pq.read_table(out)
    assert got.column("row").to_pylist() == [0, 1, 4]
    np.testing.assert_array_equal(np.array(got.column("rows").to_pylist(), np.float32), TABLE[[0, 3, 4]])


def test_a_terminal_gets_a_progress_bar_with_rows_per_second_and_eta(tmp_path: Path, keyset: KeySet,
                                                                     mlp_onnx: bytes) -> None:
    """stderr on a pseudo-terminal: the bar is drawn (a pipe gets only the summary line, as the other tests see)."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import REPO

    x = _features(60_000)
    src = tmp_path / "x.parquet"
    _write_input(src, x, ["a", "b", "c", "d"])
    art = _artifact(tmp_path, keyset, mlp_onnx)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "daemon", "batch", str(art), "--kek", str(keyset.kek_path), "--signer",
             str(keyset.public_path), "--input", str(src), "--output", str(tmp_path / "y.parquet"), "--chunk-rows",
             "100"], cwd=REPO, stderr=follower, stdout=subprocess.PIPE, text=True, timeout=120)
        os.close(follower)
        follower = -1
        drawn = b""
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not data:
                break
            drawn += data
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert b"rows/s" in drawn and b"ETA" in drawn and b"%" in drawn, drawn[-300:]
    assert "scored 60,000 rows" in proc.stdout


@pytest.mark.parametrize(("runtime", "filename"), [("openvino", "model.onnx"), ("litert", "model.tflite")])
def test_openvino_and_litert_score_equal_to_their_runtime_in_process(tmp_path: Path, keyset: KeySet, runtime: str,
                                                                     filename: str) -> None:
    """The same MLP on the other two adapters: the batch output equals the adapter's own run of the whole input."""
    from conftest import build_mlp, mlp_reference, mlp_weights
    from tflite_builder import build_mlp_tflite

    from adapters import SessionOptions, get_runtime

    model = build_mlp() if runtime == "openvino" else build_mlp_tflite(*mlp_weights())
    art = tmp_path / "m.inferd"
    art.write_bytes(pack_model(keyset, model, runtime=runtime, filename=filename))
    x = _features(150)
    src = tmp_path / "x.parquet"
    _write_input(src, x, ["a", "b", "c", "d"])
    out = tmp_path / "y.npz"
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "64") == 0
    session = get_runtime(runtime).load({filename: model}, SessionOptions(threads=1))
    try:
        (name,) = [s.name for s in session.outputs]
        want = session.run({session.inputs[0].name: x})[name]
    finally:
        session.close()
    with np.load(out) as z:
        np.testing.assert_array_equal(z[name], want)
        np.testing.assert_array_equal(z["row"], np.arange(150))
    np.testing.assert_allclose(want, mlp_reference(x), rtol=1e-5, atol=1e-5)


def test_an_input_without_rows_gives_an_output_without_rows(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    src = tmp_path / "empty.csv"
    src.write_text("a,b,c,d\n")
    art = _artifact(tmp_path, keyset, mlp_onnx)
    for suffix in (".csv", ".parquet", ".jsonl", ".npz"):
        out = tmp_path / f"out{suffix}"
        assert _batch(art, keyset, "--input", str(src), "--output", str(out)) == 0
        if suffix == ".jsonl":
            assert out.read_bytes() == b"", "no line for no row"
        else:  # the columns are there, without rows
            cols = _read_output(out)
            assert cols["row"].shape == (0,) and any(k.startswith("output") for k in cols), cols
    assert pq.read_table(tmp_path / "out.parquet").column_names == ["row", "output"]


def test_a_npy_output_of_a_model_with_two_outputs_is_refused_before_any_work(
        tmp_path: Path, keyset: KeySet, sklearn_model: SklearnModel, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "x.npy"
    np.save(src, sklearn_model.x_test)
    out = tmp_path / "y.npy"
    assert _batch(_artifact(tmp_path, keyset, sklearn_model.onnx), keyset, "--input", str(src), "--output",
                  str(out)) == 1
    assert "has 2 outputs: use .npz" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.inferd", "x.npy"]


def test_a_parquet_list_column_feeds_whole_rows_and_a_wrong_length_is_rejected(
        tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    x = _features(40)
    lists = [list(map(float, row)) for row in x]
    lists[7] = lists[7][:3]
    src = tmp_path / "x.parquet"
    pq.write_table(pa.table({"input": lists}), src)
    out = tmp_path / "y.parquet"
    art = _artifact(tmp_path, keyset, mlp_onnx)
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "8") == 3
    bad = [json.loads(line) for line in (tmp_path / "y.parquet.rejects.jsonl").read_text().splitlines()]
    assert bad == [{"row": 7, "reason": "column 'input': a row of shape [3], the input takes [4]"}]
    keep = [i for i in range(40) if i != 7]
    got = pq.read_table(out)
    assert got.column("row").to_pylist() == keep
    np.testing.assert_array_equal(np.array(got.column("output").to_pylist(), np.float32),
                                  _ort(mlp_onnx, input=x[keep])["output"])


def test_a_model_with_a_batch_of_one_runs_row_by_row(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    import onnx

    model = onnx.load_from_string(mlp_onnx)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = model.SerializeToString()
    x = _features(9)
    src = tmp_path / "x.npy"
    np.save(src, x)
    out = tmp_path / "y.npy"
    assert _batch(_artifact(tmp_path, keyset, fixed), keyset, "--input", str(src), "--output", str(out)) == 0
    want = np.concatenate([_ort(fixed, input=x[i:i + 1])["output"] for i in range(9)])
    np.testing.assert_array_equal(np.load(out), want)
