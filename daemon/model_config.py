"""Triton's model-configuration document for a loaded version (``GET /v2/models/{m}[/versions/{v}]/config``).

Triton clients call ``get_model_config()`` before their first request to learn the batch dimension and the tensors;
without this route they stop at a 404. inferd has no config.pbtxt, so the document is built from what the daemon
actually runs: the session's tensors, the scheduler's batching decision and the model's config.
"""

from __future__ import annotations

from typing import Any

from adapters.base import TensorSpec
from daemon.config import ModelConfig
from daemon.models import LoadedVersion


def _tensors(specs: list[TensorSpec], batched: bool) -> list[dict[str, Any]]:
    """Triton leaves the batch dimension out of ``dims`` when the model batches (max_batch_size > 0)."""
    return [
        {"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape[1:] if batched else s.shape)}
        for s in specs
    ]


def triton_model_config(loaded: LoadedVersion, cfg: ModelConfig) -> dict[str, Any]:
    batched = loaded.scheduler.batching
    device = loaded.session.device
    doc: dict[str, Any] = {
        "name": loaded.name,
        "platform": loaded.platform,
        "backend": loaded.runtime,
        "max_batch_size": cfg.max_batch_size if batched else 0,
        "input": _tensors(loaded.session.inputs, batched),
        "output": _tensors(loaded.session.outputs, batched),
        "instance_group": [
            {
                "name": f"{loaded.name}_0",
                "kind": "KIND_CPU" if device == "cpu" else "KIND_GPU",
                "count": loaded.scheduler.workers,
            }
        ],
        "parameters": {
            key: {"string_value": str(value)}
            for key, value in (("version", loaded.version), ("device", device), ("threads", loaded.threads))
        },
    }
    if batched:
        doc["dynamic_batching"] = {
            "preferred_batch_size": list(cfg.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(round(cfg.max_queue_delay_ms * 1000)),
        }
    return doc
