"""gRPC with auth on: every RPC needs its scope in the ``authorization`` metadata (UNAUTHENTICATED / PERMISSION_DENIED
otherwise), the probes stay open to loopback, and a stock tritonclient passes its key as a header."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from conftest import DaemonProcess, KeySet, Site, mlp_reference, pack_model
from cryptography import x509
from support.daemon import served_daemon
from tritonclient.utils import InferenceServerException

from daemon.grpc_api import GRPC_ROUTES, InferenceServicer
from daemon.security import add_key_to_file


@dataclass
class Secured:
    url: str
    keys: dict[str, str]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet, mlp_onnx: bytes) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("grpc-auth")
    keys_file = root / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    tokens = {name: add_key_to_file(keys_file, name, scopes, models) for name, scopes, models in (
        ("app", ["infer", "read", "health"], ["mlp"]), ("reader", ["read"], None))}
    site = Site(root / "site", keyset)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"grpc": {"enabled": True, "port": 0},
                  "auth": {"required": True, "keys_file": {"path": str(keys_file)}}}
    with served_daemon(site.write_config()) as daemon:
        yield Secured(f"127.0.0.1:{daemon.wait_for('grpc_listening')['port']}", tokens)


def client_call(url: str, token: str | None, call: Callable[[tgrpc.InferenceServerClient, dict], object]) -> object:
    client = tgrpc.InferenceServerClient(url)
    try:
        return call(client, {"authorization": f"Bearer {token}"} if token else {})
    finally:
        client.close()


def infer(c: tgrpc.InferenceServerClient, headers: dict) -> np.ndarray:
    x = np.array([[1, 2, 3, 4]], np.float32)
    inp = tgrpc.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    return c.infer("mlp", [inp], headers=headers).as_numpy("output")


CALLS: dict[str, Callable[[tgrpc.InferenceServerClient, dict], object]] = {
    "ServerMetadata": lambda c, h: c.get_server_metadata(headers=h),
    "ModelMetadata": lambda c, h: c.get_model_metadata("mlp", headers=h),
    "ModelConfig": lambda c, h: c.get_model_config("mlp", headers=h),
    "ModelStatistics": lambda c, h: c.get_inference_statistics("mlp", headers=h),
    "ModelReady": lambda c, h: c.is_model_ready("mlp", headers=h),
    "ModelInfer": infer,
}


@pytest.mark.parametrize("rpc", sorted(CALLS))
def test_each_rpc_needs_a_key_with_its_scope(secured: Secured, rpc: str) -> None:
    call = CALLS[rpc]
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED") as none:
        client_call(secured.url, None, call)
    assert "needs an API key" in str(none.value)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client_call(secured.url, "ifd_0123456789ab_" + "A" * 43, call)
    result = client_call(secured.url, secured.keys["app"], call)
    if rpc == "ModelInfer":
        np.testing.assert_allclose(result, mlp_reference(np.array([[1, 2, 3, 4]], np.float32)), rtol=1e-5)
    if GRPC_ROUTES[rpc].scope != "read":
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED") as refused:
            client_call(secured.url, secured.keys["reader"], call)
        assert f"lacks the '{GRPC_ROUTES[rpc].scope}' scope" in str(refused.value)


def test_probes_stay_open_to_loopback(secured: Secured) -> None:
    assert client_call(secured.url, None, lambda c, h: c.is_server_live(headers=h)) is True
    assert client_call(secured.url, None, lambda c, h: c.is_server_ready(headers=h)) is True


def test_every_rpc_the_servicer_implements_has_a_scope() -> None:
    implemented = {name for name in GRPC_ROUTES if callable(getattr(InferenceServicer, name, None))}
    assert implemented == set(GRPC_ROUTES)
    assert {"ServerLive", "ServerReady"} | set(CALLS) == set(GRPC_ROUTES)


def test_a_grpc_key_file_readable_by_others_is_refused(site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
                                                       start_daemon: Callable[..., DaemonProcess]) -> None:
    from support.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    pki["server_key"].chmod(0o644)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"grpc": {"enabled": True, "port": 0, "tls": {"enabled": True, "cert_file": str(pki["server"]),
                                                               "key_file": str(pki["server_key"])}}}
    daemon = start_daemon(site.write_config(), wait=False)
    assert daemon.proc.wait(timeout=60) != 0
    assert "readable by group or others" in daemon.wait_for_event("inferd: error: ")["event"]


def test_a_client_certificate_names_a_grpc_caller(site: Site, keyset: KeySet, mlp_onnx: bytes, tmp_path: Path,
                                                   start_daemon: Callable[..., DaemonProcess]) -> None:
    """Mutual TLS on gRPC with auth on: a verified certificate whose CN (or DNS SAN) is in auth.certificates is that
    caller, with its scopes; another verified certificate still needs a key."""
    from support.tls import issue, make_pki

    pki = make_pki(tmp_path / "pki")
    keys_file = tmp_path / "secrets" / "api-keys.json"
    keys_file.parent.mkdir(mode=0o700)
    token = add_key_to_file(keys_file, "app", ["infer"], None)
    site.install(pack_model(keyset, mlp_onnx))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {
        "grpc": {"enabled": True, "port": 0, "tls": {"enabled": True, "cert_file": str(pki["server"]),
                                                     "key_file": str(pki["server_key"]),
                                                     "client_ca_file": str(pki["ca"])}},
        "auth": {"required": True, "keys_file": {"path": str(keys_file)},
                 "certificates": [{"identity": "sensor-9", "name": "sensor-9", "scopes": ["infer"]},
                                  {"identity": "10.9.8.7", "name": "by-address", "scopes": ["infer"]}]},
    }
    daemon = start_daemon(site.write_config())
    url = f"127.0.0.1:{daemon.wait_for('grpc_listening')['port']}"

    def client(cn: str, sans: list[x509.GeneralName] | None = None) -> tgrpc.InferenceServerClient:
        cert = issue(pki, tmp_path / "clients", cn, sans=sans)
        return tgrpc.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"]),
                                           private_key=str(cert["key"]), certificate_chain=str(cert["cert"]))

    sensor, stranger = client("sensor-9"), client("stranger")
    placed = client("somewhere", [x509.IPAddress(ipaddress.ip_address("10.9.8.7"))])  # an IP SAN names nobody
    try:
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            infer(placed, {})
        np.testing.assert_allclose(infer(sensor, {}), mlp_reference(np.array([[1, 2, 3, 4]], np.float32)), rtol=1e-5)
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):  # the certificate grants infer only
            sensor.get_server_metadata()
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            infer(stranger, {})
        assert infer(stranger, {"authorization": f"Bearer {token}"}).shape == (1, 3)
    finally:
        sensor.close()
        stranger.close()
        placed.close()
