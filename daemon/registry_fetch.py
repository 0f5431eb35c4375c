"""HTTP for the registry client: allowed hosts only (redirects included), TLS verified, bounded reads, and artifact
downloads that stream to a file and resume with a Range request after a drop.

Imported only when ``registry.url`` is set (the aiohttp client and its TLS context are not free at start-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin

import aiohttp

import daemon
from daemon.config_registry import host_allowed
from daemon.registry_index import RegistryError

log = logging.getLogger("inferd.registry")

MAX_REDIRECTS = 5
MAX_INDEX_BYTES = 16 << 20
CHUNK = 256 << 10
#: drops in a row that brought no new byte before a download is given up
MAX_IDLE_DROPS = 3
MAX_DROPS = 50
#: what the registry is told the client is: inferd's version (the operator's own server may want it), never the
#: Python and aiohttp versions aiohttp would send by default
USER_AGENT = f"inferd/{daemon.__version__}"


class HostNotAllowed(RegistryError):
    reason = "host_not_allowed"


class Unavailable(RegistryError):
    reason = "unavailable"


class TooLarge(RegistryError):
    reason = "too_large"


class NoSpace(RegistryError):
    reason = "disk_full"


class TruncatedDownload(RegistryError):
    reason = "truncated"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificate and host name verified always; with ``ca_file`` only that CA is trusted (pinned). Reads files:
    call it off the loop."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class Fetcher:
    def __init__(self, allowed: list[str], timeout_s: float, tls: ssl.SSLContext, index_timeout_s: float = 30.0,
                 min_bytes_per_s: int = 65536) -> None:
        self.allowed = allowed
        self.timeout_s, self.index_timeout_s, self.min_bytes_per_s = timeout_s, index_timeout_s, min_bytes_per_s
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=4),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,  # no proxy from the environment: the box connects to what its config names, only
            auto_decompress=False,  # artifacts are compared byte for byte with the index
        )

    async def close(self) -> None:
        await self._session.close()

    def _check(self, url: str, why: str) -> None:
        if not host_allowed(url, self.allowed):
            raise HostNotAllowed(f"{why} {url} is outside registry.allowed_hosts ({', '.join(self.allowed)}): "
                                 "not connected")

    @contextlib.asynccontextmanager
    async def _get(self, url: str, headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET, following at most MAX_REDIRECTS redirects, each to an allowed host only (checked before connecting)."""
        self._check(url, "the URL")
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await self._session.get(url, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise Unavailable(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
            if response.status in (301, 302, 303, 307, 308):
                location = response.headers.get("Location")
                response.release()
                if not location:
                    raise Unavailable(f"GET {url}: HTTP {response.status} without a Location")
                target = urljoin(url, location)
                if url.startswith("https:") and not target.startswith("https:"):
                    raise HostNotAllowed(f"{url} redirects to {target}: from HTTPS to plain HTTP is refused, not "
                                         "connected")
                url = target
                self._check(url, "a redirect to")
                continue
            try:
                yield response
            finally:
                response.release()
            return
        raise Unavailable(f"more than {MAX_REDIRECTS} redirects from {url}")

    async def get_small(self, url: str, etag: str | None = None) -> tuple[int, bytes, str | None]:
        """(status, body, ETag) of a small file (the index, its signature); 304 when ``etag`` still matches. Bounded
        as a whole: a registry sending a byte just inside each read timeout would hold the poll lock for ever."""
        try:
            return await asyncio.wait_for(self._get_small(url, etag), self.index_timeout_s)
        except asyncio.TimeoutError:  # the inner reads turn theirs into Unavailable: this one is the deadline
            raise Unavailable(f"GET {url} took longer than registry.index_timeout_s ({self.index_timeout_s:g} s): "
                              "given up") from None

    async def _get_small(self, url: str, etag: str | None) -> tuple[int, bytes, str | None]:
        headers = {"If-None-Match": etag} if etag else {}
        async with self._get(url, headers) as response:
            if response.status == 304:
                return 304, b"", etag
            if response.status != 200:
                raise Unavailable(f"GET {url}: HTTP {response.status}")
            body = bytearray()
            try:
                async for chunk in response.content.iter_chunked(CHUNK):
                    body += chunk
                    if len(body) > MAX_INDEX_BYTES:
                        raise TooLarge(f"{url} is larger than {MAX_INDEX_BYTES} bytes")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise Unavailable(f"GET {url} failed while reading: {type(exc).__name__}: {exc}") from None
            return 200, bytes(body), response.headers.get("ETag")

    async def download(self, url: str, dest: Path, size: int, max_bytes: int, min_free: int) -> str:
        """Stream ``url`` into ``dest`` (exactly ``size`` bytes, as the index lists), resuming after drops; returns
        the sha256 of what was written. Never holds more than one chunk in memory."""
        if size > max_bytes:
            raise TooLarge(f"{url} is listed at {size} bytes, over registry.max_artifact_bytes ({max_bytes})")
        loop = asyncio.get_running_loop()
        free = (await loop.run_in_executor(None, shutil.disk_usage, dest.parent)).free
        if free - size < min_free:
            raise NoSpace(f"downloading {size} bytes would leave {max(free - size, 0)} bytes free in {dest.parent}, "
                          f"under registry.min_free_bytes ({min_free})")
        f: BinaryIO = await loop.run_in_executor(None, dest.open, "wb")
        deadline = self.timeout_s + size / self.min_bytes_per_s
        try:
            return await asyncio.wait_for(self._fill(url, f, size), deadline)
        except asyncio.TimeoutError:  # _fill takes its reads' timeouts as drops: this one is the deadline
            raise Unavailable(f"GET {url}: {size} bytes did not arrive within {deadline:.0f} s (registry.timeout_s "
                              "plus the size at registry.min_download_bytes_per_s): given up") from None
        finally:
            await loop.run_in_executor(None, f.close)

    async def _fill(self, url: str, f: BinaryIO, size: int) -> str:
        loop = asyncio.get_running_loop()
        have, digest, drops, idle = 0, hashlib.sha256(), 0, 0
        while True:
            before = have
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                async with self._get(url, headers) as response:
                    if have and response.status == 206:
                        if not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                            raise Unavailable(f"GET {url}: the resumed range is not the one asked for")
                    elif response.status == 200:
                        if have:  # the server ignored Range: start again
                            await loop.run_in_executor(None, _rewind, f)
                            have, digest = 0, hashlib.sha256()
                    elif response.status == 416 and have:
                        raise TruncatedDownload(f"{url} ends after {have} bytes; the index lists {size}")
                    else:
                        raise Unavailable(f"GET {url}: HTTP {response.status}")
                    async for chunk in response.content.iter_chunked(CHUNK):
                        if have + len(chunk) > size:
                            raise TooLarge(f"{url} sends more than the {size} bytes the index lists")
                        await loop.run_in_executor(None, f.write, chunk)
                        digest.update(chunk)
                        have += len(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError,
                    Unavailable) as exc:
                if have == before and isinstance(exc, Unavailable) and not have:
                    raise  # nothing came at all: the server is down, not a drop
                log.info("registry download of %s dropped at %d of %d bytes (%s): resuming", url, have, size,
                         type(exc).__name__, extra={"event_kind": "registry_resume"})
            if have == size:
                await loop.run_in_executor(None, f.flush)
                return digest.hexdigest()
            drops += 1
            idle = idle + 1 if have == before else 0
            if idle >= MAX_IDLE_DROPS or drops >= MAX_DROPS:
                raise TruncatedDownload(f"{url} stopped at {have} of {size} bytes after {drops} attempts")


def _rewind(f: BinaryIO) -> None:
    f.seek(0)
    f.truncate()
