"""YAML configuration -> typed, frozen, validated objects.

Every default lives here (config.example.yaml mirrors them; a test keeps the two in step). Validation happens once at
start-up; errors name the key path, the bad value and what was expected, and suggest a fix (the closest key for
typos, quotes for numbers; see :mod:`daemon.config_errors`). No I/O happens inside the models: key files are read
later, by :mod:`daemon.keys`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from adapters.base import SessionOptions
from daemon.config_base import NAME_PATTERN, RESERVED_MODEL_NAMES, ConfigPath, KeySource, _Model, resolve_path
from daemon.config_errors import describe
from daemon.config_frontends import GrpcConfig, MqttConfig
from daemon.config_registry import RegistryConfig
from daemon.config_security import AuditConfig, AuthConfig, ClientLimits, HttpTlsConfig
from daemon.config_updates import ProbationConfig, UpdatesConfig, VersionPolicy
from daemon.errors import ConfigError

WarmupInputs = Union[dict[str, tuple[int, ...]], Path]  # noqa: UP007


def _keyed_error(message: str, at: str = "") -> PydanticCustomError:
    """An error whose text is ours alone, reported at its key path extended by ``at`` (``.input``,
    ``models[1].name``): validators of a whole mapping or model would otherwise be reported at the mapping."""
    return PydanticCustomError("keyed", message, {"at": at})


def _warmup_error(message: str, at: str = "") -> PydanticCustomError:
    return _keyed_error(message, f".{at}" if at else "")


def _check_warmup(value: Any, info: ValidationInfo) -> WarmupInputs | None:
    """Shapes or a .npz path, told apart by type, each with its own precise error (a pydantic union would report
    every member's complaint at once)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        path = Path(value)
        if path.suffix != ".npz":
            raise _warmup_error(f"{str(value)!r} is not a .npz file (numpy.savez writes one, arrays by input name)")
        return resolve_path(path, info)
    if isinstance(value, dict):
        if not value:
            raise _warmup_error("name at least one input and its shape")
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in value.items():
            if not isinstance(name, str):
                raise _warmup_error(f"input names are strings, not {name!r}")
            if not isinstance(shape, (list, tuple)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise _warmup_error(
                    f"the shape must be a list of non-negative integers (e.g. [1, 16000]), not {shape!r}", name
                )
            shapes[name] = tuple(shape)
        return shapes
    raise _warmup_error(f"give input shapes (e.g. {{input: [1, 16000]}}) or the path of a .npz file, not {value!r}")


class ServerConfig(_Model):
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on; loopback unless you mean it.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 picks a free port, printed at start-up).")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    max_tensor_elements: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest number of elements in one request tensor."
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish before exit."
    )
    access_log: bool = Field(
        False, description="Log one JSON line per HTTP request (method, path, status, duration, sizes, peer; never "
        "a body or a header) to the daemon's log."
    )
    queue_max_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Bytes of decoded tensors that may wait in all the models' queues "
        "together; beyond it requests are refused (HTTP 503), see docs/overload.md.",
    )
    tls: HttpTlsConfig = Field(default_factory=HttpTlsConfig)
    limits: ClientLimits = Field(default_factory=ClientLimits)


class KeysConfig(_Model):
    kek: list[KeySource] = Field(
        default_factory=list,
        description="Key-encryption keys; several may be listed (rotation): an artifact's key id picks one.",
    )
    signers: list[KeySource] = Field(
        default_factory=list, description="Trusted Ed25519 public keys (PEM) that may sign artifacts."
    )
    require_signature: bool = Field(
        True, description="Refuse artifacts whose signer is not listed in 'signers'."
    )


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: key=value on a terminal, JSON otherwise (journald, files)."
    )


class _ModelBase(_Model):
    name: str = Field(pattern=NAME_PATTERN, description="Model name, as used in URLs and topics.")
    device: Literal["cpu", "gpu", "auto"] = Field(
        "cpu", description="cpu, gpu, or auto (a usable GPU if present, else the CPU)."
    )
    fallback: bool = Field(
        True, description="With device gpu and no usable GPU: run on the CPU with a warning (false: refuse)."
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Inference precision.")
    threads: int = Field(
        0, ge=0, description="Threads one inference may use (0: the usable CPUs shared among the models)."
    )
    workers: int = Field(1, ge=1, le=64, description="Inferences of this model that may run at once.")
    version: str | None = Field(
        None, pattern=NAME_PATTERN, description="Pin this version; default: the store's active version."
    )
    channel: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="The registry channel this model follows "
        "(null: registry.default_channel); a model with a pinned 'version' follows none.",
    )
    max_batch_size: int = Field(
        32, ge=0, le=4096,
        description="Dynamic batching: most rows in one execution (0 or 1: off; needs a dynamic first dimension).",
    )
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=1000,
        description="How long a batch may wait for more requests (0: batch only what is already queued).",
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="Batch sizes to dispatch at once, without waiting out the delay."
    )
    queue_size: int = Field(
        256, ge=1, description="Requests that may wait for this model; beyond it they are refused (HTTP 503)."
    )
    timeout_ms: float = Field(
        0.0, ge=0, description="Default time a request may wait in the queue (0: no limit); per request: "
        "parameters.timeout_ms."
    )
    max_queue_wait_ms: float | None = Field(
        None, ge=0, description="Admission: a request whose predicted wait in the queue exceeds this (or its own "
        "shorter timeout) is refused at once (null: 1.5 measured full batches, at least 50 ms; 0: only a request's "
        "own timeout), see docs/overload.md.",
    )
    queue_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Bytes of decoded tensors that may wait in this model's queue; beyond "
        "it requests are refused (HTTP 503).",
    )
    inline_max_ms: float = Field(
        0.5, ge=0, le=10,
        description="For a lone sequential client, runs measured faster than this execute on the event loop "
        "instead of a worker thread, saving two thread hand-offs (0: always a worker).",
    )
    probation: ProbationConfig | None = Field(
        None, description="This model's probation after an update (null: updates.probation).")
    allow_breaking: bool = Field(
        False, description="Accept an update whose inputs or outputs differ from the active version's.")
    version_policy: VersionPolicy = Field(
        default_factory=VersionPolicy, description="Which installed versions are loaded (default: the active one).")
    warmup: Annotated[WarmupInputs | None, PlainValidator(_check_warmup)] = Field(
        None, description="Warm-up inputs: shapes per input name (zero-filled), or a .npz of arrays by input name. "
        "Used instead of the synthetic guess; a failure fails the load (null: the smoke test, else a guess).",
    )

    # Each runtime's config class maps its own options: nothing above adapters/ knows a runtime's option names.
    def session_options(self, threads: int) -> SessionOptions:
        """The runtime-neutral options for one load, runtime-specific settings in ``extra``."""
        return SessionOptions(device=self.device, fallback=self.fallback, threads=threads,
                              inter_op_threads=self._inter_op_threads(), precision=self.precision,
                              workers=self.workers, extra=self._runtime_extra())

    def threads_in_use(self, threads: int) -> int:
        """Threads this model may run at once with ``threads`` per inference (for the start-up budget check)."""
        return threads * self.workers

    def _inter_op_threads(self) -> int:
        return 1

    def _runtime_extra(self) -> dict[str, Any]:
        return {}


class OnnxModelConfig(_ModelBase):
    runtime: Literal["onnxruntime"]
    inter_op_threads: int = Field(1, ge=1, description="ONNX Runtime inter-op threads (parallel branches).")
    session_config: dict[str, str] = Field(
        default_factory=dict, description="Extra ONNX Runtime session config entries (advanced)."
    )

    def _inter_op_threads(self) -> int:
        return self.inter_op_threads

    def _runtime_extra(self) -> dict[str, Any]:
        return dict(self.session_config)


class OpenVinoModelConfig(_ModelBase):
    runtime: Literal["openvino"]
    performance_hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = Field(
        "LATENCY", description="OpenVINO PERFORMANCE_HINT: LATENCY for one request at a time, THROUGHPUT for many."
    )
    num_streams: int | Literal["AUTO"] | None = Field(
        None, description="OpenVINO NUM_STREAMS (parallel inference streams); null: as the hint decides."
    )
    properties: dict[str, str] = Field(
        default_factory=dict, description="Extra OpenVINO compile properties (advanced; CACHE_DIR is refused)."
    )

    def threads_in_use(self, threads: int) -> int:
        return threads  # INFERENCE_NUM_THREADS bounds the whole compiled model, all streams together

    def _runtime_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"performance_hint": self.performance_hint, **self.properties}
        if self.num_streams is not None:
            extra["num_streams"] = self.num_streams
        return extra

    @model_validator(mode="after")
    def _positive_streams(self) -> OpenVinoModelConfig:
        if isinstance(self.num_streams, int) and self.num_streams < 1:
            raise ValueError("num_streams must be a positive integer, 'AUTO' or null")
        return self


class LiteRtModelConfig(_ModelBase):
    runtime: Literal["litert"]
    precision: Literal["fp32"] = Field("fp32", description="LiteRT serves models at the precision they were built in.")


ModelConfig = Annotated[
    Union[OnnxModelConfig, OpenVinoModelConfig, LiteRtModelConfig], Field(discriminator="runtime")  # noqa: UP007
]


class Config(_Model):
    node_id: str | None = Field(
        None, pattern=NAME_PATTERN, description="This daemon's name in logs and MQTT topics (default: hostname)."
    )
    state_dir: ConfigPath = Field(
        Path("/var/lib/inferd"), description="Model store and state journals (artifacts stay encrypted here)."
    )
    server: ServerConfig = Field(default_factory=ServerConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)
    models: list[ModelConfig] = Field(default_factory=list, description="The models this daemon serves.")

    @model_validator(mode="after")
    def _unique_models(self) -> Config:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.name in RESERVED_MODEL_NAMES:
                raise _keyed_error(f"{m.name!r} is reserved ({RESERVED_MODEL_NAMES[m.name]}): choose another model "
                                   "name", f"models[{i}].name")
            if m.name in seen:
                raise _keyed_error(f"model {m.name!r} is listed twice (also models[{seen[m.name]}])",
                                   f"models[{i}].name")
            seen[m.name] = i
        return self

    @model_validator(mode="after")
    def _keys_apart_from_the_store(self) -> Config:
        """Key files must not sit in the model store or below it: a copy, backup or clean-up of the store would take
        the keys with it. A store inside a folder that holds a key is allowed (a flat working folder with the key,
        the config and ``state/``): copying the store then takes no key. Paths are compared as written (made
        absolute against the config's folder), without touching the disk; credentials are not paths."""
        state = Path(os.path.normpath(self.state_dir))
        sources = [(f"keys.{group}[{i}]", k.path) for group in ("kek", "signers")
                   for i, k in enumerate(getattr(self.keys, group))]
        for where, path in sources:
            if path is None:
                continue
            folder = Path(os.path.normpath(path)).parent
            if folder == state:
                relation = "is the folder of"
            elif state in folder.parents:
                relation = "contains the folder of"
            else:
                continue
            raise _keyed_error(
                f"{str(state)!r} {relation} {where} ({path}): keep keys apart from the model store (a folder of "
                "their own, or systemd credentials)", "state_dir")
        return self


def parse_config(data: Any, base_dir: Path | None = None, source: str = "config") -> Config:
    """Validate already-parsed YAML; raises ConfigError with one line per problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = [describe(err, Config) for err in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    return parse_config(data, base_dir=p.parent.resolve(), source=str(p))
