"""`inferd batch`'s overlapping stages: the bound on chunks in flight, errors from the reader and the writer threads,
rejects found by the vectorised checks in the middle of a chunk, and the commit rule (a prefix of part files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, KeySet, pack_model
from onnx import TensorProto, helper

from adapters.base import TensorSpec
from daemon import cli
from daemon.batch import default_chunk_rows
from daemon.batch_pipeline import Pipeline

DEADLINE_S = 30.0


def _batch(art: Path, keyset: KeySet, *args: str) -> int:
    return cli.main(["batch", str(art), "--kek", str(keyset.kek_path), "--signer", str(keyset.public_path), *args])


def _artifact(tmp_path: Path, keyset: KeySet, model: bytes) -> Path:
    path = tmp_path / "model.inferd"
    path.write_bytes(pack_model(keyset, model))
    return path


def _ort(model: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


class _Counted:
    """Items that count themselves alive from creation until committed: what the pipeline holds at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.alive = self.most = self.committed = 0

    def source(self, n: int) -> Iterator[int]:
        for i in range(n):
            with self.lock:
                self.alive += 1
                self.most = max(self.most, self.alive)
            yield i

    def commit(self, i: int, path: Path) -> None:
        assert i == self.committed, "commits come in the order read"
        with path.open("ab") as f:  # a real write and fsync: the writer is the slow stage, as on a disk
            f.write(b"x" * 4096)
            os.fsync(f.fileno())
        with self.lock:
            self.alive -= 1
            self.committed += 1


def _drive(source: Iterator[int], commit: Callable[[int], None], put: list[int] | None = None) -> None:
    """The scoring loop of batch.py, with nothing to score."""
    with Pipeline(source, commit) as pipe:
        for item in pipe:
            pipe.put(item)
            if put is not None:
                put.append(item)


def test_the_pipeline_holds_a_few_chunks_whatever_the_input_size(tmp_path: Path) -> None:
    counted = _Counted()
    with Pipeline(counted.source(300), lambda i: counted.commit(i, tmp_path / "sink")) as pipe:
        for item in pipe:
            pipe.put(item)
    assert counted.committed == 300
    assert counted.most <= 5, f"{counted.most} chunks alive at once: the queues are not bounded"


def test_an_error_while_reading_stops_the_loop_with_that_error(tmp_path: Path) -> None:
    def source() -> Iterator[int]:
        yield 1
        raise ValueError("the second file has no column 'd'")

    seen: list[int] = []
    with pytest.raises(ValueError, match="no column 'd'"):
        _drive(source(), seen.append)
    assert seen == [1], "what was scored before the error is still committed"


def test_an_error_while_committing_reaches_the_scoring_loop() -> None:
    def commit(i: int) -> None:
        if i == 3:
            raise OSError("No space left on device")

    put: list[int] = []
    with pytest.raises(OSError, match="No space left"):
        _drive(iter(range(10_000)), commit, put)
    assert len(put) < 10_000, "the loop stopped soon after the writer failed"


def test_the_writer_is_idle_only_when_nothing_waits_and_more_is_to_come() -> None:
    """Grouped commits: ``idle`` (a settle) follows a commit when no result waits and the source has more; the
    results handed over once the scoring loop has had the last item are committed without it (the end settles)."""
    committed: list[int] = []
    idled = threading.Event()
    calls: list[list[int]] = []

    def idle() -> None:
        calls.append(list(committed))
        idled.set()

    with Pipeline(iter([1, 2, 3]), committed.append, idle) as pipe:
        items = iter(pipe)
        pipe.put(next(items))
        assert idled.wait(DEADLINE_S), "the writer never went idle after the first commit"
        rest = list(items)  # the source's end: what follows is the run's tail
        for item in rest:
            pipe.put(item)
    assert committed == [1, 2, 3]
    assert calls == [[1]]


_CTRL_C_WHILE_DRAINING = """
import signal, threading, time
from daemon.batch_pipeline import Pipeline

release, committed, pipe = threading.Event(), [], None

def commit(item):
    if item == 0:
        assert pipe._stop.wait(30), "the scoring loop never reached its end"
        deadline = time.monotonic() + 30
        while not release.wait(0.05):  # inside the pipeline's exit; again until its handler has run
            assert time.monotonic() < deadline, "the Ctrl-C never reached the main thread"
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    committed.append(item)

def on_sigint(signum, frame):
    if release.is_set():
        return  # a second one, sent before the first was seen: one Ctrl-C is what this is about
    release.set()
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_sigint)
try:
    with Pipeline(iter(range(2)), commit) as pipe:  # the second waits in the queue
        for item in pipe:
            pipe.put(item)
except KeyboardInterrupt:
    print("interrupted; writer alive:", pipe._writer.is_alive(), "committed:", committed, "error:",
          repr(pipe._write_error))
"""


def test_a_ctrl_c_while_the_writer_drains_waits_for_it_before_raising() -> None:
    """The caller's clean-up (WorkFolder.abort) must never run while the writer still commits: a Ctrl-C that
    lands while the pipeline waits for the writer is raised only once the writer is done. In a process of its own:
    signal delivery in the test process depends on what earlier tests left running there."""
    done = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_DRAINING], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "interrupted; writer alive: False committed: [0, 1] error: None", (
        done.stdout + done.stderr)


def test_a_nan_in_the_middle_of_a_npy_chunk_rejects_that_row_only(tmp_path: Path, keyset: KeySet,
                                                                 mlp_onnx: bytes) -> None:
    x = np.random.default_rng(5).normal(size=(200, 4)).astype(np.float32)
    x[77, 2] = np.nan  # chunk 1 (rows 64..127), neither its first nor its last row
    x[130, 0] = np.inf
    src = tmp_path / "rows.npy"
    np.save(src, x)
    out = tmp_path / "scores.npz"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out),
                  "--chunk-rows", "64") == 3
    bad = [json.loads(line) for line in (tmp_path / "scores.npz.rejects.jsonl").read_text().splitlines()]
    assert [b["row"] for b in bad] == [77, 130]
    assert "nan at position 2 is not allowed" in bad[0]["reason"] and "inf at position 0" in bad[1]["reason"]
    keep = [i for i in range(200) if i not in (77, 130)]
    with np.load(out) as z:
        np.testing.assert_array_equal(z["row"], keep)
        np.testing.assert_array_equal(z["output"], _ort(mlp_onnx, x[keep]))


@pytest.mark.parametrize("fmt", [".parquet", ".npz"])
def test_a_chunk_with_every_row_rejected_commits_an_empty_part(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                               fmt: str) -> None:
    x = np.random.default_rng(8).normal(size=(200, 4)).astype(np.float32)
    x[64:128] = np.nan  # the whole of chunk 1: its part holds no rows, only its rejects
    src = tmp_path / "rows.npy"
    np.save(src, x)
    out = tmp_path / f"scores{fmt}"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out),
                  "--chunk-rows", "64") == 3
    rejected = [json.loads(line)["row"] for line in out.with_name(out.name + ".rejects.jsonl").read_text().splitlines()]
    assert rejected == list(range(64, 128))
    keep = [i for i in range(200) if not 64 <= i < 128]
    if fmt == ".npz":
        with np.load(out) as z:
            rows, scores = z["row"], z["output"]
    else:
        table = pq.read_table(out)
        rows, scores = np.array(table.column("row")), np.array(table.column("output").to_pylist(), np.float32)
    np.testing.assert_array_equal(rows, keep)
    np.testing.assert_array_equal(scores, _ort(mlp_onnx, x[keep]))


def test_a_nan_in_the_middle_of_a_parquet_list_chunk_rejects_that_row_only(tmp_path: Path, keyset: KeySet,
                                                                          mlp_onnx: bytes) -> None:
    x = np.random.default_rng(6).normal(size=(150, 4)).astype(np.float32)
    x[40, 3] = np.nan
    src = tmp_path / "rows.parquet"
    ids = [f"r{i}" for i in range(150)]
    pq.write_table(pa.table({"id": ids, "input": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)}), src,
                   row_group_size=50)
    out = tmp_path / "scores.parquet"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(src), "--output", str(out),
                  "--chunk-rows", "64", "--id-column", "id") == 3
    bad = [json.loads(line) for line in (tmp_path / "scores.parquet.rejects.jsonl").read_text().splitlines()]
    assert bad == [{"id": "r40", "reason": "column 'input': nan at position 3 is not allowed (pass --allow-nan to "
                    "score NaN and inf)"}]
    got = pq.read_table(out)
    keep = [i for i in range(150) if i != 40]
    assert got.column("id").to_pylist() == [ids[i] for i in keep]
    np.testing.assert_array_equal(np.array(got.column("output").to_pylist(), np.float32), _ort(mlp_onnx, x[keep]))


def test_a_later_file_without_the_column_stops_the_run_with_exit_1(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    x = np.random.default_rng(1).normal(size=(100, 4))
    pq.write_table(pa.table({c: x[:, k] for k, c in enumerate("abcd")}), folder / "part-0.parquet")
    pq.write_table(pa.table({c: x[:, k] for k, c in enumerate("abc")}), folder / "part-1.parquet")
    out = tmp_path / "scores.parquet"
    assert _batch(_artifact(tmp_path, keyset, mlp_onnx), keyset, "--input", str(folder), "--output", str(out),
                  "--chunk-rows", "30") == 1
    assert "part-1.parquet has no column 'd'" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".scores.parquet.*.tmp")), "the streamed output's temp file is removed"


def _transposing_model() -> bytes:
    """[N, 4] -> [4, N]: an output that is not one row per input row."""
    graph = helper.make_graph([helper.make_node("Transpose", ["input"], ["output"], perm=[1, 0])], "t",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4, "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_an_error_on_the_writer_thread_stops_the_run_with_exit_1(tmp_path: Path, keyset: KeySet,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "rows.npy"
    np.save(src, np.ones((500, 4), np.float32))
    out = tmp_path / "scores.csv"
    assert _batch(_artifact(tmp_path, keyset, _transposing_model()), keyset, "--input", str(src), "--output",
                  str(out), "--chunk-rows", "50") == 1
    assert "batch needs one output row per input row" in capsys.readouterr().err
    assert not out.exists()


def _parts(work: Path) -> int:
    k = 0
    while (work / f"part-{k:08d}.arrow").exists():
        k += 1
    return k


@pytest.mark.slow
def test_a_lost_part_file_is_redone_and_the_output_is_exact(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    """The commit rule: the committed chunks are the part files from 0 without a gap. A power cut that keeps a
    later rename and loses an earlier one looks like a gap; the resumed run redoes from it (.npz, written during
    the run at its offsets: the resumed run writes the parts before the gap again, then the redone chunks)."""
    x = np.random.default_rng(9).normal(size=(300_000, 4)).astype(np.float32)
    src = tmp_path / "rows.npy"
    np.save(src, x)
    art = _artifact(tmp_path, keyset, mlp_onnx)
    out = tmp_path / "scores.npz"
    cmd = [sys.executable, "-m", "daemon", "batch", str(art), "--kek", str(keyset.kek_path), "--signer",
           str(keyset.public_path), "--input", str(src), "--output", str(out), "--chunk-rows", "1000", "--threads", "1"]
    work = out.with_name(out.name + ".inferd-batch")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _parts(work) < 6:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)  # polling the work folder: the condition itself is what we wait for
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (work / "part-00000002.arrow").write_bytes(b"torn")  # not an Arrow file: neither it nor what follows counts
    (work / "part-00000004.arrow").unlink()
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after chunk 2" in resumed.stdout
    with np.load(out) as z:
        np.testing.assert_array_equal(z["row"], np.arange(300_000))
        np.testing.assert_array_equal(z["output"], _ort(mlp_onnx, x))
    assert not work.exists()


def test_the_default_chunk_is_about_16_mib_of_model_input() -> None:
    tabular = [TensorSpec("X", "FP32", (-1, 30))]
    image = [TensorSpec("input", "FP32", (-1, 3, 96, 96))]
    assert default_chunk_rows(tabular, "parquet") == (16 << 20) // 120
    assert default_chunk_rows(image, "npy") == (16 << 20) // (3 * 96 * 96 * 4)
    assert default_chunk_rows(tabular, "jsonl") == 10_000, "JSON rows are Python objects until converted"
    assert default_chunk_rows([TensorSpec("s", "FP32", (-1,))], "csv") == 1_000_000
    assert default_chunk_rows([TensorSpec("big", "FP64", (-1, 4096, 4096))], "npy") == 1


_POOL_PROBE = ("import os, sys; import daemon.cli, daemon.batch; early = 'pyarrow' in sys.modules; "
               "import daemon.batch_io, pyarrow as pa; "
               "print(early, pa.default_memory_pool().backend_name, os.environ.get('ARROW_DEFAULT_MEMORY_POOL'))")


@pytest.mark.parametrize(("chosen", "expected"), [(None, "False jemalloc None"), ("system", "False system system")])
def test_a_batch_process_allocates_arrow_buffers_from_jemalloc_unless_the_user_chose(chosen: str | None,
                                                                                     expected: str) -> None:
    # chunks cross threads (read on one, freed on another), which mimalloc, pyarrow's default, handles slowly; the
    # choice holds only if the command line imports no pyarrow before daemon.batch_io does, and no child inherits it
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    probe = subprocess.run([sys.executable, "-c", _POOL_PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == expected.split()
