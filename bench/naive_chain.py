"""The "built the obvious way" baseline of ``warm_path.py``: a raw ASGI endpoint behind aiohttp proxies.

Each piece is one process, started by ``warm_path.py`` on 127.0.0.1::

    python bench/naive_chain.py endpoint --port P          # uvicorn (uvloop, httptools), raw ASGI
    python bench/naive_chain.py proxy --port P --upstream http://127.0.0.1:Q

The endpoint answers every POST with ``{}`` (the no-op function's answer to the event ``{}``).  A proxy
forwards the method, path, body and content type upstream and answers with the upstream's status, body
and content type, through one ``aiohttp.ClientSession`` with keep-alive (aiohttp's default pool of 100
connections).  Nothing here is tuned: it is what someone writing three hops without thinking about cost
would write, on the same event loop (uvloop) as the platform's services.  It listens on loopback only
and refuses an upstream that is not.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlparse

LOOPBACK = "127.0.0.1"

Scope = dict[str, Any]
Message = dict[str, Any]


async def endpoint(
    scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    """A raw ASGI app: read the request body, answer ``{}`` as JSON."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"{}"})


def run_endpoint(port: int) -> None:
    import uvicorn

    uvicorn.run(
        endpoint,
        host=LOOPBACK,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


async def serve_proxy(port: int, upstream: str) -> None:
    from aiohttp import ClientSession, web

    if urlparse(upstream).hostname != LOOPBACK:
        raise SystemExit(f"upstream must be on {LOOPBACK}: {upstream}")
    session = ClientSession()  # keep-alive, default pool

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with session.request(
            request.method,
            upstream + request.path_qs,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/octet-stream")},
        ) as answer:
            data = await answer.read()
            return web.Response(body=data, status=answer.status, content_type=answer.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one piece of the naive proxy chain (loopback only)")
    parser.add_argument("role", choices=("endpoint", "proxy"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="", help="proxy only: http://127.0.0.1:PORT")
    args = parser.parse_args(argv)
    if args.role == "endpoint":
        run_endpoint(args.port)
        return
    if not args.upstream:
        parser.error("proxy needs --upstream")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_proxy(args.port, args.upstream.rstrip("/")))


if __name__ == "__main__":
    main(sys.argv[1:])
