"""Key files: generation, permissions, systemd credentials, rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon import keys
from daemon.config import KeySource
from daemon.errors import KeyProblem


def test_keygen_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    kek = keys.generate_kek(tmp_path / "a.kek", "a")
    assert (tmp_path / "a.kek").stat().st_mode & 0o777 == 0o600
    assert keys.load_kek(KeySource(path=tmp_path / "a.kek")).key == kek.key
    with pytest.raises(KeyProblem, match="already exists"):
        keys.generate_kek(tmp_path / "a.kek", "a")
    pub, sid = keys.generate_signing_key(tmp_path / "s.key")
    assert (tmp_path / "s.key").stat().st_mode & 0o777 == 0o600
    assert keys.signer_id(keys.load_public_key(pub)) == sid
    assert "key=" not in repr(kek) and kek.key.hex() not in repr(kek)


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    keys.generate_kek(tmp_path / "a.kek", "a")
    os.chmod(tmp_path / "a.kek", 0o640)
    with pytest.raises(KeyProblem, match=r"readable by group or others \(mode 0640\); run: chmod 600"):
        keys.load_kek(KeySource(path=tmp_path / "a.kek"))


def test_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    keys.generate_kek(creds / "inferd-kek", "cred")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert keys.load_kek(KeySource(credential="inferd-kek")).key_id == "cred"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(KeyProblem, match=r"\$CREDENTIALS_DIRECTORY is not set"):
        keys.load_kek(KeySource(credential="inferd-kek"))


def test_malformed_and_missing_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.kek"
    bad.write_text("hello")
    bad.chmod(0o600)
    with pytest.raises(KeyProblem, match="is not an inferd KEK file"):
        keys.load_kek(KeySource(path=bad))
    with pytest.raises(KeyProblem, match="cannot read key file"):
        keys.load_kek(KeySource(path=tmp_path / "missing.kek"))
    with pytest.raises(KeyProblem, match="not a PEM Ed25519 public key"):
        keys.load_public_key(bad)


def test_rotation_needs_distinct_ids(tmp_path: Path) -> None:
    keys.generate_kek(tmp_path / "old.kek", "2025")
    keys.generate_kek(tmp_path / "new.kek", "2026")
    keys.generate_kek(tmp_path / "dup.kek", "2026")
    both = keys.load_keks([KeySource(path=tmp_path / "old.kek"), KeySource(path=tmp_path / "new.kek")])
    assert sorted(both) == ["2025", "2026"]
    with pytest.raises(KeyProblem, match="share the key id '2026'"):
        keys.load_keks([KeySource(path=tmp_path / "new.kek"), KeySource(path=tmp_path / "dup.kek")])
