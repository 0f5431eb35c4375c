"""A small, fast HTTP/1.1 load generator for `inferd bench` and bench/.

Python HTTP clients spend more time per request than a lean server does, which would make the client the thing being
measured. So this one pre-builds each request's bytes once, keeps one connection per simulated client, and parses
responses with a minimal asyncio protocol (status line, Content-Length, body). Runs are bounded by count and time.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Result:
    latencies_ns: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    seconds: float = 0.0
    #: (request index, status, body) of every ``sample_every``-th measured response, for checking answers
    samples: list[tuple[int, int, bytes]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.latencies_ns)

    @property
    def throughput(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds (nearest rank)."""
        if not self.latencies_ns:
            return math.nan
        ordered = sorted(self.latencies_ns)
        rank = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[rank] / 1e6


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep = False  # keep the next response's body (a sample), else it is dropped unread
        self.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._try_complete()

    def _try_complete(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"content-length:")
        length = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        status = int(head[9:12])
        if self.keep:
            self.body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    async def send(self, payload: bytes) -> int:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        assert self.transport is not None
        self.transport.write(payload)
        return await self.waiter


async def run(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    duration_s: float,
    max_requests: int | None = None,
    warmup_s: float = 0.5,
    progress: Callable[[int, float], None] | None = None,
    sample_every: int = 0,
    on_measure: Callable[[bool], None] | None = None,
) -> Result:
    """Send ``requests`` round-robin from ``concurrency`` connections until ``duration_s`` or ``max_requests``.

    ``sample_every`` keeps every n-th measured response's body in ``Result.samples`` so a benchmark can check the
    answers it timed; ``on_measure(True)`` / ``on_measure(False)`` mark the measured window (e.g. to read the
    server's CPU time over exactly the requests counted).
    """
    loop = asyncio.get_running_loop()
    result = Result()
    sent = 0
    measuring = False
    stop_at = 0.0
    start = 0.0
    last_done = 0.0

    async def client(index: int) -> None:
        nonlocal sent, last_done
        _, conn = await loop.create_connection(_Conn, host, port)
        i = index
        try:
            while True:
                now = time.perf_counter()
                if measuring and (now >= stop_at or (max_requests is not None and sent >= max_requests)):
                    return
                index = i % len(requests)
                payload = requests[index]
                i += 1
                keep = conn.keep = bool(measuring and sample_every and sent % sample_every == 0)
                t0 = time.perf_counter_ns()
                try:
                    status = await conn.send(payload)
                except ConnectionError:
                    result.errors += 1
                    _, conn = await loop.create_connection(_Conn, host, port)
                    continue
                if measuring:
                    last_done = time.perf_counter()
                    result.latencies_ns.append(time.perf_counter_ns() - t0)
                    result.statuses[status] += 1
                    sent += 1
                    if keep:
                        result.samples.append((index, status, conn.body))
        finally:
            if conn.transport is not None:
                conn.transport.close()

    async def clock() -> None:
        nonlocal measuring, stop_at, start
        await asyncio.sleep(warmup_s)
        start = time.perf_counter()
        stop_at = start + duration_s
        if on_measure is not None:
            on_measure(True)
        measuring = True
        while time.perf_counter() < stop_at and (max_requests is None or sent < max_requests):
            await asyncio.sleep(min(0.25, max(0.0, stop_at - time.perf_counter())))
            if progress is not None:
                progress(sent, time.perf_counter() - start)
        if on_measure is not None:
            on_measure(False)

    await asyncio.gather(clock(), *(client(i) for i in range(concurrency)))
    result.seconds = max(last_done - start, 1e-9)
    return result


def tty_progress(total_s: float) -> Callable[[int, float], None] | None:
    """A one-line progress bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, elapsed: float) -> None:
        width = 30
        filled = min(width, int(width * elapsed / total_s)) if total_s else width
        rate = done / elapsed if elapsed else 0.0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done} requests, {rate:,.0f}/s ")
        sys.stderr.flush()

    return show


def random_bodies(
    metadata: dict, count: int, batch: int, binary: bool, seed: int = 0
) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` V2 request bodies with random inputs shaped from model metadata (-1 dims: ``batch`` first, 1 after)."""
    import json

    import numpy as np

    from adapters.base import V2_TO_NUMPY

    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        tensors, blobs = [], []
        for spec in metadata["inputs"]:
            shape = [d if d >= 0 else (batch if i == 0 else 1) for i, d in enumerate(spec["shape"])]
            dtype = V2_TO_NUMPY.get(spec["datatype"])
            if dtype is None:
                raise ValueError(f"input {spec['name']!r} has datatype {spec['datatype']}, which bench cannot generate")
            if dtype.kind == "f":
                arr = rng.normal(size=shape).astype(dtype)
            elif dtype.kind == "b":
                arr = rng.integers(0, 2, size=shape).astype(bool)
            else:
                arr = rng.integers(0, 10, size=shape).astype(dtype)
            tensor = {"name": spec["name"], "shape": shape, "datatype": spec["datatype"]}
            if binary:
                tensor["parameters"] = {"binary_data_size": arr.nbytes}
                blobs.append(arr.tobytes())
            else:
                tensor["data"] = arr.ravel().tolist()
            tensors.append(tensor)
        header = json.dumps({"inputs": tensors}).encode()
        if binary:
            bodies.append((header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}))
        else:
            bodies.append((header, {"Content-Type": "application/json"}))
    return bodies
