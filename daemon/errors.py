"""The daemon's error hierarchy.

Each error carries a transport-neutral ``code``; the HTTP and MQTT frontends each map codes to their own status in
one table. Domain code raises these and never imports a transport library.
"""

from __future__ import annotations


class InferdError(Exception):
    """Base class: ``str(err)`` is the message a client or operator sees."""

    code = "internal"


class ConfigError(InferdError):
    code = "config"


class InvalidInput(InferdError):
    """The request is malformed or does not match the model's inputs."""

    code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    code = "too_large"


class ModelNotFound(InferdError):
    code = "model_not_found"


class VersionNotFound(ModelNotFound):
    code = "version_not_found"


class NotReady(InferdError):
    """The model exists but cannot serve now (loading, failed to load, or the daemon is draining)."""

    code = "not_ready"


class Busy(InferdError):
    """Load shedding: the model's queue is full; the client should retry later."""

    code = "busy"


class Timeout(InferdError):
    code = "timeout"


class RequestTimeout(InvalidInput):
    """The client did not send its request in the time allowed (a slow or stalled sender): HTTP 408."""

    code = "request_timeout"


class InferenceFailed(InferdError):
    """The runtime raised while running a request that passed validation."""

    code = "inference_failed"


class NonFiniteOutput(InferenceFailed):
    """An output holds NaN or infinity, which JSON cannot carry: the model's fault unless the caller sent them."""


class IntegrityError(InferdError):
    """An artifact failed authentication, decryption or signature checks."""

    code = "integrity"


class SmokeTestFailed(InferdError):
    """A version did not reproduce the reference outputs packed in its artifact: it must not serve."""

    code = "smoke_test_failed"


class ArtifactMismatch(InferdError):
    """The store entry or the config disagrees with the artifact: another model, version or runtime inside."""

    code = "artifact_mismatch"


class LoadFailed(InferdError):
    """A runtime refused to load a version (its message says why); the version is not served."""

    code = "load_failed"


class KeyProblem(InferdError):
    """A key is missing, unreadable, malformed or too widely readable."""

    code = "key"


class StoreError(InferdError):
    code = "store"


# --- artifact checks (daemon/artifact.py raises these; each kind of tampering has its own) ---------------------


class ArtifactFormatError(IntegrityError):
    """Not an artifact, an unknown format version, or a malformed header."""


class UnknownKeyId(KeyProblem):
    """The header names a KEK id that is not configured."""


class WrongKey(IntegrityError):
    """The configured KEK with the header's id does not unwrap the data key."""


class HeaderTampered(IntegrityError):
    pass


class ChunkTampered(IntegrityError):
    pass


class Truncated(IntegrityError):
    pass


class SignatureInvalid(IntegrityError):
    pass


class UntrustedSigner(IntegrityError):
    pass
