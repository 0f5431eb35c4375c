"""What every bench script shares: pinning, starting inferd and the reference servers, load runs that check their
answers, /proc readings, the machine line and appending a table to bench/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from daemon import keys, loadgen  # noqa: E402
from daemon.config import KeySource  # noqa: E402

SERVER_CPU = 0
CLIENT_CPU = 1


def pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(SERVER_CPU), *cmd]


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Move every thread of a running process (taskset -a): threads keep the affinity they were created with."""
    subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, sorted(cpus))), str(pid)], check=True,
                   stdout=subprocess.DEVNULL)


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
    extra = dict(extra or {})
    cfg = {
        "state_dir": str(work / "state"),
        "server": {"host": "127.0.0.1", "port": port, **extra.pop("server", {})},  # e.g. server.limits
        "keys": {"kek": [{"path": str(work / "bench.kek")}], "signers": [{"path": str(work / "sign.key.pub")}]},
        "logging": {"format": "json", "level": "warning"},
        "models": models_cfg,
        **extra,
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


def in_process_rate(model_path: Path, feed_npz: Path, name: str, seconds: float) -> float:
    """sess.run at batch 1 in a pinned child process, one thread, cycling through the inputs the servers get: the
    runtime's own limit on one CPU."""
    code = (
        "import sys,time,numpy as np,onnxruntime as ort\n"
        "so=ort.SessionOptions();so.intra_op_num_threads=1;so.inter_op_num_threads=1\n"
        "s=ort.InferenceSession(open(sys.argv[1],'rb').read(),so,providers=['CPUExecutionProvider'])\n"
        "z=np.load(sys.argv[2]);fs=[{sys.argv[4]:z[k]} for k in sorted(z.files,key=lambda k:int(k[4:]))]\n"
        "s.run(None,fs[0]);t=time.perf_counter();n=0\n"
        "while time.perf_counter()-t<float(sys.argv[3]):\n s.run(None,fs[n%len(fs)]);n+=1\n"
        "print(n/(time.perf_counter()-t))\n"
    )
    out = subprocess.run(pinned([sys.executable, "-c", code, str(model_path), str(feed_npz), str(seconds), name]),
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
    """One load run whose answers must all be 200 (bench/grpc_bench.py's HTTP side)."""
    reqs = [loadgen.build_request("127.0.0.1", port, f"/v2/models/{model}/infer", b, h) for b, h in bodies]
    result = asyncio.run(loadgen.run("127.0.0.1", port, reqs, clients, seconds, warmup_s=0.3))
    bad = {s: n for s, n in result.statuses.items() if s != 200}
    if bad or result.errors:
        raise RuntimeError(f"non-200 answers from {model} on {port}: {bad}, errors {result.errors}")
    return result


@dataclass
class Measured:
    result: loadgen.Result
    cpu_us: float  # the server process's CPU time over the measured window, per measured request


def measure_checked(server: Server, model: str, bodies: list[tuple[bytes, dict[str, str]]], clients: int,
            seconds: float, check: Callable[[int, bytes], str | None]) -> Measured:
    """One load run; every non-200 fails the bench, and so does any sampled answer ``check`` finds wrong."""
    port = server.port
    reqs = [loadgen.build_request("127.0.0.1", port, f"/v2/models/{model}/infer", b, h) for b, h in bodies]
    marks: list[float] = []
    result = asyncio.run(loadgen.run("127.0.0.1", port, reqs, clients, seconds, warmup_s=0.3, sample_every=25,
                                     on_measure=lambda _: marks.append(cpu_seconds(server.proc.pid))))
    bad = {s: n for s, n in result.statuses.items() if s != 200}
    if bad or result.errors:
        raise RuntimeError(f"non-200 answers from {server.name} ({model}): {bad}, errors {result.errors}")
    for index, _, body in result.samples:
        wrong = check(index, body)
        if wrong:
            raise RuntimeError(f"{server.name} answered request {index} of {model} wrongly: {wrong}")
    if not result.samples:
        raise RuntimeError(f"no answer of {server.name} ({model}) was sampled")
    return Measured(result, (marks[1] - marks[0]) / max(result.count, 1) * 1e6)


def answer_checker(model_bytes: bytes, name: str, inputs: list[np.ndarray]) -> Callable[[int, bytes], str | None]:
    """Compares a V2 JSON answer to the in-process runtime's result for the same input (batched runs may differ in
    the last bits, hence the tolerance)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    expected = [{o.name: r for o, r in zip(sess.get_outputs(), sess.run(None, {name: x}))} for x in inputs]

    def check(index: int, body: bytes) -> str | None:
        try:
            outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
        except (ValueError, KeyError, TypeError) as exc:
            return f"not a V2 answer ({exc}): {body[:120]!r}"
        want = expected[index]
        if set(outputs) != set(want):
            return f"outputs {sorted(outputs)}, expected {sorted(want)}"
        for out_name, ref in want.items():
            got = np.asarray(outputs[out_name]["data"], dtype=ref.dtype).reshape(outputs[out_name]["shape"])
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-4, atol=1e-5):
                return f"{out_name} differs from the in-process result"
        return None

    return check


def fixed_checker(response: bytes) -> Callable[[int, bytes], str | None]:
    """The bare server's answer is a fixed body: check it arrived whole."""
    return lambda _, body: None if body == response else f"{len(body)} bytes, expected {len(response)}"


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
