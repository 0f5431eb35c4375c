"""Every metric inferd exports, defined in one place, plus the counters the statistics route reads.

The request path updates plain Python counters (cheap, no locks: they are touched only from the event loop); a
custom Prometheus collector turns them into metric families at scrape time. So `/metrics` and
`/v2/models/{m}/stats` read the very same numbers.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

import daemon

#: request outcomes, as counted in inferd_requests_total{outcome=...}
OUTCOMES = ("success", "invalid", "shed", "timeout", "failed")

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: answers kept per version for probation's comparison; outcomes judged there (a caller's bad input or a shed
#: request says nothing about the version)
RECENT_MAX = 20_000
JUDGED = frozenset({"success", "failed", "timeout"})

# name -> (type, help); documented in docs/metrics.md, which a test keeps in step with this table.
METRICS: dict[str, tuple[str, str]] = {
    "inferd_requests_total": ("counter", "Inference requests by model, version, protocol and outcome."),
    "inferd_request_duration_seconds": ("histogram", "Time from request decoded to response ready."),
    "inferd_queue_duration_seconds": ("histogram", "Time a request waited in the model's queue."),
    "inferd_compute_duration_seconds": ("histogram", "Runtime time of one (batched) execution."),
    "inferd_batch_size": ("histogram", "Rows in each execution (after dynamic batching)."),
    "inferd_executions_total": ("counter", "Runtime executions (batches), by where they ran: worker or loop."),
    "inferd_queue_depth": ("gauge", "Requests waiting in the model's queue."),
    "inferd_refusals_total": (
        "counter", "Requests refused at admission, by reason: queue_full, queue_bytes, memory, wait."),
    "inferd_in_flight": ("gauge", "Requests accepted and not yet answered."),
    "inferd_model_loaded": ("gauge", "1 for each loaded model version, with its runtime and device."),
    "inferd_model_ready": ("gauge", "1 when the configured model is ready, else 0."),
    "inferd_mqtt_connected": ("gauge", "1 while connected to the MQTT broker (absent when MQTT is off)."),
    "inferd_mqtt_connects_total": ("counter", "Successful MQTT (re)connections."),
    "inferd_mqtt_dropped_total": ("counter", "QoS 0 MQTT requests dropped because too many were in progress."),
    "inferd_mqtt_unanswerable_total": (
        "counter", "MQTT requests refused unread because they name no usable reply topic."),
    "inferd_mqtt_refused_replies_total": ("counter", "MQTT replies the broker refused (ACL, quota)."),
    "inferd_build_info": ("gauge", "1, labelled with the running inferd's version."),
    "inferd_http_refusals_total": (
        "counter", "HTTP answers with an error status (4xx, 5xx), by route template and status."),
    "inferd_registry_polls_total": ("counter", "Polls of the registry's index (absent without registry.url)."),
    "inferd_registry_failures_total": (
        "counter", "Registry refusals and failures by reason (bad_signature, stale_sequence, expired, ...)."),
    "inferd_auth_refusals_total": (
        "counter", "Calls refused by authentication (unauthenticated) or authorization (forbidden), by transport."),
    "inferd_http_connections_cut_total": (
        "counter", "HTTP connections closed by the hostile-client limits: over_limit (per address or in all), "
        "too_slow (handshake or headers past server.limits.header_timeout_s)."),
    "inferd_rollbacks_total": (
        "counter", "Versions switched away from automatically or by hand, by model and reason."),
}
#: one HTTP error answer count: (route template, status, answers)
RouteRefusals = tuple[str, int, int]


class Histogram:
    """A fixed-bucket histogram: observe() is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, c in zip(self.bounds, self.counts):
            running += c
            out.append((_fmt(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _fmt(bound: float) -> str:
    return repr(float(bound))


@dataclass(slots=True)
class Duration:
    """Count and total nanoseconds, the unit of Triton's statistics extension."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class VersionStats:
    """Counters for one loaded model version: written on the request path, read only for export. What a part
    decides on (the scheduler's queue depth) is that part's own state, exported through the collector's sources."""

    model: str
    version: str
    requests: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (protocol, outcome)
    request_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    queue_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_rows: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    by_batch: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # runtime executions (batches)
    inline_runs: int = 0  # of which ran on the event loop (cheap runs, see scheduler)
    last_inference_ms: int = 0
    in_flight: int = 0
    refusals: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # admission's, by reason
    #: the latest answers as (monotonic time, error, seconds): what probation compares (daemon/updater.py)
    recent: deque[tuple[float, bool, float]] = field(default_factory=lambda: deque(maxlen=RECENT_MAX))
    #: every judged answer and error ever, unbounded: a probation's request count must not stop at RECENT_MAX
    judged: int = 0
    judged_errors: int = 0

    def request_done(self, protocol: str, outcome: str, seconds: float) -> None:
        self.requests[(protocol, outcome)] += 1
        if outcome in JUDGED:
            self.recent.append((time.monotonic(), outcome != "success", seconds))
            self.judged += 1
            self.judged_errors += outcome != "success"
        if outcome == "success":
            self.request_seconds.observe(seconds)
            self.success.add(seconds)
        else:
            self.fail.add(seconds)

    def queued(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)
        self.queue.add(seconds)

    def executed(self, rows: int, seconds: float) -> None:
        self.compute_seconds.observe(seconds)
        self.compute.add(seconds)
        self.batch_rows.observe(rows)
        self.by_batch[rows].add(seconds)
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)

    def triton_stats(self) -> dict[str, Any]:
        """This version in the shape of Triton's statistics extension (model_stats entry)."""
        zero = Duration().as_dict()
        return {
            "name": self.model,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": zero,
                "compute_infer": self.compute.as_dict(),
                "compute_output": zero,
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": zero, "compute_infer": d.as_dict(), "compute_output": zero}
                for size, d in sorted(self.by_batch.items())
            ],
        }


@dataclass(frozen=True)
class LoadedInfo:
    model: str
    version: str
    runtime: str
    device: str


#: one loaded version's queue, as its scheduler counts it: (model, version, requests waiting)
QueueDepth = tuple[str, str, int]


class InferdCollector:
    """Reads the live counters at scrape time from its sources: the VersionStats, the loaded versions, readiness,
    each scheduler's queue depth and MQTT's counters, each a callable asked at every scrape."""

    def __init__(
        self,
        stats: Callable[[], Iterable[VersionStats]],
        loaded: Callable[[], Iterable[LoadedInfo]],
        readiness: Callable[[], Iterable[tuple[str, bool]]],
        mqtt: Callable[[], dict[str, Any] | None] = lambda: None,
        queues: Callable[[], Iterable[QueueDepth]] = lambda: (),
        http_refusals: Callable[[], Iterable[RouteRefusals]] = lambda: (),
        registry: Callable[[], tuple[int, dict[str, int]] | None] = lambda: None,
        rollbacks: Callable[[], Iterable[tuple[str, str, int]]] = lambda: (),
        security: Callable[[], tuple[dict[tuple[str, str], int], dict[str, int]]] = lambda: ({}, {}),
    ) -> None:
        self._security = security  # (auth refusals by (transport, reason), HTTP connections cut by reason)
        self._http_refusals = http_refusals
        self._registry = registry  # (polls, failures by reason) of daemon/registry.py; None without a registry
        self._rollbacks = rollbacks  # (model, reason, count), from the updater
        self._stats = stats
        self._loaded = loaded
        self._readiness = readiness
        self._mqtt = mqtt
        self._queues = queues

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily; names are fixed in METRICS

    def collect(self) -> Iterator[Metric]:
        help_ = {name: text for name, (_, text) in METRICS.items()}
        req = CounterMetricFamily(
            "inferd_requests", help_["inferd_requests_total"], labels=["model", "version", "protocol", "outcome"]
        )
        hists = {
            "inferd_request_duration_seconds": HistogramMetricFamily(
                "inferd_request_duration_seconds", help_["inferd_request_duration_seconds"], labels=["model", "version"]
            ),
            "inferd_queue_duration_seconds": HistogramMetricFamily(
                "inferd_queue_duration_seconds", help_["inferd_queue_duration_seconds"], labels=["model", "version"]
            ),
            "inferd_compute_duration_seconds": HistogramMetricFamily(
                "inferd_compute_duration_seconds", help_["inferd_compute_duration_seconds"], labels=["model", "version"]
            ),
            "inferd_batch_size": HistogramMetricFamily(
                "inferd_batch_size", help_["inferd_batch_size"], labels=["model", "version"]
            ),
        }
        executions = CounterMetricFamily(
            "inferd_executions", help_["inferd_executions_total"], labels=["model", "version", "where"]
        )
        depth = GaugeMetricFamily("inferd_queue_depth", help_["inferd_queue_depth"], labels=["model", "version"])
        in_flight = GaugeMetricFamily("inferd_in_flight", help_["inferd_in_flight"], labels=["model", "version"])
        refusals = CounterMetricFamily(
            "inferd_refusals", help_["inferd_refusals_total"], labels=["model", "version", "reason"])
        for s in self._stats():
            labels = [s.model, s.version]
            for (protocol, outcome), n in sorted(s.requests.items()):
                req.add_metric([*labels, protocol, outcome], n)
            for name, h in (
                ("inferd_request_duration_seconds", s.request_seconds),
                ("inferd_queue_duration_seconds", s.queue_seconds),
                ("inferd_compute_duration_seconds", s.compute_seconds),
                ("inferd_batch_size", s.batch_rows),
            ):
                hists[name].add_metric(labels, h.cumulative(), h.total)
            executions.add_metric([*labels, "worker"], s.execution_count - s.inline_runs)
            executions.add_metric([*labels, "loop"], s.inline_runs)
            in_flight.add_metric(labels, s.in_flight)
            for reason, n in sorted(s.refusals.items()):
                refusals.add_metric([*labels, reason], n)
        for model, version, waiting in self._queues():
            depth.add_metric([model, version], waiting)
        loaded = GaugeMetricFamily(
            "inferd_model_loaded", help_["inferd_model_loaded"], labels=["model", "version", "runtime", "device"]
        )
        for info in self._loaded():
            loaded.add_metric([info.model, info.version, info.runtime, info.device], 1)
        ready = GaugeMetricFamily("inferd_model_ready", help_["inferd_model_ready"], labels=["model"])
        for model, ok in self._readiness():
            ready.add_metric([model], 1 if ok else 0)
        yield req
        yield from hists.values()
        yield executions
        yield depth
        yield in_flight
        yield refusals
        yield loaded
        yield ready
        mqtt = self._mqtt()
        if mqtt is not None:
            yield GaugeMetricFamily("inferd_mqtt_connected", help_["inferd_mqtt_connected"],
                                    value=1 if mqtt["connected"] else 0)
            yield CounterMetricFamily("inferd_mqtt_connects", help_["inferd_mqtt_connects_total"],
                                      value=mqtt["connects"])
            yield CounterMetricFamily("inferd_mqtt_dropped", help_["inferd_mqtt_dropped_total"],
                                      value=mqtt["dropped_qos0"])
            yield CounterMetricFamily("inferd_mqtt_unanswerable", help_["inferd_mqtt_unanswerable_total"],
                                      value=mqtt["unanswerable"])
            yield CounterMetricFamily("inferd_mqtt_refused_replies", help_["inferd_mqtt_refused_replies_total"],
                                      value=mqtt["refused_replies"])
        build = GaugeMetricFamily("inferd_build_info", help_["inferd_build_info"], labels=["version"])
        build.add_metric([daemon.__version__], 1)
        yield build
        http_refusals = CounterMetricFamily("inferd_http_refusals", help_["inferd_http_refusals_total"],
                                            labels=["route", "status"])
        for route, status, count in self._http_refusals():
            http_refusals.add_metric([route, str(status)], count)
        yield http_refusals
        polled = self._registry()
        if polled is not None:
            yield CounterMetricFamily("inferd_registry_polls", help_["inferd_registry_polls_total"], value=polled[0])
            failures = CounterMetricFamily("inferd_registry_failures", help_["inferd_registry_failures_total"],
                                           labels=["reason"])
            for reason, count in sorted(polled[1].items()):
                failures.add_metric([reason], count)
            yield failures
        rollbacks = CounterMetricFamily("inferd_rollbacks", help_["inferd_rollbacks_total"], labels=["model", "reason"])
        for model, reason, count in self._rollbacks():
            rollbacks.add_metric([model, reason], count)
        yield rollbacks
        auth, cut = self._security()
        refused = CounterMetricFamily("inferd_auth_refusals", help_["inferd_auth_refusals_total"],
                                      labels=["transport", "reason"])
        for (transport, reason), count in sorted(auth.items()):
            refused.add_metric([transport, reason], count)
        yield refused
        connections = CounterMetricFamily("inferd_http_connections_cut", help_["inferd_http_connections_cut_total"],
                                          labels=["reason"])
        for reason, count in sorted(cut.items()):
            connections.add_metric([reason], count)
        yield connections


@dataclass(frozen=True)
class Registries:
    """Two registries of our own (not the global one), rendered where each belongs: inferd's counters are memory the
    event loop mutates, so they are read on the loop; the process collector reads /proc files, so it runs off it."""

    inferd: CollectorRegistry
    process: CollectorRegistry


def make_registry(collector: InferdCollector) -> Registries:
    inferd = CollectorRegistry(auto_describe=False)
    inferd.register(collector)
    process = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=process)
    return Registries(inferd, process)
