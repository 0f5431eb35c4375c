"""The ``inferd`` command.

Every failure prints one line ``inferd: error: ...`` and exits non-zero; ``--debug`` adds the traceback. Runtime
packages are imported only by the sub-commands that need them, so ``inferd --help`` and ``check-config`` stay fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters import AdapterError
from daemon import __version__, cli_models, cli_registry, cli_security
from daemon.errors import InferdError

EXIT_ERROR = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (InferdError, AdapterError, ValueError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"inferd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferd", description="A model-serving daemon for edge and small servers.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--version", action="version", version=f"inferd {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", "-c", required=True, type=Path)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("bench", help="load-test a running daemon over HTTP and print throughput and latency")
    s.add_argument("--url", default="http://127.0.0.1:8080", help="the daemon (default: loopback, port 8080)")
    s.add_argument("--model", required=True)
    s.add_argument("--version", default=None)
    s.add_argument("--concurrency", "-c", type=int, default=16, help="simultaneous clients (connections)")
    s.add_argument("--duration", "-d", type=float, default=10.0, help="seconds to measure (at most 3600)")
    s.add_argument("--requests", "-n", type=int, default=None, help="stop after this many requests")
    s.add_argument("--batch", type=int, default=1, help="rows per request for a dynamic first dimension")
    s.add_argument("--binary", action="store_true", help="binary tensor extension instead of JSON")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("batch", help="score a file or folder offline: CSV, JSON lines, Parquet, .npy/.npz")
    from daemon.batch import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_batch)

    s = sub.add_parser("check-config", help="check a config and what serve would refuse (keys, model versions, TLS)")
    s.add_argument("config", type=Path)
    s.set_defaults(func=cmd_check_config)

    cli_security.register(sub)
    cli_registry.register(sub)

    s = sub.add_parser("keygen", help="create a key-encryption key, or with --signing an Ed25519 key pair")
    s.add_argument("--out", "-o", required=True, type=Path, help="key file to create (never overwritten)")
    s.add_argument("--id", default=None, help="key id recorded in artifact headers (KEK only; default: file stem)")
    s.add_argument("--signing", action="store_true", help="create an Ed25519 signing key pair (OUT and OUT.pub)")
    s.set_defaults(func=cmd_keygen)

    model = sub.add_parser("model", help="pack, inspect, verify, install and list model artifacts")
    msub = model.add_subparsers(metavar="ACTION")

    s = msub.add_parser("pack", help="encrypt and sign model file(s) into an artifact")
    s.add_argument("files", nargs="+", type=Path, help="model file(s): .onnx, .xml + .bin, or .tflite")
    s.add_argument("--name", required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--runtime", required=True, choices=["onnxruntime", "openvino", "litert"])
    s.add_argument("--kek", required=True, type=Path, help="KEK file (from 'inferd keygen')")
    s.add_argument("--signing-key", required=True, type=Path, help="Ed25519 private key (from 'keygen --signing')")
    s.add_argument("--out", "-o", required=True, type=Path)
    s.add_argument(
        "--reference-inputs",
        type=Path,
        help=".npz of inputs; their outputs are computed now and packed as the smoke test run at every load",
    )
    s.add_argument("--labels", type=Path, help="text file, one class label per line, packed as metadata")
    s.add_argument("--description", default=None)
    s.add_argument(
        "--no-load-check",
        action="store_true",
        help="do not load the model in its runtime first (to pack on a machine without that runtime installed)",
    )
    s.set_defaults(func=cmd_pack)

    s = msub.add_parser("inspect", help="show an artifact's cleartext header (no key needed)")
    s.add_argument("artifact", type=Path)
    s.set_defaults(func=cmd_inspect)

    s = msub.add_parser("verify", help="check an artifact's signature and decrypt it in memory")
    s.add_argument("artifact", type=Path)
    _key_args(s)
    s.set_defaults(func=cmd_verify)

    s = msub.add_parser("install", help="verify an artifact and install it into the store")
    s.add_argument("artifact", type=Path)
    s.add_argument("--config", "-c", required=True, type=Path)
    s.add_argument("--activate", action="store_true", help="make it the active version (default: only if none)")
    s.add_argument("--kek", type=Path, action="append", default=[],
                   help="KEK file to verify with instead of the config's keys (e.g. when they are systemd credentials)")
    s.add_argument("--signer", type=Path, action="append", default=[], help="trusted public key, with --kek")
    s.add_argument("--url", default=None, help="with --activate, or for a model's first version: the running "
                   "daemon to switch (default: the config's listener when a daemon answers there)")
    cli_models.add_key_args(s)  # --key-file PATH or $INFERD_API_KEY, for the daemon's admin API
    s.set_defaults(func=cmd_install)

    cli_models.register(msub)  # activate, rollback, remove, history, unquarantine, list
    return p


def _key_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", "-c", type=Path, help="take KEKs and trusted signers from this config")
    s.add_argument("--kek", type=Path, action="append", default=[], help="KEK file (repeatable)")
    s.add_argument("--signer", type=Path, action="append", default=[], help="trusted public key (repeatable)")


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon import logs
    from daemon.app import Daemon
    from daemon.config import load_config

    config = load_config(args.config)
    logs.configure(config.logging.level, config.logging.format)
    asyncio.run(Daemon(config, args.config).run())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    from daemon import loadgen

    if not 0 < args.duration <= 3600 or not 1 <= args.concurrency <= 1024 or args.batch < 1:
        raise ValueError("--duration must be in (0, 3600], --concurrency in [1, 1024], --batch >= 1")
    parts = urlsplit(args.url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be http://HOST:PORT, got {args.url!r}")
    host, port = parts.hostname, parts.port or 80
    path = f"/v2/models/{args.model}" + (f"/versions/{args.version}" if args.version else "")
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as resp:  # noqa: S310 - http only
            metadata = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{path}: {exc.code} {exc.read().decode(errors='replace')}") from None
    except urllib.error.URLError as exc:
        raise ValueError(f"cannot reach {args.url}: {exc.reason}") from None
    bodies = loadgen.random_bodies(metadata, 16, args.batch, args.binary)
    requests = [loadgen.build_request(host, port, path + "/infer", b, h) for b, h in bodies]
    result = asyncio.run(
        loadgen.run(host, port, requests, args.concurrency, args.duration, args.requests,
                    progress=loadgen.tty_progress(args.duration))
    )
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    summary = {
        "model": args.model, "concurrency": args.concurrency, "encoding": "binary" if args.binary else "json",
        "batch": args.batch, "requests": result.count, "seconds": round(result.seconds, 3),
        "throughput": round(result.throughput, 1),
        "p50_ms": round(result.percentile(50), 3), "p90_ms": round(result.percentile(90), 3),
        "p99_ms": round(result.percentile(99), 3),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())}, "connection_errors": result.errors,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{result.count} requests in {result.seconds:.2f}s from {args.concurrency} clients: "
              f"{result.throughput:,.0f} req/s; latency p50 {summary['p50_ms']} ms, p90 {summary['p90_ms']} ms, "
              f"p99 {summary['p99_ms']} ms; statuses {summary['statuses']}")
    return 0 if set(result.statuses) <= {200} and not result.errors else EXIT_ERROR


def cmd_batch(args: argparse.Namespace) -> int:
    from daemon.batch import run_command

    return run_command(args)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Syntax, then every check serve would fail on (daemon/checks.py): one line per check on stdout, and the
    failures in one ``inferd: error:`` line; checks that need the service's credentials are listed as skipped."""
    from daemon.checks import run_checks
    from daemon.config import load_config

    config = load_config(args.config)
    report = run_checks(config)
    for finding in report.findings:
        print(finding.line())
    if not report.ok:
        failed = report.of("failed")
        print(f"inferd: error: {args.config}: {len(failed)} check(s) failed: {report.reasons()}", file=sys.stderr)
        return EXIT_ERROR
    skipped = len(report.of("skipped"))
    note = f"; {skipped} check(s) skipped, see above" if skipped else ""
    print(f"{args.config}: OK ({len(config.models)} model(s){note})")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from daemon import keys

    if args.signing:
        if args.id:
            raise ValueError("--id names KEKs; a signing key's id is its fingerprint, printed after creation")
        pub, sid = keys.generate_signing_key(args.out)
        print(f"wrote signing key {args.out} (0600) and public key {pub}; signer id {sid}")
    else:
        kek = keys.generate_kek(args.out, args.id or args.out.stem)
        print(f"wrote key-encryption key {args.out} (0600) with key id {kek.key_id}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    import numpy as np

    from daemon import artifact, keys, packing
    from daemon.fsutil import atomic_write

    packing.check_name("model name", args.name)  # before any work: install would refuse it at the other end
    packing.check_name("version", args.version)
    files = {f.name: f.read_bytes() for f in args.files}
    if len(files) != len(args.files):
        raise ValueError("two model files share a file name")
    packing.check_runtime_files(args.runtime, list(files))
    if args.no_load_check and args.reference_inputs:
        raise ValueError("--reference-inputs runs the model, so it needs the load check: drop --no-load-check")
    metadata: dict[str, Any] = {}
    if args.labels:
        metadata["labels"] = [ln.strip() for ln in args.labels.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if args.description:
        metadata["description"] = args.description
    kek = keys.load_kek(_path_source(args.kek))
    signing_key = keys.load_signing_key(args.signing_key)
    if not args.no_load_check:
        reference = None
        if args.reference_inputs:
            with np.load(args.reference_inputs, allow_pickle=False) as data:
                reference = {k: data[k] for k in data.files}
        checked = packing.load_check(args.runtime, files, reference)
        if checked.reference is not None:
            files.update(artifact.smoke_files(*checked.reference))
    blob = artifact.pack(
        files,
        name=args.name,
        version=args.version,
        runtime=args.runtime,
        kek=kek,
        signing_key=signing_key,
        metadata=metadata,
        info=metadata,  # labels and description in the signed cleartext header: inspect and list show them
    )
    atomic_write(args.out, blob, mode=0o644)
    print(f"packed {args.name}:{args.version} ({args.runtime}, {len(blob)} bytes) into {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from daemon.artifact import read_header

    header, _ = read_header(args.artifact.read_bytes())
    print(json.dumps(header.public_dict(), indent=2))
    return 0


def _keys_for(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], bool]:
    from daemon import keys
    from daemon.config import load_config

    keks: dict[str, Any] = {}
    signers: dict[str, Any] = {}
    require = True
    if args.config:
        config = load_config(args.config)
        require = config.keys.require_signature
        if not (args.kek or args.signer):  # explicit key files replace the config's (credentials outside systemd)
            keks.update(keys.load_keks(list(config.keys.kek)))
            signers.update(keys.load_signers(list(config.keys.signers)))
    keks.update(keys.load_keks([_path_source(p) for p in args.kek]))
    signers.update(keys.load_signers([_path_source(p) for p in args.signer]))
    if not keks:
        raise ValueError("no KEK given: use --config or --kek")
    return keks, signers, require


def _path_source(path: Path) -> Any:
    from daemon.config import KeySource

    return KeySource(path=path)


def cmd_verify(args: argparse.Namespace) -> int:
    from daemon.artifact import open_artifact

    keks, signers, require = _keys_for(args)
    opened = open_artifact(args.artifact.read_bytes(), keks, signers, require_signature=require)
    h = opened.header
    names = ", ".join(f"{n} ({len(b)} bytes)" for n, b in opened.files.items())
    print(f"OK: {h.name}:{h.version} ({h.runtime}) signed by {h.signer}, decrypts with key {h.kek_id}: {names}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from daemon.artifact import open_artifact
    from daemon.config import load_config
    from daemon.store import Store

    keks, signers, require = _keys_for(args)
    blob = args.artifact.read_bytes()
    open_artifact(blob, keks, signers, require_signature=require)  # never install what the daemon would refuse
    config = load_config(args.config)
    store = Store(config.state_dir)
    url = cli_models.daemon_url(args) if args.activate else None  # a running daemon switches through its updater
    done = store.install(blob)
    if args.activate and url is None and not done.active:  # refused as the daemon's updater would refuse it
        cli_models.activate_in_store(args.config, done.name, done.version)
        done = done._replace(active=True)
    what = "installed" if done.fresh else "already installed"
    notes = ([] if done.fresh else ["identical bytes"]) + (["active"] if done.active else [])
    print(f"{what} {done.name}:{done.version}" + (f" ({', '.join(notes)})" if notes else ""))
    model = next((m for m in config.models if m.name == done.name), None)
    first = not args.activate and done.fresh and done.active  # a model's first version: active on its own
    if first and (model is not None or args.url):  # a daemon serving nothing of it must hear of it too
        url = cli_models.daemon_url(args)
    if url is not None and first and model is not None and model.version is not None:  # pinned: no activation
        cli_models.call_admin(url, f"/v2/repository/models/{done.name}/load", {}, args.key)
        print(f"the daemon at {url} loaded {done.name} (pinned to version {model.version} by its config)")
    elif url is not None:  # even when the journal already says active: the daemon loads through its updater
        doc = cli_models.call_admin(url, f"/admin/models/{done.name}/activate", {"version": done.version}, args.key)
        print(f"activated {done.name}:{doc.get('serving')} on the daemon at {url}" +
              (" (on probation)" if doc.get("probation") else ""))
    elif args.activate:
        print("no daemon answered on the config's listener: it serves this version when it starts (a daemon that "
              "runs elsewhere must be told: inferd model activate NAME VERSION --url URL)")
    return 0
