"""``inferd model activate / rollback / remove / history / unquarantine / list``: the local side of model updates.

A running daemon is told through its admin API (``--url URL``, or the config's own listener when it answers; with
auth on, the admin key from ``--key-file PATH`` or ``$INFERD_API_KEY``, never the command line), so an activation or
rollback from the shell takes the same load-beside, smoke-test, switch and probation path as a registry update
(daemon/updater.py). Without a running daemon the store's journal is changed instead and the daemon applies it when
it starts. Removal and unquarantine are store changes either way (the daemon reads the journal on each decision).
A change made here rather than by a daemon is audited here, in the config's audit log (daemon/audit.cli_audited).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemon.audit import cli_audited
from daemon.errors import InferdError, KeyProblem, StoreError

#: how long to wait for the config's listener to answer before deciding no daemon runs there
PROBE_TIMEOUT_S = 1.0
#: an activation waits for the load, warm-up, smoke test and switch
API_TIMEOUT_S = 300.0
#: the admin key for a script or unit that cannot write a file: only its own user (and root) can read a process's
#: environment, whereas anyone on the box reads its command line (/proc/PID/cmdline, ps) and shells keep history
KEY_ENV = "INFERD_API_KEY"
#: one printable token: whitespace or a control character would end up in an HTTP header, whose error quotes it
_KEY_SHAPE = re.compile(r"[!-~]{1,512}")


def register(msub: Any) -> None:
    s = msub.add_parser("activate", help="switch a model to an installed version (through the daemon when it runs)")
    s.add_argument("name")
    s.add_argument("version")
    _target_args(s)
    s.set_defaults(func=cmd_activate)

    s = msub.add_parser("rollback", help="switch a model back to its previous version, or to --to VERSION")
    s.add_argument("name")
    s.add_argument("--to", default=None, help="the version to go back to (default: the previous one)")
    _target_args(s)
    s.set_defaults(func=cmd_rollback)

    s = msub.add_parser("remove", help="delete an installed version (not the active one or the rollback target)")
    s.add_argument("name")
    s.add_argument("version")
    _target_args(s)
    s.set_defaults(func=cmd_remove)

    s = msub.add_parser("history", help="a model's journal: installs, activations, rollbacks, quarantines")
    s.add_argument("name")
    s.add_argument("--config", "-c", required=True, type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_history)

    s = msub.add_parser("unquarantine", help="allow a quarantined version to be offered again")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--config", "-c", required=True, type=Path)
    s.set_defaults(func=cmd_unquarantine)

    s = msub.add_parser("list", help="list installed models and versions, with their states")
    s.add_argument("--config", "-c", required=True, type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)


def _target_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", "-c", type=Path, help="the daemon's config (its store, and its listener)")
    s.add_argument("--url", default=None, help="the running daemon's base URL, e.g. http://127.0.0.1:8080")
    add_key_args(s)


def add_key_args(s: argparse.ArgumentParser) -> None:
    """``--key-file`` (read at once, so a bad file stops the command before it changes anything); ``--key`` is
    refused rather than dropped, or argparse would take ``--key SECRET`` as an abbreviation of ``--key-file`` and
    quote the secret back as a file name that cannot be read."""
    s.add_argument("--key-file", dest="key", action=_KeyFile, default=None, metavar="PATH",
                   help=f"a file (mode 0600) holding an API key with the admin scope, when auth is on "
                        f"(default: ${KEY_ENV})")
    s.add_argument("--key", dest="key_on_command_line", action=_KeyOnCommandLine, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


class _KeyFile(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from daemon.keys import read_secret_file

        try:
            setattr(namespace, self.dest, checked_key(read_secret_file(Path(values)), f"key file {values}"))
        except KeyProblem as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


class _KeyOnCommandLine(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        raise argparse.ArgumentError(self, "an API key on the command line is readable by every user of this "
                                           f"machine (ps, /proc) and stays in shell history: give --key-file PATH "
                                           f"(mode 0600) or set {KEY_ENV}")


def checked_key(raw: bytes | str, origin: str) -> str:
    """The key in ``raw`` (surrounding whitespace dropped, as editors add a newline), refused unless it is one
    printable token; the error names where it came from, never what it holds."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    key = text.strip()
    if not _KEY_SHAPE.fullmatch(key):
        raise KeyProblem(f"{origin} must hold one API key (printable, no spaces, at most 512 characters)"
                         + ("; it is empty" if not key else ""))
    return key


def admin_key(key: str | None) -> str | None:
    """``key`` (from --key-file), else ``$INFERD_API_KEY`` when set, else None (auth off: no header sent)."""
    if key is not None:
        return key
    env = os.environ.get(KEY_ENV)
    return checked_key(env, f"${KEY_ENV}") if env else None


def daemon_url(args: argparse.Namespace) -> str | None:
    """--url, else the config's HTTP listener when a daemon answers there, else None (no daemon runs)."""
    if getattr(args, "url", None):
        return str(args.url).rstrip("/")
    if args.config is None:
        return None
    from daemon.config import load_config

    server = load_config(args.config).server
    if server.port == 0:
        return None
    host = "127.0.0.1" if server.host in ("0.0.0.0", "") else ("::1" if server.host == "::" else server.host)
    scheme = "https" if server.tls.enabled else "http"
    url = f"{scheme}://[{host}]:{server.port}" if ":" in host else f"{scheme}://{host}:{server.port}"
    try:
        with urllib.request.urlopen(url + "/v2/health/live", timeout=PROBE_TIMEOUT_S):  # noqa: S310 - its own config
            return url
    except urllib.error.HTTPError:
        return url  # something answered: a daemon (401 with auth on the probe)
    except (OSError, ValueError):
        return None


def call_admin(url: str, path: str, doc: dict[str, Any], key: str | None) -> dict[str, Any]:
    """POST to the daemon's admin API with ``key`` (None: ``$INFERD_API_KEY``, read only when a daemon is called);
    its refusal becomes an error with the daemon's own message."""
    headers = {"Content-Type": "application/json"}
    key = admin_key(key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=json.dumps(doc).encode(),  # noqa: S310 - the operator's URL
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=API_TIMEOUT_S) as resp:  # noqa: S310 - the operator's URL
            return dict(json.loads(resp.read() or b"{}"))
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise InferdError(f"the daemon at {url} refused ({exc.code}): {message}") from None
    except urllib.error.URLError as exc:
        raise InferdError(f"cannot reach the daemon at {url}: {exc.reason}") from None


def _store(config: Path | None) -> Any:
    return _store_and_pin(config, None)[0]


def _store_and_pin(config: Path | None, name: str | None) -> tuple[Any, str | None]:
    """The config's store, and the version the config pins model ``name`` to (its ``version:``), if any: the daemon
    serves a pinned version whatever the journal says, so the journal's rules refuse changing it."""
    from daemon.config import load_config
    from daemon.store import Store

    if config is None:
        raise ValueError("give --config (the store to change) or --url (a running daemon)")
    loaded = load_config(config)
    pins = {m.name: m.version for m in loaded.models}
    return Store(loaded.state_dir), pins.get(name) if name is not None else None


def cmd_activate(args: argparse.Namespace) -> int:
    url = daemon_url(args)
    if url is not None:
        doc = call_admin(url, f"/admin/models/{args.name}/activate", {"version": args.version}, args.key)
        note = " (on probation)" if doc.get("probation") else ""
        print(f"activated {args.name}:{doc.get('serving')} on the daemon at {url}{note}")
        return 0
    activate_in_store(args.config, args.name, args.version)
    print(f"activated {args.name}:{args.version} in the store (no daemon answered: it serves it when it starts)")
    return 0


def activate_in_store(config: Path | None, name: str, version: str) -> None:
    """Make ``version`` the journal's active one for the daemon's next start, refused as the updater would refuse
    it (a journaled probation too: the next start would judge it failed and undo the activation); audited in the
    config's audit log either way (``admin.activate``, via cli), as the daemon audits its admin route."""
    with cli_audited(config, "admin.activate", model=name, version=version):
        _activate_in_journal(config, name, version)


def _activate_in_journal(config: Path | None, name: str, version: str) -> None:
    from daemon.update_records import check_activation

    store, pinned = _store_and_pin(config, name)

    def check(s: Any) -> None:
        check_activation(name, version, s, store.versions(name), pinned=pinned,
                         on_probation=(s.probation or {}).get("version"))

    check(store.state(name))  # before the locked change, which would create a mistyped model's folder

    def change(s: Any) -> None:
        check(s)
        if s.active != version:
            s.previous, s.active = s.active, version
            s.record("activated", version, source="cli")

    store.update_state(name, change)


def cmd_rollback(args: argparse.Namespace) -> int:
    url = daemon_url(args)
    if url is not None:
        doc = call_admin(url, f"/admin/models/{args.name}/rollback", {"to": args.to} if args.to else {}, args.key)
        print(f"rolled {args.name} back to {doc.get('serving')} on the daemon at {url}")
        return 0
    from daemon.update_records import journal_rollback, rollback_target

    with cli_audited(args.config, "admin.rollback", model=args.name, to=args.to) as done:  # "to": where it went
        store, pinned = _store_and_pin(args.config, args.name)

        def target(s: Any) -> str:
            return rollback_target(args.name, args.to, s, s.active, store.versions(args.name), pinned=pinned)

        target(store.state(args.name))  # before the locked change, which would create a mistyped model's folder

        def change(s: Any) -> None:
            done["to"] = target(s)
            journal_rollback(s, s.active, done["to"], "manual (cli)")

        store.update_state(args.name, change)
    print(f"rolled {args.name} back to {done['to']} in the store (no daemon answered: it serves it when it starts)")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    url = daemon_url(args)
    if url is not None:  # the daemon drains the version first if its version policy has it loaded
        call_admin(url, f"/admin/models/{args.name}/remove", {"version": args.version}, args.key)
        print(f"removed {args.name}:{args.version} on the daemon at {url}")
        return 0
    with cli_audited(args.config, "admin.remove", model=args.name, version=args.version):
        _store(args.config).remove_version(args.name, args.version)
    print(f"removed {args.name}:{args.version}")
    return 0


def cmd_unquarantine(args: argparse.Namespace) -> int:
    store = _store(args.config)

    def change(s: Any) -> None:
        if args.version not in s.quarantined:
            raise StoreError(f"{args.name}:{args.version} is not quarantined")
        s.quarantined.remove(args.version)
        s.reasons.pop(args.version, None)
        s.record("unquarantined", args.version)

    with cli_audited(args.config, "admin.unquarantine", model=args.name, version=args.version):
        store.update_state(args.name, change)  # the journal entry is what the registry client reads (docs/registry.md)
    print(f"{args.name}:{args.version} may be offered again: the registry offers it at its next poll when the "
          "model's channel names it, or 'inferd model activate' tries it now")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    state = _store(args.config).state(args.name)
    if args.json:
        print(json.dumps(state.history, indent=2))
        return 0
    for h in state.history:
        extra = " ".join(f"{k}={v}" for k, v in h.items() if k not in ("at", "event", "version"))
        print(f"{h['at']}  {h['event']:<13} {h['version']}" + (f"  {extra}" if extra else ""))
    return 0


def version_states(version: str, state: Any, pinned: str | None) -> list[str]:
    """What the journal says of one version (the daemon's own view adds staged and failed: GET /admin/models/{m})."""
    states = []
    if version == state.active:
        states.append("probation" if (state.probation or {}).get("version") == version else "active")
    if version == state.previous:
        states.append("previous")
    if pinned == version:
        states.append("pinned")
    if version in state.quarantined:
        states.append("quarantined")
    if (state.pending or {}).get("version") == version:
        states.append("pending")
    return states or ["installed"]


def cmd_list(args: argparse.Namespace) -> int:
    from daemon.artifact import read_header
    from daemon.config import load_config
    from daemon.store import Store

    config = load_config(args.config)
    store = Store(config.state_dir)
    configured = {m.name: m for m in config.models}
    rows = []
    for name in sorted(set(store.model_names()) | set(configured)):
        state = store.state(name)
        cfg = configured.get(name)
        versions: list[str | None] = list(store.versions(name)) or [None]
        for version in versions:
            header = read_header(store.read_artifact(name, version))[0] if version else None
            info = header.info if header else {}
            rows.append({
                "model": name,
                "version": version,
                "active": version is not None and version == state.active,
                "runtime": header.runtime if header else (cfg.runtime if cfg else None),
                "device": cfg.device if cfg else None,
                "threads": (cfg.threads or "auto") if cfg else None,
                "workers": cfg.workers if cfg else None,
                "configured": cfg is not None,
                "created": header.created if header else None,
                "state": ",".join(version_states(version, state, cfg.version if cfg else None)) if version else None,
                "labels": len(info["labels"]) if isinstance(info.get("labels"), list) else None,
                "description": info.get("description"),
                "why": state.reasons.get(version) if version else None,
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["model", "version", "active", "runtime", "device", "threads", "workers", "configured", "created", "state",
            "labels", "description"]
    table = [cols] + [["-" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in rows:
        if r["why"]:
            print(f"{r['model']}:{r['version']} quarantined: {r['why']}")
    return 0
