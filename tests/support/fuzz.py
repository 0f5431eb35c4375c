"""What both fuzz passes share (tests/test_fuzz.py, and tests/test_fuzz_auth.py with auth on): the seeded settings,
the operations generated from docs/openapi.yaml, and the pass condition every case must meet."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from contract import OPENAPI
from httpclient import Reply
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("INFERD_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
#: what a response body must never show: the server's insides
LEAKS = ("Traceback", 'File "', str(REPO), "site-packages", ".py\"", "daemon/", "adapters/", "onnxruntime_src", ".cc:")

tried: Counter[str] = Counter()
statuses: Counter[int] = Counter()


def sane(reply: Reply, kind: str) -> Reply:
    """The pass condition every case shares (the contract check already ran in the client)."""
    tried[kind] += 1
    statuses[reply.status] += 1
    assert reply.status < 500 or reply.status in (503, 504), (reply.status, reply.body[:300])
    text = reply.body.decode("utf-8", "replace")
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} in a response body: {text[:300]}"
    return reply


def _operations() -> list[Any]:
    import schemathesis

    schema = schemathesis.openapi.from_path(str(OPENAPI))
    return [op.ok() for op in schema.get_all_operations()]


OPERATIONS = _operations()
