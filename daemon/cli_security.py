"""``inferd auth`` (make, list and revoke API keys in the keys file the config names) and ``inferd doctor`` (the
effective security posture); docs/security.md. Adding and revoking a key through ``--config`` is audited in the
config's audit log (who: the local user, via: cli), like the daemon's own admin actions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon.audit import cli_audited
from daemon.errors import ConfigError
from daemon.security import SCOPES, add_key_to_file, parse_keys_file, remove_key_from_file


def register(sub: argparse._SubParsersAction) -> None:
    auth = sub.add_parser("auth", help="make, list and revoke API keys (stored as hashes only)")
    asub = auth.add_subparsers(metavar="ACTION")

    s = asub.add_parser("add-key", help="make a new random key, print it once and store only its hash")
    s.add_argument("--name", required=True, help="the caller's name in logs and the audit log")
    s.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(SCOPES)}")
    s.add_argument("--models", help="comma-separated model names the key may use (default: every model)")
    _file_args(s)
    s.set_defaults(func=cmd_add_key)

    s = asub.add_parser("list-keys", help="list the keys' names, ids and grants (never a key or a hash)")
    _file_args(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list_keys)

    s = sub.add_parser("doctor", help="print the config's security posture; exit 1 if any of it is unsafe")
    s.add_argument("config", type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = asub.add_parser("remove-key", help="revoke a key by name (a running daemon drops it on SIGHUP)")
    s.add_argument("name")
    _file_args(s)
    s.set_defaults(func=cmd_remove_key)


def _file_args(s: argparse.ArgumentParser) -> None:
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", "-c", type=Path, help="use the config's auth.keys_file")
    group.add_argument("--file", type=Path, help="the keys file itself")


def keys_file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return Path(args.file)
    from daemon.config import load_config

    source = load_config(args.config).auth.keys_file
    if source is None:
        raise ConfigError(f"{args.config}: auth.keys_file is not set; set it to {{path: FILE}} or pass --file")
    if source.path is None:
        raise ConfigError(f"{args.config}: auth.keys_file is the credential {source.credential!r}: edit the file "
                          "it is loaded from with --file")
    return source.path


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def cmd_add_key(args: argparse.Namespace) -> int:
    path = keys_file(args)
    scopes, models = _split(args.scopes) or [], _split(args.models)
    with cli_audited(args.config, "auth.add_key", key=args.name, scopes=scopes, models=models) as done:
        token = add_key_to_file(path, args.name, scopes, models)
        done["id"] = token.split("_")[1]  # the public half of the token (list-keys shows it), never the secret
    print(token)
    print(f"key {args.name!r} added to {path}; this is the only time it is shown: give it to the caller now. A "
          "running daemon accepts it after SIGHUP (systemctl reload inferd).", file=sys.stderr)
    return 0


def cmd_list_keys(args: argparse.Namespace) -> int:
    from daemon.keys import read_secret_file

    path = keys_file(args)
    rows: list[dict[str, Any]] = [{"name": k.name, "id": k.key_id, "scopes": sorted(k.scopes),
             "models": sorted(k.models) if k.models is not None else None}
            for k in parse_keys_file(read_secret_file(path), str(path))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        models = ",".join(row["models"]) if row["models"] is not None else "all models"
        print(f"{row['name']:24} {row['id']}  {','.join(row['scopes'])}  ({models})")
    return 0


def cmd_remove_key(args: argparse.Namespace) -> int:
    path = keys_file(args)
    with cli_audited(args.config, "auth.remove_key", key=args.name):
        remove_key_from_file(path, args.name)
    print(f"key {args.name!r} removed from {path}; a running daemon refuses it after SIGHUP", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from daemon.config import load_config
    from daemon.doctor import UNSAFE, examine

    findings = examine(load_config(args.config))
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for finding in findings:
            print(finding.line())
    unsafe = [f for f in findings if f.level == UNSAFE]
    if unsafe and not args.json:
        print(f"{len(unsafe)} unsafe finding(s)", file=sys.stderr)
    return 1 if unsafe else 0


__all__ = ["register"]
