"""The HTTP client for the internal hops of an invocation (gateway -> trigger -> dispatcher -> host).

These hops carry every invocation, so they use aiohttp (measured here at about a sixth of httpx's CPU
per request); management calls keep httpx.  Guarantees:
- one connection pool per ``HopClient`` (keep-alive), to a TCP base URL or a unix socket;
- every call has a timeout; transport failures come out as exactly three exceptions, which tell a
  caller whether the request may be re-sent: ``NotDelivered`` (the connection could not be opened: the
  peer never saw the request), ``ConnectionBroken`` (the connection failed after the request may have
  been sent) and ``HopTimeout``.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy


class HopError(Exception):
    """Root of transport failures of an internal hop."""


class NotDelivered(HopError):
    pass


class ConnectionBroken(HopError):
    pass


class HopTimeout(HopError):
    pass


@dataclass(slots=True)
class HopResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class HopClient:
    """A keep-alive client to one peer (``base_url``) or to many (``base_url=None``, absolute URLs)."""

    def __init__(self, *, unix_socket: str | None = None, max_connections: int = 0) -> None:
        if unix_socket is not None:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=unix_socket, limit=max_connections)
        else:
            connector = aiohttp.TCPConnector(limit=max_connections, family=socket.AF_INET, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Internal hops never use cookies, and skipping the jar and auto-decompression saves work.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def post(self, url: str, *, body: bytes, headers: dict[str, str], timeout_s: float) -> HopResponse:
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=max(timeout_s, 0.001))
            ) as resp:
                content = await resp.read()
                return HopResponse(resp.status, resp.headers, content)
        except aiohttp.ClientConnectorError as exc:
            raise NotDelivered(str(exc)) from exc
        except TimeoutError as exc:
            raise HopTimeout(f"no answer from {url} within {timeout_s:.1f} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionBroken(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._session.close()
        # Let the connector finish closing its transports (aiohttp's documented graceful close).
        await asyncio.sleep(0)


def for_address(address: str, *, max_connections: int) -> tuple[HopClient, str]:
    """A client for an instance address and the base URL to prefix paths with."""
    if address.startswith("unix://"):
        return HopClient(unix_socket=address[len("unix://") :], max_connections=max_connections), "http://instance"
    return HopClient(max_connections=max_connections), address.rstrip("/")
