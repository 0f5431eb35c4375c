"""Registries for the tests, served for real over loopback: ``inferd registry serve`` and nginx as child processes,
and a raw asyncio HTTP server (in the test's own loop) that can cut a download after N bytes or redirect."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqttclient import PortLease

from daemon import artifact, keys, registry_index, registry_publish
from support.daemon import REPO

DEADLINE_S = 20.0


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    assert found, "nginx is not installed (make test installs it: make deps-system)"
    return found


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.02)  # polling a condition (the port accepts) with a deadline, not a synchronisation sleep
    raise AssertionError(f"{what} did not listen on {host}:{port} within {DEADLINE_S} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nginx(root: Path, work: Path) -> Iterator[str]:
    """nginx from Debian's package serving ``root`` on a port of its own; yields the registry URL."""
    work.mkdir(parents=True, exist_ok=True)
    lease = PortLease()
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root nginx would switch its workers to nobody
    temp = "\n".join(f"  {kind}_temp_path {work / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                       "scgi"))
    (work / "nginx.conf").write_text(
        f"{user}worker_processes 1;\nerror_log {work / 'error.log'} warn;\n"
        "events { worker_connections 64; }\n"
        "http {\n  access_log off;\n" + temp + "\n"
        "  types { application/json json; }\n  default_type application/octet-stream;\n"
        f"  server {{\n    listen 127.0.0.1:{lease.port};\n    root {root};\n"
        "    location ~ /\\. { deny all; }\n  }\n}\n", encoding="utf-8")
    lease.release()  # nginx binds it now; the lease kept the other brokers and nginxes of this suite off it
    proc = subprocess.Popen(
        [nginx_binary(), "-p", str(work), "-e", str(work / "error.log"), "-c", str(work / "nginx.conf"),
         "-g", f"daemon off; pid {work / 'nginx.pid'};"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(lease.port, proc, "nginx")
        yield f"http://127.0.0.1:{lease.port}/"
    finally:
        _stop(proc)


@contextlib.contextmanager
def inferd_serve(root: Path) -> Iterator[str]:
    """``inferd registry serve --port 0``; yields the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "registry", "serve", "--dir", str(root), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("serving "), f"inferd registry serve said {line!r} (exit {proc.poll()})"
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class RawServer:
    """A minimal HTTP/1.1 file server on the running loop: Range, a cut after ``cut_after`` bytes on the first
    ``cuts`` full answers of a path, and redirects. Raw, so a cut is a real dropped connection mid-body."""

    files: dict[str, bytes]
    host: str = "127.0.0.1"
    cut_after: dict[str, int] = field(default_factory=dict)
    cuts: int = 1
    redirects: dict[str, str] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    stall: bool = False  # accept connections and never answer (a registry that hangs)
    etags: bool = False  # answer ETag and honour If-None-Match with 304
    conditional: list[str] = field(default_factory=list)  # paths asked with If-None-Match
    then: dict[str, list[bytes]] = field(default_factory=dict)  # a path's next bodies, one per request, in order
    hold_after: dict[str, int] = field(default_factory=dict)  # send this many bytes, then wait for ``released``
    released: threading.Event = field(default_factory=threading.Event)
    trickle: dict[str, float] = field(default_factory=dict)  # send a path one byte each this many seconds
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    _server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self._server.sockets[0].getsockname()[1]}/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1].lstrip("/")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
            rng = headers.get("range")
            self.requests.append((path, rng))
            if self.stall:
                await reader.read()  # until the client gives up and closes
                return
            if self.then.get(path):  # the file changed since the last request (a publication in progress)
                self.files[path] = self.then[path].pop(0)
            tag = f'"{hashlib.sha256(self.files[path]).hexdigest()[:16]}"' if path in self.files else ""
            if "if-none-match" in headers:
                self.conditional.append(path)
            if self.etags and tag and headers.get("if-none-match") == tag:
                writer.write(f"HTTP/1.1 304 Not Modified\r\nETag: {tag}\r\nConnection: close\r\n\r\n".encode())
            elif path in self.redirects:
                writer.write(f"HTTP/1.1 302 Found\r\nLocation: {self.redirects[path]}\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
            elif path not in self.files:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                data = self.files[path]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                status = "206 Partial Content" if rng else "200 OK"
                extra = f"Content-Range: bytes {start}-{len(data) - 1}/{len(data)}\r\n" if rng else ""
                extra += f"ETag: {tag}\r\n" if self.etags else ""
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
                             .encode())
                if path in self.hold_after and not self.released.is_set():  # a download that stalls midway
                    writer.write(body[: self.hold_after[path]])
                    await writer.drain()
                    await asyncio.get_running_loop().run_in_executor(None, self.released.wait, DEADLINE_S)
                    writer.write(body[self.hold_after[path] :])
                    await writer.drain()
                    return
                if path in self.trickle:  # a registry that is slow, never silent long enough to time a read out
                    for i in range(len(body)):
                        writer.write(body[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(self.trickle[path])
                    return
                if path in self.cut_after and not rng and self.cuts > 0:
                    self.cuts -= 1
                    writer.write(body[: self.cut_after[path]])
                    await writer.drain()
                    writer.transport.abort()  # the connection drops mid-body
                    return
                writer.write(body)
            await writer.drain()
        finally:
            writer.close()


@dataclass
class Central:
    """The publishing side: a registry folder and its index key."""

    root: Path
    key_path: Path
    keyset: Any
    model: bytes

    @property
    def key(self) -> Any:
        return keys.load_signing_key(self.key_path)

    def artifact(self, version: str, keyset: Any | None = None) -> Path:
        path = self.root.parent / f"mlp-{version}.inferd"
        ks = keyset or self.keyset
        path.write_bytes(artifact.pack({"model.onnx": self.model}, name="mlp", version=version,
                                       runtime="onnxruntime", kek=ks.kek, signing_key=ks.signing_key))
        return path

    def publish(self, version: str, keyset: Any | None = None, channel: str = "stable",
                **kwargs: Any) -> registry_index.Index:
        return registry_publish.publish(self.artifact(version, keyset), self.root, self.key, channels=[channel],
                                        **kwargs)[0]

    def files(self) -> tuple[bytes, bytes]:
        return (self.root / "index.json").read_bytes(), (self.root / "index.json.sig").read_bytes()

    def put(self, index: bytes, sig: bytes) -> None:
        (self.root / "index.json.sig").write_bytes(sig)
        touch_write(self.root / "index.json", index)


def touch_write(path: Path, data: bytes) -> None:
    """Write and move the mtime on, as a publish does, so a web server's ETag changes (nginx's is to the second)."""
    before = path.stat().st_mtime if path.exists() else 0.0
    path.write_bytes(data)
    moment = max(time.time(), before + 1.0)
    os.utime(path, (moment, moment))


class Threaded:
    """A RawServer on an event loop of its own thread, for a daemon subprocess to poll; stopped and joined on exit."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-server")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.server.__aenter__())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.__aexit__(None, None, None))
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()

    def __enter__(self) -> RawServer:
        self._thread.start()
        assert self._started.wait(DEADLINE_S), "the registry server did not start"
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.released.set()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEADLINE_S)
