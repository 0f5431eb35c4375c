"""The KServe V2 gRPC frontend (``inference.GRPCInferenceService``) on grpcio's asyncio server, in the daemon's loop.

The message classes and the servicer base come from tritonclient's generated ``service_pb2``/``service_pb2_grpc``
(a maintained package and a superset of KServe's service), so stock Triton and KServe clients work unchanged. Every
inference takes the one path HTTP takes (:func:`daemon.service.admit` + :func:`daemon.service.call`), decoded by
:mod:`daemon.grpc_codec` with protocol's checks; errors leave through the one table below. This module is imported
only when ``grpc.enabled`` is set: grpcio and protobuf are not free to import.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import unquote

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

import daemon
from daemon import grpc_codec, grpc_tls, responses, service
from daemon.access import Guard, Route
from daemon.admission import retry_after_s
from daemon.config_frontends import GrpcConfig
from daemon.context import Activity, RequestContext
from daemon.errors import Busy, InferdError, NotReady
from daemon.frontend import Health, Readiness
from daemon.http_info import SERVER_NAME
from daemon.model_config import triton_model_config
from daemon.models import ModelManager
from daemon.protocol import Limits, tensor_metadata
from daemon.security import Caller

log = logging.getLogger("inferd.grpc")

#: transport-neutral error code -> gRPC status; the only place gRPC statuses for domain errors are chosen.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "model_not_found": grpc.StatusCode.NOT_FOUND,
    "version_not_found": grpc.StatusCode.NOT_FOUND,
    "not_ready": grpc.StatusCode.UNAVAILABLE,
    "busy": grpc.StatusCode.UNAVAILABLE,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
}
#: not ``model_repository``: its RPCs are UNIMPLEMENTED here (the repository extension is served over HTTP)
EXTENSIONS: list[str] = ["statistics", "model_configuration"]
#: the trailing metadata key of a shed client's retry hint: gRPC's server pushback (gRFC A6), honoured by clients
#: with a retry policy; its value is the predicted time for the queue to drain, in milliseconds (at least 1)
RETRY_PUSHBACK = "grpc-retry-pushback-ms"
#: what calls still running when the drain budget is spent get before grpcio cancels them
STOP_GRACE_S = 0.5
#: at most this much of a caller's deadline is kept back to answer in (see :func:`deadline`)
DEADLINE_MARGIN_S = 0.05
#: RPCs of Triton's service inferd does not serve (yet): each answers UNIMPLEMENTED naming itself
UNIMPLEMENTED = (
    "ModelStreamInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
)


async def _fail(context: grpc.aio.ServicerContext, exc: InferdError) -> NoReturn:
    code = GRPC_STATUS.get(exc.code, grpc.StatusCode.INTERNAL)
    if code is grpc.StatusCode.INTERNAL:
        log.error("gRPC request failed: %s", exc)
    if isinstance(exc, Busy):
        context.set_trailing_metadata(((RETRY_PUSHBACK, str(max(1, math.ceil(retry_after_s(exc) * 1000)))),))
    await context.abort(code, str(exc))
    raise AssertionError("grpc.aio's abort raises")  # for the type checker: abort is not typed NoReturn


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's gRPC deadline as the request's (time.monotonic()), a little early: the caller's own timer runs
    out first (its deadline was set before the request travelled), so a request that expires in the queue is
    answered with the daemon's DEADLINE_EXCEEDED, which says where the time went, before the caller gives up."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining - min(DEADLINE_MARGIN_S, remaining * 0.1))


def _version(value: str) -> str | None:
    return value or None  # protobuf's empty string is "no version given": the active one


#: the scope each RPC needs, as HTTP's routes do (daemon/http_api.py ROUTES; docs/grpc.md lists them)
GRPC_ROUTES: dict[str, Route] = {
    "ServerLive": Route("health", "ServerLive", probe=True),
    "ServerReady": Route("health", "ServerReady", probe=True),
    "ServerMetadata": Route("read", "ServerMetadata"),
    "ModelReady": Route("health", "ModelReady"),
    "ModelMetadata": Route("read", "ModelMetadata"),
    "ModelConfig": Route("read", "ModelConfig"),
    "ModelStatistics": Route("read", "ModelStatistics"),
    "ModelInfer": Route("infer", "ModelInfer"),
}


def peer_host(peer: str) -> str | None:
    """grpc's ``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` (brackets sometimes percent-encoded) -> the address
    (``unix:...`` and others: None)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return None


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, manager: ModelManager, limits: Limits, readiness: Readiness, activity: Activity,
                 guard: Guard | None = None) -> None:
        self.manager = manager
        self.limits = limits
        self.readiness = readiness
        self.activity = activity
        self.guard = guard  # replaced by a reload that re-reads the keys (daemon/access.py reload_section)

    async def _allow(self, context: grpc.aio.ServicerContext, rpc: str, model: str | None) -> Caller | None:
        """UNAUTHENTICATED / PERMISSION_DENIED unless the call's ``authorization`` metadata (or its client
        certificate) grants the RPC's scope; None when auth is off."""
        guard = self.guard
        if guard is None or not guard.required:
            return None
        authorization = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        try:
            return guard.check(GRPC_ROUTES[rpc], model or None, authorization if isinstance(authorization, str)
                               else None, peer_host(context.peer()), "grpc", grpc_tls.certificate_ids(context))
        except InferdError as exc:
            await _fail(context, exc)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 - gRPC names
        await self._allow(context, "ServerLive", None)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._allow(context, "ServerReady", None)
        return service_pb2.ServerReadyResponse(ready=not self.readiness.reasons())

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._allow(context, "ServerMetadata", None)
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=daemon.__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Not ready is an answer (ready=false), as Triton gives it; an unknown model or version is NOT_FOUND."""
        await self._allow(context, "ModelReady", request.name)
        try:
            self.manager.entry(request.name)
            self.manager.lookup(request.name, _version(request.version))
        except NotReady:
            return service_pb2.ModelReadyResponse(ready=False)
        except InferdError as exc:
            await _fail(context, exc)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._allow(context, "ModelMetadata", request.name)
        try:
            loaded = self.manager.lookup(request.name, _version(request.version))
            versions = self.manager.serving(request.name)
        except InferdError as exc:
            await _fail(context, exc)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=request.name, versions=versions, platform=loaded.platform,
            inputs=[tensor(**t) for t in tensor_metadata(loaded.session.inputs)],
            outputs=[tensor(**t) for t in tensor_metadata(loaded.session.outputs)],
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Triton's model configuration, the document HTTP's config route gives, for ``get_model_config()``."""
        await self._allow(context, "ModelConfig", request.name)
        try:
            loaded = self.manager.lookup(request.name, _version(request.version))
            doc = triton_model_config(loaded, self.manager.entry(request.name).config)
        except InferdError as exc:
            await _fail(context, exc)
        config = json_format.ParseDict(doc, model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """The counters HTTP's stats route gives: every loaded version, or those of one model (and version)."""
        caller = await self._allow(context, "ModelStatistics", request.name)
        manager = self.manager
        try:
            if not request.name:  # a key limited to some models sees only theirs
                stats = [s for s in manager.all_stats()
                         if caller is None or caller.models is None or s.model in caller.models]
            else:
                version = _version(request.version)
                entry = manager.entry(request.name)
                if version is not None:
                    manager.lookup(request.name, version)  # NOT_FOUND for a version that is not loaded
                stats = [v.stats for v in entry.versions.values() if version is None or v.version == version]
        except InferdError as exc:
            await _fail(context, exc)
        return json_format.ParseDict({"model_stats": [s.triton_stats() for s in stats]},
                                     service_pb2.ModelStatisticsResponse())

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        caller = await self._allow(context, "ModelInfer", request.model_name)
        self.activity.enter()
        try:
            if self.readiness.draining:  # a retryable refusal while accepted calls finish (see GrpcFrontend.stop)
                raise NotReady("server is shutting down")
            ctx = RequestContext("grpc", self.activity, peer=context.peer(), deadline=deadline(context),
                                 identity=caller.name if caller is not None else None)
            loaded = service.admit(self.manager, request.model_name, _version(request.model_version), ctx)
            async with service.call(loaded, ctx) as call:
                session = loaded.session
                decoded = grpc_codec.decode_infer(request, session.inputs, session.outputs, self.limits)
                results = await call.run(decoded)
                built = responses.build_response(loaded.name, loaded.version, decoded, results)
                return grpc_codec.encode_infer(built, service_pb2)
        except InferdError as exc:
            await _fail(context, exc)
        except Exception:
            log.exception("unhandled error on ModelInfer for %r", request.model_name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            self.activity.leave()


def _unimplemented(name: str) -> Any:
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"inferd does not implement {name}")
        raise AssertionError("grpc.aio's abort raises")

    handler.__name__ = name
    return handler


for _name in UNIMPLEMENTED:
    setattr(InferenceServicer, _name, _unimplemented(_name))


def server_options(cfg: GrpcConfig) -> list[tuple[str, int]]:
    """grpcio channel arguments from the config: the message bound (over it, RESOURCE_EXHAUSTED from grpcio itself)
    and keepalive. Responses are not bounded here: their size is the model's, and the client's own limit applies."""
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(cfg.keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(cfg.min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", cfg.max_ping_strikes),
        ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail to bind, not share it
    ]


class GrpcFrontend:
    name = "grpc"

    def __init__(self, cfg: GrpcConfig, servicer: InferenceServicer) -> None:
        self.cfg = cfg
        self.servicer = servicer
        self.port = cfg.port  # the configured one until start(), then the bound one (port 0 picks a free port)
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._tls_files: grpc_tls.TlsFiles | None = None  # the certificate files served now
        self._next_certificates: grpc.ServerCertificateConfiguration | None = None  # for grpcio's next handshake

    def _fetch_certificates(self) -> grpc.ServerCertificateConfiguration | None:
        """grpcio asks before every handshake (from its own thread) whether the certificates changed: the one
        supported way to re-read them without a restart; open connections keep theirs."""
        pending, self._next_certificates = self._next_certificates, None
        return pending

    def load_tls(self) -> Callable[[], str] | None:
        """SIGHUP (daemon/reload.py): the certificate files again; None when unchanged (blocking: an executor)."""
        tls = self.cfg.tls
        if not tls.enabled or self._tls_files is None:
            return None
        files = grpc_tls.certificate_files(tls)
        if files == self._tls_files:
            return None
        grpc_tls.usable(tls, files)

        def switch() -> str:
            self._tls_files, self._next_certificates = files, grpc_tls.certificates(files)
            return f"gRPC certificate re-read from {tls.cert_file}; new connections use it"

        return switch

    async def start(self) -> None:
        self._stopped.clear()
        server = grpc.aio.server(options=server_options(self.cfg))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        host = self.cfg.host
        address = f"[{host}]:{self.cfg.port}" if ":" in host else f"{host}:{self.cfg.port}"
        tls = self.cfg.tls
        try:
            if tls.enabled:
                files = await asyncio.get_running_loop().run_in_executor(None, grpc_tls.certificate_files, tls)
                self._tls_files, self._next_certificates = files, None
                creds = grpc.dynamic_ssl_server_credentials(grpc_tls.certificates(files), self._fetch_certificates,
                                                            require_client_authentication=files[2] is not None)
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio's only word for it; its log line above says why (address in use, ...)
            raise OSError(f"grpc: cannot listen on {address} (address in use or not available)") from None
        await server.start()
        self._server = server
        scheme = ("mutual TLS" if tls.client_ca_file else "TLS") if tls.enabled else "plaintext"
        log.info("gRPC listening on %s:%d (%s)", host, self.port, scheme,
                 extra={"event_kind": "grpc_listening", "port": self.port})

    async def run(self) -> None:
        """grpcio serves from its own tasks; this only marks the frontend's lifetime for the supervisor."""
        await self._stopped.wait()

    async def stop(self, budget: float) -> None:
        """Stop taking work at once, let accepted calls finish within ``budget``, then close the listener.

        While the daemon drains, the servicer answers new calls UNAVAILABLE ("server is shutting down"), which
        clients may retry elsewhere. grpcio's own stop comes last, once the accepted calls are done or the budget is
        spent: from the moment it runs, calls arriving on open connections are cancelled (CANCELLED, which clients do
        not retry), and calls still running get STOP_GRACE_S before they are."""
        server, self._server = self._server, None
        if server is not None:
            activity = self.servicer.activity
            if activity.in_progress:
                await activity.wait_idle(budget)  # HTTP's stop logs the drain and its time-out for every frontend
            await server.stop(STOP_GRACE_S)
        self._stopped.set()

    def health(self) -> Health:
        return Health("listening" if self._server is not None else "stopped", True)


def from_config(cfg: GrpcConfig, manager: ModelManager, limits: Limits, readiness: Readiness,
                activity: Activity, guard: Guard | None = None) -> GrpcFrontend:
    return GrpcFrontend(cfg, InferenceServicer(manager, limits, readiness, activity, guard))
