"""The reference servers bench/run.py measures inferd against, each started as its own process.

- ``bare``: a handler that returns a fixed body of the same size as inferd's answer: the HTTP transport limit.
- ``refuser``: answers every inference 503 with ``Retry-After`` at once, from the headers, without reading the body
  (as inferd refuses): the fastest a refusal can come back through this transport and client (bench/overload_bench.py).
- ``minimal``: what a 40-line V2 server does: parse JSON (orjson) or binary, one numpy conversion, the runtime
  through an executor, orjson out. No validation, no scheduling, no metrics.

Both run on aiohttp's low-level server (``web_server.Server`` behind a ``ServerRunner``), the same one inferd uses:
``web.Application`` adds a router and middleware chain that inferd does not pay for, which would make "x of bare"
flatter us. Both still check the method and path, as any server must.

Usage: python bench/servers.py bare|refuser|minimal PORT MODEL.onnx RESPONSE_FILE THREADS
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from aiohttp import web, web_server

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
PREFIX = "/v2/models/"
SUFFIX = "/infer"


def _model_of(request: web.BaseRequest) -> str | None:
    path = request.rel_url.raw_path
    if request.method != "POST" or not path.startswith(PREFIX) or not path.endswith(SUFFIX):
        return None
    return path[len(PREFIX) : -len(SUFFIX)]


def bare(response: bytes) -> Handler:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if _model_of(request) is None:
            return web.Response(status=404)
        await request.read()
        return web.Response(body=response, content_type="application/json")

    return handler


def refuser(response: bytes) -> Handler:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if _model_of(request) is None:
            return web.Response(status=404)
        return web.Response(status=503, body=response, content_type="application/json", headers={"Retry-After": "1"})

    return handler


def minimal(model: bytes, threads: int) -> Handler:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    pool = ThreadPoolExecutor(1)
    out_names = [o.name for o in sess.get_outputs()]

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        name = _model_of(request)
        if name is None:
            return web.Response(status=404)
        body = await request.read()
        hlen = request.headers.get("Inference-Header-Content-Length")
        if hlen is None:
            doc = orjson.loads(body)
            feed = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in doc["inputs"]}
        else:
            n = int(hlen)
            doc = orjson.loads(body[:n])
            offset, feed = n, {}
            for t in doc["inputs"]:
                size = t["parameters"]["binary_data_size"]
                feed[t["name"]] = np.frombuffer(body, np.float32, size // 4, offset).reshape(t["shape"])
                offset += size
        results = await asyncio.get_running_loop().run_in_executor(pool, sess.run, out_names, feed)
        outputs = [{"name": n, "datatype": "FP32" if r.dtype == np.float32 else "INT64", "shape": list(r.shape),
                    "data": r.reshape(-1)} for n, r in zip(out_names, results)]
        return web.Response(body=orjson.dumps({"model_name": name, "outputs": outputs},
                                              option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")

    return handler


async def serve(handler: Handler, port: int) -> None:
    loop = asyncio.get_running_loop()

    def make_request(message: object, payload: object, proto: object, writer: object, task: object) -> web.BaseRequest:
        return web.BaseRequest(message=message, payload=payload, protocol=proto, payload_writer=writer,  # type: ignore[arg-type]
                               task=task, loop=loop, client_max_size=64 << 20)  # type: ignore[arg-type]

    runner = web.ServerRunner(web_server.Server(handler, request_factory=make_request, access_log=None),
                              handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print(json.dumps({"listening": port}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    kind, port, model, response, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    handlers = {"bare": lambda: bare(Path(response).read_bytes()), "refuser": lambda: refuser(Path(response).read_bytes()),
                "minimal": lambda: minimal(Path(model).read_bytes(), threads)}
    handler = handlers[kind]()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(handler, port))


if __name__ == "__main__":
    main()
