"""`inferd batch` as a real subprocess, killed mid-run (SIGKILL, then Ctrl-C) and resumed: the output is exactly an
uninterrupted run's, no row missing or twice, no half-written output, and no plaintext model on disk anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from conftest import REPO, KeySet, pack_model

ROWS, CHUNK = 400_000, 500


def _command(art: Path, keyset: KeySet, src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "daemon", "batch", str(art), "--kek", str(keyset.kek_path), "--signer",
            str(keyset.public_path), "--input", str(src), "--output", str(out), "--chunk-rows", str(CHUNK),
            "--threads", "1", *extra]


def _committed(work: Path) -> int:
    """The committed chunks: the part files from chunk 0 without a gap (docs/batch.md, "Chunks")."""
    k = 0
    while (work / f"part-{k:08d}.arrow").exists():
        k += 1
    return k


def _interrupt_after(cmd: list[str], env: dict[str, str], work: Path, beyond: int, sig: int) -> int:
    """Start the run, send ``sig`` once its work folder has more than ``beyond`` committed chunks; its exit status."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _committed(work) <= beyond:
            assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "no chunk committed within 120 s"
            time.sleep(0.002)  # polling the work folder: the condition itself is what we wait for
        proc.send_signal(sig)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _scan_for(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_sigkill_then_ctrl_c_then_resume_gives_exactly_the_uninterrupted_output(
        tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    x = np.random.default_rng(7).normal(size=(ROWS, 4)).astype(np.float32)
    src = tmp_path / "in" / "rows.csv"
    src.parent.mkdir()
    pacsv.write_csv(pa.table({"id": [f"r{i}" for i in range(ROWS)], **{c: x[:, k] for k, c in enumerate("abcd")}}),
                    src)
    art = tmp_path / "mlp.inferd"
    art.write_bytes(pack_model(keyset, mlp_onnx))
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}

    whole = tmp_path / "whole" / "scores.csv"
    done = subprocess.run(_command(art, keyset, src, whole, "--id-column", "id"), cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "resumed" / "scores.csv"
    work = out.with_name(out.name + ".inferd-batch")
    cmd = _command(art, keyset, src, out, "--id-column", "id")
    assert _interrupt_after(cmd, env, work, 0, signal.SIGKILL) == -signal.SIGKILL
    first = _committed(work)
    assert 0 < first < ROWS // CHUNK
    assert not out.exists(), "a killed run leaves no output under the output's name"
    needle = mlp_onnx[len(mlp_onnx) // 2: len(mlp_onnx) // 2 + 64]
    for root in (temp, out.parent, src.parent):
        assert _scan_for(root, needle) == [], f"plaintext model bytes under {root}"

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr, "a leftover work folder is never overwritten"
    other = subprocess.run([*cmd, "--resume", "--chunk-rows", "499"], cwd=REPO, env=env, capture_output=True, text=True)
    assert other.returncode == 1 and "started with another chunk_rows" in other.stderr
    assert _committed(work) == first

    assert _interrupt_after([*cmd, "--resume"], env, work, first, signal.SIGINT) == 130
    second = _committed(work)
    assert second > first and not out.exists()

    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after chunk {second}" in resumed.stdout, "it went on from the journal, not from 0"
    assert out.read_bytes() == whole.read_bytes()
    ids = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(include_columns=["id"])).column("id")
    assert ids.to_pylist() == [f"r{i}" for i in range(ROWS)], "no row missing or twice"
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.csv"], "work folder, lock and temps removed"
    for root in (temp, out.parent, whole.parent):
        assert _scan_for(root, needle) == []


@pytest.mark.slow
def test_a_resumed_run_keeps_the_rejects_of_both_runs(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    """The end of a run reads back only the parts of the run before it: which of this run's own chunks had rejects
    it keeps from their commits."""
    x = np.random.default_rng(11).normal(size=(100_000, 4)).astype(np.float32)
    x[::997, 1] = np.nan  # a rejected row in most chunks, before and after the kill
    x[:CHUNK, 0] = np.inf  # chunk 0 wholly rejected: a part without columns
    src = tmp_path / "rows.npy"
    np.save(src, x)
    art = tmp_path / "mlp.inferd"
    art.write_bytes(pack_model(keyset, mlp_onnx))
    whole = tmp_path / "whole" / "scores.parquet"
    done = subprocess.run(_command(art, keyset, src, whole), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr

    out = tmp_path / "resumed" / "scores.parquet"
    work = out.with_name(out.name + ".inferd-batch")
    cmd = _command(art, keyset, src, out)
    assert _interrupt_after(cmd, dict(os.environ), work, 2, signal.SIGKILL) == -signal.SIGKILL
    assert 2 < _committed(work) < len(x) // CHUNK
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 3, resumed.stderr
    assert "resumed after chunk" in resumed.stdout
    assert out.read_bytes() == whole.read_bytes()
    rejects = out.with_name(out.name + ".rejects.jsonl").read_text()
    assert rejects == whole.with_name(whole.name + ".rejects.jsonl").read_text()
    rows = [json.loads(line)["row"] for line in rejects.splitlines()]
    assert rows == sorted({*range(CHUNK), *range(0, len(x), 997)})


_MEASURE = """
import json, sys, tracemalloc
import onnxruntime, pyarrow as pa, pyarrow.csv, pyarrow.parquet
from daemon import batch, batch_io, batch_rows, cli
from daemon import artifact, config, keys, store
tracemalloc.start()  # after the imports: their code objects are no data
rc = cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "arrow_peak": pa.default_memory_pool().max_memory(),
                  "python_peak": tracemalloc.get_traced_memory()[1]}))
"""


@pytest.mark.slow
def test_memory_is_bounded_by_the_chunk_not_by_the_input(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    """A Parquet input of 51 MB of features scored in chunks of 20,000 rows: the Arrow pool's peak and the Python
    heap's (numpy's arrays included) stay far below the input, as they would not if the file were read whole."""
    import pyarrow.parquet as pq

    rows = 1_600_000
    x = np.random.default_rng(3).normal(size=(rows, 4)).astype(np.float64)
    src = tmp_path / "big.parquet"
    pq.write_table(pa.table({c: x[:, k] for k, c in enumerate("abcd")}), src, row_group_size=20_000)
    art = tmp_path / "mlp.inferd"
    art.write_bytes(pack_model(keyset, mlp_onnx))
    out = tmp_path / "scores.npy"
    done = subprocess.run([sys.executable, "-c", _MEASURE, *_command(art, keyset, src, out)[3:-4],
                           "--chunk-rows", "20000", "--threads", "1"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["rc"] == 0
    assert x.nbytes == 51_200_000
    assert got["arrow_peak"] < 8_000_000, got
    assert got["python_peak"] < 8_000_000, got
    assert np.load(out, mmap_mode="r").shape == (rows, 3)
