"""``inferd model activate / rollback / remove / history / unquarantine / list`` (daemon/cli_models.py): through a
running daemon's admin API (the updater's path), and on the store's journal when no daemon runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import KeySet, Site
from httpclient import infer
from support.daemon import REPO
from support.update_models import MODEL, body, pack_version
from support.updates import audited, lookup_site

from daemon.security import add_key_to_file
from daemon.store import Store


def inferd(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    if ok:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode == 1, res.stdout
    return res


def test_without_a_daemon_the_commands_change_the_journal(site: Site, keyset: KeySet) -> None:
    lookup_site(site, keyset, ["1", "2", "3"])
    config = str(site.write_config())  # port 0: no daemon can be found on it
    store = Store(site.state_dir)
    assert "in the store" in inferd("model", "activate", MODEL, "2", "--config", config).stdout
    assert (store.state(MODEL).active, store.state(MODEL).previous) == ("2", "1")
    inferd("model", "rollback", MODEL, "--config", config)
    assert (store.state(MODEL).active, store.state(MODEL).previous) == ("1", "2")
    inferd("model", "rollback", MODEL, "--to", "3", "--config", config)
    assert store.state(MODEL).active == "3"
    refused = inferd("model", "remove", MODEL, "3", "--config", config, ok=False)
    assert "is active" in refused.stderr
    assert "rollback target" in inferd("model", "remove", MODEL, "1", "--config", config, ok=False).stderr
    inferd("model", "remove", MODEL, "2", "--config", config)
    assert store.versions(MODEL) == ["1", "3"]
    assert "not installed" in inferd("model", "activate", MODEL, "2", "--config", config, ok=False).stderr

    store.update_state(MODEL, lambda s: (s.quarantined.append("1"), s.reasons.update({"1": "probation_errors: x"})))
    assert "quarantined" in inferd("model", "rollback", MODEL, "--config", config, ok=False).stderr
    rows = json.loads(inferd("model", "list", "--config", config, "--json").stdout)
    states = {r["version"]: (r["state"], r["why"]) for r in rows}
    assert states == {"1": ("previous,quarantined", "probation_errors: x"), "3": ("active", None)}
    assert "1 quarantined: probation_errors: x" in inferd("model", "list", "--config", config).stdout.replace(
        f"{MODEL}:", "")
    inferd("model", "unquarantine", MODEL, "1", "--config", config)
    assert "not quarantined" in inferd("model", "unquarantine", MODEL, "1", "--config", config, ok=False).stderr
    history = inferd("model", "history", MODEL, "--config", config).stdout
    for event in ("installed", "activated", "rolled_back", "removed", "unquarantined"):
        assert event in history
    events = [h["event"] for h in json.loads(inferd("model", "history", MODEL, "--config", config, "--json").stdout)]
    assert events[-1] == "unquarantined"


def test_with_a_daemon_the_commands_go_through_its_updater(site: Site, keyset: KeySet, start_daemon: Any,
                                                            tmp_path: Path) -> None:
    lookup_site(site, keyset, ["1", "2"])
    config = str(site.write_config())
    d = start_daemon(config)
    out = inferd("model", "activate", MODEL, "2", "--url", d.url).stdout
    assert f"activated {MODEL}:2 on the daemon" in out
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    d.wait_for("committed", timeout=30)
    assert "back to 1 on the daemon" in inferd("model", "rollback", MODEL, "--url", d.url).stdout
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "1"
    refused = inferd("model", "rollback", MODEL, "--to", "1", "--url", d.url, ok=False)
    assert "refused (409)" in refused.stderr and "already the active version" in refused.stderr

    artifact = tmp_path / "v3.inferd"
    artifact.write_bytes(pack_version(keyset, "3"))
    out = inferd("model", "install", str(artifact), "--config", config, "--activate", "--url", d.url).stdout
    assert f"installed {MODEL}:3" in out and f"activated {MODEL}:3 on the daemon" in out
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "3"
    assert inferd("model", "rollback", MODEL, "--to", "2", "--url", d.url).returncode == 0
    assert infer(d.url, MODEL, body([0])).json()["model_version"] == "2"
    state = Store(site.state_dir).state(MODEL)
    assert state.active == "2" and state.previous == "3"
    refused = inferd("model", "remove", MODEL, "3", "--url", d.url, ok=False)
    assert "refused (409)" in refused.stderr and "rollback target" in refused.stderr
    assert "on the daemon" in inferd("model", "remove", MODEL, "1", "--url", d.url).stdout
    assert Store(site.state_dir).versions(MODEL) == ["2", "3"]


def test_packed_labels_and_description_show_in_inspect_list_and_metadata(site: Site, keyset: KeySet,
                                                                           start_daemon: Any, tmp_path: Path) -> None:
    from support.update_models import build_lookup

    model = tmp_path / "model.onnx"
    model.write_bytes(build_lookup(1.0))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    out = tmp_path / "lk-1.inferd"
    inferd("model", "pack", str(model), "--name", MODEL, "--version", "1", "--runtime", "onnxruntime",
           "--kek", str(keyset.kek_path), "--signing-key", str(keyset.signing_path), "--labels", str(labels),
           "--description", "a lookup table", "-o", str(out))
    info = json.loads(inferd("model", "inspect", str(out)).stdout)["info"]
    assert info == {"labels": ["cat", "dog"], "description": "a lookup table"}
    site.install(out.read_bytes())
    site.models = [{"name": MODEL, "runtime": "onnxruntime", "threads": 1}]
    config = str(site.write_config())
    rows = json.loads(inferd("model", "list", "--config", config, "--json").stdout)
    assert (rows[0]["labels"], rows[0]["description"]) == (2, "a lookup table")
    d = start_daemon(config)
    from httpclient import request

    parameters = request(d.url + f"/v2/models/{MODEL}").json()["parameters"]
    assert parameters["labels"] == ["cat", "dog"] and parameters["description"] == "a lookup table"


def test_without_a_daemon_the_journal_keeps_the_updaters_rules(site: Site, keyset: KeySet) -> None:
    """The refusals the updater makes hold in the journal too: an activation while a probation is journaled would be
    undone by the next start (it judges the probation as failed and goes back to its previous version), and a pinned
    model serves its pin whatever the journal says."""
    lookup_site(site, keyset, ["1", "2", "3"])
    config = str(site.write_config())
    store = Store(site.state_dir)

    def on_probation(s: Any) -> None:
        s.active, s.previous = "2", "1"
        s.probation = {"version": "2", "previous": "1", "source": "registry", "since": "2026-01-01T00:00:00+00:00"}

    store.update_state(MODEL, on_probation)
    before = store.state(MODEL)
    refused = inferd("model", "activate", MODEL, "3", "--config", config, ok=False)
    assert f"{MODEL}:2 is on probation" in refused.stderr
    assert store.state(MODEL) == before
    inferd("model", "rollback", MODEL, "--config", config)  # ends the probation: back to its previous version
    state = store.state(MODEL)
    assert (state.active, state.previous, state.probation) == ("1", "2", None)
    inferd("model", "activate", MODEL, "3", "--config", config)

    assert "not installed" in inferd("model", "activate", "nope", "1", "--config", config, ok=False).stderr
    assert "no previous version" in inferd("model", "rollback", "nope", "--config", config, ok=False).stderr
    assert store.model_names() == [MODEL]  # a mistyped name leaves no folder behind

    site.models[0]["version"] = "1"
    config = str(site.write_config())
    before = store.state(MODEL)
    for command in (["activate", MODEL, "2"], ["rollback", MODEL]):
        assert "pinned to version 1" in inferd("model", *command, "--config", config, ok=False).stderr
    assert store.state(MODEL) == before
    artifact = site.root / "v4.inferd"  # install --activate goes through the same refusals
    artifact.write_bytes(pack_version(keyset, "4"))
    refused = inferd("model", "install", str(artifact), "--config", config, "--activate", ok=False)
    assert "pinned to version 1" in refused.stderr
    assert store.state(MODEL).active == before.active and "4" in store.versions(MODEL)


@pytest.mark.parametrize("how", ["--activate", "implicit", "pinned"])
def test_a_first_version_installed_beside_a_running_daemon_serves_at_once(site: Site, keyset: KeySet,
                                                                         start_daemon: Any, how: str) -> None:
    """The store makes a model's first version active on its own, so the daemon (serving nothing of the model) must
    be told even though the journal already says so: with --activate, without, and for a model pinned to it."""
    lookup_site(site, keyset, [], **({"version": "1"} if how == "pinned" else {}))
    config = str(site.write_config())
    d = start_daemon(config)
    assert infer(d.url, MODEL, body([0])).status == 503  # configured, nothing installed
    artifact = site.root / "v1.inferd"
    artifact.write_bytes(pack_version(keyset, "1"))
    out = inferd("model", "install", str(artifact), "--config", config, "--url", d.url,
                 *(["--activate"] if how == "--activate" else [])).stdout
    told = f"loaded {MODEL} (pinned to version 1" if how == "pinned" else f"activated {MODEL}:1 on the daemon"
    assert f"installed {MODEL}:1 (active)" in out and told in out and d.url in out
    assert "no daemon answered" not in out
    reply = infer(d.url, MODEL, body([0]))
    assert reply.status == 200 and reply.json()["model_version"] == "1"
    state = Store(site.state_dir).state(MODEL)
    assert (state.active, state.previous, state.probation, state.quarantined) == ("1", None, None, [])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, with INFERD_API_KEY only where ``env`` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "INFERD_API_KEY"}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env={**base, **(env or {})})


def test_the_admin_key_comes_from_a_0600_file_or_the_environment_never_the_command_line(
        site: Site, keyset: KeySet, start_daemon: Any) -> None:
    """A key on the command line is readable by every local user (ps, /proc/PID/cmdline) and stays in shell
    history, so --key is refused without the secret quoted back; --key-file must be 0600 like every other secret."""
    lookup_site(site, keyset, ["1", "2"])
    keys_file = site.root / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    token = add_key_to_file(keys_file, "ops", ["admin"], None)
    site.extra["auth"] = {"required": True, "keys_file": {"path": str(keys_file)}}
    d = start_daemon(site.write_config())
    secret = token.split("_", 2)[2]

    for how in (["--key", token], [f"--key={token}"]):
        refused = run_cli("model", "activate", MODEL, "2", "--url", d.url, *how)
        assert refused.returncode == 2 and "--key-file PATH" in refused.stderr and "INFERD_API_KEY" in refused.stderr
        assert secret not in refused.stderr + refused.stdout
    no_key = run_cli("model", "activate", MODEL, "2", "--url", d.url)
    assert no_key.returncode == 1 and "refused (401)" in no_key.stderr

    key_file = site.root / "admin.key"
    key_file.write_text(token + "\n")  # an editor's trailing newline is not part of the key
    key_file.chmod(0o640)
    loose = run_cli("model", "activate", MODEL, "2", "--url", d.url, "--key-file", str(key_file))
    assert loose.returncode == 2 and "readable by group or others (mode 0640)" in loose.stderr
    assert Store(site.state_dir).state(MODEL).active == "1"  # refused before anything was asked of the daemon
    key_file.chmod(0o600)
    out = run_cli("model", "activate", MODEL, "2", "--url", d.url, "--key-file", str(key_file))
    assert out.returncode == 0 and f"activated {MODEL}:2 on the daemon" in out.stdout, out.stderr
    d.wait_for("committed", timeout=30)

    for bad in ("", f"{token} {token}"):
        key_file.write_text(bad)
        shaped = run_cli("model", "rollback", MODEL, "--url", d.url, "--key-file", str(key_file))
        assert shaped.returncode == 2 and "must hold one API key" in shaped.stderr
        assert secret not in shaped.stderr
    mangled = run_cli("model", "rollback", MODEL, "--url", d.url, env={"INFERD_API_KEY": f"{token}\nX-Evil: 1"})
    assert mangled.returncode == 1 and "$INFERD_API_KEY must hold one API key" in mangled.stderr
    assert secret not in mangled.stderr
    back = run_cli("model", "rollback", MODEL, "--url", d.url, env={"INFERD_API_KEY": token})
    assert back.returncode == 0 and f"rolled {MODEL} back to 1 on the daemon" in back.stdout, back.stderr
    assert infer(d.url, MODEL, body([0]), headers={"Authorization": f"Bearer {token}"}).status == 403  # admin only
    assert d.stop() == 0  # the audit writer has flushed
    done = [(r["action"], r.get("who")) for r in audited(site) if r.get("result") == "ok"]
    assert ("admin.activate", "ops") in done and ("admin.rollback", "ops") in done, done


def test_without_a_daemon_every_change_is_audited_with_the_local_user(site: Site, keyset: KeySet) -> None:
    """The daemon audits its admin routes; the same actions done on the journal from the shell are audited in the
    same log (via: cli, who: the user at the shell), refusals too."""
    lookup_site(site, keyset, ["1", "2", "3"])
    config = str(site.write_config())
    inferd("model", "activate", MODEL, "2", "--config", config)
    inferd("model", "rollback", MODEL, "--config", config)
    inferd("model", "remove", MODEL, "3", "--config", config)
    inferd("model", "activate", MODEL, "3", "--config", config, ok=False)  # removed: refused, and audited
    Store(site.state_dir).update_state(MODEL, lambda s: s.quarantined.append("2"))
    inferd("model", "unquarantine", MODEL, "2", "--config", config)
    artifact = site.root / "v4.inferd"
    artifact.write_bytes(pack_version(keyset, "4"))
    inferd("model", "install", str(artifact), "--config", config, "--activate")
    records = [r for r in audited(site) if r.get("via") == "cli"]
    assert [(r["action"], r["result"], r.get("version", r.get("to"))) for r in records] == [
        ("admin.activate", "ok", "2"), ("admin.rollback", "ok", "1"), ("admin.remove", "ok", "3"),
        ("admin.activate", "refused", "3"), ("admin.unquarantine", "ok", "2"), ("admin.activate", "ok", "4")]
    assert "not installed" in records[3]["reason"]
    assert all(r["model"] == MODEL and r["who"] and r["peer"] is None for r in records)
