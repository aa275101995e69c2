"""A multiplexed, framed protocol for the hops between the platform's services on one machine.

A client opens one unix-socket connection to a service and sends ``PREFACE``; the service's hop
server (``faas.core.hop_server``) recognises it and reads frames from then on.  Many calls share the
connection, each a stream: one ``REQUEST`` frame (an HTTP/1.1-like head and the whole body) and one
``RESPONSE`` frame back.  Frames written in one turn of the event loop go out in one ``send``, so under
load one system call and one wake-up carry many calls (write coalescing) instead of one each.

Frame: a 9-byte header (payload length u32, type u8, stream id u32, big-endian) and the payload.
Payload of a request: ``METHOD PATH[?QUERY]\\r\\n`` then ``name: value\\r\\n`` lines, a blank line,
the body; of a response: ``STATUS\\r\\n``, the header lines, a blank line, the body.

Authentication, once per connection: right after the preface a client sends a ``HELLO`` frame
(stream 0) whose payload is the platform's internal token (``Settings.internal_token``).  A server
that requires the token (every internal service) runs no request of a connection before a ``HELLO``
with the right token (compared in constant time); a connection whose first frame is anything else, or
a ``HELLO`` with another token, gets one ``RESPONSE`` frame on stream 0 (401 ``unauthorized`` in the
platform's error shape) and is closed (the server's side at once; what the client still sends is
read away, unrun, until it closes or for 5 s), and none of its requests runs.  The client answers every call
outstanding on a refused connection with that 401.  Calls then cost nothing more per call.

Guarantees (the client, ``MuxClient``):
- the same three failures as the HTTP hop client: ``NotDelivered`` when the connection could not be
  opened or broke before the request's frame was handed to the kernel (the service never saw it),
  ``ConnectionBroken`` when it broke after, ``HopTimeout`` past the call's timeout (the connection
  stays: other calls on it go on; the service, as over HTTP, runs a call whose caller left to its end);
- bodies are whole: a call's body and answer are at most ``MAX_FRAME`` bytes each (the platform's
  payload limits are far below); a peer that sends a larger or malformed frame loses the connection.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, cast

from faas.core.http import ConnectionBroken, HopResponse, HopTimeout, NotDelivered

PREFACE = b"FAAS-MUX/1\r\n\r\n"
HEADER = struct.Struct(">IBI")
REQUEST = 1
RESPONSE = 2
HELLO = 3  # client -> server, stream 0, once, first: the internal token
REFUSAL_STREAM = 0  # the stream of a server's refusal of the connection (no call has stream 0)
MAX_FRAME = 64 * 1024 * 1024


class FrameError(Exception):
    pass


class FrameReader:
    """Cuts a byte stream into frames."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        size = len(buffer)
        while size - offset >= HEADER.size:
            length, kind, stream = HEADER.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            end = offset + HEADER.size + length
            if end > size:
                break
            frames.append((kind, stream, bytes(buffer[offset + HEADER.size : end])))
            offset = end
        if offset:
            del buffer[:offset]
        return frames


def frame(kind: int, stream: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind, stream) + payload


def split_head(payload: bytes) -> tuple[list[bytes], bytes]:
    """The head's lines and the body of a frame's payload."""
    head, sep, body = payload.partition(b"\r\n\r\n")
    if not sep:
        raise FrameError("a frame without a head")
    return head.split(b"\r\n"), body


def parse_headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise FrameError("a malformed header line")
        headers.append((name.strip().lower(), value.strip()))
    return headers


class Coalescer:
    """Writes queued in one turn of the event loop go to the transport in one ``write``."""

    __slots__ = ("transport", "_out", "_scheduled", "on_flush")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._out: list[bytes] = []
        self._scheduled = False
        self.on_flush: Any = None  # called after each flush (the client marks its streams sent)

    def write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        if not self.transport.is_closing():
            self.transport.write(data)
        if self.on_flush is not None:
            self.on_flush()


def hello(token: str | None) -> bytes:
    """What a client sends first on a connection: the preface, and its token's ``HELLO`` if it has one."""
    return PREFACE if token is None else PREFACE + frame(HELLO, REFUSAL_STREAM, token.encode("latin-1"))


def response_payload(
    status: int, headers: dict[str, str] | list[tuple[str, str]] | None, content_type: str | None, body: bytes
) -> bytes:
    """The payload of a ``RESPONSE`` frame."""
    parts = [b"%d\r\n" % status]
    if content_type is not None:
        parts.append(b"content-type: %s\r\n" % content_type.encode("latin-1"))
    if headers:
        for name, value in headers.items() if isinstance(headers, dict) else headers:
            if name not in ("content-length", "connection", "transfer-encoding"):
                parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def parse_response(payload: bytes) -> HopResponse:
    lines, body = split_head(payload)
    raw = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in parse_headers(lines[1:])]
    headers: dict[str, str] = {}
    for name, value in raw:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return HopResponse(int(lines[0]), headers, body, raw)


class _MuxConnection(asyncio.Protocol):
    """One client connection and the calls outstanding on it."""

    def __init__(self, token: str | None = None) -> None:
        self._hello = hello(token)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reader = FrameReader()
        self.writer: Coalescer | None = None
        # stream id -> (the caller's future, whether its request frame reached the kernel)
        self.pending: dict[int, list[Any]] = {}
        self.refusal: HopResponse | None = None  # the service's answer when it refused the connection
        self._unsent: list[int] = []
        self._next = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.writer = Coalescer(self.transport)
        self.writer.on_flush = self._flushed
        self.transport.write(self._hello)

    def _flushed(self) -> None:
        for stream in self._unsent:
            entry = self.pending.get(stream)
            if entry is not None:
                entry[1] = True
        self._unsent.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = f"the connection to the service closed ({exc or 'closed by the peer'})"
        for future, sent in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionBroken(why) if sent else NotDelivered(why))
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            for kind, stream, payload in self.reader.feed(data):
                if kind != RESPONSE:
                    raise FrameError(f"unexpected frame type {kind}")
                if stream == REFUSAL_STREAM:
                    self._refused(parse_response(payload))
                    return
                entry = self.pending.pop(stream, None)
                if entry is None or entry[0].done():
                    continue  # a call that timed out or was given up
                entry[0].set_result(parse_response(payload))
        except (FrameError, ValueError) as exc:
            if self.transport is not None:
                self.transport.abort()
            self.connection_lost(ConnectionError(f"malformed frame from the service: {exc}"))

    def _refused(self, answer: HopResponse) -> None:
        """The service refused this connection (no token, or another one): none of its calls ran,
        and each gets the refusal as its answer; the next call opens a new connection."""
        self.closed = True
        self.refusal = answer
        for future, _ in self.pending.values():
            if not future.done():
                future.set_result(answer)
        self.pending.clear()
        if self.transport is not None:
            self.transport.close()

    def send(self, head: str, body: bytes) -> tuple[int, asyncio.Future[HopResponse]]:
        stream = self._next
        self._next = stream + 1 if stream < 0xFFFFFFFF else 1
        future: asyncio.Future[HopResponse] = asyncio.get_running_loop().create_future()
        self.pending[stream] = [future, False]
        self._unsent.append(stream)
        assert self.writer is not None
        self.writer.write(frame(REQUEST, stream, head.encode("latin-1") + body))
        return stream, future


class MuxClient:
    """Calls to services over one multiplexed connection per unix socket; each connection presents
    ``token`` once, when it opens."""

    def __init__(self, *, token: str | None = None) -> None:
        self._token = token
        self._connections: dict[str, _MuxConnection] = {}
        self._connecting: dict[str, asyncio.Future[_MuxConnection]] = {}

    async def _connection(self, path: str, timeout_s: float) -> _MuxConnection:
        conn = self._connections.get(path)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(path)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(path, timeout_s))
            self._connecting[path] = pending
            pending.add_done_callback(lambda _: self._connecting.pop(path, None))
        return await asyncio.shield(pending)

    async def _connect(self, path: str, timeout_s: float) -> _MuxConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_unix_connection(lambda: _MuxConnection(self._token), path)
        except TimeoutError as exc:
            raise NotDelivered(f"could not connect to {path} within {timeout_s:.1f} s") from exc
        except OSError as exc:
            raise NotDelivered(f"cannot connect to {path}: {exc}") from exc
        self._connections[path] = conn
        return conn

    async def request(
        self, path: str, method: str, target: str, headers: dict[str, str] | list[tuple[str, str]] | None, body: bytes,
        timeout_s: float,
    ) -> HopResponse:  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = await self._connection(path, timeout_s)
        if conn.closed:  # refused, or lost, between its opening and this call
            if conn.refusal is not None:
                return conn.refusal
            raise NotDelivered(f"the connection to {path} closed before the call was sent")
        lines = [f"{method} {target}\r\n"]
        if headers:
            pairs = headers.items() if isinstance(headers, dict) else headers
            lines.extend(f"{name}: {value}\r\n" for name, value in pairs)
        lines.append("\r\n")
        stream, future = conn.send("".join(lines), body)
        timer = loop.call_at(deadline, _time_out, future, path, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()
            conn.pending.pop(stream, None)

    async def close(self) -> None:
        for conn in self._connections.values():
            if conn.transport is not None:
                conn.transport.close()
        self._connections.clear()


def _time_out(future: asyncio.Future[HopResponse], path: str, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(HopTimeout(f"no answer from {path} within {timeout_s:.1f} s"))
