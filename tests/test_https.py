"""HTTPS and mutual TLS on the HTTP listener: TLS 1.2 at least, client certificates that name callers, bad ones
refused at the handshake, and certificates re-read on SIGHUP without dropping an open connection."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DaemonProcess, KeySet, Site, pack_model
from cryptography import x509
from httpclient import request
from support.daemon import served_daemon
from support.tls import issue, make_pki

from daemon.security import add_key_to_file

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
#: callers mapped by identity, each to be matched by one kind of name only (test_each_kind_of_name_is_matched_alone)
SAN_IDENTITIES = {"dns-caller": "sensor.inferd.test", "uri-caller": "spiffe://inferd.test/sensor",
                  "email-caller": "sensor@inferd.test", "cn-caller": "cn-only-sensor", "o-caller": "plant-7",
                  "ip-caller": "10.9.8.7"}


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


def secure_site(root: Path, keyset: KeySet, mlp_onnx: bytes) -> tuple[Site, dict[str, Path], str]:
    """HTTPS with mutual TLS and auth; the certificate, key and client CA the daemon reads are copies in
    root/live, which a reload test replaces."""
    pki = make_pki(root / "pki")
    live = root / "live"
    live.mkdir()
    for name in ("server", "server_key", "ca"):
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
                           "key": {"path": str(live / "server.key")}, "client_ca_file": str(live / "ca.pem")}},
        "auth": {"required": True, "keys_file": {"path": str(keys_file)}, "open_probes": "none",
                 "certificates": [{"identity": "device-17", "name": "device-17", "scopes": ["infer"]},
                                  *({"identity": identity, "name": name, "scopes": ["infer"]}
                                    for name, identity in SAN_IDENTITIES.items())]},
    }
    site.write_config()
    return site, pki, token


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[Https]:
    root = tmp_path_factory.mktemp("https")
    site, pki, token = secure_site(root, keyset, mlp_onnx)
    with served_daemon(site.config_path) as proc:
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


@pytest.mark.parametrize(("kind", "caller"), [
    ("dns", "dns-caller"), ("uri", "uri-caller"), ("email", "email-caller"), ("cn", "cn-caller"),
    ("organization", None), ("ip", None), ("other-dns", None)])
def test_each_kind_of_name_is_matched_alone(https: Https, kind: str, caller: str | None) -> None:
    """The CN differs from every SAN, so a caller found proves the SAN (or, for ``cn``, the CN) was matched; names
    outside CN, DNS, URI and e-mail (the subject's O, an IP SAN) and a near miss never name a caller."""
    ids = SAN_IDENTITIES
    cn, sans, organization = f"unmapped-{kind}", [], None
    if kind == "dns":
        sans = [x509.DNSName(ids["dns-caller"]), x509.DNSName("other.inferd.test")]
    elif kind == "uri":
        sans = [x509.UniformResourceIdentifier(ids["uri-caller"])]
    elif kind == "email":
        sans = [x509.RFC822Name(ids["email-caller"])]
    elif kind == "cn":
        cn = ids["cn-caller"]  # and no SAN extension at all
    elif kind == "organization":
        organization = ids["o-caller"]
    elif kind == "ip":
        sans = [x509.IPAddress(ipaddress.ip_address(ids["ip-caller"]))]
    else:  # a SAN that only contains, or differs in case from, a mapped identity: matching is exact
        sans = [x509.DNSName("x." + ids["dns-caller"]), x509.DNSName(ids["dns-caller"].upper())]
    cert = issue(https.pki, https.certs, cn, sans=sans, organization=organization, stem=f"san-{kind}")
    ctx = https.context(cert)
    answer = request(https.url + "/v2/models/mlp/infer", "POST", BODY, context=ctx)
    if caller is None:
        assert answer.status == 401
        return
    assert answer.status == 200
    refused = request(https.url + "/v2", context=ctx)  # the refusal names the caller the certificate was matched to
    assert refused.status == 403 and f"'{caller}' lacks the 'read' scope" in refused.json()["error"]


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
    weak = https.context(device)  # TLS 1.2 with a cipher that has no forward secrecy and no AEAD
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA256")
    assert raw_get(weak, https.daemon.port) == b""
    strong = https.context(device)  # the same TLS 1.2 with an ECDHE AES-GCM suite is served
    strong.maximum_version = ssl.TLSVersion.TLSv1_2
    strong.set_ciphers("ECDHE+AESGCM")
    assert raw_get(strong, https.daemon.port).startswith(b"HTTP/1.1 ")


def plain_get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def test_sighup_rereads_certificate_and_client_ca_and_keeps_open_connections(
        tmp_path: Path, keyset: KeySet, mlp_onnx: bytes, start_daemon: Callable[..., DaemonProcess]) -> None:
    site, pki, token = secure_site(tmp_path, keyset, mlp_onnx)
    daemon = start_daemon(site.config_path)
    https = Https(daemon, pki, tmp_path / "clients", token, site)
    old_device = issue(pki, https.certs, "device-17")
    auth = {"Authorization": f"Bearer {token}"}
    fresh = make_pki(tmp_path / "renewed", cn="renewed-ca")  # a new server certificate and a new client CA

    def trusting(client: dict[str, Path]) -> ssl.SSLContext:
        ctx = https.context(client)
        ctx.load_verify_locations(cafile=str(fresh["ca"]))
        return ctx

    old_context = trusting(old_device)  # one context: a session resumes only from the context that made it
    old_tls12 = trusting(old_device)  # TLS 1.2 resumes by session id from the server's cache (1.3 has no tickets)
    old_tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with old_tls12.wrap_socket(socket.create_connection(("127.0.0.1", daemon.port), timeout=10),
                               server_hostname="127.0.0.1") as first:
        first.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.recv(65536).startswith(b"HTTP/1.1 ")
        session12 = first.session
    assert raw_get(old_tls12, daemon.port, session12).startswith(b"HTTP/1.1 ")  # it resumes before the reload
    kept = http.client.HTTPSConnection("127.0.0.1", daemon.port, timeout=10, context=old_context)
    try:
        kept.request("GET", "/v2/models/mlp/ready", headers=auth)
        assert kept.getresponse().read() is not None
        before = kept.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        session = kept.sock.session  # type: ignore[union-attr]
        assert session is not None
        live = tmp_path / "live"
        (live / "server.pem").write_bytes(fresh["server"].read_bytes())
        (live / "server.key").write_bytes(fresh["server_key"].read_bytes())
        (live / "ca.pem").write_bytes(fresh["ca"].read_bytes())
        os.kill(daemon.proc.pid, signal.SIGHUP)
        daemon.wait_for_event("reload: HTTPS certificate re-read", timeout=30)

        new_device = issue(fresh, tmp_path / "new-clients", "device-17")
        after = http.client.HTTPSConnection("127.0.0.1", daemon.port, timeout=10, context=trusting(new_device))
        try:
            after.request("POST", "/v2/models/mlp/infer", body=json.dumps(BODY), headers=auth)
            assert after.getresponse().status == 200
            assert after.sock.getpeercert(binary_form=True) != before  # type: ignore[union-attr]
        finally:
            after.close()
        with pytest.raises((ssl.SSLError, ConnectionError)):  # the old client CA is trusted no more
            request(https.url + "/v2/models/mlp/infer", "POST", BODY, context=trusting(old_device), check=False)
        # nor can a session resumed from before the reload carry the old certificate in
        assert raw_get(old_context, daemon.port, session) == b""
        assert raw_get(old_tls12, daemon.port, session12) == b""
        assert raw_get(trusting(new_device), daemon.port).startswith(b"HTTP/1.1 ")  # the same probe, unresumed
        kept.request("POST", "/v2/models/mlp/infer", body=json.dumps(BODY), headers=auth)
        assert kept.getresponse().status == 200  # the connection opened before the reload still serves
    finally:
        kept.close()


def raw_get(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> bytes:
    """What the daemon answers a GET over a fresh TLS connection (b"" when it closes the connection instead)."""
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1",
                             session=session) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(65536)
    except (ssl.SSLError, ConnectionError):
        return b""


def test_a_stalled_tls_handshake_is_counted_and_cut(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                     start_daemon: Callable[..., DaemonProcess]) -> None:
    site, pki, token = secure_site(tmp_path, keyset, mlp_onnx)
    site.extra["server"]["limits"] = {"header_timeout_s": 0.5, "max_connections_per_client": 2}
    daemon = start_daemon(site.write_config())
    stalled = []
    try:
        for _ in range(2):  # TCP connections that never send a ClientHello
            s = socket.socket()
            s.settimeout(10)
            s.bind(("127.0.0.6", 0))
            s.connect(("127.0.0.1", daemon.port))
            stalled.append(s)
        third = socket.socket()
        third.settimeout(10)
        third.bind(("127.0.0.6", 0))
        third.connect(("127.0.0.1", daemon.port))
        with third:
            assert third.recv(1) == b""  # over the per-address limit: closed at once, handshakes count
        started = time.monotonic()
        for s in stalled:
            assert s.recv(1) == b""  # cut by the handshake deadline
        assert time.monotonic() - started < 5
        device = issue(pki, tmp_path / "clients", "device-17")
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ctx.load_cert_chain(device["cert"], device["key"])
        url = f"https://127.0.0.1:{daemon.port}/v2/models/mlp/infer"
        assert request(url, "POST", BODY, context=ctx).status == 200  # a well-behaved client was never affected
    finally:
        for s in stalled:
            s.close()


def test_certificate_and_key_from_systemd_credentials(tmp_path: Path, keyset: KeySet, mlp_onnx: bytes,
                                                      start_daemon: Callable[..., DaemonProcess]) -> None:
    site, pki, _ = secure_site(tmp_path, keyset, mlp_onnx)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    shutil.copy(pki["server"], creds / "inferd-tls.pem")
    shutil.copy(pki["server_key"], creds / "inferd-tls.key")
    (creds / "inferd-tls.key").chmod(0o600)
    tls = site.extra["server"]["tls"]
    tls.pop("cert_file")
    tls.update(cert={"credential": "inferd-tls.pem"}, key={"credential": "inferd-tls.key"}, client_ca_file=None)
    daemon = start_daemon(site.write_config(), env={"CREDENTIALS_DIRECTORY": str(creds)})
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    assert raw_get(ctx, daemon.port).startswith(b"HTTP/1.1 ")
