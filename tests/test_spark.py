"""Spark scoring (daemon/spark.py) on a real local Spark: equal to in-process ONNX Runtime, decrypted on executors only.

One local[2] session serves the module (its JVM and temp folders under one root, reaped at the end); the entry point
runs through pyspark's own spark-submit with the artifact and keys shipped by --files, as on a cluster.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, KeySet, SklearnModel, pack_model
from support.spark import LOG, SPARK_BIN, local_conf, local_spark, scratch_env

from daemon import keys, spark_worker
from daemon.spark import model_specs, plan, score_dataframe
from daemon.spark_score import error_line

pytestmark = pytest.mark.slow

KEK_ENV = "INFERD_TEST_KEK_FILE"


@pytest.fixture(scope="module")
def spark_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spark")


@pytest.fixture(scope="module")
def spark(spark_root: Path, keyset: KeySet) -> Iterator[Any]:
    with local_spark(spark_root, {f"spark.executorEnv.{KEK_ENV}": str(keyset.kek_path)}) as session:
        yield session


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, sklearn_model: SklearnModel,
              mlp_onnx: bytes) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("artifacts")
    paths = {"sklearn": d / "cancer.inferd", "mlp": d / "mlp.inferd"}
    paths["sklearn"].write_bytes(pack_model(keyset, sklearn_model.onnx, name="cancer"))
    paths["mlp"].write_bytes(pack_model(keyset, mlp_onnx, name="mlp"))
    return paths


def _ort(model: bytes, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def _rows(sklearn_model: SklearnModel, n: int) -> np.ndarray:
    """``n`` rows like the test set's (tiled, with a little noise so they differ)."""
    x = np.tile(sklearn_model.x_test, (n // len(sklearn_model.x_test) + 1, 1))[:n]
    noise = np.random.default_rng(3).normal(scale=0.01, size=x.shape) * np.abs(x)
    return (x + noise).astype(np.float32)


def _table(x: np.ndarray) -> pa.Table:
    cols = {"key": pa.array([f"k{i}" for i in range(len(x))])}
    cols.update({f"f{j}": pa.array(x[:, j]) for j in range(x.shape[1])})
    return pa.table(cols)


def _kek_texts(keyset: KeySet) -> list[bytes]:
    """The KEK in every form it could leak in: raw bytes, its base64 text, the key file's line."""
    raw = keyset.kek.key
    return [raw, base64.b64encode(raw), keyset.kek_path.read_bytes().strip()]


def _plaintext_files(root: Path, model: bytes) -> list[Path]:
    """Files under ``root`` holding any 48-byte window of the plaintext model (its head, middle or tail)."""
    windows = [model[:48], model[len(model) // 2: len(model) // 2 + 48], model[-48:]]
    return [p for p in root.rglob("*") if p.is_file() and any(w in p.read_bytes() for w in windows)]


def test_a_dataframe_scores_equal_to_in_process_onnx_runtime_decrypted_on_executors_only(
        spark: Any, spark_root: Path, artifacts: dict[str, Path], keyset: KeySet,
        sklearn_model: SklearnModel) -> None:
    x = _rows(sklearn_model, 3000)
    df = spark.createDataFrame(_table(x)).repartition(4)
    spark.sparkContext.setLogLevel("INFO")  # the most the logs ever say: the KEK must be in none of it
    try:
        scored = score_dataframe(df, str(artifacts["sklearn"]), kek=str(keyset.kek_path),
                                 signers=str(keyset.public_path), keep=["key"], threads=1)
        plan_text = StringIO()
        with redirect_stdout(plan_text):
            scored.explain(mode="extended")
        got = scored.toArrow().sort_by("key")
    finally:
        spark.sparkContext.setLogLevel("ERROR")
    assert got.column_names == ["key", "label", "probabilities", "reject_reason"]
    assert got.num_rows == 3000 and got.column("reject_reason").null_count == 3000
    order = np.array([int(k[1:]) for k in got.column("key").to_pylist()])
    want = _ort(sklearn_model.onnx, X=x[order])
    np.testing.assert_array_equal(got.column("label").to_numpy(), want["label"])
    np.testing.assert_allclose(np.array(got.column("probabilities").to_pylist(), np.float32), want["probabilities"],
                               rtol=1e-5, atol=1e-6)

    # the driver (this process) never decrypted it; each worker that did, did it once
    assert spark_worker.LOADS == {} and spark_worker._CACHE == {}

    digest = hashlib.sha256(artifacts["sklearn"].read_bytes()).hexdigest()

    def loads(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import os

        from daemon import spark_worker as worker

        for _ in batches:
            pass
        yield pa.RecordBatch.from_pydict({"pid": [os.getpid()], "loads": [worker.LOADS[(digest, "main")]]})

    seen = {r["pid"]: r["loads"] for r in spark.range(0, 4, 1, 4).mapInArrow(loads, "pid long, loads long").collect()}
    assert seen and all(pid != os.getpid() for pid in seen)
    assert set(seen.values()) <= {0, 1} and 1 in seen.values(), seen  # decrypted by a worker, once in each

    # the KEK is in neither the plan, nor the function shipped to the executors, nor the logs
    from pyspark.serializers import CloudPickleSerializer

    inputs, outputs = model_specs(spark, scored_ref(artifacts["sklearn"], keyset))
    shipped = CloudPickleSerializer().dumps(plan(df.schema, scored_ref(artifacts["sklearn"], keyset), inputs, outputs,
                                                 inputs=None, outputs=None, keep=["key"], batch_rows=10_000,
                                                 allow_nan=False, csv_text=False))
    logged = (spark_root / LOG).read_bytes()
    assert b" INFO DAGScheduler: " in logged  # the INFO lines of this very job are there
    for text in _kek_texts(keyset):
        assert text not in shipped
        assert text.decode("latin-1") not in plan_text.getvalue()
        assert text not in logged
    assert "MapInArrow" in plan_text.getvalue()
    assert _plaintext_files(spark_root, sklearn_model.onnx) == []


def scored_ref(artifact: Path, keyset: KeySet) -> spark_worker.ModelRef:
    return spark_worker.ModelRef(artifact=str(artifact), keks=(str(keyset.kek_path),),
                                 signers=(str(keyset.public_path),), threads=1)


def test_an_array_column_maps_to_an_input_and_bad_rows_carry_their_reason(
        spark: Any, spark_root: Path, artifacts: dict[str, Path], keyset: KeySet, mlp_onnx: bytes) -> None:
    """The KEK comes from an environment variable naming its file on the executors (a Kubernetes secret's way)."""
    x = np.random.default_rng(5).normal(size=(2000, 4)).astype(np.float32)
    features: list[Any] = [list(map(float, row)) for row in x]
    features[7], features[11], features[13] = None, [1.0, 2.0], [float("nan")] * 4
    table = pa.table({"id": pa.array(np.arange(2000, dtype=np.int64)), "note": pa.array(["n"] * 2000),
                      "features": pa.array(features, type=pa.list_(pa.float32()))})
    scored = score_dataframe(spark.createDataFrame(table).repartition(3), str(artifacts["mlp"]), kek_env=KEK_ENV,
                             signers=[str(keyset.public_path)], inputs={"input": "features"}, batch_rows=128)
    got = scored.toArrow().sort_by("id")
    assert got.column_names == ["id", "note", "output", "reject_reason"]  # every column that feeds no input is kept
    assert scored.schema["output"].metadata == {"inferd_shape": [3], "inferd_datatype": "FP32"}
    reasons = dict(zip(got.column("id").to_pylist(), got.column("reject_reason").to_pylist()))
    bad = {i: r for i, r in reasons.items() if r is not None}
    assert sorted(bad) == [7, 11, 13]
    assert bad[7] == "column 'features': missing value"
    assert "shape [2]" in bad[11] and "not allowed" in bad[13]
    out = got.column("output").to_pylist()
    assert all(out[i] is None for i in bad)
    good = np.array([i for i in range(2000) if i not in bad])
    np.testing.assert_allclose(np.array([out[i] for i in good], np.float32), _ort(mlp_onnx, input=x[good])["output"],
                               rtol=1e-5, atol=1e-6)
    assert _plaintext_files(spark_root, mlp_onnx) == []


def test_csv_text_is_parsed_per_column_and_a_kept_column_may_also_feed_the_model(
        spark: Any, tmp_path: Path, artifacts: dict[str, Path], keyset: KeySet, mlp_onnx: bytes) -> None:
    x = np.random.default_rng(9).normal(size=(300, 4)).astype(np.float32)
    lines = ["id,a,b,c,d"] + [f"r{i}," + ",".join(repr(float(v)) for v in row) for i, row in enumerate(x)]
    lines[1 + 5] = "r5,0.5,abc,0.1,0.2"
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    df = spark.read.option("header", "true").csv(str(tmp_path / "in.csv"))
    scored = score_dataframe(df, str(artifacts["mlp"]), kek=str(keyset.kek_path), signers=str(keyset.public_path),
                             keep=["id", "a"], inputs={"input": ["a", "b", "c", "d"]}, csv_text=True)
    got = scored.toArrow()
    assert got.column_names == ["id", "a", "output", "reject_reason"]
    rows = {r["id"]: r for r in got.to_pylist()}
    assert rows["r5"]["reject_reason"] == "column 'b': 'abc' is not a number" and rows["r5"]["output"] is None
    good = [i for i in range(300) if i != 5]
    np.testing.assert_allclose(np.array([rows[f"r{i}"]["output"] for i in good], np.float32),
                               _ort(mlp_onnx, input=x[good])["output"], rtol=1e-5, atol=1e-6)


def test_a_key_missing_or_wrong_on_the_executors_fails_before_any_scoring_with_the_reason(
        spark: Any, tmp_path: Path, artifacts: dict[str, Path], keyset: KeySet) -> None:
    df = spark.createDataFrame(pa.table({"input": pa.array([[0.0] * 4], type=pa.list_(pa.float32()))}))
    with pytest.raises(Exception, match="nowhere.kek: no such file on this executor") as missing:
        score_dataframe(df, str(artifacts["mlp"]), kek="nowhere.kek", signers=str(keyset.public_path))
    assert error_line(missing.value) == ("FileNotFoundError: nowhere.kek: no such file on this executor, and no file "
                                         "'nowhere.kek' distributed with --files or SparkContext.addFile")
    keys.generate_kek(tmp_path / "other.kek", "main")  # the right key id, another key
    with pytest.raises(Exception, match="does not decrypt") as wrong:
        score_dataframe(df, str(artifacts["mlp"]), kek=str(tmp_path / "other.kek"), signers=str(keyset.public_path))
    assert error_line(wrong.value).startswith("WrongKey: the configured KEK 'main' does not decrypt artifact mlp:1")
    with pytest.raises(ValueError, match="--map names input 'nope'"):
        score_dataframe(df, str(artifacts["mlp"]), kek=str(keyset.kek_path), signers=str(keyset.public_path),
                        inputs={"nope": "input"})


def test_spark_submit_runs_the_entry_point_with_the_artifact_and_keys_shipped_by_files(
        tmp_path: Path, artifacts: dict[str, Path], keyset: KeySet, sklearn_model: SklearnModel) -> None:
    x = _rows(sklearn_model, 500)
    pq.write_table(_table(x), tmp_path / "in.parquet")
    conf = [a for k, v in local_conf(tmp_path / "spark").items() for a in ("--conf", f"{k}={v}")]
    ship = ",".join(str(p) for p in (artifacts["sklearn"], keyset.kek_path, keyset.public_path))
    run_dir = tmp_path / "cwd"  # where the file names given below do not exist: they must come from --files
    run_dir.mkdir()
    cmd = [str(SPARK_BIN), "--master", "local[2]", *conf, "--conf", f"spark.pyspark.python={sys.executable}",
           "--files", ship, str(REPO / "daemon" / "spark_score.py"), artifacts["sklearn"].name,
           "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--keep", "key",
           "--kek", keyset.kek_path.name, "--signer", keyset.public_path.name]
    env = {**os.environ, **scratch_env(tmp_path / "spark")}
    done = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, timeout=150)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().strip().splitlines()[-1] == f"scored 500 rows into {tmp_path / 'out'}"
    got = pq.read_table(tmp_path / "out").sort_by("key")
    order = np.array([int(k[1:]) for k in got.column("key").to_pylist()])
    want = _ort(sklearn_model.onnx, X=x[order])
    np.testing.assert_array_equal(got.column("label").to_numpy(), want["label"])
    np.testing.assert_allclose(np.array(got.column("probabilities").to_pylist(), np.float32), want["probabilities"],
                               rtol=1e-5, atol=1e-6)
    for text in _kek_texts(keyset):
        assert text not in done.stdout + done.stderr
    assert _plaintext_files(tmp_path, sklearn_model.onnx) == []


def test_the_daemon_and_its_cli_start_without_importing_pyspark() -> None:
    code = "import sys, daemon.app, daemon.cli, daemon.batch; print(sorted(m for m in sys.modules if 'spark' in m))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
