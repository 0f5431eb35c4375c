"""gRPC over TLS and mutual TLS on a real daemon, with tritonclient's own TLS options: a client that trusts the CA is
served, a plaintext client or one trusting another CA is not; with ``client_ca_file`` a client without a certificate
signed by that CA is refused during the handshake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from conftest import DaemonProcess, KeySet, Site, pack_model
from support.tls import make_pki
from tritonclient.utils import InferenceServerException


def serve_tls(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon, pki: dict[str, Path],
              mutual: bool) -> tuple[DaemonProcess, str]:
    site.install(pack_model(keyset, mlp_onnx, name="mlp"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    tls = {"enabled": True, "cert_file": str(pki["server"]), "key_file": str(pki["server_key"]),
           "client_ca_file": str(pki["ca"]) if mutual else None}
    site.extra = {"grpc": {"enabled": True, "port": 0, "tls": tls}}
    daemon = start_daemon(site.write_config())
    line = daemon.wait_for("grpc_listening")
    assert line["event"].endswith("(mutual TLS)" if mutual else "(TLS)")
    return daemon, f"127.0.0.1:{line['port']}"


def infer(client: tgrpc.InferenceServerClient) -> np.ndarray:
    x = tgrpc.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    out = client.infer("mlp", [x], client_timeout=30).as_numpy("output")
    assert out is not None
    return out


def refused(client: tgrpc.InferenceServerClient) -> str:
    with pytest.raises(InferenceServerException) as err:
        client.is_server_live(client_timeout=10)
    return str(err.value.status())


def test_tls(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", cn="other-ca")
    _, url = serve_tls(site, keyset, mlp_onnx, start_daemon, pki, mutual=False)
    good = tgrpc.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"]))
    plain = tgrpc.InferenceServerClient(url)
    wrong_ca = tgrpc.InferenceServerClient(url, ssl=True, root_certificates=str(other["ca"]))
    try:
        assert good.is_server_live() and infer(good).shape == (1, 3)
        assert refused(plain) == "StatusCode.UNAVAILABLE"
        assert refused(wrong_ca) == "StatusCode.UNAVAILABLE"
    finally:
        for c in (good, plain, wrong_ca):
            c.close()


def test_mutual_tls(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", cn="other-ca")
    _, url = serve_tls(site, keyset, mlp_onnx, start_daemon, pki, mutual=True)
    good = tgrpc.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"]),
                                       private_key=str(pki["client_key"]), certificate_chain=str(pki["client"]))
    anonymous = tgrpc.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"]))
    foreign = tgrpc.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca"]),
                                          private_key=str(other["client_key"]),
                                          certificate_chain=str(other["client"]))
    try:
        assert infer(good).shape == (1, 3)
        assert refused(anonymous) == "StatusCode.UNAVAILABLE"
        assert refused(foreign) == "StatusCode.UNAVAILABLE"
    finally:
        for c in (good, anonymous, foreign):
            c.close()


def test_an_unreadable_certificate_stops_start_up(site: Site, keyset: KeySet, start_daemon, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    site.extra = {"grpc": {"enabled": True, "port": 0,
                           "tls": {"enabled": True, "cert_file": str(missing), "key_file": str(missing)}}}
    daemon = start_daemon(site.write_config(), wait=False)
    assert daemon.proc.wait(timeout=60) != 0
    line = daemon.wait_for_event("inferd: error: ")["event"]
    assert line == f"inferd: error: grpc.tls.key_file: cannot read key file {missing}: No such file or directory"
