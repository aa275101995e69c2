"""The HTTP client for the internal hops of an invocation (gateway -> trigger -> dispatcher -> host).

A lean HTTP/1.1 client on asyncio + httptools (measured by ``bench/warm_path.py``: a hop through it
costs a fraction of aiohttp's CPU); management calls keep httpx.  Guarantees:
- keep-alive connections per peer (a TCP ``host:port``, or a unix socket: ``http+unix://<quoted
  path>/...`` URLs, or every URL of a client made with ``unix_socket``), one request at a time on
  each; a connection idle longer than ``IDLE_REUSE_S`` (shorter than the servers' idle timeout) is
  not reused, so a request is not written on a connection the peer is closing;
- a client made with ``internal_token`` sends it (``wire.INTERNAL_TOKEN``) with every request, as a
  header line built once, and presents it once per multiplexed connection; a client of a function
  host is made without it (user code never sees the platform's token);
- every call has a timeout; transport failures come out as exactly three exceptions, which tell a
  caller whether the request may be re-sent: ``NotDelivered`` (the connection could not be opened: the
  peer never saw the request), ``ConnectionBroken`` (the connection failed after the request may have
  been sent) and ``HopTimeout``;
- bodies stream both ways: a request body may be an async iterator of chunks (sent chunked, or with
  the ``content-length`` the caller gives), and ``stream=True`` hands the response back once its
  head arrived, its body (``HopResponse.stream``) read piece by piece with flow control.  A streamed
  response's connection is reused only after its body was read to the end.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterable
from typing import Any, cast
from urllib.parse import unquote

import httptools

from faas.core import wire
from faas.core.body import Body, BodyIncomplete, WriteFlow, set_nodelay

IDLE_REUSE_S = 50.0
_HOP_BY_HOP = frozenset(("connection", "transfer-encoding"))
Headers = dict[str, str] | list[tuple[str, str]]
"""A request's headers: a dict, or a list of (name, value) when a name may repeat (a web app's request)."""
_socket_paths: dict[str, str] = {}  # the quoted authority of an http+unix:// URL -> its socket path
_WRITE_HIGH_WATER = 256 * 1024


class HopError(Exception):
    """Root of transport failures of an internal hop."""


class NotDelivered(HopError):
    pass


class ConnectionBroken(HopError):
    pass


class HopTimeout(HopError):
    pass


class HopResponse:
    """``headers`` has lowercase names.  ``body`` is the whole body, unless the call was made with
    ``stream=True``: then ``stream`` yields it and ``body`` is empty."""

    __slots__ = ("status", "headers", "body", "raw_headers", "_stream", "_release")

    def __init__(
        self, status: int, headers: dict[str, str], body: bytes = b"", raw_headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.headers = headers  # a repeated header's values joined with ", "
        self.body = body
        self.raw_headers = raw_headers  # every header line as it came (lowercase names), when kept
        self._stream: Body | None = None
        self._release: Any = None

    @property
    def streamed(self) -> bool:
        """Made with ``stream=True``: the body is still to be read."""
        return self._stream is not None

    async def stream(self) -> AsyncIterable[bytes]:
        """The body, piece by piece (a response read with ``stream=True``)."""
        if self._stream is None:
            if self.body:
                yield self.body
            return
        try:
            async for chunk in self._stream.chunks():
                yield chunk
        except BodyIncomplete as exc:
            if isinstance(exc.__cause__, HopError):
                raise exc.__cause__ from exc  # a HopTimeout, or how the connection broke
            raise ConnectionBroken(f"the connection broke during the response body: {exc}") from exc
        finally:
            if self._release is not None:
                self._release()
                self._release = None

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body of a streamed response."""
        if self._stream is None:
            return self.body
        try:
            data = await self._stream.read(limit)
        except BaseException as exc:
            self.close()  # too large, broken or cancelled: the connection is not reused
            if isinstance(exc, BodyIncomplete):
                if isinstance(exc.__cause__, HopError):
                    raise exc.__cause__ from exc
                raise ConnectionBroken(f"the connection broke during the response body: {exc}") from exc
            raise
        if self._release is not None:
            self._release()
            self._release = None
        self.body = data
        self._stream = None
        return data

    def close(self) -> None:
        """Give up a streamed response unread: its connection is closed, not reused."""
        if self._release is not None:
            self._release(abandon=True)
            self._release = None


class _Connection(asyncio.Protocol, WriteFlow):
    __slots__ = (
        "key", "parser", "transport", "closed", "idle_since", "_head", "_body", "_headers", "_keep_alive",
        "_failure", "raw_headers",
    )  # fmt: skip

    def __init__(self, key: str) -> None:
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._head: asyncio.Future[tuple[int, dict[str, str], Body]] | None = None
        self._body: Body | None = None
        self._headers: dict[str, str] = {}
        self.raw_headers: list[tuple[str, str]] = []  # the current response's header lines, as they came
        self._keep_alive = False
        self._failure: HopError | None = None
        WriteFlow.__init__(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        set_nodelay(transport)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        failure = self._failure or ConnectionBroken(
            f"the connection closed before the response ended ({exc or 'closed by the peer'})"
        )
        if self._head is not None and not self._head.done():
            self._head.set_exception(failure)
        if self._body is not None:
            self._body.fail(failure)
        self.fail_writers(failure)

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # nothing asked: a peer talking out of turn
            self.abort(ConnectionBroken("unexpected data from the peer"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.abort(ConnectionBroken(f"malformed response: {exc}"))

    # parser callbacks
    def on_message_begin(self) -> None:
        self._headers = {}
        self.raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.raw_headers.append((key, text))
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._body = Body(self.transport)
        self._keep_alive = self.parser.should_keep_alive()
        head = self._head
        if head is not None and not head.done():
            head.set_result((self.parser.get_status_code(), self._headers, self._body))

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.feed(data)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.finish()

    # used by the client
    def begin(self) -> asyncio.Future[tuple[int, dict[str, str], Body]]:
        self._head = asyncio.get_running_loop().create_future()
        self._body = None
        return self._head

    def reusable(self, sender: asyncio.Task[None] | None = None) -> bool:
        """The response was read whole, and the request sent whole: the next request may use it."""
        if sender is not None and not (sender.done() and not sender.cancelled() and sender.exception() is None):
            return False
        return not self.closed and self._keep_alive and self._body is not None and self._body.complete

    def sent(self, sender: asyncio.Task[None]) -> None:
        """A streamed request body's sender ended: if it failed, the request is broken."""
        if sender.cancelled():
            return
        exc = sender.exception()
        if exc is not None and not self.closed:
            failure = exc if isinstance(exc, HopError) else ConnectionBroken(f"sending the request body failed: {exc!r}")
            self.abort(failure)

    def end(self) -> None:
        self._head = None
        self._body = None

    def time_out(self, url: str, timeout_s: float) -> None:
        self.abort(HopTimeout(f"no answer from {url} within {timeout_s:.1f} s"))

    def abort(self, failure: HopError) -> None:
        self._failure = failure
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ConnectionBroken("the connection closed while the request was being sent")
        self.transport.write(data)
        await self.wait_writable()


class HopClient:
    """A keep-alive client to one unix socket (``unix_socket``) or to TCP peers named by absolute URLs;
    with ``internal_token``, a client of the platform's internal services."""

    def __init__(
        self, *, unix_socket: str | None = None, max_connections: int = 0, multiplex: bool = True,
        internal_token: str | None = None,
    ) -> None:  # fmt: skip
        self._unix = unix_socket
        self._token = internal_token
        # Built once: every request's head carries it right after its host line.
        self._token_line = f"{wire.INTERNAL_TOKEN}: {internal_token}\r\n" if internal_token else ""
        # Calls to http+unix:// services go over faas.core.mux (whole bodies only; a streamed body
        # takes an HTTP connection); a client made with ``unix_socket`` (a function host) never does.
        self._multiplex = multiplex
        self._mux: Any = None
        self._max_idle = max(max_connections, 256)  # idle connections kept per peer (beyond: closed)
        self._idle: dict[str, list[_Connection]] = {}
        self._closed = False

    async def post(
        self, url: str, *, body: bytes | AsyncIterable[bytes], headers: Headers, timeout_s: float,
        stream: bool = False,
    ) -> HopResponse:  # fmt: skip
        return await self.request("POST", url, body=body, headers=headers, timeout_s=timeout_s, stream=stream)

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | AsyncIterable[bytes] = b"",  # bytes (not bytearray) or chunks
        headers: Headers | None = None,
        timeout_s: float,
        stream: bool = False,
        multiplex: bool = True,
    ) -> HopResponse:
        """One request; with ``stream`` the response comes back at its head (read its body with
        ``stream()`` or ``read()``, or ``close()`` it).  ``timeout_s`` bounds the whole exchange, the
        body of a streamed response included.  ``multiplex=False``: an HTTP connection even to a
        service that speaks the multiplexed protocol (whose answers arrive whole, never streamed)."""
        unix = self._unix
        if url.startswith("http://"):
            authority, slash, path = url[7:].partition("/")
            path = slash + path
        elif url.startswith("http+unix://"):
            authority, slash, path = url[12:].partition("/")
            path = slash + path
            unix = _socket_paths.get(authority)
            if unix is None:
                unix = _socket_paths[authority] = unquote(authority)
            authority = "localhost"
            if self._multiplex and multiplex and isinstance(body, bytes):
                # A platform service on this machine: many calls share one framed connection.
                if self._mux is None:
                    from faas.core.mux import MuxClient

                    self._mux = MuxClient(token=self._token)
                return await self._mux.request(unix, method, path, headers, body, max(timeout_s, 0.001))
        else:
            authority, path = "", url
        key = unix or authority
        loop = asyncio.get_running_loop()
        timeout_s = max(timeout_s, 0.001)
        deadline = loop.time() + timeout_s
        conn = self._take_idle(key)
        if conn is None:
            conn = await self._connect(key, authority, timeout_s, unix)
        head_future = conn.begin()
        timer = loop.call_at(deadline, conn.time_out, url, timeout_s)
        sender: asyncio.Task[None] | None = None
        try:
            if isinstance(body, bytes):
                # The whole request in one write (the usual case: no await, the kernel takes it).
                lines, _ = self._head(method, path, authority, headers, len(body))
                lines.append("\r\n")
                if conn.closed or conn.transport is None:
                    raise NotDelivered("the connection closed before the request was sent")
                conn.transport.write("".join(lines).encode("latin-1") + body)
            else:
                # A streamed body is sent while the response is read (full duplex): a peer may answer,
                # or stream its response, before it has read the whole request.
                sender = loop.create_task(self._send(conn, method, path, authority, headers, body))
                sender.add_done_callback(conn.sent)
            status, resp_headers, resp_body = await head_future
            if stream:
                # The timer stays armed until the body was read (or given up): a peer that stops in
                # the middle of a body does not hold the caller past its timeout.
                resp = HopResponse(status, resp_headers, raw_headers=conn.raw_headers)
                resp._stream = resp_body

                def release(abandon: bool = False) -> None:
                    timer.cancel()
                    if abandon or not conn.reusable(sender):
                        conn.abort(ConnectionBroken("response abandoned"))
                    else:
                        self._give_back(conn)

                resp._release = release
                return resp
            try:
                data = resp_body.take() if resp_body.complete else await resp_body.read()
            except BodyIncomplete as exc:
                raise conn._failure or ConnectionBroken(str(exc)) from exc
        except BaseException:
            timer.cancel()
            if not conn.closed:
                conn.abort(ConnectionBroken("request abandoned"))
            if sender is not None:
                sender.cancel()
            raise
        timer.cancel()
        if conn.reusable(sender):
            self._give_back(conn)
        else:
            conn.abort(ConnectionBroken("not reusable"))
        return HopResponse(status, resp_headers, data, conn.raw_headers)

    def _head(
        self, method: str, path: str, authority: str, headers: Headers | None, length: int | None
    ) -> tuple[list[str], bool]:
        """The request head's lines (without the blank line) and whether the caller gave a length."""
        lines = [f"{method} {path} HTTP/1.1\r\n"]
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
        if not any(name.lower() == "host" for name, _ in pairs):
            lines.append(f"host: {authority or 'localhost'}\r\n")
        lines.append(self._token_line)
        length_given = False
        if pairs:
            for name, value in pairs:
                lower = name.lower()
                if lower in _HOP_BY_HOP:
                    continue
                if lower == "content-length":
                    length_given = True
                lines.append(f"{name}: {value}\r\n")
        if length is not None and not length_given:
            lines.append(f"content-length: {length}\r\n")
        return lines, length_given

    async def _send(
        self, conn: _Connection, method: str, path: str, authority: str, headers: Headers | None,
        body: AsyncIterable[bytes],
    ) -> None:  # fmt: skip
        lines, length_given = self._head(method, path, authority, headers, None)
        if not length_given:
            lines.append("transfer-encoding: chunked\r\n")
        lines.append("\r\n")
        await conn.write("".join(lines).encode("latin-1"))
        async for chunk in body:
            if chunk:
                await conn.write(chunk if length_given else b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if not length_given:
            await conn.write(b"0\r\n\r\n")

    def _take_idle(self, key: str) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_REUSE_S:
                return conn
            conn.abort(ConnectionBroken("stale"))
        return None

    def _give_back(self, conn: _Connection) -> None:
        conn.end()
        if self._closed:
            conn.abort(ConnectionBroken("client closed"))
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._max_idle:
            conn.abort(ConnectionBroken("too many idle connections"))
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _connect(self, key: str, authority: str, timeout_s: float, unix: str | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                if unix is not None:
                    _, conn = await loop.create_unix_connection(lambda: _Connection(key), unix)
                else:
                    host, _, port = authority.rpartition(":")
                    _, conn = await loop.create_connection(
                        lambda: _Connection(key), host or "127.0.0.1", int(port or 80), family=socket.AF_INET
                    )
        except TimeoutError as exc:
            raise NotDelivered(f"could not connect to {key} within {timeout_s:.1f} s") from exc
        except (OSError, ValueError) as exc:
            raise NotDelivered(f"cannot connect to {key}: {exc}") from exc
        return conn

    async def close(self) -> None:
        self._closed = True
        if self._mux is not None:
            await self._mux.close()
        for idle in self._idle.values():
            for conn in idle:
                conn.abort(ConnectionBroken("client closed"))
        self._idle.clear()
        await asyncio.sleep(0)


def for_address(address: str, *, max_connections: int) -> tuple[HopClient, str]:
    """A client for an instance address and the base URL to prefix paths with."""
    if address.startswith("unix://"):
        return HopClient(unix_socket=address[len("unix://") :], max_connections=max_connections), "http://instance"
    return HopClient(max_connections=max_connections), address.rstrip("/")
