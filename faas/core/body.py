"""A message body arriving from a socket, read whole or chunk by chunk, with flow control.

Guarantees: the bytes come out in the order they arrived and exactly once; at most about
``HIGH_WATER`` bytes are buffered before the transport stops reading (it reads again below
``LOW_WATER``), so a body of any size passes through in bounded memory when it is read chunk by
chunk; a connection that ends before the body is complete fails the reader with ``BodyIncomplete``
instead of handing out a truncated body.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class BodyIncomplete(Exception):
    """The connection ended (or was aborted) before the whole body arrived."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body exceeds {limit} bytes")
        self.limit = limit


class Body:
    """Fed by a protocol (``feed``, ``finish``, ``fail``), read by one consumer."""

    __slots__ = (
        "_chunks", "_buffered", "_complete", "_error", "_waiter", "_transport", "_paused", "consumed", "_discard",
    )  # fmt: skip

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._transport = transport
        self._paused = False
        self.consumed = False  # the consumer has taken the whole body
        self._discard = False

    # -- the producer side (the protocol) ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._discard:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def discard(self) -> None:
        """Nobody will read the rest: drop what is buffered and what still arrives."""
        self._discard = True
        self._chunks.clear()
        self._buffered = 0
        self._resume()

    def finish(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._complete:
            self._error = exc
            self._wake()

    @property
    def complete(self) -> bool:
        return self._complete

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the consumer side ------------------------------------------------------------------------

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; ``BodyTooLarge`` once more than ``limit`` bytes arrived."""
        while not self._complete:
            if limit is not None and self._buffered > limit:
                raise BodyTooLarge(limit)
            if self._error is not None:
                raise BodyIncomplete(str(self._error)) from self._error
            await self._wait()
        if limit is not None and self._buffered > limit:
            raise BodyTooLarge(limit)
        return self.take()

    def take(self) -> bytes:
        """The whole body of a ``complete`` one, without waiting."""
        assert self._complete
        self.consumed = True
        data = self._chunks.pop() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._resume()
        return data

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end.  Safe to cancel: a cancelled wait loses
        nothing (unlike an async generator, which a cancellation ends)."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < LOW_WATER:
                    self._resume()
                return chunk
            if self._complete:
                self.consumed = True
                return None
            if self._error is not None:
                raise BodyIncomplete(str(self._error)) from self._error
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body piece by piece, as it arrives (reading the next piece resumes the transport)."""
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def _wait(self) -> None:
        self._resume()  # waiting for more: let it come
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _resume(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()


class WriteFlow:
    """Write flow control for a protocol: ``pause_writing``/``resume_writing`` from the transport,
    and ``wait_writable`` for a writer that must not outrun a slow peer.  ``connection_lost`` of the
    protocol calls ``fail_writers`` with how the connection ended."""

    __slots__ = ("_write_paused", "_drain")

    def __init__(self) -> None:
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def fail_writers(self, exc: BaseException) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(exc)

    async def wait_writable(self) -> None:
        if self._write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a TCP transport (a response is not held back for the peer's delayed ACK)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def complete_body(data: bytes) -> Body:
    """A body already whole (a request built in memory)."""
    body = Body()
    if data:
        body.feed(data)
    body.finish()
    return body
