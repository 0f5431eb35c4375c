"""The model store: atomic installs, immutable versions, the state journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import KeySet, pack_model

from daemon.config import NAME_PATTERN
from daemon.errors import ModelNotFound, StoreError, VersionNotFound
from daemon.store import ModelState, Store, held_versions


def test_install_activates_first_version_only(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    assert store.install(pack_model(keyset, mlp_onnx, version="1")) == ("mlp", "1", True, True)
    assert store.install(pack_model(keyset, mlp_onnx, version="2")) == ("mlp", "2", False, True)
    assert store.state("mlp").active == "1"
    assert store.install(pack_model(keyset, mlp_onnx, version="10"), activate=True) == ("mlp", "10", True, True)
    state = store.state("mlp")
    assert (state.active, state.previous) == ("10", "1")
    assert store.versions("mlp") == ["1", "2", "10"]
    assert [e["event"] for e in state.history] == ["installed", "activated", "installed", "installed", "activated"]
    on_disk = json.loads((tmp_path / "state/models/mlp/state.json").read_text())
    assert on_disk["active"] == "10"
    assert list((tmp_path / "state/tmp").iterdir()) == []


def test_versions_are_immutable(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    blob = pack_model(keyset, mlp_onnx, version="1")
    assert store.install(blob).fresh
    again = store.install(blob)  # identical bytes: a no-op, and said to be one
    assert (again.active, again.fresh) == (True, False)
    with pytest.raises(StoreError, match="already installed with different content"):
        store.install(pack_model(keyset, mlp_onnx, version="1"))  # fresh keys and nonces: different bytes
    assert store.read_artifact("mlp", "1") == blob


def test_missing_models_and_versions(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    with pytest.raises(ModelNotFound):
        store.read_artifact("nope", "1")
    store.install(pack_model(keyset, mlp_onnx))
    with pytest.raises(VersionNotFound):
        store.read_artifact("mlp", "9")


def test_leftover_staging_is_cleaned(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.ensure()
    (store.tmp_dir / "mlp-1-crashed").mkdir()
    (store.tmp_dir / "mlp-1-crashed" / "artifact.inferd").write_bytes(b"half")
    store.ensure()
    assert list(store.tmp_dir.iterdir()) == []


def test_corrupt_journal_is_a_clear_error(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    store.install(pack_model(keyset, mlp_onnx))
    (tmp_path / "state/models/mlp/state.json").write_text("{not json")
    with pytest.raises(StoreError, match="state journal .* is unreadable"):
        store.state("mlp")


def test_quarantined_version_is_refused_before_anything_is_written(tmp_path: Path, keyset: KeySet,
                                                                  mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    store.install(pack_model(keyset, mlp_onnx, version="1"))
    state = store.state("mlp")
    state.quarantined.append("2")
    store.save_state("mlp", state)
    with pytest.raises(StoreError, match="quarantined"):
        store.install(pack_model(keyset, mlp_onnx, version="2"))
    assert store.versions("mlp") == ["1"] and list(store.tmp_dir.iterdir()) == []


def test_reinstalling_the_same_bytes_changes_nothing(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    blob = pack_model(keyset, mlp_onnx, version="1")
    store.install(blob)
    history = store.state("mlp").history
    store.install(blob)
    assert store.state("mlp").history == history
    assert (tmp_path / "state/models/mlp/1").stat().st_mode & 0o777 == 0o750


def test_root_installs_are_handed_to_the_store_owner(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to chown (CI and the dev machines run as root)")
    root = tmp_path / "state"
    root.mkdir()
    os.chown(root, 4242, 4243)  # a service account's store, as systemd's StateDirectory= creates it
    Store(root).install(pack_model(keyset, mlp_onnx, version="1"))
    for path in (root / "models/mlp", root / "models/mlp/1", root / "models/mlp/1/artifact.inferd",
                 root / "models/mlp/state.json"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (4242, 4243), path


def test_install_refuses_a_header_name_the_config_could_not_name(tmp_path: Path, keyset: KeySet,
                                                                mlp_onnx: bytes) -> None:
    """An artifact from another packer: the store applies the config's name rule and says what the rule is."""
    blob = pack_model(keyset, mlp_onnx, name="mlp")
    renamed = blob.replace(b'"name":"mlp"', b'"name":"m p"', 1)  # same length: the header still parses
    store = Store(tmp_path / "state")
    with pytest.raises(StoreError) as err:
        store.install(renamed)
    assert str(err.value) == (
        "artifact 'm p':'1' has an invalid model name 'm p': model names and versions are 1 to 128 letters, digits, "
        f"'_', '.' or '-', starting with a letter or digit (the pattern {NAME_PATTERN} that the config and the store "
        "use)"
    )
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_removal_and_pruning_hold_the_versions_the_journal_points_at(tmp_path: Path, keyset: KeySet,
                                                                     mlp_onnx: bytes) -> None:
    store = Store(tmp_path / "state")
    for v in ("1", "2", "3", "4", "5"):
        store.install(pack_model(keyset, mlp_onnx, version=v))

    def mid_update(s: ModelState) -> None:
        s.active, s.previous = "4", "2"
        s.probation = {"version": "4", "previous": "3"}
        s.pending = {"version": "5"}

    store.update_state("mlp", mid_update)
    held = held_versions(store.state("mlp"))
    assert held == {"4": "active", "5": "being tried by an update", "2": "the rollback target",
                    "3": "the rollback target"}
    for version, role in held.items():
        with pytest.raises(StoreError, match=f"mlp:{version} is {role}: "):
            store.remove_version("mlp", version)
    assert store.prune("mlp", 1) == ["1"]  # the only version the journal does not point at
    assert store.versions("mlp") == ["2", "3", "4", "5"]
