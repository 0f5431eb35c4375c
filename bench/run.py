"""`make bench`: inferd against the in-process runtime, a bare aiohttp handler and a minimal V2 handler, in one run.

Fairness on a small box: every server process is pinned to CPU 0 and the load generator to CPU 1 (taskset /
sched_setaffinity), every runtime gets one thread, and the servers are measured in alternating rounds; medians are
reported. Results (table, date, machine) are appended to bench/RESULTS.md.

Usage: python bench/run.py [--rounds 3] [--seconds 2] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import models  # noqa: E402

from daemon import artifact, keys, loadgen  # noqa: E402
from daemon.config import KeySource  # noqa: E402
from daemon.store import Store  # noqa: E402

SERVER_CPU = 0
CLIENT_CPU = 1


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(SERVER_CPU), *cmd]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    started_s: float = 0.0


def wait_listening(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_inferd(work: Path, name: str, models_cfg: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Server:
    import yaml

    port = free_port()
    cfg = {
        "state_dir": str(work / "state"),
        "server": {"host": "127.0.0.1", "port": port},
        "keys": {"kek": [{"path": str(work / "bench.kek")}], "signers": [{"path": str(work / "sign.key.pub")}]},
        "logging": {"format": "json", "level": "warning"},
        "models": models_cfg,
        **(extra or {}),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    proc = subprocess.Popen(pinned([sys.executable, "-m", "daemon", "serve", "--config", str(path)]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    server = Server(name, port, proc)
    wait_ready(port)
    server.started_s = time.monotonic() - t0
    return server


def wait_ready(port: int, timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:  # noqa: S310
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"inferd on {port} did not become ready")


def start_ref(kind: str, model_path: Path, response: bytes, work: Path) -> Server:
    port = free_port()
    resp = work / f"{kind}-{model_path.stem}.resp"
    resp.write_bytes(response)
    proc = subprocess.Popen(pinned([sys.executable, str(HERE / "servers.py"), kind, str(port), str(model_path),
                                    str(resp), "1"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return Server(f"{kind}-{model_path.stem}", port, proc)


def in_process_rate(model_path: Path, feed_npz: Path, seconds: float) -> float:
    """sess.run at batch 1 in a pinned child process, one thread: the runtime's own limit on one CPU."""
    code = (
        "import sys,time,numpy as np,onnxruntime as ort\n"
        "so=ort.SessionOptions();so.intra_op_num_threads=1;so.inter_op_num_threads=1\n"
        "s=ort.InferenceSession(open(sys.argv[1],'rb').read(),so,providers=['CPUExecutionProvider'])\n"
        "f=dict(np.load(sys.argv[2]));s.run(None,f)\n"
        "t=time.perf_counter();n=0\n"
        "while time.perf_counter()-t<float(sys.argv[3]):\n s.run(None,f);n+=1\n"
        "print(n/(time.perf_counter()-t))\n"
    )
    out = subprocess.run(pinned([sys.executable, "-c", code, str(model_path), str(feed_npz), str(seconds)]),
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def one_request(port: int, model: str, body: bytes, headers: dict[str, str]) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{model} on {port}: {resp.status} {data[:200]!r}")
    return data


def json_body(name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    doc = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}


def binary_body(name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def measure(port: int, model: str, bodies: list[tuple[bytes, dict[str, str]]], clients: int,
            seconds: float) -> loadgen.Result:
    reqs = [loadgen.build_request("127.0.0.1", port, f"/v2/models/{model}/infer", b, h) for b, h in bodies]
    result = asyncio.run(loadgen.run("127.0.0.1", port, reqs, clients, seconds, warmup_s=0.3))
    bad = {s: n for s, n in result.statuses.items() if s != 200}
    if bad or result.errors:
        raise RuntimeError(f"non-200 answers from {model} on {port}: {bad}, errors {result.errors}")
    return result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def bench_args() -> argparse.Namespace:
    """The options every bench script takes: alternating rounds, seconds a measurement, and whether to append."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true", help="print the table without appending it to RESULTS.md")
    return parser.parse_args()


def publish(report: str, args: argparse.Namespace) -> None:
    """Print a run's table, and append it to bench/RESULTS.md unless --no-write."""
    print(report)
    if not args.no_write:
        with (HERE / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write("\n" + report + "\n")


def bench_keys(work: Path) -> tuple[keys.Kek, Any]:
    """A KEK and a signing key of the run's own, in ``work``: (kek, signing key)."""
    keys.generate_kek(work / "bench.kek", "bench")
    keys.generate_signing_key(work / "sign.key")
    return keys.load_kek(KeySource(path=work / "bench.kek")), keys.load_signing_key(work / "sign.key")


def main() -> int:
    args = bench_args()
    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs (server and load generator pinned apart)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CPU})

    work = Path(tempfile.mkdtemp(prefix="inferd-bench-"))
    kek, signer = bench_keys(work)
    tab_model, tab_rows = models.tabular_classifier()
    cnn_model = models.small_cnn()
    store = Store(work / "state")
    for name, blob in (("tabular", tab_model), ("cnn", cnn_model)):
        (work / f"{name}.onnx").write_bytes(blob)
        store.install(artifact.pack({"model.onnx": blob}, name=name, version="1", runtime="onnxruntime", kek=kek,
                                    signing_key=signer), activate=True)

    rng = np.random.default_rng(0)
    tab_x = [tab_rows[i : i + 1] for i in range(0, 64)]
    cnn_x = [rng.random((1, 3, 96, 96), dtype=np.float32) for _ in range(8)]
    np.savez(work / "tabular.npz", X=tab_x[0])
    np.savez(work / "cnn.npz", input=cnn_x[0])
    tab_json = [json_body("X", x) for x in tab_x]
    cnn_bin = [binary_body("input", x) for x in cnn_x]
    cnn_json = [json_body("input", x) for x in cnn_x]

    base = {"runtime": "onnxruntime", "threads": 1, "workers": 1}
    servers: dict[str, Server] = {}
    try:
        servers["inferd"] = start_inferd(work, "inferd", [{"name": "tabular", **base}, {"name": "cnn", **base}])
        servers["inferd-nobatch"] = start_inferd(
            work, "nobatch", [{"name": "tabular", **base, "max_batch_size": 0}, {"name": "cnn", **base, "max_batch_size": 0}])
        tab_resp = one_request(servers["inferd"].port, "tabular", *tab_json[0])
        cnn_resp = one_request(servers["inferd"].port, "cnn", *cnn_json[0])
        servers["bare-tabular"] = start_ref("bare", work / "tabular.onnx", tab_resp, work)
        servers["bare-cnn"] = start_ref("bare", work / "cnn.onnx", cnn_resp, work)
        servers["minimal-tabular"] = start_ref("minimal", work / "tabular.onnx", b"", work)
        servers["minimal-cnn"] = start_ref("minimal", work / "cnn.onnx", b"", work)

        scenarios: list[tuple[str, str, list[tuple[bytes, dict[str, str]]], int, list[str]]] = [
            ("tabular JSON", "tabular", tab_json, 1, ["bare-tabular", "minimal-tabular", "inferd", "inferd-nobatch"]),
            ("tabular JSON", "tabular", tab_json, 16, ["bare-tabular", "minimal-tabular", "inferd", "inferd-nobatch"]),
            ("CNN binary", "cnn", cnn_bin, 1, ["minimal-cnn", "inferd", "inferd-nobatch"]),
            ("CNN binary", "cnn", cnn_bin, 16, ["bare-cnn", "minimal-cnn", "inferd", "inferd-nobatch"]),
            ("CNN binary", "cnn", cnn_bin, 32, ["bare-cnn", "minimal-cnn", "inferd", "inferd-nobatch"]),
            ("CNN JSON", "cnn", cnn_json, 16, ["bare-cnn", "minimal-cnn", "inferd", "inferd-nobatch"]),
        ]
        raw: dict[tuple[str, int, str], list[loadgen.Result]] = {}
        for r in range(args.rounds):
            for label, model, bodies, clients, names in scenarios:
                order = names if r % 2 == 0 else list(reversed(names))  # alternate who goes first
                seconds = args.seconds * (3 if label == "CNN JSON" else 1)  # ~300 req/s: longer, or it is noise
                for name in order:
                    res = measure(servers[name].port, model, bodies, clients, seconds)
                    raw.setdefault((label, clients, name), []).append(res)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        limits = {"tabular": in_process_rate(work / "tabular.onnx", work / "tabular.npz", args.seconds),
                  "cnn": in_process_rate(work / "cnn.onnx", work / "cnn.npz", args.seconds)}
        idle = idle_figures(work)
    finally:
        for s in servers.values():
            s.proc.terminate()
        for s in servers.values():
            s.proc.wait(timeout=30)

    table = summarise(raw)
    report = render(table, limits, idle, args)
    publish(report, args)
    return 0


def idle_figures(work: Path) -> dict[str, float]:
    """Start-to-ready, RSS and CPU over 2 s of an idle daemon with one ONNX model."""
    server = start_inferd(work, "idle", [{"name": "tabular", "runtime": "onnxruntime"}])
    try:
        before = cpu_seconds(server.proc.pid)
        time.sleep(2.0)
        cpu = (cpu_seconds(server.proc.pid) - before) / 2.0
        return {"start_to_ready_s": server.started_s, "rss_mb": rss_mb(server.proc.pid), "idle_cpu_pct": cpu * 100}
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


def summarise(raw: dict[tuple[str, int, str], list[loadgen.Result]]) -> dict[tuple[str, int, str], dict[str, float]]:
    return {
        key: {
            "rps": statistics.median(r.throughput for r in results),
            "p50": statistics.median(r.percentile(50) for r in results),
            "p90": statistics.median(r.percentile(90) for r in results),
            "p99": statistics.median(r.percentile(99) for r in results),
        }
        for key, results in raw.items()
    }


def render(table: dict[tuple[str, int, str], dict[str, float]], limits: dict[str, float], idle: dict[str, float],
           args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Run of {when} (commit {commit()})", "", f"Machine: {machine()}. Servers pinned to CPU {SERVER_CPU}, load generator to "
             f"CPU {CLIENT_CPU}, runtime threads 1; {args.rounds} alternating rounds of {args.seconds:g} s (CNN JSON: "
             f"{3 * args.seconds:g} s); medians.",
             "", "| scenario | clients | server | req/s | p50 ms | p90 ms | p99 ms |", "|---|---:|---|---:|---:|---:|---:|"]
    for (label, clients, name), v in table.items():
        lines.append(f"| {label} | {clients} | {name} | {v['rps']:,.0f} | {v['p50']:.3f} | {v['p90']:.3f} | "
                     f"{v['p99']:.3f} |")
    lines += ["", f"In-process runtime, batch 1, one thread on one CPU: tabular {limits['tabular']:,.0f}/s, "
              f"CNN {limits['cnn']:,.0f}/s.", "",
              "| target | measured | met |", "|---|---|---|"]

    def get(label: str, clients: int, name: str, key: str = "rps") -> float:
        return table[(label, clients, name)][key]

    checks = [
        ("tabular JSON, 16 clients: >= 50% of bare aiohttp",
         get("tabular JSON", 16, "inferd") / get("tabular JSON", 16, "bare-tabular"), 0.5, "ratio"),
        ("tabular, 1 client: p50 within 0.1 ms of bare aiohttp",
         get("tabular JSON", 1, "inferd", "p50") - get("tabular JSON", 1, "bare-tabular", "p50"), 0.1, "delta_ms"),
        ("tabular, 1 client: p99 within 3x p50",
         get("tabular JSON", 1, "inferd", "p99") / get("tabular JSON", 1, "inferd", "p50"), 3.0, "max"),
        ("CNN binary, 16 clients: >= 65% of in-process", get("CNN binary", 16, "inferd") / limits["cnn"], 0.65, "ratio"),
        ("CNN binary, 32 clients: >= 65% of in-process", get("CNN binary", 32, "inferd") / limits["cnn"], 0.65, "ratio"),
        ("CNN binary, 16 clients: share of the bare transport limit for the same body (context)",
         get("CNN binary", 16, "inferd") / get("CNN binary", 16, "bare-cnn"), 0.0, "ratio"),
        # a server with no overhead at all still receives each body (bare-cnn's cost) and runs the model on the same
        # CPU: its rate over the in-process rate is the most any server can reach on this machine (context)
        ("CNN binary, 16 clients: ceiling for any server here, 1/(1/bare + 1/in-process) over in-process (context)",
         1 / (1 / get("CNN binary", 16, "bare-cnn") + 1 / limits["cnn"]) / limits["cnn"], 0.0, "ratio"),
        ("CNN JSON, 16 clients: >= 90% of the minimal handler",
         get("CNN JSON", 16, "inferd") / get("CNN JSON", 16, "minimal-cnn"), 0.9, "ratio"),
    ]
    for label, clients in (("tabular JSON", 16), ("CNN binary", 16), ("CNN binary", 32), ("CNN JSON", 16)):
        checks.append((f"{label}, {clients} clients: batching on >= batching off",
                       get(label, clients, "inferd") / get(label, clients, "inferd-nobatch"), 1.0, "ratio"))
    checks.append(("CNN binary, 1 client: batching adds <= max_queue_delay_ms (0) to p50",
                   get("CNN binary", 1, "inferd", "p50") - get("CNN binary", 1, "inferd-nobatch", "p50"), 0.05,
                   "delta_ms"))
    checks += [
        ("idle: RSS <= 150 MB", idle["rss_mb"], 150, "max"),
        ("idle: start to ready <= 2 s", idle["start_to_ready_s"], 2.0, "max"),
        ("idle: CPU ~0", idle["idle_cpu_pct"], 1.0, "max"),
    ]
    for text, value, target, kind in checks:
        met = value >= target if kind == "ratio" else value <= target
        shown = f"{value:.2f}x" if kind == "ratio" else f"{value:.3f}"
        lines.append(f"| {text} | {shown} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
