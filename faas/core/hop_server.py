"""The platform's HTTP/1.1 server: hot routes straight on asyncio + httptools, the rest through ASGI.

Every platform service runs on it (``faas.core.service.run_service``).  A connection that opens
with ``faas.core.mux.PREFACE`` speaks the multiplexed protocol instead of HTTP, with the same routes.  A request whose method and
path match a ``Router`` route runs its handler directly: no ASGI scope, no middleware, no parameter
machinery, one ``write`` for a response whose body is bytes.  Any other request goes to the service's
ASGI app (the FastAPI management API), so the one port serves both.

Guarantees:
- a server made with ``internal_token`` (every internal service) answers a request that does not
  carry the token (``wire.INTERNAL_TOKEN``, compared in constant time) 401 ``unauthorized`` before
  anything else runs or its body is read, then closes the connection, whatever the route: only the
  ``open_paths`` (the health check) answer without it.  A multiplexed connection presents the token
  once, in its ``HELLO`` frame; one that does not is refused before any of its requests runs
  (``faas.core.mux``), and stays open no longer than an idle HTTP connection;
- requests on one connection are answered in order (a pipelined request waits for the one before);
- request bodies are read on demand (``Request.body``, ``faas.core.body``): a handler that forwards the
  body chunk by chunk holds at most about ``body.HIGH_WATER`` bytes of it; a response body may be an
  async iterator of chunks, sent with the handler's ``content-length`` or else chunked, and the
  handler waits while the peer reads slowly (write flow control);
- a client that goes away never cancels a handler that is running (an invocation runs to its end, and
  a dispatcher joins a re-sent call to it by request id); its response is dropped;
- a ``FaasError`` from a handler is answered in the platform's error shape with its status and
  headers; any other exception is a 500 ``platform_error``, logged, and the connection stays usable;
- a request head over ``MAX_HEAD_BYTES`` or with more than ``MAX_HEADERS`` headers is answered 431, a malformed request 400, then the
  connection closes; a connection idle for ``IDLE_TIMEOUT_S`` between requests is closed, and so is
  one whose request stopped arriving (no byte of its head or body for as long);
- ``shutdown`` stops accepting, closes idle connections, lets running requests finish within a grace
  period (their connections end after the answer), then closes the rest.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import unquote

import httptools

from faas.core import mux, wire
from faas.core.body import Body, BodyIncomplete, BodyTooLarge, WriteFlow, complete_body, set_nodelay
from faas.core.errors import FaasError, PayloadTooLarge, Unauthorized
from faas.core.http import HopResponse

log = logging.getLogger("faas.server")

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
IDLE_TIMEOUT_S = 75.0
# How long a connection whose request was answered before its body arrived reads the body away.
LINGER_S = 5.0
_WRITE_HIGH_WATER = 256 * 1024

_REASONS = {
    200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content", 301: b"Moved Permanently",
    302: b"Found", 304: b"Not Modified", 307: b"Temporary Redirect", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    409: b"Conflict", 410: b"Gone", 413: b"Payload Too Large", 422: b"Unprocessable Entity",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    507: b"Insufficient Storage",
}  # fmt: skip


class Request:
    """One request as the handler sees it.  ``headers`` has lowercase names (a repeated header keeps
    its values joined by ``, ``); ``params`` holds the route's path parameters."""

    __slots__ = ("method", "path", "query", "headers", "raw_headers", "body", "params", "client", "keep_alive")

    def __init__(
        self, method: str, path: str, query: bytes, raw_headers: list[tuple[bytes, bytes]], body: Body,
        client: tuple[str, int] | None, keep_alive: bool,
    ) -> None:  # fmt: skip
        self.method = method
        self.path = path
        self.query = query
        self.raw_headers = raw_headers
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.headers = headers
        self.body = body
        self.params: dict[str, Any] = {}
        self.client = client
        self.keep_alive = keep_alive


class Response:
    """``body`` bytes, or ``stream`` an async iterable of chunks (then ``body`` is ignored)."""

    __slots__ = ("status", "headers", "body", "stream", "content_type", "on_close")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        *,
        stream: AsyncIterable[bytes] | None = None,
        content_type: str | None = "application/json",
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.stream = stream
        self.content_type = content_type
        # Called once the response is sent or given up (a relayed stream frees its upstream connection).
        self.on_close = on_close


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(value).encode(), headers)


def error_response(exc: FaasError) -> Response:
    return Response(exc.http_status, json.dumps(exc.to_body()).encode(), exc.response_headers() or None)


# A hop's response body up to this size is read whole and answered in one write; a larger one (or one
# of unknown size) is relayed chunk by chunk as it arrives.
RELAY_WHOLE_BYTES = 64 * 1024


async def relay(resp: HopResponse) -> Response:
    """Answer with what the next hop answered: its status, the headers a hop passes on
    (``wire.PASSED_HEADERS``), its content type and its body (streamed through when large)."""
    passed = wire.passed_headers(resp.headers)
    content_type = resp.headers.get("content-type", "application/json")
    length = resp.headers.get("content-length")
    if not resp.streamed or (length is not None and length.isdigit() and int(length) <= RELAY_WHOLE_BYTES):
        return Response(resp.status, await resp.read(), passed, content_type=content_type)
    if length is not None:
        passed["content-length"] = length
    return Response(resp.status, headers=passed, stream=resp.stream(), content_type=content_type, on_close=resp.close)


# What a hop does not pass on of a web app's response: the framing of its own connection.
_APP_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length"))


async def relay_app(resp: HopResponse, *, head_request: bool = False) -> Response:
    """Answer with a web app's response as the next hop relayed it: its status, every header line it
    sent (``Set-Cookie`` repeated included) and its body, streamed through as it arrives."""
    raw = resp.raw_headers if resp.raw_headers is not None else list(resp.headers.items())
    headers = [(name, value) for name, value in raw if name not in _APP_HOP_BY_HOP]
    length = resp.headers.get("content-length")
    no_body = head_request or resp.status in (204, 304) or 100 <= resp.status < 200
    if no_body or not resp.streamed or (length is not None and length.isdigit() and int(length) <= RELAY_WHOLE_BYTES):
        body = await resp.read()
        return Response(resp.status, b"" if no_body else body, headers, content_type=None)
    if length is not None and length.isdigit():
        headers.append(("content-length", length))
    return Response(resp.status, headers=headers, stream=resp.stream(), content_type=None, on_close=resp.close)


async def released_after(resp: HopResponse, release: Callable[[], None], *, head_request: bool = False) -> Response:
    """``relay_app(resp)``, calling ``release`` once its body is relayed or given up (at once when it
    was read whole)."""
    try:
        out = await relay_app(resp, head_request=head_request)
    except BaseException:
        resp.close()
        release()
        raise
    if out.stream is None:
        release()
        return out
    close = out.on_close

    def closed() -> None:
        if close is not None:
            close()
        release()

    out.on_close = closed
    return out


# A web app's request headers a hop does not pass on: the framing of its own connection, and the
# internal token and deadline, which each hop sends itself.
_APP_NOT_FORWARDED = frozenset(
    name.encode() for name in (wire.INTERNAL_TOKEN, wire.DEADLINE_MS, "connection", "keep-alive",
                               "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection")
)  # fmt: skip


def app_headers(request: Request) -> list[tuple[str, str]]:
    """A web app's request headers to pass on to the next hop, every line as it came."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in request.raw_headers
        if name not in _APP_NOT_FORWARDED
    ]


def app_body(request: Request) -> bytes | AsyncIterator[bytes]:
    """A web app's request body to pass on: nothing when it has none, else streamed as it arrives."""
    length = request.headers.get("content-length")
    if "transfer-encoding" not in request.headers and (length is None or length == "0"):
        return b""
    return request.body.chunks()


Handler = Callable[[Request], Awaitable[Response]]
ASGIApp = Callable[..., Awaitable[None]]  # (scope, receive, send)


class Router:
    """Routes by method and path template (``/v1/invoke/{ns}/{name}/{version:int}``)."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], tuple[str, ...], dict[str, Handler]]] = []
        # The largest request body the fallback (ASGI) app is given; a larger one is answered 413
        # before it is read (a declared length) or as soon as it passes the limit (chunked).
        self.fallback_body_limit: int | None = None
        # Runs before the fallback app sees a request (before its body is read): a ``FaasError`` it
        # raises is the answer (the gateway checks the API key here, so FastAPI never parses the body
        # of a caller without one).
        self.fallback_guard: Callable[[Request], None] | None = None
        # Consulted before the paths: a request it claims (by its Host, say) goes to the handler it
        # names, with the path parameters it gives, whatever its path.
        self.by_host: Callable[[Request], tuple[Handler, dict[str, Any]] | None] | None = None

    def add(self, method: str, template: str, handler: Handler) -> None:
        if "{" not in template:
            self._exact.setdefault(template, {})[method] = handler
            return
        ints: list[str] = []

        def group(match: re.Match[str]) -> str:
            name, _, kind = match.group(1).partition(":")
            if kind == "int":
                ints.append(name)
                return f"(?P<{name}>[0-9]{{1,18}})"
            if kind == "path":  # the rest of the path, slashes included (possibly empty)
                return f"(?P<{name}>.*)"
            return f"(?P<{name}>[^/]+)"

        pattern = re.compile("^" + re.sub(r"\{([^}]+)\}", group, template) + "$")
        for compiled, _, methods in self._patterns:
            if compiled.pattern == pattern.pattern:
                methods[method] = handler
                return
        self._patterns.append((pattern, tuple(ints), {method: handler}))

    def match(self, path: str) -> tuple[dict[str, Handler], dict[str, Any]] | None:
        methods = self._exact.get(path)
        if methods is not None:
            return methods, {}
        for pattern, ints, methods in self._patterns:
            m = pattern.match(path)
            if m is not None:
                params: dict[str, Any] = m.groupdict()
                for name in ints:
                    params[name] = int(params[name])
                return methods, params
        return None


class _Connection(asyncio.Protocol, WriteFlow):
    __slots__ = (
        "server", "parser", "transport", "client", "_url", "_headers", "_head_bytes", "_too_many_headers", "_current",
        "_waiting", "_active", "_closed", "idle_since", "_lost", "_lingering",
        "_force_close", "_sniffed", "_sniff_buffer", "_mux", "last_data",
    )  # fmt: skip

    def __init__(self, server: HopServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._too_many_headers = False
        self._current: Request | None = None  # the request being parsed
        self._waiting: deque[Request] = deque()  # parsed, waiting for the one before to be answered
        self._active = False
        self._closed = False
        WriteFlow.__init__(self)
        self.idle_since: float | None = None  # loop time since when no request is running or arriving
        self._lost: asyncio.Future[None] | None = None  # set when the connection ends (ASGI disconnect)
        self._lingering: asyncio.TimerHandle | None = None  # reading away an unanswered body, then closing
        self._force_close = False  # the connection ends after the current request
        self.last_data = 0.0  # loop time of the last bytes received
        self._sniffed = False
        self._sniff_buffer = b""
        self._mux: _MuxServer | None = None

    # -- transport events -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (peer[0], peer[1])
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.server._connections.add(self)
        self.idle_since = asyncio.get_running_loop().time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server._connections.discard(self)
        if self._lingering is not None:
            self._lingering.cancel()
        lost = ConnectionResetError("the client closed the connection")
        for request in (self._current, *self._waiting):
            if request is not None:
                request.body.fail(lost)
        self._waiting.clear()
        self.fail_writers(lost)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_data = asyncio.get_running_loop().time()
        if self._mux is not None:
            self._mux.feed(data)
            return
        if not self._sniffed:
            # A client of the multiplexed protocol (faas.core.mux) starts with its preface.
            sniff = self._sniff_buffer + data
            if len(sniff) < len(mux.PREFACE) and mux.PREFACE.startswith(sniff):
                self._sniff_buffer = sniff
                return
            self._sniffed = True
            self._sniff_buffer = b""
            if sniff.startswith(mux.PREFACE) and self.transport is not None:
                self._mux = _MuxServer(self, self.transport)
                self._mux.feed(sniff[len(mux.PREFACE) :])
                return
            data = sniff
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request (already parsed and running) is served as HTTP/1.1; what follows the
            # upgrade request is not HTTP, so the connection ends after the answer.
            self._force_close = True
            if self.transport is not None:
                self.transport.pause_reading()
        except httptools.HttpParserCallbackError:
            if self._too_many_headers:
                self._reject(431, f"request has more than {MAX_HEADERS} headers")
            elif self._head_bytes > MAX_HEAD_BYTES:
                self._reject(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")
            else:
                self._reject(400, "malformed request")
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")

    def _reject(self, status: int, message: str) -> None:
        if self._closed or self.transport is None:
            return
        if self._current is not None:
            self._current.body.fail(ConnectionAbortedError(message))
        if not self._active:
            kind = "payload_too_large" if status == 431 else "invalid_request"
            body = json.dumps({"error": {"kind": kind, "type": "BadRequest", "message": message}}).encode()
            self.transport.write(_head(status, None, "application/json", len(body), False) + body)
        self.transport.close()
        self._closed = True

    # -- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._lingering is not None:
            return
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._too_many_headers = False
        self.idle_since = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ValueError("head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ValueError("head too large")
        if len(self._headers) >= MAX_HEADERS:
            self._too_many_headers = True
            raise ValueError("too many headers")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._lingering is not None:
            return
        raw_path, _, query = self._url.partition(b"?")
        path = raw_path.decode("latin-1")
        request = Request(
            self.parser.get_method().decode(), path, query, self._headers, Body(self.transport), self.client,
            self.parser.should_keep_alive(),
        )  # fmt: skip
        self._current = request
        if self._active:
            self._waiting.append(request)
        else:
            self._start(request)

    def on_body(self, data: bytes) -> None:
        if self._current is not None:
            self._current.body.feed(data)

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.body.finish()
            self._current = None
        if self._lingering is not None:
            self._close()

    def _close(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if self.transport is not None and not self._closed:
            self.transport.close()
        self._closed = True

    # -- running requests -------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._active = True
        self.server._running += 1
        asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        keep_alive = request.keep_alive and not self._force_close
        response: Response | None = None
        try:
            server = self.server
            if server.token is not None and not server.admits(request):
                # Before the route, its body or the fallback's guards; the connection then ends.
                keep_alive = await self._send(server.refusal, False)
                return
            response = await _respond(server, request)
            if response is None:
                keep_alive = await self._asgi(request) and keep_alive
                return
            if not request.body.complete:
                keep_alive = False  # the rest of the body is still on the wire: do not parse it as a request
            keep_alive = await self._send(response, keep_alive)
        except (ConnectionError, BodyIncomplete):
            keep_alive = False
        except BaseException as exc:
            # A failure after the head went out (a relayed body whose upstream broke): the response is
            # cut short, so the connection must end for the client to see it.
            keep_alive = False
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("a response to %s %s broke off: %r", request.method, request.path, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if response is not None and response.on_close is not None:
                response.on_close()
            # Whatever of the body the handler left unread is dropped (and reading resumes).
            request.body.discard()
            self.server._running -= 1
            self._active = False
            self._finished(keep_alive)

    def _finished(self, keep_alive: bool) -> None:
        if self._closed or self.transport is None:
            return
        if not keep_alive or self._force_close:
            current = self._current
            if current is not None and not current.body.complete:
                # Answered before its body arrived (413, an error): read the rest away before closing,
                # or the peer, still sending, would get a reset instead of the answer.
                current.body.discard()
                self._waiting.clear()
                self._lingering = asyncio.get_running_loop().call_later(LINGER_S, self._close)
                return
            self._close()
            return
        if self._waiting:
            self._start(self._waiting.popleft())
        else:
            self.idle_since = asyncio.get_running_loop().time()

    def closing(self) -> None:
        """The server stops: an idle connection closes now, a busy one after its answer."""
        self._force_close = True
        if not self._active and self._current is None and self._mux is None:
            self._close()

    def close_if_idle_since(self, before: float) -> None:
        if self._mux is not None and self._mux.authenticated:
            return  # a multiplexed connection is its client's for as long as it runs
        if self._current is not None and self.last_data < before and self.transport is not None:
            # A request whose head or body stopped arriving (a client that trickles or vanished).
            self._current.body.fail(ConnectionAbortedError("the request stopped arriving"))
            self._close()
            return
        idle_since = self.idle_since
        if idle_since is not None and idle_since < before and not self._active and self._current is None:
            self._close()

    async def _send(self, response: Response, keep_alive: bool) -> bool:
        """Write the response; returns whether the connection may carry another request."""
        if self._closed or self.transport is None:
            return False
        headers = response.headers
        if (_header(headers, "connection") or "").lower() == "close":
            keep_alive = False
        if response.stream is None:
            body = response.body
            self.transport.write(_head(response.status, headers, response.content_type, len(body), keep_alive) + body)
            return keep_alive
        declared = _header(headers, "content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        self.transport.write(_head(response.status, headers, response.content_type, length, keep_alive))
        sent = 0
        async for chunk in response.stream:
            if not chunk:
                continue
            sent += len(chunk)
            await self._write(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if length is None:
            await self._write(b"0\r\n\r\n")
        elif sent != length:
            log.error("a streamed response sent %d bytes for a content-length of %d; closing", sent, length)
            return False
        return keep_alive

    async def _write(self, data: bytes) -> None:
        if self._closed or self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)
        await self.wait_writable()

    # -- ASGI, for everything that is not a hot route ---------------------------------------------

    async def _asgi(self, request: Request) -> bool:
        """Run the fallback ASGI app for ``request``; returns whether the connection may be kept."""
        app = self.server.fallback
        assert app is not None
        loop = asyncio.get_running_loop()
        if self._lost is None:
            self._lost = loop.create_future()
        sockname = self.transport.get_extra_info("sockname") if self.transport is not None else None
        server = tuple(sockname[:2]) if isinstance(sockname, tuple) else None
        scope = _asgi_scope(request, self.server.state, server)
        guard = self.server.router.fallback_guard
        if guard is not None:
            try:
                guard(request)
            except FaasError as exc:
                await self._send(error_response(exc), False)  # the body still arriving is read away
                return False
        limit = self.server.router.fallback_body_limit
        if limit is not None and _declared_length(request) > limit:
            # Refused before its body is read: the rest of it is read away for a while, not kept.
            await self._send(error_response(PayloadTooLarge(f"request body exceeds {limit} bytes")), False)
            return False
        received = 0
        refused = False
        body_done = False
        response_done = False
        started: dict[str, Any] = {}
        chunked = False
        keep_alive = request.keep_alive and not self._force_close
        no_body = request.method == "HEAD"

        async def receive() -> dict[str, Any]:
            nonlocal body_done, received, response_done, refused
            if not body_done:
                try:
                    chunk = await request.body.next_chunk()
                except BodyIncomplete:
                    return {"type": "http.disconnect"}
                if chunk is None:
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                received += len(chunk)
                if limit is not None and received > limit:
                    # A chunked body past the limit: answered 413 here; the app sees the client leave.
                    body_done = refused = True
                    if "written" not in started:
                        started["written"] = True
                        response_done = True
                        await self._send(error_response(PayloadTooLarge(f"request body exceeds {limit} bytes")), False)
                    return {"type": "http.disconnect"}
                return {"type": "http.request", "body": chunk, "more_body": True}
            if not response_done and self._lost is not None:
                await asyncio.shield(self._lost)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal chunked, response_done, keep_alive, no_body
            kind = message["type"]
            if kind == "http.response.start":
                started["status"] = message["status"]
                started["headers"] = message.get("headers", [])
                return
            if kind != "http.response.body" or response_done:
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if "written" not in started:
                started["written"] = True
                raw = started.get("headers", [])
                names = {bytes(n).lower() for n, _ in raw}
                if b"connection" in names and any(bytes(n).lower() == b"connection" and bytes(v).lower() == b"close" for n, v in raw):
                    keep_alive = False
                lines = [b"HTTP/1.1 %d %s\r\n" % (started["status"], _REASONS.get(started["status"], b"Unknown"))]
                lines.extend(b"%s: %s\r\n" % (bytes(n), bytes(v)) for n, v in raw)
                status = started["status"]
                no_body = no_body or status in (204, 304)
                # A body still arriving when the answer goes out is read away, then the connection ends.
                keep_alive = keep_alive and request.body.complete
                if b"content-length" not in names and not no_body:
                    if more:
                        chunked = True
                        lines.append(b"transfer-encoding: chunked\r\n")
                    else:
                        lines.append(b"content-length: %d\r\n" % len(body))
                lines.append(b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n")
                await self._write(b"".join(lines))
            if no_body:
                body = b""
            if body:
                await self._write(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
            if not more:
                response_done = True
                if chunked and not no_body:
                    await self._write(b"0\r\n\r\n")

        try:
            await app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the app's own error handlers answer what they know
            if refused:
                return False  # the app failed on the body it was refused (a disconnect, to it)
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
            if "written" not in started and not self._closed:
                await self._send(error_response(FaasError(f"internal error: {type(exc).__name__}: {exc}")), False)
            return False
        if not response_done:
            return False  # the app ended without finishing its response: the peer cannot frame it
        return keep_alive and request.body.complete


def _header(headers: dict[str, str] | list[tuple[str, str]] | None, name: str) -> str | None:
    """A response header's value (the first, when the headers are a list of lines)."""
    if headers is None:
        return None
    if isinstance(headers, dict):
        return headers.get(name)
    return next((value for key, value in headers if key == name), None)


def _head(
    status: int, headers: dict[str, str] | list[tuple[str, str]] | None, content_type: str | None,
    length: int | None, keep_alive: bool,
) -> bytes:  # fmt: skip
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    if content_type is not None:
        parts.append(b"content-type: %s\r\n" % content_type.encode("latin-1"))
    if headers:
        for name, value in headers.items() if isinstance(headers, dict) else headers:
            if name in ("content-length", "connection", "transfer-encoding"):
                continue
            parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    parts.append(b"content-length: %d\r\n" % length if length is not None else b"transfer-encoding: chunked\r\n")
    parts.append(b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n")
    return b"".join(parts)


def _declared_length(request: Request) -> int:
    """The request's Content-Length, 0 when it has none (chunked, or no body)."""
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0


def _not_found(path: str) -> Response:
    body = {"error": {"kind": "not_found", "type": "NotFound", "message": f"no route {path}"}}
    return Response(404, json.dumps(body).encode())


def _method_not_allowed(method: str, allowed: list[str]) -> Response:
    body = {"error": {"kind": "invalid_request", "type": "MethodNotAllowed", "message": f"{method} not allowed; use {', '.join(allowed)}"}}
    return Response(405, json.dumps(body).encode(), {"allow": ", ".join(allowed)})


async def _respond(server: HopServer, request: Request) -> Response | None:
    """The response of ``request``'s hot route, or None when it is the fallback's."""
    by_host = server.router.by_host
    claimed = by_host(request) if by_host is not None else None
    found = ({request.method: claimed[0]}, claimed[1]) if claimed is not None else server.router.match(request.path)
    if found is None or (request.method not in found[0] and server.fallback is not None):
        return _not_found(request.path) if server.fallback is None else None
    handler = found[0].get(request.method)
    if handler is None:
        return _method_not_allowed(request.method, sorted(found[0]))
    request.params = found[1]
    try:
        return await handler(request)
    except FaasError as exc:
        return error_response(exc)
    except BodyTooLarge as exc:
        return error_response(PayloadTooLarge(f"request body exceeds {exc.limit} bytes"))
    except BodyIncomplete:
        raise  # the client went away mid-body: nobody to answer
    except Exception as exc:  # noqa: BLE001 - a handler bug answers 500, the server goes on
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return error_response(FaasError(f"internal error: {type(exc).__name__}: {exc}"))


def _asgi_scope(request: Request, state: dict[str, Any], server: tuple[Any, ...] | None) -> dict[str, Any]:
    """The ASGI HTTP scope of ``request`` (the fallback app's view of it)."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": unquote(request.path),
        "raw_path": request.path.encode("latin-1"), "query_string": request.query, "root_path": "",
        "headers": request.raw_headers, "client": request.client, "server": server, "state": dict(state),
    }  # fmt: skip


async def _asgi_collect(app: ASGIApp, request: Request, state: dict[str, Any], limit: int | None) -> Response:
    """Run the fallback app for a request whose body is whole, and collect its whole response;
    ``BodyTooLarge`` for a body over ``limit``."""
    scope = _asgi_scope(request, state, None)
    body = await request.body.read(limit)
    sent = False
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    status = 500
    headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never  # the caller stays for the whole response
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", []):
                headers[bytes(name).decode("latin-1").lower()] = bytes(value).decode("latin-1")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception as exc:  # noqa: BLE001 - the app's own error handlers answer what they know
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return error_response(FaasError(f"internal error: {type(exc).__name__}: {exc}"))
    finally:
        never.cancel()
    return Response(status, b"".join(chunks), headers, content_type=None)


class _MuxServer:
    """The server side of a multiplexed connection (``faas.core.mux``): each request frame runs as
    the same route it would over HTTP, its response goes back in one frame."""

    __slots__ = ("conn", "reader", "writer", "authenticated", "greeted", "refused")

    def __init__(self, conn: _Connection, transport: asyncio.Transport) -> None:
        self.conn = conn
        self.reader = mux.FrameReader()
        self.writer = mux.Coalescer(transport)
        # Requests run only once the connection presented the server's token (if it has one).
        self.authenticated = conn.server.token is None
        self.greeted = False  # a HELLO was received
        self.refused = False

    def feed(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            for kind, stream, payload in self.reader.feed(data):
                if kind != mux.REQUEST or not self.authenticated:
                    if self._greeting(kind, payload):
                        continue
                    return
                lines, body = mux.split_head(payload)
                method, target = lines[0].split(b" ", 1)
                raw_path, _, query = target.partition(b"?")
                request = Request(
                    method.decode("latin-1"), raw_path.decode("latin-1"), query, mux.parse_headers(lines[1:]),
                    complete_body(body), None, True,
                )  # fmt: skip
                self.conn.server._running += 1
                asyncio.get_running_loop().create_task(self._run(stream, request))
        except (mux.FrameError, ValueError) as exc:
            log.warning("closing a multiplexed connection: %s", exc)
            self.writer.transport.abort()

    def _greeting(self, kind: int, payload: bytes) -> bool:
        """A frame other than an authenticated connection's request: True when the connection goes on
        (its HELLO carried the token); else it is refused or broken, and nothing more of it runs."""
        if kind == mux.HELLO and not self.greeted:
            self.greeted = True
            token = self.conn.server.token
            if token is None or hmac.compare_digest(payload, token):
                self.authenticated = True
                return True
        if self.authenticated:
            raise mux.FrameError(f"unexpected frame type {kind}")
        # No HELLO first, or not the token: one refusal on stream 0, then the connection ends.  Our
        # side is shut at once; what the client still sends is read away (unrun) for a while, so it
        # reads the refusal rather than a broken pipe on the calls it wrote meanwhile.
        self.refused = True
        transport = self.writer.transport
        if not transport.is_closing():
            transport.write(self.conn.server.mux_refusal)
            if transport.can_write_eof():
                transport.write_eof()
                asyncio.get_running_loop().call_later(LINGER_S, transport.close)
            else:
                transport.close()
        return False

    async def _run(self, stream: int, request: Request) -> None:
        server = self.conn.server
        response: Response | None = None
        try:
            response = await _respond(server, request)
            if response is None:
                assert server.fallback is not None
                try:
                    if server.router.fallback_guard is not None:
                        server.router.fallback_guard(request)
                    response = await _asgi_collect(
                        server.fallback, request, server.state, server.router.fallback_body_limit
                    )
                except FaasError as exc:
                    response = error_response(exc)
                except BodyTooLarge as exc:
                    response = error_response(PayloadTooLarge(f"request body exceeds {exc.limit} bytes"))
            if response.stream is None:
                body = response.body
            else:
                body = b"".join([chunk async for chunk in response.stream])
            payload = mux.response_payload(response.status, response.headers, response.content_type, body)
            if not self.conn._closed:
                self.writer.write(mux.frame(mux.RESPONSE, stream, payload))
        except Exception as exc:  # noqa: BLE001 - e.g. a relayed body that broke: the caller's call breaks
            log.warning("a multiplexed call to %s failed: %r", request.path, exc)
            if not self.conn._closed:
                self.writer.transport.abort()
        finally:
            if response is not None and response.on_close is not None:
                response.on_close()
            server._running -= 1


REFUSED = (
    "this internal service answers only the platform's own processes: send the platform's internal "
    f"token ({wire.INTERNAL_TOKEN}, from FAAS_INTERNAL_TOKEN)"
)


class HopServer:
    """Serves ``router``'s routes, and everything else through ``fallback`` (an ASGI app), on one socket.

    With ``internal_token`` only callers that send it are served, but on ``open_paths``."""

    def __init__(
        self, router: Router, fallback: ASGIApp | None = None, *, idle_timeout_s: float = IDLE_TIMEOUT_S,
        state: dict[str, Any] | None = None, internal_token: str | None = None,
        open_paths: frozenset[str] = wire.OPEN_PATHS,
    ) -> None:  # fmt: skip
        if internal_token is not None and not internal_token:
            raise ValueError("an empty internal token would let anyone in: pass None for an open server")
        self.token = internal_token.encode("latin-1") if internal_token is not None else None
        self.open_paths = open_paths
        refusal = Unauthorized(REFUSED)
        self.refusal = error_response(refusal)  # the same answer every time: built once
        self.mux_refusal = mux.frame(
            mux.RESPONSE, mux.REFUSAL_STREAM,
            mux.response_payload(401, refusal.response_headers(), "application/json", self.refusal.body),
        )  # fmt: skip
        self.router = router
        self.fallback = fallback
        self.idle_timeout_s = idle_timeout_s
        self.state = state or {}
        self._connections: set[_Connection] = set()
        self._running = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def admits(self, request: Request) -> bool:
        """Whether ``request`` carries the internal token, or asks for an open path."""
        given = request.headers.get(wire.INTERNAL_TOKEN)
        if given is not None and self.token is not None and hmac.compare_digest(given.encode("latin-1"), self.token):
            return True
        return request.path in self.open_paths

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        else:
            self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=2048)
        self._sweeper = loop.create_task(self._close_idle_connections())

    async def _close_idle_connections(self) -> None:
        """One sweep every quarter of the idle timeout, rather than a timer per request."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.idle_timeout_s / 4)
            before = loop.time() - self.idle_timeout_s
            for conn in list(self._connections):
                conn.close_if_idle_since(before)

    async def shutdown(self, grace_s: float = 3.0) -> None:
        """Stop accepting, give running requests ``grace_s`` to finish, then close every connection."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._connections):
            conn.closing()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._running and loop.time() < deadline:  # noqa: ASYNC110 - shutdown only
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
