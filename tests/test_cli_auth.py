"""``inferd auth``: a key printed once and stored as a hash, listed without secrets, revoked by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from daemon.security import Authenticator, parse_keys_file


def inferd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=60)


def test_add_list_and_remove_keys_through_the_config(tmp_path: Path) -> None:
    config = tmp_path / "inferd.yaml"
    config.write_text(yaml.safe_dump({"auth": {"keys_file": {"path": "keys/api-keys.json"}}}))
    (tmp_path / "keys").mkdir(mode=0o700)
    made = inferd("auth", "add-key", "--name", "billing", "--scopes", "infer,read", "--models", "fraud",
                  "--config", str(config))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("ifd_") and "only time it is shown" in made.stderr
    stored = tmp_path / "keys" / "api-keys.json"
    assert token not in stored.read_text()
    assert Authenticator(parse_keys_file(stored.read_bytes(), "f")).from_header(f"Bearer {token}").name == "billing"

    listed = inferd("auth", "list-keys", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["name"] == "billing" and row["scopes"] == ["infer", "read"] and row["models"] == ["fraud"]
    assert "hmac" not in listed.stdout and token not in listed.stdout

    assert inferd("auth", "remove-key", "billing", "--file", str(stored)).returncode == 0
    assert parse_keys_file(stored.read_bytes(), "f") == []
    again = inferd("auth", "remove-key", "billing", "--file", str(stored))
    assert again.returncode == 1 and "no key named 'billing'" in again.stderr


def test_bad_requests_are_refused_with_the_reason(tmp_path: Path) -> None:
    bad = inferd("auth", "add-key", "--name", "x", "--scopes", "root", "--file", str(tmp_path / "k.json"))
    assert bad.returncode == 1 and "unknown scope(s) root" in bad.stderr
    assert not (tmp_path / "k.json").exists()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"auth": {}}))
    unset = inferd("auth", "list-keys", "--config", str(config))
    assert unset.returncode == 1 and "auth.keys_file is not set" in unset.stderr
