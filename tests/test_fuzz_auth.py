"""The contract's fuzz pass with auth on: generated requests for every documented operation, each with an
Authorization header that is missing, good, good but lacking the scope, or hostile (malformed, oversized, another
scheme, a token of the right shape that nobody holds). Pass: a good key with the scope is never refused by auth;
anything else gets 401 (with WWW-Authenticate) or 403, never a 5xx; every body matches docs/openapi.yaml (the
client checks it); the daemon stays live and correct. ``make fuzz`` runs it long with the rest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from httpclient import request
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.core import NotSet
from support.daemon import served_daemon
from support.fuzz import FUZZ, OPERATIONS, sane

from daemon import http_api
from daemon.security import add_key_to_file


@dataclass
class Secured:
    daemon: DaemonProcess
    full: str  # every scope but admin, for the mlp model only
    metrics_only: str


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("fuzz-auth")
    keys_file = root / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    full = add_key_to_file(keys_file, "full", ["health", "read", "infer", "metrics"], ["mlp"])
    metrics_only = add_key_to_file(keys_file, "scraper", ["metrics"], None)
    site = Site(root / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx, name="mlp", version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"server": {"max_body_bytes": 64 * 1024},
                  "auth": {"required": True, "keys_file": {"path": str(keys_file)}, "open_probes": "none"}}
    with served_daemon(site.write_config()) as daemon:
        yield Secured(daemon, full, metrics_only)


HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120)


def authorizations(s: Secured) -> st.SearchStrategy[tuple[str, str | None]]:
    token_shaped = st.builds(lambda i, sec: f"Bearer ifd_{i}_{sec}", st.text("0123456789abcdef", min_size=12,
                             max_size=12), st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                                                   min_size=43, max_size=43))
    return st.one_of(
        st.just(("none", None)),
        st.just(("good", f"Bearer {s.full}")),
        st.just(("scope", f"Bearer {s.metrics_only}")),
        token_shaped.map(lambda v: ("bad", v)),
        HEADER_TEXT.map(lambda v: ("bad", v)),
        HEADER_TEXT.map(lambda v: ("bad", f"Bearer {v}")),
        st.integers(600, 7000).map(lambda n: ("bad", "Bearer " + "A" * n)),
        st.just(("bad", "Basic dXNlcjpwYXNz")),
        st.just(("bad", f"Bearer {s.full[:-1]}")),  # one character short of the good key
    )


def test_generated_requests_with_every_kind_of_credential(secured: Secured) -> None:
    cases = st.sampled_from(OPERATIONS).flatmap(lambda op: op.as_strategy().map(lambda case: (op, case)))

    @FUZZ
    @given(pair=cases, auth=authorizations(secured), model=st.sampled_from(["mlp", "other"]))
    def run(pair: tuple[Any, Any], auth: tuple[str, str | None], model: str) -> None:
        operation, case = pair
        params = {k: quote(str(v), safe="") for k, v in (case.path_parameters or {}).items()}
        if "model" in params:
            params["model"] = model
        if "version" in params:
            params["version"] = "1"
        path = operation.path.format(**params)
        headers = {k: str(v) for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        kind, value = auth
        if value is not None:
            headers["Authorization"] = value
        body: bytes | str | None = None
        if case.method.upper() == "POST" and case.media_type and not isinstance(case.body, NotSet):  # no body
            body = json.dumps(case.body) if case.media_type == "application/json" else (
                case.body if isinstance(case.body, bytes) else str(case.body or "").encode())
            headers["Content-Type"] = case.media_type
        reply = sane(request(secured.daemon.url + path, case.method.upper(), body, headers=headers), f"auth-{kind}")
        handler, _ = http_api.HttpApi._route(case.method.upper(), path)
        scope = http_api.ROUTES[handler].scope
        if kind == "good" and scope == "admin":  # the fuzzing key holds every scope but admin
            assert reply.status == 403 and "lacks the 'admin' scope" in reply.json()["error"]
        elif kind == "good" and (model == "mlp" or "{model}" not in operation.path):
            assert reply.status not in (401, 403), reply.body[:200]
        elif kind == "good":  # the key is limited to mlp
            assert reply.status == 403 and "may not use model 'other'" in reply.json()["error"], reply.body[:200]
        elif kind in ("none", "bad"):
            assert reply.status in (400, 401), (kind, value and value[:40], reply.status, reply.body[:200])
            if reply.status == 401:
                assert reply.headers["www-authenticate"].startswith('Bearer realm="inferd"')
        elif kind == "scope" and scope != "metrics":
            assert reply.status == 403 and f"lacks the {scope!r} scope" in reply.json()["error"]

    run()
    assert request(secured.daemon.url + "/v2/models/mlp/ready",
                   headers={"Authorization": f"Bearer {secured.full}"}).status == 200
