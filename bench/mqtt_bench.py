"""MQTT round trips: inferd against a bare echo through the same broker (the transport limit), in one run.

A real mosquitto on a free port (with `set_tcp_nodelay true`, as docs/mqtt.md advises); inferd (tabular model, one thread) and a paho echo client that answers each request
with a reply of the same size as inferd's. Both pinned to CPU 0, the load generator to CPU 1; QoS 0 and QoS 1, one
request in flight and 64 in flight, alternating rounds, medians. Appends its table to bench/RESULTS.md.

Usage: python bench/mqtt_bench.py [--rounds 3] [--seconds 2] [--no-write]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE), str(REPO / "tests")]

import models  # noqa: E402
from mqttclient import Broker  # noqa: E402
from run import SERVER_CPU, bench_args, commit, machine, pinned, publish, set_affinity  # noqa: E402

from daemon import artifact, keys  # noqa: E402
from daemon.config import KeySource  # noqa: E402
from daemon.store import Store  # noqa: E402

ECHO_CODE = r"""
import sys, paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
port, topic, reply = int(sys.argv[1]), sys.argv[2], open(sys.argv[3], "rb").read()
c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="echo", protocol=paho.MQTTv5)
def on_connect(cl, u, f, rc, p):
    cl.subscribe(topic, qos=1)
    print("ready", flush=True)
def on_message(cl, u, m):
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = m.properties.CorrelationData
    props.UserProperty = [("status", "200")]
    cl.publish(m.properties.ResponseTopic, reply, qos=m.qos, properties=props)
import socket
c.on_connect, c.on_message = on_connect, on_message
c.on_socket_open = lambda cl, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.max_inflight_messages_set(1000)
c.connect("127.0.0.1", port)
c.loop_forever()
"""


class Driver:
    """Publishes requests keeping ``inflight`` outstanding; measures each round trip by correlation data."""

    def __init__(self, port: int) -> None:
        self.reply_topic = f"bench/replies/{uuid.uuid4().hex}"
        self.sent: dict[bytes, float] = {}
        self.last_size = 0
        self.lat: list[float] = []
        self.failures: list[str] = []  # replies whose status is not 200: an error reply is not a round trip
        self.samples: list[bytes] = []  # every 50th reply's payload, checked after the run
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(0)
        self.ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"drv-{uuid.uuid4().hex[:6]}",
                                  protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(self.reply_topic, qos=1), self.ready.set())
        self.client.on_message = self._on_message
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(30)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        self.last_size = len(msg.payload)
        status = dict(getattr(msg.properties, "UserProperty", None) or []).get("status")
        with self.lock:
            t0 = self.sent.pop(msg.properties.CorrelationData, None)
        if t0 is not None:
            if status != "200":
                self.failures.append(f"status {status}: {msg.payload[:200]!r}")
            else:
                self.lat.append(now - t0)
                if len(self.lat) % 50 == 1:
                    self.samples.append(msg.payload)
            self.slots.release()

    def run(self, topic: str, payload: bytes, qos: int, inflight: int, seconds: float) -> tuple[float, float, float]:
        self.lat, self.sent, self.failures, self.samples = [], {}, [], []
        self.slots = threading.Semaphore(inflight)
        end = time.perf_counter() + seconds
        n = 0
        start = time.perf_counter()
        while time.perf_counter() < end:
            if not self.slots.acquire(timeout=10):
                raise RuntimeError(f"no reply within 10 s on {topic} (qos {qos})")
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            cid = str(n).encode()
            props.CorrelationData = cid
            with self.lock:
                self.sent[cid] = time.perf_counter()
            self.client.publish(topic, payload, qos=qos, properties=props)
            n += 1
        for _ in range(inflight):  # wait for the stragglers so the next run starts clean
            self.slots.acquire(timeout=10)
        elapsed = time.perf_counter() - start
        if self.failures:
            raise RuntimeError(f"{len(self.failures)} error replies on {topic}: {self.failures[0]}")
        ms = sorted(x * 1000 for x in self.lat)
        return len(ms) / elapsed, ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))]


def main() -> int:
    args = bench_args()
    os.sched_setaffinity(0, {1})
    work = Path(tempfile.mkdtemp(prefix="inferd-mqtt-bench-"))
    broker = Broker(work / "broker")
    broker.start()
    assert broker.proc is not None
    set_affinity(broker.proc.pid, {SERVER_CPU})  # started from this process, it inherited the load generator's CPU
    procs: list[subprocess.Popen[bytes]] = []
    try:
        keys.generate_kek(work / "b.kek", "b")
        keys.generate_signing_key(work / "s.key")
        model, rows = models.tabular_classifier()
        Store(work / "state").install(artifact.pack(
            {"m.onnx": model}, name="tabular", version="1", runtime="onnxruntime",
            kek=keys.load_kek(KeySource(path=work / "b.kek")), signing_key=keys.load_signing_key(work / "s.key")))
        import yaml

        (work / "c.yaml").write_text(yaml.safe_dump({
            "state_dir": str(work / "state"), "server": {"port": 0},
            "keys": {"kek": [{"path": str(work / "b.kek")}], "signers": [{"path": str(work / "s.key.pub")}]},
            "logging": {"level": "warning", "format": "json"},
            "models": [{"name": "tabular", "runtime": "onnxruntime", "threads": 1}],
            "mqtt": {"enabled": True, "port": broker.port, "topic_prefix": "bench", "receive_maximum": 128}}))
        procs.append(subprocess.Popen(pinned([sys.executable, "-m", "daemon", "serve", "--config",
                                              str(work / "c.yaml")]), cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        request = json.dumps({"inputs": [{"name": "X", "shape": [1, 30], "datatype": "FP32",
                                          "data": rows[0].tolist()}]}).encode()
        expected = in_process(model, rows[:1])
        driver = Driver(broker.port)
        # a first request tells us inferd is up and how big its reply is
        deadline = time.monotonic() + 60
        while True:
            try:
                driver.run("bench/models/tabular/infer", request, 1, 1, 0.2)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        (work / "reply.bin").write_bytes(b"x" * driver.last_size)  # the echo answers with as many bytes
        echo = subprocess.Popen(pinned([sys.executable, "-c", ECHO_CODE, str(broker.port), "echo/request",
                                        str(work / "reply.bin")]), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(echo)
        assert echo.stdout is not None
        assert echo.stdout.readline().strip() == b"ready"
        targets = {"echo": "echo/request", "inferd": "bench/models/tabular/infer"}
        results: dict[tuple[int, int, str], list[tuple[float, float, float]]] = {}
        for r in range(args.rounds):
            for qos in (0, 1):
                for inflight in (1, 64):
                    names = list(targets) if r % 2 == 0 else list(reversed(targets))
                    for name in names:
                        results.setdefault((qos, inflight, name), []).append(
                            driver.run(targets[name], request, qos, inflight, args.seconds))
                        if name == "inferd":
                            for payload in driver.samples:
                                check_reply(payload, expected)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        broker.stop()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## MQTT run of {when} (commit {commit()})", "", f"Machine: {machine()}. mosquitto, inferd and the echo client on CPU 0, the "
             f"load generator on CPU 1; tabular model, one thread; {args.rounds} alternating rounds of "
             f"{args.seconds:g} s; medians.", "",
             "| QoS | in flight | server | round trips/s | p50 ms | p99 ms |", "|---:|---:|---|---:|---:|---:|"]
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in results.items()}
    for (qos, inflight, name), (rps, p50, p99) in med.items():
        lines.append(f"| {qos} | {inflight} | {name} | {rps:,.0f} | {p50:.2f} | {p99:.2f} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    missed = []
    for qos in (0, 1):
        e1, i1 = med[(qos, 1, "echo")], med[(qos, 1, "inferd")]
        e64, i64 = med[(qos, 64, "echo")], med[(qos, 64, "inferd")]
        for text, value, ok in (
            (f"QoS {qos}, sequential: p50 within 1.5x of the echo", i1[1] / e1[1], i1[1] / e1[1] <= 1.5),
            (f"QoS {qos}, 64 in flight: >= 60% of the echo's throughput", i64[0] / e64[0], i64[0] / e64[0] >= 0.6),
        ):
            lines.append(f"| {text} | {value:.4f}x | {'yes' if ok else 'no'} |")
            if not ok:
                missed.append(f"{text}: {value:.4f}x")
    report = "\n".join(lines)
    publish(report, args)
    for text in missed:
        print(f"target missed: {text}", file=sys.stderr)
    return 1 if missed else 0


def in_process(model: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return {o.name: r for o, r in zip(sess.get_outputs(), sess.run(None, {"X": x}))}


def check_reply(payload: bytes, expected: dict[str, np.ndarray]) -> None:
    """A sampled reply must carry the in-process result, or the bench fails."""
    outputs = {o["name"]: o for o in json.loads(payload)["outputs"]}
    if set(outputs) != set(expected):
        raise RuntimeError(f"reply outputs {sorted(outputs)}, expected {sorted(expected)}")
    for name, ref in expected.items():
        got = np.asarray(outputs[name]["data"], dtype=ref.dtype).reshape(outputs[name]["shape"])
        if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"reply output {name} differs from the in-process result")


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
