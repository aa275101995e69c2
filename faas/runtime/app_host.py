"""A WSGI or ASGI web app served by a function host, over HTTP/1.1, with the standard library only.

The host (``host.py``) loads this file when it specialises as an app (``"kind": "app"``): it imports
the user's ``module:attr``, makes an ``AppServer`` of it and calls ``start`` (ASGI lifespan startup,
then the readiness request), and from then on hands every connection whose first request is for the
app (``METHOD /_/app<path>[?query]``) to ``AppServer.adopt``.  The connection is served on the
host's event loop from then on, keep-alive included.

Wire: ``/_/app`` is cut off the request target; the rest is the path the app is asked for, below its
root path, which the caller names in ``X-Faas-Root-Path`` (``/app/shop`` for ``/app/shop/items``).
Bodies either way are ``Content-Length`` or chunked.  ``GET /_/health`` on an adopted connection is
answered as the host answers it; any other ``/_/`` path is 404.

Guarantees:
- streamed both ways: a request body reaches the app as it arrives (at most ``READ_CHUNK`` bytes read
  ahead of what the app has taken), and the response goes out as the app produces it (chunked unless
  the app set ``Content-Length``), each write waiting for the socket to drain; a HEAD answer has no
  body;
- headers as they came: a repeated request header reaches an ASGI app as separate pairs and a WSGI
  app joined with ", " (cookies with "; "); repeated response headers (``Set-Cookie``) go out each on
  its own line; the app's root path is the ASGI ``root_path`` (with ``path`` including it, as uvicorn
  does) and the WSGI ``SCRIPT_NAME`` (``PATH_INFO`` below it);
- ASGI apps run on the host's one event loop (lifespan ``state`` shared, as the spec says); WSGI apps
  in a pool of ``concurrency`` threads, their body reads and writes passed to the loop;
- at most ``concurrency`` requests run at once; one more is answered 429 at once;
- each request is bounded by its deadline (``X-Faas-Deadline-Ms``, else the version's timeout): past
  it an ASGI request is cancelled, a WSGI one is abandoned (its thread cannot be stopped; what it
  writes later is dropped); either is answered 504 if its response has not started, else its
  connection is closed mid-body;
- an exception before the response started is answered 500 in the platform's error shape (the
  traceback goes to the host's log); one after it closes the connection mid-body, so the client sees
  a truncated response and never a complete-looking one;
- a request the app did not read to its end is read away (up to ``DRAIN_LIMIT``) before the next
  one on the connection, else the connection is closed.

Caveats: WebSocket upgrades are answered 501 for now; HTTP/1.0 clients get ``Connection: close``
answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

READ_CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
DRAIN_LIMIT = 1024 * 1024
APP_PREFIX = b"/_/app"
READINESS_TIMEOUT_S = 30.0
LIFESPAN_TIMEOUT_S = 30.0
TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Headers of the hop between the dispatcher and the host, not the client's: the app does not see them.
HOP_HEADERS = frozenset({b"x-faas-root-path", b"x-faas-deadline-ms", b"x-faas-internal-token", b"x-faas-function-uid",
                         b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade"})  # fmt: skip
REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AppStartError(Exception):
    """The app could not start: its lifespan startup failed, or it answered no readiness request."""


def is_asgi(app: Any) -> bool:
    """An ASGI 3 app is an async callable; anything else callable is taken for WSGI."""
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004 - an object with an async __call__
    return not inspect.isfunction(app) and inspect.iscoroutinefunction(call)


# -- the request ------------------------------------------------------------------------------------


class Request:
    __slots__ = ("method", "path", "raw_path", "query", "version", "headers", "keep_alive", "length", "chunked",
                 "root_path", "deadline")  # fmt: skip

    def __init__(self, head: bytes, default_timeout_s: float) -> None:
        lines = head[:-4].split(b"\r\n")
        while lines and not lines[0]:  # stray CRLFs between requests
            del lines[0]
        try:
            method, target, version = lines[0].split(b" ", 2)
        except (ValueError, IndexError):
            raise BadRequest(400, "malformed request line") from None
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not method or not set(method) <= TOKEN_CHARS:
            raise BadRequest(400, "malformed request line")
        if len(lines) - 1 > MAX_HEADERS:
            raise BadRequest(431, f"more than {MAX_HEADERS} headers")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or not set(name) <= TOKEN_CHARS:
                raise BadRequest(400, "malformed header line")
            headers.append((name.lower(), value.strip(b" \t")))
        self.method = method.decode("ascii")
        self.version = version
        raw_path, _, self.query = target.partition(b"?")
        if not raw_path.startswith(APP_PREFIX):
            raise BadRequest(404, f"not an app request: {raw_path[:200].decode('latin-1')}")
        self.raw_path = raw_path[len(APP_PREFIX) :] or b"/"
        if not self.raw_path.startswith(b"/"):
            raise BadRequest(404, f"not an app request: {raw_path[:200].decode('latin-1')}")
        self.path = unquote_to_bytes(self.raw_path)
        self.headers = [(n, v) for n, v in headers if n not in HOP_HEADERS]
        own = dict(headers)
        self.root_path = own.get(b"x-faas-root-path", b"").decode("latin-1").rstrip("/")
        connection = own.get(b"connection", b"").lower()
        self.keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
        deadline_ms = own.get(b"x-faas-deadline-ms", b"")
        self.deadline = int(deadline_ms) / 1000 if deadline_ms.isdigit() else time.time() + default_timeout_s
        encoding = own.get(b"transfer-encoding")
        self.chunked = False
        self.length = 0
        if encoding is not None:
            if encoding.lower() != b"chunked":
                raise BadRequest(501, f"transfer-encoding {encoding.decode('latin-1')!r} is not supported")
            if b"content-length" in own:
                raise BadRequest(400, "both Content-Length and Transfer-Encoding")
            self.chunked = True
        elif b"content-length" in own:
            text = own[b"content-length"]
            if not text.isdigit():
                raise BadRequest(400, "bad Content-Length")
            self.length = int(text)
        if own.get(b"upgrade"):
            raise BadRequest(501, "WebSocket and other upgrades are not supported yet")

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next request head (CRLFCRLF included), or None when the peer closed between requests."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise ConnectionResetError("the peer closed in the middle of a request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "request head too large") from None


class Body:
    """A request's body, read as the app asks for it."""

    __slots__ = ("reader", "remaining", "chunked", "done")

    def __init__(self, reader: asyncio.StreamReader, request: Request) -> None:
        self.reader = reader
        self.chunked = request.chunked
        self.remaining = request.length  # of the body (Content-Length), or of the current chunk
        self.done = not request.chunked and request.length == 0

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b"" once it is all read."""
        if self.done:
            return b""
        if not self.chunked:
            data = await self.reader.read(min(self.remaining, READ_CHUNK))
            if not data:
                raise ConnectionResetError("the peer closed in the middle of a request body")
            self.remaining -= len(data)
            self.done = self.remaining == 0
            return data
        if self.remaining == 0:
            line = await self.reader.readuntil(b"\r\n")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(400, "malformed chunk size") from None
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":  # trailers: ignored
                    pass
                self.done = True
                return b""
            self.remaining = size
        data = await self.reader.read(min(self.remaining, READ_CHUNK))
        if not data:
            raise ConnectionResetError("the peer closed in the middle of a request body")
        self.remaining -= len(data)
        if self.remaining == 0:
            if await self.reader.readexactly(2) != b"\r\n":
                raise BadRequest(400, "malformed chunk")
        return data

    async def drain(self, limit: int) -> bool:
        """Read away what the app left unread; False if more than ``limit`` bytes were left."""
        read = 0
        while not self.done:
            read += len(await self.next_chunk())
            if read > limit:
                return False
        return True


# -- the response -----------------------------------------------------------------------------------


class Response:
    """Writes one response as the app produces it: head at the first body (or at the end), then the
    body, chunked unless the app gave a Content-Length.  ``abandon`` drops every later write."""

    __slots__ = ("writer", "head_only", "keep_alive", "status", "headers", "started", "ended", "chunked",
                 "abandoned", "version")  # fmt: skip

    def __init__(self, writer: asyncio.StreamWriter, request: Request) -> None:
        self.writer = writer
        self.head_only = request.method == "HEAD"
        self.keep_alive = request.keep_alive
        self.version = request.version
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False  # the head is written
        self.ended = False
        self.chunked = False
        self.abandoned = False

    def set_head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = [(n.lower(), v) for n, v in headers if n.lower() not in (b"connection", b"transfer-encoding")]

    def _head(self, final: bytes | None) -> bytes:
        no_body = self.head_only or self.status in (204, 304) or 100 <= self.status < 200
        headers = self.headers
        if no_body:
            # No body follows, whatever length the app announced (a HEAD answer gives the GET's): the
            # hop's client cannot know the request was a HEAD, so the framing says 0.
            headers = [(n, v) for n, v in headers if n != b"content-length"] + [(b"content-length", b"0")]
        has_length = any(n == b"content-length" for n, _ in headers)
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, REASONS.get(self.status, "Unknown").encode())]
        lines += [b"%s: %s\r\n" % (n, v) for n, v in headers]
        if not has_length and not no_body:
            if final is not None:
                lines.append(b"content-length: %d\r\n" % len(final))  # the whole body is known
            elif self.version == b"HTTP/1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        lines.append(b"connection: keep-alive\r\n\r\n" if self.keep_alive else b"connection: close\r\n\r\n")
        return b"".join(lines)

    async def body(self, data: bytes, *, more: bool, force: bool = False) -> None:
        if (self.abandoned and not force) or self.ended:
            return
        out = b""
        if not self.started:
            self.started = True
            out = self._head(None if more else data)
        if data and not self.head_only:
            out += b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        if not more:
            self.ended = True
            if self.chunked and not self.head_only:
                out += b"0\r\n\r\n"
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def error(self, status: int, kind: str, error_type: str, message: str) -> None:
        """The platform's error shape, when the app's response has not started (written even when
        the app's own writes are abandoned)."""
        body = json.dumps({"error": {"kind": kind, "type": error_type, "message": message}}).encode()
        self.set_head(status, [(b"content-type", b"application/json")])
        await self.body(body, more=False, force=True)

    async def from_thread(self, status: int, headers: list[tuple[str, str]], data: bytes, *, more: bool) -> None:
        """A WSGI app's write, run on the loop: its head first if not written yet."""
        if self.abandoned or self.ended:
            return
        if not self.started and self.status == 0:
            self.set_head(status, [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers])
        await self.body(data, more=more)


# -- the server -------------------------------------------------------------------------------------


class AppServer:
    def __init__(
        self, app: Any, *, concurrency: int, timeout_s: float, health: Callable[[], tuple[int, dict[str, Any]]],
        diag: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.app = app
        self.asgi = is_asgi(app)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.health = health
        self.diag = diag
        self.inflight = 0
        self.requests = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state: dict[str, Any] = {}  # ASGI lifespan state, shallow-copied into every request
        self.pool = (
            None if self.asgi else concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="wsgi")
        )
        self._lifespan: asyncio.Task[Any] | None = None
        self.connections: set[asyncio.Task[None]] = set()  # the adopted connections' tasks

    # -- start ---------------------------------------------------------------------------------------

    async def start(self, readiness_path: str) -> None:
        """Lifespan startup (ASGI), then one ``GET readiness_path`` in process: any HTTP answer will do."""
        self.loop = asyncio.get_running_loop()
        if self.asgi:
            await self._lifespan_startup()
        try:
            status = await asyncio.wait_for(self._probe(readiness_path), READINESS_TIMEOUT_S)
        except TimeoutError:
            raise AppStartError(f"the app did not answer GET {readiness_path} within {READINESS_TIMEOUT_S:g} s") from None
        except Exception as exc:
            raise AppStartError(
                f"the app raised {type(exc).__name__} answering GET {readiness_path}: {exc}"
            ) from exc
        self.diag(f"app ready: GET {readiness_path} answered {status}")

    async def _lifespan_startup(self) -> None:
        assert self.loop is not None
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        started: asyncio.Future[None] = self.loop.create_future()

        async def receive() -> dict[str, Any]:
            return await inbox.get()

        async def send(message: dict[str, Any]) -> None:
            kind = message.get("type")
            if kind == "lifespan.startup.complete" and not started.done():
                started.set_result(None)
            elif kind == "lifespan.startup.failed" and not started.done():
                started.set_exception(AppStartError(f"the app's lifespan startup failed: {message.get('message', '')}"))

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        task = self._lifespan = self.loop.create_task(self.app(scope, receive, send))
        inbox.put_nowait({"type": "lifespan.startup"})
        done, _ = await asyncio.wait({task, started}, timeout=LIFESPAN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if started in done:
            started.result()  # raises AppStartError when it failed
            return
        if task in done:
            # It returned or raised without answering the startup: no lifespan support (uvicorn's
            # "auto" mode takes it so too).
            error = task.exception()
            self.diag(f"the app does not support lifespan ({type(error).__name__ if error else 'returned'}); going on")
            return
        raise AppStartError(f"the app's lifespan startup did not finish within {LIFESPAN_TIMEOUT_S:g} s")

    async def _probe(self, path: str) -> int:
        """One GET of ``path``, in process; the status the app answered."""
        answered: list[int] = []
        if self.asgi:
            scope = self._asgi_scope("GET", path.encode(), path.encode(), b"", [(b"host", b"localhost")], "")

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    answered.append(int(message["status"]))

            await self.app(scope, receive, send)
        else:
            environ = self._wsgi_environ("GET", path.encode(), b"", [(b"host", b"localhost")], "", None)

            def run() -> None:
                def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
                    answered.append(int(status.split(" ", 1)[0]))
                    return lambda _data: None

                result = self.app(environ, start_response)
                try:
                    for _ in result:
                        pass
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()

            assert self.loop is not None
            await self.loop.run_in_executor(self.pool, run)
        if not answered:
            raise AppStartError(f"the app answered GET {path} without a response")
        return answered[0]

    # -- connections ---------------------------------------------------------------------------------

    def adopt(self, sock: Any, head: bytes, buffered: bytes) -> None:
        """Serve ``sock`` on the loop from now on; ``head`` is its first request's, ``buffered`` what was
        read after it.  Called from the connection's thread, which then lets go of the socket."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._start_serving, sock, head, buffered)

    def _start_serving(self, sock: Any, head: bytes, buffered: bytes) -> None:
        # The loop keeps only weak references to tasks: one nobody holds may be collected while it
        # waits, closing its connection under a request.  ``connections`` holds each until it ends.
        assert self.loop is not None
        task = self.loop.create_task(self._serve(sock, head, buffered))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def _serve(self, sock: Any, head: bytes | None, buffered: bytes) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        reader = asyncio.StreamReader(limit=MAX_HEAD)
        reader.feed_data(buffered)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=sock)
        except OSError:
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            while True:
                if head is None:
                    head = await read_head(reader)
                    if head is None:
                        return
                keep_alive = await self._one(head, reader, writer)
                head = None
                if not keep_alive:
                    return
        except BadRequest as exc:
            await self._refuse(writer, exc.status, str(exc))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return  # the peer went away, or sent a chunk line past the limit
        finally:
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        body = json.dumps({"error": {"kind": "invalid_request" if status < 500 else "unavailable",
                                     "type": "BadRequest", "message": message}}).encode()  # fmt: skip
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        try:
            writer.write(head % (status, REASONS.get(status, "Error").encode(), len(body)) + body)
            await writer.drain()
        except OSError:
            pass

    async def _one(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request on an adopted connection; whether the connection may carry another."""
        if head.startswith(b"GET /_/health ") or head.lstrip(b"\r\n").startswith(b"GET /_/health "):
            status, payload = self.health()
            encoded = json.dumps(payload).encode()
            writer.write(b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (status, len(encoded), encoded))  # fmt: skip
            await writer.drain()
            return True
        request = Request(head, self.timeout_s)
        body = Body(reader, request)
        response = Response(writer, request)
        if self.inflight >= self.concurrency:
            await response.error(429, "too_many_requests", "TooManyRequests",
                                 f"all {self.concurrency} concurrency slots of this instance are busy")  # fmt: skip
            return response.keep_alive and await body.drain(DRAIN_LIMIT)
        self.inflight += 1
        self.requests += 1
        try:
            ok = await self._run(request, body, response)
        finally:
            self.inflight -= 1
        if not ok or not response.ended:
            return False
        return response.keep_alive and await body.drain(DRAIN_LIMIT)

    async def _run(self, request: Request, body: Body, response: Response) -> bool:
        """Run the app on one request; False when the connection must close (the response is cut)."""
        assert self.loop is not None
        remaining = request.deadline - time.time()
        # Held by this frame until it returns (the loop references tasks only weakly).
        if self.asgi:
            work: asyncio.Future[Any] = self.loop.create_task(self._asgi(request, body, response))
        else:
            work = asyncio.ensure_future(self._wsgi(request, body, response))
        try:
            done, _ = await asyncio.wait({work}, timeout=max(remaining, 0.001))
        except asyncio.CancelledError:
            work.cancel()
            raise
        if not done:
            response.abandoned = True  # first: nothing the app still writes goes out
            work.cancel()
            self.diag(f"{request.method} {request.raw_path.decode('latin-1')} passed its deadline; abandoned")
            if not response.started:
                await response.error(504, "function_timeout", "TimeoutError", "the app did not answer in time")
            return False
        error = work.exception()
        if error is None:
            if not response.started:
                await response.error(500, "function_error", "NoResponse", "the app returned without a response")
            elif not response.ended:
                await response.body(b"", more=False)
            return True
        if isinstance(error, OSError | asyncio.IncompleteReadError):
            return False  # the client went away
        if isinstance(error, BadRequest):  # the request's body was malformed
            if not response.started:
                await response.error(error.status, "invalid_request", "BadRequest", str(error))
            return False
        self.diag(f"the app raised on {request.method} {request.raw_path.decode('latin-1')}:\n"
                  + "".join(traceback.format_exception(error)))  # fmt: skip
        if response.ended:
            return True  # a whole answer went out (Starlette answers 500, then raises): only logged
        if response.started:
            return False  # cut the response: a truncated body, never a complete-looking one
        await response.error(500, "function_error", type(error).__name__, str(error)[:500])
        return True

    # -- ASGI ----------------------------------------------------------------------------------------

    def _asgi_scope(
        self, method: str, path: bytes, raw_path: bytes, query: bytes, headers: list[tuple[bytes, bytes]], root: str
    ) -> dict[str, Any]:
        host = next((v for n, v in headers if n == b"host"), b"localhost").decode("latin-1")
        name, _, port = host.partition(":")
        scheme = next((v for n, v in headers if n == b"x-forwarded-proto"), b"http").decode("latin-1")
        forwarded = next((v for n, v in headers if n == b"x-forwarded-for"), b"").decode("latin-1")
        client = forwarded.split(",")[0].strip()
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": scheme,
            "path": root + path.decode("utf-8", "surrogateescape"),
            "raw_path": root.encode("latin-1") + raw_path,
            "query_string": query,
            "root_path": root,
            "headers": headers,
            "client": (client, 0) if client else None,
            "server": (name, int(port) if port.isdigit() else (443 if scheme == "https" else 80)),
            "state": dict(self.state),
        }

    async def _asgi(self, request: Request, body: Body, response: Response) -> None:
        scope = self._asgi_scope(
            request.method, request.path, request.raw_path, request.query, request.headers, request.root_path
        )
        finished = asyncio.Event()
        started: list[tuple[int, list[tuple[bytes, bytes]]]] = []

        async def receive() -> dict[str, Any]:
            if not body.done:
                data = await body.next_chunk()
                return {"type": "http.request", "body": data, "more_body": not body.done}
            if not started or not response.ended:
                await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                if started:
                    raise RuntimeError("http.response.start sent twice")
                started.append((int(message["status"]), list(message.get("headers") or [])))
                response.set_head(int(message["status"]), [(bytes(n), bytes(v)) for n, v in message.get("headers") or []])
            elif kind == "http.response.body":
                if not started:
                    raise RuntimeError("http.response.body before http.response.start")
                await response.body(bytes(message.get("body", b"")), more=bool(message.get("more_body", False)))
                if response.ended:
                    finished.set()

        try:
            await self.app(scope, receive, send)
        finally:
            finished.set()

    # -- WSGI ----------------------------------------------------------------------------------------

    def _wsgi_environ(
        self, method: str, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]], root: str, stream: Any
    ) -> dict[str, Any]:
        joined: dict[bytes, list[bytes]] = {}
        for key, value in headers:
            joined.setdefault(key, []).append(value)
        host = b", ".join(joined.get(b"host", [b"localhost"])).decode("latin-1")
        name, _, port = host.partition(":")
        scheme = joined.get(b"x-forwarded-proto", [b"http"])[0].decode("latin-1")
        forwarded = joined.get(b"x-forwarded-for", [b""])[0].decode("latin-1")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": root,
            "PATH_INFO": path.decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_NAME": name,
            "SERVER_PORT": port or ("443" if scheme == "https" else "80"),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": forwarded.split(",")[0].strip() or "127.0.0.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scheme,
            "wsgi.input": stream if stream is not None else _EmptyInput(),
            "wsgi.errors": _DiagStream(self.diag),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            # The input ends where the body does (a chunked one included): the app may read to EOF.
            "wsgi.input_terminated": True,
        }
        for key, values in joined.items():
            text = (b"; " if key == b"cookie" else b", ").join(values).decode("latin-1")
            if key == b"content-type":
                environ["CONTENT_TYPE"] = text
            elif key == b"content-length":
                environ["CONTENT_LENGTH"] = text
            else:
                environ["HTTP_" + key.decode("latin-1").upper().replace("-", "_")] = text
        return environ

    async def _wsgi(self, request: Request, body: Body, response: Response) -> None:
        loop = asyncio.get_running_loop()

        def call(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        stream = _WsgiInput(body, call)
        environ = self._wsgi_environ(
            request.method, request.path, request.query, request.headers, request.root_path, stream
        )

        def run() -> None:
            head: list[Any] = []

            def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
                if exc_info is not None and response.started:
                    raise exc_info[1].with_traceback(exc_info[2])
                head[:] = [int(status.split(" ", 1)[0]), headers]
                return write

            def write(data: bytes, *, more: bool = True) -> None:
                if not head:
                    raise RuntimeError("the WSGI app wrote before calling start_response()")
                call(response.from_thread(head[0], head[1], bytes(data), more=more))

            result = self.app(environ, start_response)
            try:
                for data in result:
                    if data:
                        write(data)
                write(b"", more=False)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()

        await loop.run_in_executor(self.pool, run)


class _WsgiInput:
    """``wsgi.input``: reads the body from the loop, blocking the app's thread meanwhile."""

    def __init__(self, body: Body, call: Callable[[Any], Any]) -> None:
        self.body = body
        self.call = call
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.call(self.body.next_chunk())
        self.buffer += data
        return bool(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            data, self.buffer = self.buffer, b""
            return data
        while len(self.buffer) < size and self._fill():
            pass
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def readline(self, size: int = -1) -> bytes:
        while b"\n" not in self.buffer and (size < 0 or len(self.buffer) < size) and self._fill():
            pass
        end = self.buffer.find(b"\n") + 1 or len(self.buffer)
        if size >= 0:
            end = min(end, size)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class _EmptyInput:
    def read(self, size: int = -1) -> bytes:
        return b""

    def readline(self, size: int = -1) -> bytes:
        return b""

    def readlines(self, hint: int = -1) -> list[bytes]:
        return []

    def __iter__(self) -> Any:
        return iter(())


class _DiagStream:
    """``wsgi.errors``: the host's log."""

    def __init__(self, diag: Callable[[str], None]) -> None:
        self.diag = diag

    def write(self, text: str) -> int:
        if text.strip():
            self.diag(text.rstrip())
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

