"""What the update tests share: a site serving the lookup model's versions, the admin API, metrics, the audit log,
and a load generator that keeps every answer with the time its request was sent."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from httpclient import infer, request

from support.daemon import DaemonProcess
from support.update_models import MODEL, body, pack_version

#: commits quickly; latency is not judged (a fresh version's first answers on a busy test machine are slow)
FAST_PROBATION = {"seconds": 0.5, "min_requests": 20, "max_p99_ratio": 1000}


def lookup_site(site: Any, keyset: Any, versions: list[str], *, probation: dict[str, Any] | None = None,
                **model: Any) -> Any:
    for v in versions:
        site.install(pack_version(keyset, v), activate=(v == versions[0]))
    site.models = [{"name": MODEL, "runtime": "onnxruntime", "threads": 1, "max_batch_size": 0,
                    "probation": probation or FAST_PROBATION, **model}]
    site.extra = {"audit": {"path": str(site.root / "audit.log")}}
    return site


def admin(d: DaemonProcess, action: str = "", doc: dict[str, Any] | None = None) -> Any:
    path = f"/admin/models/{MODEL}" + (f"/{action}" if action else "")
    return request(d.url + path, "POST" if action else "GET", doc if doc is not None else None)


def metric(d: DaemonProcess, prefix: str) -> float:
    text = request(d.url + "/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def audited(site: Any) -> list[dict[str, Any]]:
    path = site.root / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Load:
    """Clients sending requests until stopped; each answer kept with when it was sent."""

    url: str
    indices: list[int] = field(default_factory=lambda: [0, 1])
    clients: int = 4
    answers: list[tuple[float, int, str | None, float | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and n < 20_000:
            n += 1
            sent = time.monotonic()
            try:
                reply = infer(self.url, MODEL, body(self.indices))
            except Exception as exc:  # kept, so the test fails saying what went wrong instead of waiting out
                with self._lock:
                    self.errors.append(repr(exc))
                return
            doc = reply.json()
            value = doc["outputs"][0]["data"][0] if reply.status == 200 else None
            with self._lock:
                self.answers.append((sent, reply.status, doc.get("model_version"), value))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def count(self) -> int:
        assert not self.errors, self.errors
        return len(self.answers)
