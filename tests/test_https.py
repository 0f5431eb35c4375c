"""HTTPS and mutual TLS on the HTTP listener: TLS 1.2 at least, client certificates that name callers, bad ones
refused at the handshake, and certificates re-read on SIGHUP without dropping an open connection."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from httpclient import request
from support.daemon import served_daemon
from support.tls import issue, make_pki

from daemon.security import add_key_to_file

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@dataclass
class Https:
    daemon: DaemonProcess
    pki: dict[str, Path]
    certs: Path
    token: str
    site: Site

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.daemon.port}"

    def context(self, client: dict[str, Path] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca"]))
        if client is not None:
            ctx.load_cert_chain(client["cert"], client["key"])
        return ctx


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[Https]:
    root = tmp_path_factory.mktemp("https")
    pki = make_pki(root / "pki")
    live = root / "live"  # the files the daemon reads: replaced in place by the reload test
    live.mkdir()
    for name in ("server", "server_key"):
        shutil.copy(pki[name], live / pki[name].name)
    (live / "server.key").chmod(0o600)
    keys_file = root / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    token = add_key_to_file(keys_file, "app", ["infer"], None)
    site = Site(root / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {
        "server": {"tls": {"enabled": True, "cert_file": str(live / "server.pem"),
                           "key": {"path": str(live / "server.key")}, "client_ca_file": str(pki["ca"])}},
        "auth": {"required": True, "keys_file": {"path": str(keys_file)}, "open_probes": "none",
                 "certificates": [{"identity": "device-17", "name": "device-17", "scopes": ["infer"]}]},
    }
    with served_daemon(site.write_config()) as proc:
        yield Https(proc, pki, root / "clients", token, site)


def test_a_mapped_client_certificate_is_a_caller(https: Https) -> None:
    device = issue(https.pki, https.certs, "device-17")
    reply = request(https.url + "/v2/models/mlp/infer", "POST", BODY, context=https.context(device))
    assert reply.status == 200
    refused = request(https.url + "/v2", context=https.context(device))  # the certificate grants infer only
    assert refused.status == 403 and "'device-17' lacks the 'read' scope" in refused.json()["error"]


def test_an_unmapped_certificate_still_needs_a_key(https: Https) -> None:
    stranger = issue(https.pki, https.certs, "stranger")
    url = https.url + "/v2/models/mlp/infer"
    assert request(url, "POST", BODY, context=https.context(stranger)).status == 401
    ok = request(url, "POST", BODY, context=https.context(stranger), headers={"Authorization": f"Bearer {https.token}"})
    assert ok.status == 200


@pytest.mark.parametrize("kind", ["none", "expired", "self-signed", "other-ca"])
def test_bad_client_certificates_fail_the_handshake(https: Https, tmp_path: Path, kind: str) -> None:
    client = {
        "none": None,
        "expired": lambda: issue(https.pki, tmp_path, "device-17", expired=True),
        "self-signed": lambda: issue(https.pki, tmp_path, "device-17", self_signed=True),
        "other-ca": lambda: issue(make_pki(tmp_path / "other"), tmp_path, "device-17"),
    }[kind]
    ctx = https.context(client() if client is not None else None)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(https.url + "/v2/models/mlp/infer", "POST", BODY, context=ctx, check=False)
    device = issue(https.pki, tmp_path / "good", "device-17")
    assert request(https.url + "/v2/models/mlp/infer", "POST", BODY, context=https.context(device)).status == 200


def test_old_tls_and_plaintext_are_refused(https: Https) -> None:
    device = issue(https.pki, https.certs, "device-17")
    old = https.context(device)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():  # TLS 1.1 is deprecated in Python too: asking for it is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(https.url + "/v2/models/mlp/infer", "POST", BODY, context=old, check=False)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain_get(https.daemon.port, "/v2/health/live")


def plain_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def test_sighup_rereads_the_certificate_and_keeps_open_connections(https: Https, tmp_path: Path) -> None:
    device = issue(https.pki, https.certs, "device-17")
    kept = http.client.HTTPSConnection("127.0.0.1", https.daemon.port, timeout=10, context=https.context(device))
    try:
        kept.request("GET", "/v2/models/mlp/ready", headers={"Authorization": f"Bearer {https.token}"})
        assert kept.getresponse().read() is not None
        before = kept.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        fresh = make_pki(tmp_path / "renewed", cn="renewed-ca")  # a new server certificate from another trusted CA
        live = Path(https.site.extra["server"]["tls"]["cert_file"]).parent
        (live / "server.pem").write_bytes(fresh["server"].read_bytes())
        (live / "server.key").write_bytes(fresh["server_key"].read_bytes())
        os.kill(https.daemon.proc.pid, signal.SIGHUP)
        https.daemon.wait_for_event("reload: HTTPS certificate re-read", timeout=30)
        renewed = https.context(device)
        renewed.load_verify_locations(cafile=str(fresh["ca"]))
        after = http.client.HTTPSConnection("127.0.0.1", https.daemon.port, timeout=10, context=renewed)
        try:
            after.request("GET", "/v2/health/live", headers={"Authorization": f"Bearer {https.token}"})
            after.getresponse().read()
            assert after.sock.getpeercert(binary_form=True) != before  # type: ignore[union-attr]
        finally:
            after.close()
        kept.request("POST", "/v2/models/mlp/infer", body=b'{"inputs": [{"name": "input", "shape": [1, 4], '
                     b'"datatype": "FP32", "data": [1, 2, 3, 4]}]}', headers={"Authorization": f"Bearer {https.token}"})
        assert kept.getresponse().status == 200  # the connection opened before the reload still serves
    finally:
        kept.close()
