"""The multiplexed hop protocol (faas.core.mux) between a hop client and a hop server, on a real unix socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI

from faas.core import wire
from faas.core.errors import NotFound
from faas.core.hop_server import HopServer, Request, Response, Router, json_response
from faas.core.http import ConnectionBroken, HopClient, HopTimeout, NotDelivered


@asynccontextmanager
async def serving(path: Path, router: Router, fallback: FastAPI | None = None) -> AsyncIterator[HopServer]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    server = HopServer(router, fallback)
    await server.start(sock)
    try:
        yield server
    finally:
        await server.shutdown(0.2)


def routes() -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        delay = float(request.headers.get("x-delay", "0"))
        await asyncio.sleep(delay)
        if request.params["n"] == 404:
            raise NotFound("no such thing")
        return json_response({"n": request.params["n"], "body": (await request.body.read()).decode(), "q": request.query.decode()})

    router.add("POST", "/echo/{n:int}", echo)
    return router


async def test_many_calls_share_one_connection_and_each_gets_its_own_answer(tmp_path: Path) -> None:
    fallback = FastAPI()

    @fallback.get("/managed")
    async def managed() -> dict[str, str]:
        return {"via": "fastapi"}

    path = tmp_path / "svc.sock"
    async with serving(path, routes(), fallback) as server:
        base = wire.unix_address(path)
        client = HopClient()
        # Later calls answer first (shorter delays): answers are matched by stream, not by order.
        answers = await asyncio.gather(*(
            client.post(f"{base}/echo/{n}?x={n}", body=str(n).encode(), headers={"x-delay": str((50 - n) / 1000)}, timeout_s=5)
            for n in range(50)
        ))  # fmt: skip
        for n, resp in enumerate(answers):
            assert resp.status == 200
            assert resp.body == f'{{"n": {n}, "body": "{n}", "q": "x={n}"}}'.encode()
        assert len(server._connections) == 1  # one multiplexed connection carried them all
        missing = await client.post(f"{base}/echo/404", body=b"", headers={}, timeout_s=5)
        assert missing.status == 404 and b'"kind": "not_found"' in missing.body
        managed_resp = await client.request("GET", f"{base}/managed", timeout_s=5)
        assert managed_resp.status == 200 and managed_resp.body == b'{"via":"fastapi"}'
        await client.close()


async def test_failures_say_whether_the_service_saw_the_call(tmp_path: Path) -> None:
    client = HopClient()
    with pytest.raises(NotDelivered):
        await client.post(f"{wire.unix_address(tmp_path / 'nobody.sock')}/echo/1", body=b"", headers={}, timeout_s=2)
    path = tmp_path / "svc.sock"
    base = wire.unix_address(path)
    async with serving(path, routes()) as server:
        # A call that times out leaves the connection good for the next.
        with pytest.raises(HopTimeout):
            await client.post(f"{base}/echo/1", body=b"", headers={"x-delay": "0.5"}, timeout_s=0.1)
        assert (await client.post(f"{base}/echo/2", body=b"", headers={}, timeout_s=5)).status == 200
        # The service dies under a call it received.
        call = asyncio.create_task(client.post(f"{base}/echo/3", body=b"", headers={"x-delay": "5"}, timeout_s=10))
        await asyncio.sleep(0.1)
        for conn in list(server._connections):
            assert conn.transport is not None
            conn.transport.abort()
        with pytest.raises(ConnectionBroken):
            await call
        # The client reconnects for the next call.
        assert (await client.post(f"{base}/echo/4", body=b"", headers={}, timeout_s=5)).status == 200
    await client.close()
