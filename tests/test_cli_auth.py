"""``inferd auth``: a key printed once and stored as a hash, listed without secrets, revoked by name; adding and
revoking audited in the config's audit log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import DaemonProcess, KeySet, Site, pack_model
from support.accepted import wait_until

from daemon.security import Authenticator, add_key_to_file, parse_keys_file


def inferd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=60)


def test_add_list_and_remove_keys_through_the_config(tmp_path: Path) -> None:
    config = tmp_path / "inferd.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"),  # where the audit log goes
                                      "auth": {"keys_file": {"path": "keys/api-keys.json"}}}))
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


def audited(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_adding_and_revoking_a_key_is_audited_without_the_key(tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "audit.log"
    config = tmp_path / "inferd.yaml"
    config.write_text(yaml.safe_dump({"auth": {"keys_file": {"path": str(tmp_path / "api-keys.json")}},
                                      "audit": {"path": str(audit)}}))
    token = inferd("auth", "add-key", "--name", "billing", "--scopes", "infer", "--models", "fraud",
                   "--config", str(config)).stdout.strip()
    assert inferd("auth", "remove-key", "billing", "--config", str(config)).returncode == 0
    assert inferd("auth", "remove-key", "billing", "--config", str(config)).returncode == 1
    added, removed, refused = audited(audit)
    assert (added["action"], added["result"], added["via"], added["key"]) == ("auth.add_key", "ok", "cli", "billing")
    assert added["scopes"] == ["infer"] and added["models"] == ["fraud"] and added["id"] == token.split("_")[1]
    assert added["who"] and added["who"] == removed["who"]  # the local user
    assert (removed["action"], removed["result"]) == ("auth.remove_key", "ok")
    assert refused["result"] == "refused" and "no key named 'billing'" in refused["reason"]
    assert token.split("_", 2)[2] not in audit.read_text()


def test_a_key_is_not_added_when_its_audit_record_cannot_be_written(tmp_path: Path) -> None:
    config = tmp_path / "inferd.yaml"
    (tmp_path / "audit.log").mkdir()  # where the log should be: it cannot be opened
    config.write_text(yaml.safe_dump({"auth": {"keys_file": {"path": str(tmp_path / "api-keys.json")}},
                                      "audit": {"path": str(tmp_path / "audit.log")}}))
    made = inferd("auth", "add-key", "--name", "x", "--scopes", "infer", "--config", str(config))
    assert made.returncode == 1 and "cannot write the audit log" in made.stderr and not made.stdout
    assert not (tmp_path / "api-keys.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands a new audit log to the folder's owner")
def test_an_audit_log_root_creates_belongs_to_the_daemons_account(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # the daemon's account owns its state folder (StateDirectory=)
    config = tmp_path / "inferd.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state), "auth": {"keys_file": {"path": str(tmp_path / "k")}}}))
    assert inferd("auth", "add-key", "--name", "x", "--scopes", "infer", "--config", str(config)).returncode == 0
    for made in (state / "audit", state / "audit" / "audit.log"):  # the default place, made by this command
        assert (made.stat().st_uid, made.stat().st_gid) == (65534, 65534), made
    assert audited(state / "audit" / "audit.log")[0]["action"] == "auth.add_key"


def test_a_key_added_from_the_shell_is_named_in_the_daemons_reload_record(
        site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
        start_daemon: Callable[..., DaemonProcess]) -> None:
    """The shell's record and the daemon's share one file: who added the key, then which keys the reload took."""
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    add_key_to_file(keys_file, "old", ["infer"], None)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    audit = tmp_path / "audit.log"
    site.extra = {"auth": {"required": True, "keys_file": {"path": str(keys_file)}}, "audit": {"path": str(audit)}}
    config = site.write_config()
    daemon = start_daemon(config)
    token = inferd("auth", "add-key", "--name", "new", "--scopes", "infer", "--config", str(config)).stdout.strip()
    assert inferd("auth", "remove-key", "old", "--config", str(config)).returncode == 0
    os.kill(daemon.proc.pid, signal.SIGHUP)
    assert "(added: new; removed: old)" in daemon.wait_for("reloaded", new=True)["event"]
    wait_until(lambda: any(r["action"] == "config.reload" for r in audited(audit)), 10.0, "the reload's record")
    records = audited(audit)
    assert [r["action"] for r in records if r.get("via") == "cli"] == ["auth.add_key", "auth.remove_key"]
    (reload,) = [r for r in records if r["action"] == "config.reload"]
    assert reload["result"] == "applied" and any("added: new; removed: old" in c for c in reload["changes"])
    assert token.split("_", 2)[2] not in audit.read_text()
