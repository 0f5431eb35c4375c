"""The `inferd` command end to end: keygen, pack (with a smoke reference), inspect, verify, install, list; and the
first-run mistakes pack and install now catch with the fix in the message."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, KeySet, Site, pack_model

from daemon import cli
from daemon.config import NAME_PATTERN
from daemon.packing import ONNX_ML_HINT, STRING_HINT, ZIPMAP_HINT


def inferd(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def test_the_whole_cli_flow(tmp_path: Path, mlp_onnx: bytes) -> None:
    kek, sig = tmp_path / "keys" / "site.kek", tmp_path / "keys" / "release.key"
    assert "key id site" in inferd("keygen", "--out", str(kek)).stdout
    assert "signer id" in inferd("keygen", "--signing", "--out", str(sig)).stdout
    again = inferd("keygen", "--out", str(kek), ok=False)
    assert again.returncode == 1 and "already exists" in again.stderr

    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx)
    ref = tmp_path / "ref.npz"
    np.savez(ref, input=np.ones((2, 4), np.float32))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    out = tmp_path / "mlp-2.inferd"
    inferd("model", "pack", str(model), "--name", "mlp", "--version", "2", "--runtime", "onnxruntime",
           "--kek", str(kek), "--signing-key", str(sig), "--reference-inputs", str(ref), "--labels", str(labels),
           "-o", str(out))

    header = json.loads(inferd("model", "inspect", str(out)).stdout)
    assert header["name"] == "mlp" and header["version"] == "2" and header["kek_id"] == "site"
    assert "wrapped_key" not in header

    verified = inferd("model", "verify", str(out), "--kek", str(kek), "--signer", str(sig) + ".pub").stdout
    assert verified.startswith("OK: mlp:2 (onnxruntime)") and "smoke/output/output.npy" in verified
    unsigned = inferd("model", "verify", str(out), "--kek", str(kek), ok=False)
    assert unsigned.returncode == 1 and "not a trusted signer" in unsigned.stderr

    config = tmp_path / "inferd.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": "state",
        "keys": {"kek": [{"path": str(kek)}], "signers": [{"path": str(sig) + ".pub"}]},
        "models": [{"name": "mlp", "runtime": "onnxruntime"}],
    }))
    assert "installed mlp:2 (active)" in inferd("model", "install", str(out), "--config", str(config)).stdout
    rows = json.loads(inferd("model", "list", "--config", str(config), "--json").stdout)
    assert rows == [{"model": "mlp", "version": "2", "active": True, "runtime": "onnxruntime", "device": "cpu",
                     "threads": "auto", "workers": 1, "configured": True, "created": header["created"],
                     "state": "active", "labels": 3, "description": None, "why": None}]
    table = inferd("model", "list", "--config", str(config)).stdout.splitlines()
    assert table[0].split() == ["model", "version", "active", "runtime", "device", "threads", "workers", "configured",
                                "created", "state", "labels", "description"]


def test_pack_refuses_a_file_the_runtime_cannot_read(tmp_path: Path, mlp_onnx: bytes) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx)
    res = inferd("model", "pack", str(model), "--name", "m", "--version", "1", "--runtime", "litert",
                 "--kek", "x", "--signing-key", "y", "-o", str(tmp_path / "o"), ok=False)
    assert res.returncode == 1
    assert res.stderr.strip() == "inferd: error: runtime litert reads .tflite files, not mlp.onnx"
    assert not (tmp_path / "o").exists()


def test_install_refuses_a_tampered_artifact(tmp_path: Path, mlp_onnx: bytes) -> None:
    kek, sig = tmp_path / "a.kek", tmp_path / "s.key"
    inferd("keygen", "--out", str(kek))
    inferd("keygen", "--signing", "--out", str(sig))
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_onnx)
    out = tmp_path / "m.inferd"
    inferd("model", "pack", str(model), "--name", "m", "--version", "1", "--runtime", "onnxruntime",
           "--kek", str(kek), "--signing-key", str(sig), "-o", str(out))
    blob = bytearray(out.read_bytes())
    blob[-100] ^= 1
    out.write_bytes(bytes(blob))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"state_dir": "st", "keys": {"kek": [{"path": str(kek)}],
                                                                 "signers": [{"path": str(sig) + ".pub"}]}}))
    res = inferd("model", "install", str(out), "--config", str(config), ok=False)
    assert res.returncode == 1 and "failed authentication" in res.stderr
    assert not (tmp_path / "st" / "models" / "m").exists()


# --- pack refuses what the daemon could not serve (issue 9) -------------------------------------------------


@pytest.fixture(scope="module")
def iris_exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same scikit-learn classifier exported by skl2onnx by default (ZipMap) and with zipmap off."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(x, y)
    d = tmp_path_factory.mktemp("iris")
    zipmap, plain = d / "zipmap.onnx", d / "plain.onnx"
    zipmap.write_bytes(to_onnx(clf, x[:1], target_opset=17).SerializeToString())
    plain.write_bytes(to_onnx(clf, x[:1], target_opset=17, options={"zipmap": False}).SerializeToString())
    return zipmap, plain


def pack_args(model: Path, keyset: KeySet, out: Path, *extra: str, name: str = "iris", version: str = "1",
              runtime: str = "onnxruntime") -> list[str]:
    return ["model", "pack", str(model), "--name", name, "--version", version, "--runtime", runtime,
            "--kek", str(keyset.kek_path), "--signing-key", str(keyset.signing_path), "-o", str(out), *extra]


def test_pack_refuses_a_zipmap_export_and_says_how_to_export(tmp_path: Path, keyset: KeySet,
                                                             iris_exports: tuple[Path, Path]) -> None:
    zipmap, plain = iris_exports
    out = tmp_path / "iris.inferd"
    res = inferd(*pack_args(zipmap, keyset, out), ok=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "inferd: error: the model cannot be served by onnxruntime: tensor 'output_probability' has type "
        f"seq(map(int64,tensor(float))), which inferd cannot serve; fix: {ZIPMAP_HINT}"
    )
    assert "options={id(estimator): {'zipmap': False}}" in ZIPMAP_HINT
    assert not out.exists()
    # the opt-out packs it unchecked (the daemon's load is then the first check) ...
    assert "packed iris:1" in inferd(*pack_args(zipmap, keyset, out, "--no-load-check")).stdout
    # ... and the export the hint asks for packs, with a smoke test computed by the same load
    ref = tmp_path / "ref.npz"
    np.savez(ref, X=np.asarray([[5.1, 3.5, 1.4, 0.2]], np.float32))
    inferd(*pack_args(plain, keyset, out, "--reference-inputs", str(ref)))
    verified = inferd("model", "verify", str(out), "--kek", str(keyset.kek_path), "--signer",
                      str(keyset.public_path)).stdout
    assert "smoke/output/probabilities.npy" in verified and "smoke/output/label.npy" in verified


def test_pack_gives_the_fix_for_string_labels_and_for_onnx_ml_on_openvino(
    tmp_path: Path, keyset: KeySet, iris_exports: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    named = LogisticRegression(max_iter=500).fit(x, np.asarray(["setosa", "versicolor", "virginica"])[y])
    strings = tmp_path / "strings.onnx"
    strings.write_bytes(to_onnx(named, x[:1], target_opset=17, options={"zipmap": False}).SerializeToString())
    assert cli.main(pack_args(strings, keyset, tmp_path / "o")) == 1
    assert capsys.readouterr().err.strip() == (
        "inferd: error: the model cannot be served by onnxruntime: tensor 'label' has type tensor(string), which "
        f"inferd cannot serve; fix: {STRING_HINT}"
    )
    # OpenVINO converts no ONNX-ML operator: zipmap off would not help there, the runtime is the fix
    assert cli.main(pack_args(iris_exports[1], keyset, tmp_path / "o", runtime="openvino")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("inferd: error: the model cannot be served by openvino: openvino could not read plain.onnx")
    assert err.endswith(f"; fix: {ONNX_ML_HINT}") and ZIPMAP_HINT not in err
    assert not (tmp_path / "o").exists()


def test_pack_names_the_extra_when_the_runtime_is_not_installed(
    tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A packing machine without OpenVINO: the import fails as it would there (None in sys.modules blocks it)."""
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx)
    out = tmp_path / "mlp.inferd"
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert cli.main(pack_args(model, keyset, out, runtime="openvino")) == 1
    err = capsys.readouterr().err
    assert err.startswith("inferd: error: cannot check that the model loads: openvino is not installed; install it "
                          "with: pip install 'inferd[openvino]'")
    assert err.rstrip().endswith("or pack with --no-load-check to skip the check on this machine (the daemon's load "
                                 "is then the first check)")
    assert not out.exists()
    ref = tmp_path / "ref.npz"
    np.savez(ref, input=np.ones((1, 4), np.float32))
    assert cli.main(pack_args(model, keyset, out, "--no-load-check", "--reference-inputs", str(ref),
                              runtime="openvino")) == 1
    assert capsys.readouterr().err.strip() == (
        "inferd: error: --reference-inputs runs the model, so it needs the load check: drop --no-load-check"
    )
    assert cli.main(pack_args(model, keyset, out, "--no-load-check", runtime="openvino")) == 0
    assert "packed iris:1 (openvino" in capsys.readouterr().out


def test_pack_checks_the_reference_inputs_name_the_model_inputs(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_onnx)
    ref = tmp_path / "ref.npz"
    np.savez(ref, features=np.ones((1, 4), np.float32))
    assert cli.main(pack_args(model, keyset, tmp_path / "o", "--reference-inputs", str(ref))) == 1
    assert capsys.readouterr().err.strip() == (
        "inferd: error: the reference inputs are named features, but the model's inputs are input"
    )


@pytest.mark.parametrize(("flag", "value", "label"), [("--name", "bc model", "model name"),
                                                       ("--version", "1/2", "version")])
def test_pack_refuses_a_name_install_would_refuse(tmp_path: Path, keyset: KeySet, flag: str, value: str,
                                                  label: str) -> None:
    out = tmp_path / "o.inferd"
    args = pack_args(tmp_path / "never-read.onnx", keyset, out)  # the name is checked before any file is read
    args[args.index(flag) + 1] = value
    res = inferd(*args, ok=False)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"inferd: error: invalid {label} {value!r}: model names and versions are 1 to 128 letters, digits, '_', '.' "
        f"or '-', starting with a letter or digit (the pattern {NAME_PATTERN} that the config and the store use)"
    )
    assert not out.exists()


def test_reinstalling_identical_bytes_says_already_installed(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                            site: Site) -> None:
    first = tmp_path / "mlp-1.inferd"
    first.write_bytes(pack_model(keyset, mlp_onnx, version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime"}]
    config = site.write_config()
    install = ("model", "install", str(first), "--config", str(config))
    assert inferd(*install).stdout == "installed mlp:1 (active)\n"
    again = inferd(*install)
    assert again.stdout == "already installed mlp:1 (identical bytes, active)\n"
    other = tmp_path / "mlp-1-other.inferd"
    other.write_bytes(pack_model(keyset, mlp_onnx, version="1"))  # fresh data key and nonces: different bytes
    refused = inferd("model", "install", str(other), "--config", str(config), ok=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "inferd: error: mlp:1 is already installed with different content; versions are immutable"
    )
    assert (site.state_dir / "models/mlp/1/artifact.inferd").read_bytes() == first.read_bytes()


def documented_list_columns() -> tuple[list[str], list[str]]:
    """docs/store.md's `inferd model list` section: its bullet list of columns, and its example table's header."""
    doc = (REPO / "docs/store.md").read_text(encoding="utf-8")
    section = doc.split("## `inferd model list", 1)[1].split("\n## ", 1)[0]
    bullets = re.findall(r"^- `([a-z_]+)`", section, flags=re.MULTILINE)
    example = section.split("```\n", 1)[1].splitlines()[0].split()
    return bullets, example


def test_model_list_prints_the_columns_docs_store_md_describes(site: Site) -> None:
    site.models = [{"name": "planned", "runtime": "onnxruntime"}]  # configured, nothing installed: one row
    table = inferd("model", "list", "--config", str(site.write_config())).stdout.splitlines()
    bullets, example = documented_list_columns()
    assert table[0].split() == bullets == example
    assert table[1].split() == ["planned", "-", "False", "onnxruntime", "cpu", "auto", "1", "True", "-", "-", "-", "-"]
