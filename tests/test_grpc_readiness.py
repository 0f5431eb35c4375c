"""Readiness over gRPC is the daemon's one decision (daemon.frontend.Readiness): a configured model that cannot serve
makes ServerReady false and its ModelReady false, its inference UNAVAILABLE with the reason, while the other models
serve; HTTP's readiness names the gRPC frontend. With gRPC off, the daemon never imports grpcio; the grpc config
section becomes grpcio's channel arguments."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from conftest import REPO, KeySet, Site, pack_model
from httpclient import request
from tritonclient.grpc import service_pb2, service_pb2_grpc


def test_an_unready_model_over_grpc(site: Site, keyset: KeySet, mlp_onnx: bytes, start_daemon) -> None:
    site.install(pack_model(keyset, mlp_onnx, name="mlp"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1},
                   {"name": "broken", "runtime": "onnxruntime"}]  # configured, nothing installed
    site.extra = {"grpc": {"enabled": True, "port": 0}}
    daemon = start_daemon(site.write_config())
    address = f"127.0.0.1:{daemon.wait_for('grpc_listening')['port']}"
    client = tgrpc.InferenceServerClient(address)
    channel = grpc.insecure_channel(address)
    try:
        assert client.is_server_live() and not client.is_server_ready()
        assert client.is_model_ready("mlp") and not client.is_model_ready("broken")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="broken")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("model 'broken' is not ready")
        req.model_name = "mlp"
        assert len(stub.ModelInfer(req).raw_output_contents[0]) == 12
    finally:
        channel.close()
        client.close()
    ready = request(daemon.url + "/v2/health/ready", check=False)
    assert ready.status == 503 and "broken" in ready.json()["error"]


def test_the_http_readiness_body_names_the_grpc_frontend(site: Site, keyset: KeySet, mlp_onnx: bytes,
                                                         start_daemon) -> None:
    site.install(pack_model(keyset, mlp_onnx, name="mlp"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "threads": 1}]
    site.extra = {"grpc": {"enabled": True, "port": 0}}
    daemon = start_daemon(site.write_config())
    assert request(daemon.url + "/v2/health/ready").json() == {"ready": True, "grpc": "listening"}


def test_with_grpc_off_grpcio_is_never_imported() -> None:
    code = ("import sys, daemon.app, daemon.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'tritonclient', 'google')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_grpc_section_becomes_grpcio_channel_arguments() -> None:
    from daemon.config_frontends import GrpcConfig, GrpcTlsConfig
    from daemon.grpc_api import server_options

    options = dict(server_options(GrpcConfig(max_message_bytes=4096, keepalive_time_s=60, keepalive_timeout_s=5,
                                             keepalive_permit_without_calls=True, min_ping_interval_s=10,
                                             max_ping_strikes=0)))
    assert options == {
        "grpc.max_receive_message_length": 4096, "grpc.max_send_message_length": -1,
        "grpc.keepalive_time_ms": 60_000, "grpc.keepalive_timeout_ms": 5000, "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.min_ping_interval_without_data_ms": 10_000, "grpc.http2.max_ping_strikes": 0,
        "grpc.so_reuseport": 0,
    }
    with pytest.raises(ValueError, match="less than or equal to 2147483647"):
        GrpcConfig(max_message_bytes=2**31)
    with pytest.raises(ValueError, match="TLS needs both 'cert_file' and 'key_file'"):
        GrpcTlsConfig(enabled=True, cert_file="server.pem")
