"""``inferd registry serve``: a registry folder over HTTP for a small site (any static web server does as well).

GET and HEAD only; aiohttp's file response gives ETag / If-None-Match (304) and Range (206) that the box's client
relies on for cheap polls and resumed downloads. Dot files (the publish lock, uploads in progress) are never served.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web, web_response


def make_app(root: Path) -> web.Application:
    base = root.resolve()

    async def serve_file(request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        parts = [p for p in rel.split("/") if p]
        if not parts or any(p.startswith(".") for p in parts):
            raise web.HTTPNotFound()
        path = base.joinpath(*parts)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, path.is_file):
            raise web.HTTPNotFound()
        response = web.FileResponse(path, headers={"Cache-Control": "no-cache"})
        return response

    app = web.Application()
    app.router.add_get("/{path:.*}", serve_file)
    return app


async def serve(root: Path, host: str, port: int) -> None:
    if not await asyncio.get_running_loop().run_in_executor(None, root.is_dir):
        raise OSError(f"{root} is not a folder")
    web_response.SERVER_SOFTWARE = "inferd"  # as the daemon says it: no Python or aiohttp versions to a stranger
    runner = web.AppRunner(make_app(root), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {root} on http://{shown}:{bound}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    print("stopped", file=sys.stderr, flush=True)
