"""What security costs, in one run on the tabular model (1 and 16 clients):

- auth on (every request carries an API key, parsed, HMAC-checked and authorized) against auth off, in one daemon
  whose auth.required a SIGHUP reload switches between measurements (two processes of the same code differ by a few
  per cent on this box from memory layout alone, as much as the target); target: the key check costs under 5% of
  throughput, as the median of each round's paired ratio. Beside it, as context: auth off measured a second time in
  each round (what two identical measurements differ by on this host: the noise floor of that ratio), and the key
  check timed in-process over auth off's CPU per request (its cost without the load runs' noise);
- a well-behaved client's latency while it is attacked, against its latency without (ratios recorded): by
  slow-loris connections (headers trickled a byte at a time from 127.0.0.2-9, reopened as soon as the daemon cuts
  them at server.limits.header_timeout_s, set to 1 s here) and by a connection flood (one address, 127.0.0.10,
  keeping far more connections open than server.limits.max_connections_per_client, set to 32, lets it hold). The
  run fails when an attack was never cut: then it measured nothing.

The daemon pinned to CPU 0, the load generator and the attacker to CPU 1; alternating rounds, medians; every answer
sampled and checked against the in-process result. Appends its table to bench/RESULTS.md; exits 1 on a miss.

Usage: python bench/security_bench.py [--rounds 3] [--seconds 2] [--no-write]
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
from harness import (  # noqa: E402
    CLIENT_CPU,
    SERVER_CPU,
    Measured,
    Server,
    answer_checker,
    bench_args,
    bench_keys,
    commit,
    json_body,
    machine,
    measure_checked,
    one_request,
    publish,
    start_inferd,
)

from daemon import artifact  # noqa: E402
from daemon.security import add_key_to_file  # noqa: E402
from daemon.store import Store  # noqa: E402

ON, OFF, OFF_AGAIN = "auth on", "auth off", "auth off, measured again (the noise floor)"
SLOW = "auth off, 200 slow-loris connections"
FLOOD = "auth off, a flood of 300 connections from one address"


class SlowLoris:
    """``count`` connections from 127.0.0.2-9 that send a request's first line and then a header byte every 0.2 s;
    each one the daemon closes is reopened, so the attack keeps its size until stop()."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.stop_event = threading.Event()
        self.cut = 0
        self.thread = threading.Thread(target=self._run, name="slow-loris", daemon=True)

    def _open(self, i: int) -> socket.socket:
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % 8}", 0))
        s.connect(("127.0.0.1", self.port))
        s.sendall(b"POST /v2/models/tabular/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.setblocking(False)
        return s

    def _run(self) -> None:
        conns = [self._open(i) for i in range(self.count)]
        while not self.stop_event.wait(0.2):
            for i, s in enumerate(conns):
                try:
                    s.send(b"a")
                    if s.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    s.close()
                    self.cut += 1
                    conns[i] = self._open(i)
        for s in conns:
            s.close()

    def __enter__(self) -> SlowLoris:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()


class Flood:
    """``count`` idle connections from 127.0.0.10 (past the per-client limit); whichever the daemon closes is opened
    again on the next 50 ms pass, so the flood keeps knocking without costing the load generator's CPU much."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.stop_event = threading.Event()
        self.cut = 0
        self.thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _open(self) -> socket.socket | None:
        s = socket.socket()
        s.bind(("127.0.0.10", 0))
        try:
            s.connect(("127.0.0.1", self.port))
        except OSError:
            s.close()
            self.cut += 1
            return None
        s.setblocking(False)
        return s

    def _run(self) -> None:
        conns = [self._open() for _ in range(self.count)]
        while not self.stop_event.wait(0.05):
            for i, s in enumerate(conns):
                if s is not None:
                    try:
                        if s.recv(1) != b"":
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    s.close()
                    self.cut += 1
                conns[i] = self._open()
        for s in conns:
            if s is not None:
                s.close()

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()


def key_check_us(keys_file: Path, token: str) -> float:
    """Microseconds of the daemon's own check of one request's key (parse, HMAC, scope and model), in this process:
    the cost the throughput ratio is meant to show, measured without the noise of two load runs."""
    from daemon.access import Guard
    from daemon.http_api import ROUTES, infer
    from daemon.security import Authenticator, parse_keys_file

    guard = Guard(Authenticator(parse_keys_file(keys_file.read_bytes(), str(keys_file))), True, "loopback")
    route, header = ROUTES[infer], f"Bearer {token}"
    n = 100_000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            guard.check(route, "tabular", header, lambda: "127.0.0.1", "http")
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def switch_auth(server: Server, config: Path, required: bool, probe: tuple[bytes, dict[str, str]]) -> None:
    """Set auth.required in the daemon's config and reload it (SIGHUP); back once a request without a key gets the
    answer the new setting gives (401 with auth on, 200 off)."""
    doc = yaml.safe_load(config.read_text())
    if doc["auth"]["required"] == required:
        return
    doc["auth"]["required"] = required
    config.write_text(yaml.safe_dump(doc))
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:
        try:
            one_request(server.port, "tabular", *probe)
            refused = False
        except RuntimeError as exc:
            refused = " 401 " in str(exc)
        if refused == required:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the reload to auth.required={required} did not take within 30 s")
        time.sleep(0.05)


def main() -> int:
    args = bench_args()
    os.sched_setaffinity(0, {CLIENT_CPU})
    work = Path(tempfile.mkdtemp(prefix="inferd-auth-bench-"))
    kek, signer = bench_keys(work)
    model, rows = models.tabular_classifier()
    Store(work / "state").install(artifact.pack({"model.onnx": model}, name="tabular", version="1",
                                                runtime="onnxruntime", kek=kek, signing_key=signer), activate=True)
    (work / "secrets").mkdir(mode=0o700)
    keys_file = work / "secrets" / "api-keys.json"
    token = add_key_to_file(keys_file, "bench", ["infer"], ["tabular"])
    xs = [rows[i : i + 1] for i in range(64)]
    plain = [json_body("X", x) for x in xs]
    keyed = [(b, {**h, "Authorization": f"Bearer {token}"}) for b, h in plain]
    check = answer_checker(model, "X", xs)
    cfg = [{"name": "tabular", "runtime": "onnxruntime", "threads": 1, "workers": 1}]
    limits = {"server": {"limits": {"header_timeout_s": 1.0, "max_connections_per_client": 32}}}
    # One daemon for both: auth.required switched by a SIGHUP reload between measurements, so the ratio compares
    # the same process (two processes of the same code differ by several per cent here, by layout alone).
    server = start_inferd(work, "auth", cfg, {**limits, "audit": {"enabled": True},
                                              "auth": {"required": False, "keys_file": {"path": str(keys_file)}}})
    raw: dict[tuple[int, str], list[Measured]] = {}
    cut = {SLOW: 0, FLOOD: 0}
    try:
        for r in range(args.rounds):
            for clients in (1, 16):
                names = [OFF, ON, OFF_AGAIN] if r % 2 == 0 else [OFF_AGAIN, ON, OFF]
                for name in names:
                    switch_auth(server, work / "auth.yaml", name == ON, plain[0])
                    bodies = keyed if name == ON else plain
                    raw.setdefault((clients, name), []).append(
                        measure_checked(server, "tabular", bodies, clients, args.seconds, check))
                switch_auth(server, work / "auth.yaml", False, plain[0])
                for label, attack in ((SLOW, SlowLoris(server.port, 200)), (FLOOD, Flood(server.port, 300))):
                    with attack:
                        raw.setdefault((clients, label), []).append(
                            measure_checked(server, "tabular", plain, clients, args.seconds, check))
                    cut[label] += attack.cut
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)
    check_us = key_check_us(keys_file, token)
    med = {k: {"rps": statistics.median(m.result.throughput for m in v),
               "p50": statistics.median(m.result.percentile(50) for m in v),
               "p99": statistics.median(m.result.percentile(99) for m in v),
               "cpu": statistics.median(m.cpu_us for m in v)} for k, v in raw.items()}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Auth run of {when} (commit {commit()})", "",
             f"Machine: {machine()}. One daemon, auth.required switched by SIGHUP between measurements, on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}; tabular model, "
             f"one thread; {args.rounds} alternating rounds of {args.seconds:g} s; medians. Auth on: every request "
             "sends `Authorization: Bearer <key>` (parsed, HMAC-checked, scope and model authorized).", "",
             "| clients | server | req/s | p50 ms | p99 ms | CPU us/req |", "|---:|---|---:|---:|---:|---:|"]
    for (clients, name), v in sorted(med.items()):
        lines.append(f"| {clients} | {name} | {v['rps']:,.0f} | {v['p50']:.3f} | {v['p99']:.3f} | {v['cpu']:.0f} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    missed = []
    for clients in (1, 16):
        for label in (SLOW, FLOOD):
            attacked = med[(clients, label)]
            lines.append(f"| {clients} client(s): p50 with {label} over p50 without (context; {cut[label]} of its "
                         f"connections cut in all) | {attacked['p50'] / med[(clients, 'auth off')]['p50']:.4f}x"
                         " | context |")
        # paired: each round measures off and on back to back, so a round's ratio cancels the host's slow drifts
        # (this VM's throughput moves by 20-40% within minutes); the median of those ratios is the figure
        pairs = [on.result.throughput / off.result.throughput
                 for on, off in zip(raw[(clients, "auth on")], raw[(clients, "auth off")])]
        ratio = statistics.median(pairs)
        lines.append(f"| {clients} client(s): each round's auth on / auth off (context) | "
                     f"{', '.join(f'{p:.3f}' for p in pairs)} | context |")
        lines.append(f"| {clients} client(s): median of auth on's / auth off's req/s (context) | "
                     f"{med[(clients, 'auth on')]['rps'] / med[(clients, 'auth off')]['rps']:.4f}x | context |")
        same = [again.result.throughput / off.result.throughput
                for again, off in zip(raw[(clients, OFF_AGAIN)], raw[(clients, OFF)])]
        lines.append(f"| {clients} client(s): each round's auth off measured again / auth off: what identical runs "
                     f"differ by here (context) | {', '.join(f'{p:.3f}' for p in same)} | context |")
        lines.append(f"| {clients} client(s): the key check in-process ({check_us:.2f} us) over auth off's CPU a "
                     f"request ({med[(clients, OFF)]['cpu']:.0f} us) (context) | "
                     f"{check_us / med[(clients, OFF)]['cpu']:.4f} | context |")
        ok = ratio >= 0.95
        text = f"{clients} client(s): auth on keeps >= 95% of auth off's throughput (median of the rounds' ratios)"
        lines.append(f"| {text} | {ratio:.4f}x | {'yes' if ok else 'no'} |")
        if not ok:
            missed.append(f"{text}: {ratio:.4f}x")
    missed += [f"the {label} was never cut: nothing was measured" for label in (SLOW, FLOOD) if not cut[label]]
    publish("\n".join(lines), args)
    for text in missed:
        print(f"target missed: {text}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
