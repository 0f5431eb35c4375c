"""The store's format number (docs/store.md, "Format"): a new store is stamped, an unversioned one (the layout of the
releases before the ``format`` file) is migrated in place and keeps serving, a newer or unreadable one is refused
with what to do, and nothing is written into a store that is refused."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import KeySet, Site, mlp_reference, pack_model
from httpclient import request

from daemon import store_format
from daemon.errors import StoreError
from daemon.store import Store


def tree(root: Path) -> dict[str, str]:
    """Every file of the store with the sha256 of its bytes: what "never corrupted" means here. (The state folder
    holds other things too, such as the audit log, which are not the store's.)"""
    files = [root / "format", *(root / "models").rglob("*"), *(root / "tmp").rglob("*")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files) if p.is_file()}


def unversioned(root: Path, keyset: KeySet, mlp_onnx: bytes) -> Store:
    """A store as releases before the format file left it: same layout, no ``format``."""
    store = Store(root)
    store.install(pack_model(keyset, mlp_onnx, version="1"))
    store.install(pack_model(keyset, mlp_onnx, version="2"), activate=True)
    (root / store_format.FORMAT_NAME).unlink()
    return Store(root)


def test_a_new_store_is_stamped_with_the_current_format(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    Store(tmp_path / "a").ensure()
    assert (tmp_path / "a/format").read_text() == f"{store_format.CURRENT}\n"
    Store(tmp_path / "b").install(pack_model(keyset, mlp_onnx))  # the CLI's first write stamps it too
    assert (tmp_path / "b/format").read_text() == f"{store_format.CURRENT}\n"
    assert store_format.CURRENT == 1


def test_an_unversioned_store_is_migrated_in_place(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = unversioned(tmp_path / "state", keyset, mlp_onnx)
    before = tree(store.root)
    assert store.state("mlp").active == "2"  # readers read it as it is, and write nothing
    assert tree(store.root) == before
    with caplog.at_level(logging.INFO, logger="inferd.store"):
        store.ensure()
    assert (store.root / "format").read_text() == "1\n"
    assert tree(store.root) == {**before, "format": hashlib.sha256(b"1\n").hexdigest()}  # nothing else changed
    (record,) = [r for r in caplog.records if getattr(r, "event_kind", None) == "store_migrated"]
    assert (record.from_format, record.to_format) == (0, 1)  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inferd.store"):
        Store(store.root).ensure()  # once migrated, nothing more to do
    assert not caplog.records


@pytest.mark.parametrize("content", ["2\n", "99"])
def test_a_newer_store_is_refused_and_left_untouched(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                     content: str) -> None:
    store = unversioned(tmp_path / "state", keyset, mlp_onnx)
    (store.root / "format").write_text(content)
    (store.root / "tmp").mkdir(exist_ok=True)
    (store.root / "tmp" / "staged-by-the-newer-release").write_bytes(b"x")  # ensure() would otherwise clean it
    before = tree(store.root)
    found = content.strip()
    for attempt in (store.ensure, lambda: store.install(pack_model(keyset, mlp_onnx, version="3")),
                    lambda: Store(store.root).state("mlp"), lambda: Store(store.root).read_artifact("mlp", "1"),
                    lambda: Store(store.root).model_names()):
        with pytest.raises(StoreError, match=rf"has format {found}, newer than inferd .* reads \(format 1\).*"
                                             r"restore the store from the backup.*left as it is"):
            attempt()
    assert tree(store.root) == before


@pytest.mark.parametrize("content", ["", "one\n", "1.5\n", "-1\n"])
def test_an_unreadable_format_file_is_refused_not_reset(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                        content: str) -> None:
    store = unversioned(tmp_path / "state", keyset, mlp_onnx)
    (store.root / "format").write_text(content)
    before = tree(store.root)
    with pytest.raises(StoreError, match=r"format file .* not a format number: restore it from a backup"):
        store.ensure()
    with pytest.raises(StoreError, match="not a format number"):
        Store(store.root).state("mlp")
    assert tree(store.root) == before


def test_a_step_that_fails_leaves_the_format_where_it_was(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule every future migration relies on: the number moves only after its step completed, so a crash (here
    a step that raises half-way) reruns the step from its start and never finds the file ahead of the layout."""
    store = unversioned(tmp_path / "state", keyset, mlp_onnx)
    calls: list[str] = []

    def half_done(root: Path) -> None:
        calls.append("half")
        (root / "models" / ".step-1-marker").write_text("started")  # an idempotent step may leave its work begun
        raise OSError("power cut")

    monkeypatch.setattr(store_format, "CURRENT", 2)
    monkeypatch.setitem(store_format.MIGRATIONS, 1, half_done)
    with pytest.raises(OSError, match="power cut"):
        store.ensure()
    assert (store.root / "format").read_text() == "1\n"  # step 0 -> 1 committed, step 1 -> 2 not

    def complete(root: Path) -> None:
        calls.append("complete")
        (root / "models" / ".step-1-marker").write_text("done")

    monkeypatch.setitem(store_format.MIGRATIONS, 1, complete)
    Store(store.root).ensure()
    assert (store.root / "format").read_text() == "2\n" and calls == ["half", "complete"]
    assert Store(store.root).state("mlp").active == "2"


def test_the_daemon_migrates_an_unversioned_store_and_serves_it(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                                start_daemon) -> None:
    unversioned(site.state_dir, keyset, mlp_onnx)
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    daemon = start_daemon(site.write_config())
    assert daemon.wait_for("store_migrated")["to_format"] == 1
    x = np.full((1, 4), 0.5, np.float32)
    res = request(daemon.url + "/v2/models/mlp/infer", "POST", {"inputs": [
        {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert res.status == 200 and res.json()["model_version"] == "2"
    np.testing.assert_allclose(res.json()["outputs"][0]["data"], mlp_reference(x).ravel(), rtol=1e-5, atol=1e-6)
    assert (site.state_dir / "format").read_text() == "1\n"
    assert daemon.stop() == 0


def test_the_daemon_refuses_a_newer_store_with_what_to_do(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                          start_daemon) -> None:
    unversioned(site.state_dir, keyset, mlp_onnx)
    (site.state_dir / "format").write_text("2\n")
    before = tree(site.state_dir)
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    daemon = start_daemon(site.write_config(), wait=False)
    daemon.wait_for("eof")
    assert daemon.proc.wait(timeout=30) != 0
    said = " ".join(str(d.get("event", "")) for d in daemon.log)
    assert "has format 2, newer than inferd" in said and "restore the store from the backup" in said, said
    assert tree(site.state_dir) == before
