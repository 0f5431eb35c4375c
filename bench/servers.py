"""The reference servers bench/run.py measures inferd against, each started as its own process.

- ``bare``: an aiohttp handler that returns a fixed body of the same size as inferd's answer: the HTTP transport limit.
- ``minimal``: what a 40-line V2 server does: parse JSON (orjson) or binary, one numpy conversion, the runtime
  through an executor, orjson out. No validation, no routing, no scheduling, no metrics.

Usage: python bench/servers.py bare|minimal PORT MODEL.onnx RESPONSE_FILE THREADS
"""

from __future__ import annotations

import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from aiohttp import web


def bare(response: bytes) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=response, content_type="application/json")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v2/models/{model}/infer", handler)
    return app


def minimal(model: bytes, threads: int) -> web.Application:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    pool = ThreadPoolExecutor(1)
    out_names = [o.name for o in sess.get_outputs()]

    async def handler(request: web.Request) -> web.Response:
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
        return web.Response(body=orjson.dumps({"model_name": request.match_info["model"], "outputs": outputs},
                                              option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v2/models/{model}/infer", handler)
    return app


def main() -> None:
    kind, port, model, response, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    app = bare(Path(response).read_bytes()) if kind == "bare" else minimal(Path(model).read_bytes(), threads)
    print(json.dumps({"listening": port}), flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
