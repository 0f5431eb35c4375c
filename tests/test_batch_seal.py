"""The end of a `inferd batch` run whose .npy/.npz output was written at its offsets (daemon/batch_npz.py): a run
stopped while sealing the output, or between sealing and the rename, is finished by --resume with exactly the
uninterrupted run's output, rejects file and exit status; a chunk whose columns differ from the layout is an error.

The stops are faults injected into the real run (an OSError where the kernel could fail or a power cut could
strike), so each test lands on its exact step."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import KeySet, pack_model

from daemon import batch_npz, cli


def _batch(art: Path, keyset: KeySet, *args: str) -> int:
    return cli.main(["batch", str(art), "--kek", str(keyset.kek_path), "--signer", str(keyset.public_path), *args])


@pytest.fixture(params=[[5, 1_500], []], ids=["rejects", "no-rejects"])
def setup(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    x = np.random.default_rng(11).normal(size=(2_000, 4)).astype(np.float32)
    x[request.param, 1] = np.nan
    src = tmp_path / "rows.npy"
    np.save(src, x)
    art = tmp_path / "model.inferd"
    art.write_bytes(pack_model(keyset, mlp_onnx))
    return art, src


def _fail_once(monkeypatch: pytest.MonkeyPatch, name: str, when: str) -> None:
    """``batch_npz.os.<name>`` raises the first time it is called on the run's end (``when``: seal or publish)."""
    real = getattr(os, name)
    state = {"armed": False, "fired": False}

    def seal_or_publish(method: str) -> None:
        original = getattr(batch_npz.ArrayStream, method)

        def wrapped(self: batch_npz.ArrayStream, *args: object) -> object:
            state["armed"] = method == when
            try:
                return original(self, *args)
            finally:
                state["armed"] = False
        monkeypatch.setattr(batch_npz.ArrayStream, method, wrapped)

    def failing(*args: object) -> object:
        if state["armed"] and not state["fired"]:
            state["fired"] = True
            raise OSError(5, "Input/output error (injected)")
        return real(*args)

    seal_or_publish("seal")
    seal_or_publish("publish")
    monkeypatch.setattr(batch_npz.os, name, failing)


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
@pytest.mark.parametrize(("call", "when"), [("fsync", "seal"), ("replace", "publish"), ("fsync", "publish")],
                         ids=["in-seal", "at-the-rename", "after-the-rename"])
def test_a_run_stopped_at_its_end_is_finished_by_resume(tmp_path: Path, keyset: KeySet, setup: tuple[Path, Path],
                                                       monkeypatch: pytest.MonkeyPatch, suffix: str, call: str,
                                                       when: str, capsys: pytest.CaptureFixture[str]) -> None:
    art, src = setup
    whole = tmp_path / "whole" / f"scores{suffix}"
    status = _batch(art, keyset, "--input", str(src), "--output", str(whole), "--chunk-rows", "300")
    out = tmp_path / "stopped" / f"scores{suffix}"
    work = out.with_name(out.name + ".inferd-batch")
    with monkeypatch.context() as m:
        _fail_once(m, call, when)
        assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "300") == 1
    assert "Input/output error (injected)" in capsys.readouterr().err
    # stopped after the rename, the output is whole (the folder's fsync failed); before it, there is none
    assert out.exists() == (call == "fsync" and when == "publish") and work.exists()
    assert (work / "sealed.json").exists() == (when == "publish"), "sealed once its file is whole and on disk"
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "300", "--resume") == status
    assert out.read_bytes() == whole.read_bytes()
    rejects = out.with_name(out.name + ".rejects.jsonl")
    kept = [whole.with_name(whole.name + ".rejects.jsonl")]
    assert [p.read_bytes() for p in kept if p.exists()] == [p.read_bytes() for p in [rejects] if p.exists()]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name] + ([rejects.name] if status else []))


def test_a_folder_whose_id_column_changes_type_is_an_error_not_a_short_output(tmp_path: Path, keyset: KeySet,
                                                                              setup: tuple[Path, Path]) -> None:
    """Numbers in one file, text in the next: the layout the first rows fixed cannot hold the rest."""
    art, _ = setup
    folder = tmp_path / "in"
    folder.mkdir()
    x = np.random.default_rng(12).normal(size=(100, 4)).astype(np.float32)
    np.savez(folder / "a.npz", key=np.arange(100), **{c: x[:, k] for k, c in enumerate("abcd")})
    np.savez(folder / "b.npz", key=np.array([f"k{i}" for i in range(100)]), **{c: x[:, k] for k, c in
                                                                              enumerate("abcd")})
    out = tmp_path / "scores.npz"
    assert _batch(art, keyset, "--input", str(folder), "--output", str(out), "--chunk-rows", "50",
                  "--id-column", "key") == 1
    assert not out.exists()


def test_a_run_stopped_while_its_work_folder_goes_is_finished_by_resume(
        tmp_path: Path, keyset: KeySet, setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The folder's record of the sealed output goes last but the journal: stopped just before it, the parts
    already gone, --resume still finishes (it was: "the output in progress is missing", for good)."""
    art, src = setup
    out = tmp_path / "scores.npz"
    work = out.with_name(out.name + ".inferd-batch")
    real = Path.unlink
    fired: list[Path] = []

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name == "sealed.json" and not fired:
            fired.append(self)
            raise OSError(5, "Input/output error (injected)")
        real(self, missing_ok=missing_ok)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", unlink)
        status = _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "300")
    assert status == 1 and fired and "injected" in capsys.readouterr().err
    assert out.exists() and sorted(p.name for p in work.iterdir()) == ["journal.json", "sealed.json"]
    whole = out.read_bytes()
    rejects = out.with_name(out.name + ".rejects.jsonl")
    rejected = len(rejects.read_text().splitlines()) if rejects.exists() else 0
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "300",
                  "--resume") == (3 if rejected else 0)
    assert f"had already scored {2_000 - rejected:,} rows" in capsys.readouterr().out
    assert out.read_bytes() == whole and not work.exists()


@pytest.mark.parametrize(("suffix", "status"), [(".parquet", 1), (".npz", 1), (".jsonl", 0), (".csv", 0)])
def test_ids_that_change_type_are_refused_with_a_clear_error_where_the_output_types_columns(
        tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, suffix: str, status: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "model.inferd"
    art.write_bytes(pack_model(keyset, mlp_onnx))
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(f'{{"id": {i if i < 10 else repr(f"k{i}")}, "a": 1, "b": 2, "c": 3, "d": 4}}\n'
                           .replace("'", '"') for i in range(15)))
    out = tmp_path / f"scores{suffix}"
    assert _batch(art, keyset, "--input", str(src), "--output", str(out), "--chunk-rows", "5",
                  "--id-column", "id") == status
    if status:
        assert "the ids are int64 up to chunk 2 and string in it" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert out.exists()
