"""The hop server and client (faas.core.hop_server, faas.core.http) over real sockets.

Every test runs real servers on loopback or unix sockets in this process: hot routes, the ASGI
fallback, bodies far larger than the buffers streamed through a chain of hops in both directions,
pipelining, malformed and oversized requests, early answers, and the three transport failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.requests import Request as StarletteRequest

from faas.core.body import HIGH_WATER
from faas.core.errors import NotFound
from faas.core.hop_server import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    HopServer,
    Request,
    Response,
    Router,
    json_response,
    relay,
)
from faas.core.http import ConnectionBroken, HopClient, HopTimeout, NotDelivered


def _listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@asynccontextmanager
async def serving(router: Router, fallback: FastAPI | None = None) -> AsyncIterator[str]:
    sock = _listening()
    server = HopServer(router, fallback)
    await server.start(sock)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await server.shutdown(0.5)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


def echo_router() -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        """Streams the request body back as it arrives, with its length and digest in no header: the
        client checks what it gets."""
        return Response(200, stream=request.body.chunks(), content_type="application/octet-stream")

    async def item(request: Request) -> Response:
        if request.params["n"] == 404:
            raise NotFound("no such item")
        if request.params["n"] == 500:
            raise RuntimeError("handler bug")
        return json_response({"n": request.params["n"], "name": request.params["name"], "q": request.query.decode()})

    router.add("POST", "/echo", echo)
    router.add("GET", "/items/{name}/{n:int}", item)
    return router


async def test_hot_routes_errors_and_fallback_share_one_port() -> None:
    fallback = FastAPI()

    @fallback.get("/managed")
    async def managed() -> dict[str, str]:
        return {"served_by": "fastapi"}

    client = HopClient()
    async with serving(echo_router(), fallback) as base:
        ok = await client.request("GET", f"{base}/items/a/7?x=1", timeout_s=5)
        assert ok.status == 200 and ok.body == b'{"n": 7, "name": "a", "q": "x=1"}'
        missing = await client.request("GET", f"{base}/items/a/404", timeout_s=5)
        assert missing.status == 404 and b'"kind": "not_found"' in missing.body
        bug = await client.request("GET", f"{base}/items/a/500", timeout_s=5)
        assert bug.status == 500 and b"handler bug" in bug.body
        # The connection that carried the error is still good for the next request.
        again = await client.request("GET", f"{base}/items/b/1", timeout_s=5)
        assert again.status == 200
        managed_resp = await client.request("GET", f"{base}/managed", timeout_s=5)
        assert managed_resp.status == 200 and managed_resp.body == b'{"served_by":"fastapi"}'
        unknown = await client.request("GET", f"{base}/nowhere", timeout_s=5)
        assert unknown.status == 404  # FastAPI's own 404
    await client.close()
    async with serving(echo_router()) as base:
        wrong_method = await client.request("PUT", f"{base}/echo", timeout_s=5)
        assert wrong_method.status == 405 and wrong_method.headers["allow"] == "POST"
    await client.close()


async def test_bodies_larger_than_the_buffers_stream_through_a_chain_of_hops_both_ways() -> None:
    """client -> proxy -> proxy -> echo and back, 24 MiB each way, read chunk by chunk at every hop."""
    payload = os.urandom(24 * 1024 * 1024)
    assert len(payload) > 50 * HIGH_WATER
    async with serving(echo_router()) as echo_base:
        hop_client = HopClient()

        def proxy_to(upstream: str) -> Router:
            router = Router()

            async def forward(request: Request) -> Response:
                resp = await hop_client.post(
                    upstream, body=request.body.chunks(), headers={"content-type": "application/octet-stream"},
                    timeout_s=30, stream=True,
                )  # fmt: skip
                return await relay(resp)

            router.add("POST", "/echo", forward)
            return router

        async with (
            serving(proxy_to(f"{echo_base}/echo")) as second,
            serving(proxy_to(f"{second}/echo")) as first,
        ):
            client = HopClient()
            resp = await client.post(f"{first}/echo", body=_chunks(payload, 100_000), headers={}, timeout_s=30, stream=True)
            assert resp.status == 200
            digest = hashlib.sha256()
            size = 0
            async for chunk in resp.stream():
                digest.update(chunk)
                size += len(chunk)
            assert size == len(payload)
            assert digest.digest() == hashlib.sha256(payload).digest()
            # The same connections carry the next request (the streamed ones ended cleanly).
            small = await client.post(f"{first}/echo", body=b"again", headers={}, timeout_s=5)
            assert small.status == 200 and small.body == b"again"
            await client.close()
        await hop_client.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    router = Router()

    async def slow_then_fast(request: Request) -> Response:
        await asyncio.sleep(0.2 if request.path == "/slow" else 0)
        return Response(200, request.path.encode(), content_type="text/plain")

    router.add("GET", "/slow", slow_then_fast)
    router.add("GET", "/fast", slow_then_fast)
    async with serving(router) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"/fast"):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, data
            data += chunk
        assert data.index(b"/slow") < data.index(b"/fast")
        writer.close()


async def test_malformed_and_oversized_requests_get_a_status_and_a_closed_connection() -> None:
    async with serving(echo_router()) as base:
        port = int(base.rsplit(":", 1)[1])
        many = b"".join(b"x-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
        for raw, status in (
            (b"NONSENSE\r\n\r\n", b"400"),
            (b"GET /items/a/1 HTTP/1.1\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n", b"431"),
            (b"GET /items/a/1 HTTP/1.1\r\n" + many + b"\r\n", b"431"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)  # read() to EOF: the server closed
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
            writer.close()


async def test_an_answer_before_the_body_reaches_a_client_still_sending() -> None:
    """A handler that refuses a large body at once: the client gets the 413, not a reset."""
    router = Router()

    async def refuse(request: Request) -> Response:
        await request.body.read(limit=1024)
        return Response(200)

    router.add("POST", "/small", refuse)
    async with serving(router) as base:
        client = HopClient()
        resp = await client.post(f"{base}/small", body=os.urandom(8 * 1024 * 1024), headers={}, timeout_s=10)
        assert resp.status == 413 and b"payload_too_large" in resp.body
        await client.close()


async def test_a_client_that_goes_away_does_not_cancel_the_handler() -> None:
    finished = asyncio.Event()
    router = Router()

    async def long(request: Request) -> Response:
        await asyncio.sleep(0.3)
        finished.set()
        return Response(200)

    router.add("POST", "/long", long)
    async with serving(router) as base:
        client = HopClient()
        with pytest.raises(HopTimeout):
            await client.post(f"{base}/long", body=b"", headers={}, timeout_s=0.05)
        await asyncio.wait_for(finished.wait(), 5)
        await client.close()


async def test_transport_failures_say_whether_the_request_may_have_arrived(tmp_path: object) -> None:
    client = HopClient()
    with pytest.raises(NotDelivered):  # nothing listens there: the peer never saw it
        free = _listening()
        port = free.getsockname()[1]
        free.close()
        await client.post(f"http://127.0.0.1:{port}/x", body=b"", headers={}, timeout_s=2)
    with pytest.raises(NotDelivered):
        await HopClient(unix_socket="/nonexistent/faas.sock").post("http://instance/x", body=b"", headers={}, timeout_s=2)

    router = Router()

    async def die(request: Request) -> Response:
        os_transport = request  # the handler cannot reach its transport; close from outside
        del os_transport
        await asyncio.sleep(10)
        return Response(200)

    router.add("POST", "/die", die)
    sock = _listening()
    server = HopServer(router)
    await server.start(sock)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    call = asyncio.create_task(client.post(f"{base}/die", body=b"x", headers={}, timeout_s=5))
    await asyncio.sleep(0.1)
    for conn in list(server._connections):  # the server dies under the call
        assert conn.transport is not None
        conn.transport.abort()
    with pytest.raises(ConnectionBroken):
        await call
    with pytest.raises(HopTimeout):
        await client.post(f"{base}/die", body=b"x", headers={}, timeout_s=0.2)
    await server.shutdown(0)
    await client.close()


async def test_a_body_left_unread_does_not_stall_the_next_request_on_the_connection() -> None:
    router = Router()

    async def ignore_body(request: Request) -> Response:
        return Response(503, b'{"error": {"kind": "not_leader"}}')

    async def small(request: Request) -> Response:
        return Response(200, await request.body.read())

    router.add("POST", "/ignore", ignore_body)
    router.add("POST", "/small", small)
    async with serving(router) as base:
        client = HopClient()
        # More than the server buffers before it stops reading, all of it sent before the answer.
        first = await client.post(f"{base}/ignore", body=os.urandom(3 * HIGH_WATER), headers={}, timeout_s=5)
        assert first.status == 503
        second = await client.post(f"{base}/small", body=b"next", headers={}, timeout_s=2)
        assert second.status == 200 and second.body == b"next"
        await client.close()


async def test_a_relayed_body_that_breaks_off_ends_the_downstream_connection_and_a_stalled_one_times_out() -> None:
    upstream_router = Router()
    stall = asyncio.Event()

    async def half(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 100_000
            if request.path == "/stall":
                await stall.wait()  # never set: the peer stops in the middle of a body
            raise RuntimeError("upstream died mid-body")

        return Response(200, headers={"content-length": "200000"}, stream=body())

    upstream_router.add("GET", "/break", half)
    upstream_router.add("GET", "/stall", half)
    async with serving(upstream_router) as upstream:
        relay_client = HopClient()
        router = Router()

        async def forward(request: Request) -> Response:
            return await relay(await relay_client.request("GET", f"{upstream}/break", timeout_s=5, stream=True))

        router.add("GET", "/relay", forward)
        async with serving(router) as base:
            client = HopClient()
            with pytest.raises(ConnectionBroken):
                await client.request("GET", f"{base}/relay", timeout_s=5)  # cut short, not a hang
            await client.close()
        started = asyncio.get_running_loop().time()
        with pytest.raises(HopTimeout):
            resp = await relay_client.request("GET", f"{upstream}/stall", timeout_s=0.5, stream=True)
            await resp.read()
        assert asyncio.get_running_loop().time() - started < 2
        stall.set()  # let the stalled upstream handler end
        await asyncio.sleep(0.05)
        await relay_client.close()


async def test_upgrade_and_head_requests_are_answered_and_keep_the_framing() -> None:
    fallback = FastAPI()

    @fallback.api_route("/stream", methods=["GET", "HEAD"])
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            yield b"one"
            yield b"two"

        return StreamingResponse(parts())

    async with serving(echo_router(), fallback) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /items/a/1 HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # answered as HTTP/1.1, then closed
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'"q": ""}')
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /stream HTTP/1.1\r\nhost: x\r\n\r\nGET /items/b/2 HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while not data.endswith(b'"q": ""}'):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, data
            data += chunk
        head_answer, _, rest = data.partition(b"\r\n\r\n")
        assert head_answer.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200")  # no body after HEAD
        writer.close()


async def test_a_request_that_stops_arriving_is_dropped_and_shutdown_closes_idle_connections() -> None:
    sock = _listening()
    server = HopServer(echo_router(), idle_timeout_s=0.4)
    await server.start(sock)
    port = sock.getsockname()[1]
    trickle_reader, trickle = await asyncio.open_connection("127.0.0.1", port)
    trickle.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly part")
    await trickle.drain()
    cut = await asyncio.wait_for(trickle_reader.read(), 3)  # read() to EOF: the server closed it
    assert not cut.endswith(b"0\r\n\r\n")  # the echo of a body that never came whole is cut short
    idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    await server.shutdown(1.0)
    assert await asyncio.wait_for(idle_reader.read(), 1) == b""
    trickle.close()
    idle.close()


async def test_the_fallback_body_limit_refuses_a_declared_or_chunked_body_past_it() -> None:
    """A body over ``Router.fallback_body_limit`` never reaches the ASGI app whole: a declared length
    is refused before the body is read, a chunked one as soon as it passes the limit."""
    app = FastAPI()
    seen: list[int] = []

    @app.post("/upload")
    async def upload(request: StarletteRequest) -> dict[str, int]:
        body = await request.body()
        seen.append(len(body))
        return {"bytes": len(body)}

    router = Router()
    router.fallback_body_limit = 64 * 1024
    async with serving(router, app) as base:
        port = int(base.rsplit(":", 1)[1])
        client = HopClient()
        small = await client.post(f"{base}/upload", body=b"a" * 1000, headers={}, timeout_s=5)
        assert small.status == 200 and seen == [1000]

        # Declared far past the limit: answered at once, with only a little of the body sent.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1100000000\r\n\r\n" + b"a" * 4096)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413"), head
        writer.close()

        chunked = await client.post(f"{base}/upload", body=_chunks(b"b" * (1024 * 1024), 16 * 1024), headers={}, timeout_s=5)
        assert chunked.status == 413 and b"payload_too_large" in chunked.body
        assert seen == [1000], "no body past the limit reached the app"
        await client.close()
