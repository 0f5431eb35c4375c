"""``inferd registry publish / promote / resign / serve``: the central side of model distribution
(docs/registry.md)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from daemon.registry_publish import DEFAULT_EXPIRES_S


def register(sub: argparse._SubParsersAction) -> None:
    reg = sub.add_parser("registry", help="publish model versions to a static registry folder, and serve it")
    rsub = reg.add_subparsers(metavar="ACTION")

    s = rsub.add_parser("publish", help="add an artifact to the registry and re-sign its index")
    s.add_argument("artifact", type=Path)
    s.add_argument("--channel", action="append", default=None,
                   help="point this channel at the new version (repeatable; none: listed, followed by no channel)")
    _common(s)
    s.set_defaults(func=cmd_publish)

    s = rsub.add_parser("promote", help="point a channel at an already published version and re-sign")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--channel", required=True)
    _common(s)
    s.set_defaults(func=cmd_promote)

    s = rsub.add_parser("resign", help="re-sign the index unchanged under a fresh sequence and expiry")
    _common(s)
    s.set_defaults(func=cmd_resign)

    s = rsub.add_parser("serve", help="serve a registry folder over HTTP (ETag, Range) for a small site")
    s.add_argument("--dir", required=True, type=Path)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8081, help="0 picks a free port (printed)")
    s.set_defaults(func=cmd_serve)


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--registry", required=True, type=Path, help="the registry folder (created if missing)")
    s.add_argument("--signing-key", required=True, type=Path, help="Ed25519 private key (PEM, 0600) for the index")
    s.add_argument("--expires-in", type=float, default=DEFAULT_EXPIRES_S,
                   help=f"seconds until the index expires (default {DEFAULT_EXPIRES_S:.0f}: 30 days)")
    s.add_argument("--next-key", type=Path, action="append", default=None,
                   help="a successor's public key (PEM) the boxes trust from this index on (rotation; repeatable)")


def _keys(args: argparse.Namespace) -> dict:
    from daemon.keys import load_public_key, load_signing_key

    nxt = [load_public_key(p) for p in args.next_key] if args.next_key else None
    return {"key": load_signing_key(args.signing_key), "expires_s": args.expires_in, "next_keys": nxt}


def cmd_publish(args: argparse.Namespace) -> int:
    from daemon.registry_publish import publish

    index, name, version = publish(args.artifact, args.registry, channels=args.channel, **_keys(args))
    channels = [c for c, v in index.models[name].channels.items() if v == version]
    print(f"published {name}:{version} in {args.registry} (sequence {index.sequence}"
          + (f", channels {', '.join(sorted(channels))}" if channels else "") + ")")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from daemon.registry_publish import promote

    index = promote(args.registry, args.name, args.version, args.channel, **_keys(args))
    print(f"{args.channel} -> {args.name}:{args.version} (sequence {index.sequence})")
    return 0


def cmd_resign(args: argparse.Namespace) -> int:
    from daemon.registry_publish import resign

    index = resign(args.registry, **_keys(args))
    print(f"re-signed {args.registry} (sequence {index.sequence}, expires {index.expires.isoformat()})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.registry_serve import serve

    asyncio.run(serve(args.dir, args.host, args.port))
    return 0
