"""Goodput under overload (issue #16): the bench CNN over JSON, 16 clients steady, then 256 clients, then quiet.

What it reports, against the targets of docs/overload.md: accepted requests a second at 256 clients over 16 (>= 0.9),
their p99 over the 16-client p99 (<= 3), the p99 of the refusals (< 5 ms), the peak RSS during the overload over the
16-client steady state (<= +20%), and the RSS 5 s after the load stops (within 10% of the steady state). A sample of
the accepted answers is checked against the in-process result. The daemon runs unpinned, as on a user's small box,
with its config defaults (one worker, one thread, batching on). Refused clients send again at once (the harshest
client; ``--honour-retry-after`` makes them wait the hinted seconds instead). Exit status 1 when a target is missed.

Usage: python bench/overload_bench.py [--steady 10] [--overload 15] [--quiet 5] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
from harness import (  # noqa: E402
    REPO,
    answer_checker,
    bench_keys,
    commit,
    free_port,
    json_body,
    machine,
    rss_mb,
    wait_listening,
    wait_ready,
)

from daemon import artifact, loadgen  # noqa: E402
from daemon.store import Store  # noqa: E402

TARGETS = {"accepted_rps": 0.9, "accepted_p99": 3.0, "refused_p99_ms": 5.0, "rss_growth": 0.20, "rss_after": 0.10}


@dataclass
class Phase:
    ok_ns: list[int] = field(default_factory=list)
    refused_ns: list[int] = field(default_factory=list)
    other: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    rss_peak_mb: float = 0.0
    wrong: list[str] = field(default_factory=list)

    def p(self, which: list[int], q: float) -> float:
        if not which:
            return math.nan
        ordered = sorted(which)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] / 1e6

    @property
    def ok_rps(self) -> float:
        return len(self.ok_ns) / self.seconds if self.seconds else 0.0


async def load(port: int, reqs: list[bytes], clients: int, seconds: float, pid: int, check: Any,
               honour_retry_after: bool) -> Phase:
    """``clients`` connections send round-robin for ``seconds`` (after 0.5 s of warm-up); every 50th answer is kept
    and checked; the daemon's RSS is sampled every 0.25 s."""
    loop = asyncio.get_running_loop()
    phase = Phase()
    state = {"measuring": False, "stop": math.inf, "n": 0}

    async def client(index: int) -> None:
        _, conn = await loop.create_connection(loadgen._Conn, "127.0.0.1", port)
        i = index
        try:
            while time.perf_counter() < state["stop"]:
                k = i % len(reqs)
                i += 1
                if conn.closed:  # the daemon closed it after an answer
                    _, conn = await loop.create_connection(loadgen._Conn, "127.0.0.1", port)
                conn.keep = state["measuring"] and state["n"] % 50 == 0
                t0 = time.perf_counter_ns()
                try:
                    status = await conn.send(reqs[k])
                except ConnectionError:  # the daemon closed it: counted, and the client reconnects
                    if state["measuring"]:
                        phase.other[0] = phase.other.get(0, 0) + 1
                    _, conn = await loop.create_connection(loadgen._Conn, "127.0.0.1", port)
                    continue
                took = time.perf_counter_ns() - t0
                if not state["measuring"]:
                    continue
                state["n"] += 1
                if status == 200:
                    phase.ok_ns.append(took)
                    if conn.keep:
                        wrong = check(k, conn.body)
                        if wrong:
                            phase.wrong.append(wrong)
                elif status == 503:
                    phase.refused_ns.append(took)
                    if honour_retry_after:
                        await asyncio.sleep(1.0)
                else:
                    phase.other[status] = phase.other.get(status, 0) + 1
        finally:
            if conn.transport is not None:
                conn.transport.close()

    async def clock() -> None:
        await asyncio.sleep(0.5)
        start = time.perf_counter()
        state["stop"] = start + seconds
        state["measuring"] = True
        while time.perf_counter() < state["stop"]:
            phase.rss_peak_mb = max(phase.rss_peak_mb, rss_mb(pid))
            await asyncio.sleep(0.25)
        phase.seconds = time.perf_counter() - start

    await asyncio.gather(clock(), *(client(i) for i in range(clients)))
    return phase


def refusal_floor(work: Path, reqs: list[bytes], seconds: float, honour_retry_after: bool) -> Phase:
    """The same 256-client load against a server that refuses everything at once, unpinned like the daemon (the
    requests' Host header still names the daemon's port: nothing reads it)."""
    port = free_port()
    body = work / "refusal.json"
    body.write_bytes(b'{"error": "overloaded: the predicted wait in the queue exceeds the deadline"}')
    proc = subprocess.Popen([sys.executable, str(HERE / "servers.py"), "refuser", str(port), "-", str(body), "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        return asyncio.run(load(port, reqs, 256, seconds, proc.pid, lambda k, b: None, honour_retry_after))
    finally:
        proc.terminate()
        proc.wait(30)


def start_daemon(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    import yaml

    from daemon.config import ServerConfig

    port = free_port()
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if "limits" in ServerConfig.model_fields:  # 256 clients from one address: past the default per-client limit
        server["limits"] = {"max_connections_per_client": 1024}
    cfg = {"state_dir": str(work / "state"), "server": server,
           "keys": {"kek": [{"path": str(work / "bench.kek")}], "signers": [{"path": str(work / "sign.key.pub")}]},
           "logging": {"format": "json", "level": "warning"},
           "models": [{"name": "cnn", "runtime": "onnxruntime", "threads": 1, "workers": 1}]}
    (work / "overload.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--config", str(work / "overload.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wait_ready(port)
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of 16 clients")
    parser.add_argument("--overload", type=float, default=15.0, help="seconds of 256 clients")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds after the load before RSS is read")
    parser.add_argument("--honour-retry-after", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="inferd-overload-"))
    kek, signer = bench_keys(work)
    cnn = models.small_cnn()
    Store(work / "state").install(artifact.pack({"model.onnx": cnn}, name="cnn", version="1", runtime="onnxruntime",
                                                kek=kek, signing_key=signer), activate=True)
    rng = np.random.default_rng(0)
    xs = [rng.random((1, 3, 96, 96), dtype=np.float32) for _ in range(8)]
    check = answer_checker(cnn, "input", xs)
    proc, port = start_daemon(work)
    try:
        reqs = [loadgen.build_request("127.0.0.1", port, "/v2/models/cnn/infer", *json_body("input", x)) for x in xs]
        steady = asyncio.run(load(port, reqs, 16, args.steady, proc.pid, check, args.honour_retry_after))
        rss_steady = rss_mb(proc.pid)
        over = asyncio.run(load(port, reqs, 256, args.overload, proc.pid, check, args.honour_retry_after))
        time.sleep(args.quiet)  # the load has stopped: how much memory is given back meanwhile is the figure
        rss_quiet = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    floor = refusal_floor(work, reqs, args.overload, args.honour_retry_after)

    figures = {
        "accepted_rps": over.ok_rps / steady.ok_rps,
        "accepted_p99": over.p(over.ok_ns, 99) / steady.p(steady.ok_ns, 99),
        "refused_p99_ms": over.p(over.refused_ns, 99),
        "rss_growth": over.rss_peak_mb / rss_steady - 1,
        "rss_after": abs(rss_quiet / rss_steady - 1),
    }
    met = {k: (v >= TARGETS[k] if k == "accepted_rps" else v <= TARGETS[k]) for k, v in figures.items()}
    if not over.refused_ns:
        met["refused_p99_ms"] = False  # nothing was refused: the overload was absorbed as latency
    faults = steady.wrong + over.wrong + [f"{f'status {s}' if s else 'connection closed'} x{n}"
                                          for s, n in {**steady.other, **over.other}.items()]
    lines = [
        f"## Overload, CNN JSON ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()})",
        "",
        f"Machine: {machine()}; unpinned; 16 clients {args.steady:g} s, then 256 clients {args.overload:g} s, "
        f"RSS {args.quiet:g} s after; refused clients {'wait 1 s' if args.honour_retry_after else 'resend at once'}.",
        "",
        "| phase | accepted req/s | accepted p50 ms | accepted p99 ms | refused | refused p99 ms | RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| 16 clients | {steady.ok_rps:.0f} | {steady.p(steady.ok_ns, 50):.1f} | {steady.p(steady.ok_ns, 99):.1f} | "
        f"{len(steady.refused_ns)} | {steady.p(steady.refused_ns, 99):.2f} | {rss_steady:.0f} |",
        f"| 256 clients | {over.ok_rps:.0f} | {over.p(over.ok_ns, 50):.1f} | {over.p(over.ok_ns, 99):.1f} | "
        f"{len(over.refused_ns)} | {over.p(over.refused_ns, 99):.2f} | {over.rss_peak_mb:.0f} (peak) |",
        f"| {args.quiet:g} s later | | | | | | {rss_quiet:.0f} |",
        f"| refusal floor: 256 clients, a server refusing every request at once | | | | {len(floor.refused_ns)} | "
        f"{floor.p(floor.refused_ns, 99):.2f} | |",
        "",
        "The refusal floor (bench/servers.py refuser, on aiohttp's low-level server as inferd, same client, same "
        "bodies): what a refusal's round trip costs here with this load generator and no model running; inferd's "
        f"refused p99 is {over.p(over.refused_ns, 99) / max(floor.p(floor.refused_ns, 99), 1e-9):.2f}x of it.",
        "",
        "| target | figure | limit | met |",
        "| --- | --- | --- | --- |",
        *(f"| {k} | {v:.4f} | {'>=' if k == 'accepted_rps' else '<='} {TARGETS[k]} | {'yes' if met[k] else 'no'} |"
          for k, v in figures.items()),
    ]
    if faults:
        lines.append(f"\nFaults: {'; '.join(faults[:10])}")
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        with (HERE / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write("\n" + report + "\n")
    return 0 if all(met.values()) and not faults else 1


if __name__ == "__main__":
    sys.exit(main())
