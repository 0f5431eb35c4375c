"""How one model version is queued, batched and timed out: the scheduler's settings, in seconds.

Defaults live in one place, the model config (daemon/config.py): a ``BatchPolicy()`` built without arguments has
exactly the settings a model configured with nothing gets, so a test that does not say otherwise runs what
production runs. Both go through one conversion (:func:`_settings`), and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from daemon.config import ModelConfig, OnnxModelConfig


def _settings(model: Any) -> dict[str, Any]:
    """A model config's scheduling fields as BatchPolicy's: milliseconds to seconds, 0 ms of timeout to none."""
    return {
        "max_batch_size": model.max_batch_size,
        "max_queue_delay_s": model.max_queue_delay_ms / 1000,
        "preferred_batch_sizes": tuple(model.preferred_batch_sizes),
        "queue_size": model.queue_size,
        "timeout_s": model.timeout_ms / 1000 if model.timeout_ms else None,
        "inline_max_s": model.inline_max_ms / 1000,
        "max_queue_wait_s": None if model.max_queue_wait_ms is None else model.max_queue_wait_ms / 1000,
        "queue_max_bytes": model.queue_max_bytes,
    }


# every runtime's config shares these fields and their defaults (config.py's _ModelBase)
_DEFAULTS = _settings(SimpleNamespace(**{
    name: field.get_default(call_default_factory=True) for name, field in OnnxModelConfig.model_fields.items()
}))


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = _DEFAULTS["max_batch_size"]  # most rows in one execution; 0 or 1: no batching
    max_queue_delay_s: float = _DEFAULTS["max_queue_delay_s"]  # how long a short batch waits for company
    preferred_batch_sizes: tuple[int, ...] = _DEFAULTS["preferred_batch_sizes"]  # sizes sent without waiting
    queue_size: int = _DEFAULTS["queue_size"]  # requests that may wait; beyond it they are refused
    timeout_s: float | None = _DEFAULTS["timeout_s"]  # longest wait in the queue; None: no limit
    inline_max_s: float = _DEFAULTS["inline_max_s"]  # runs estimated below this go on the event loop (0: never)
    max_queue_wait_s: float | None = _DEFAULTS["max_queue_wait_s"]  # admission's default deadline; None: derived
    queue_max_bytes: int = _DEFAULTS["queue_max_bytes"]  # tensor bytes that may wait in the queue

    @classmethod
    def from_config(cls, model: ModelConfig) -> BatchPolicy:
        return cls(**_settings(model))
