"""A function host serving a web app (faas/runtime/app_host.py), spoken to over its real unix socket.

Real FastAPI and Flask, vendored into the code archive from this environment the way ``faas deploy``
vendors ``requirements.txt``; the host runs them under ``python -S -E`` and sees nothing else.
Covered: ASGI and WSGI detection, root path, query strings, repeated headers, cookies set and read,
the app's own 404, bodies streamed both ways (a chunked upload, a download whose first byte arrives
before its last is produced), server-sent events, deadlines, errors before and after the response
started, lifespan, and the start failures a deploy must report.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import io
import json
import os
import textwrap
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.code_server import CodeServer
from tests.hosts import Host, specialize_body

pytestmark = pytest.mark.timeout(60)

FASTAPI_APP = """
    import asyncio, contextlib, hashlib, time
    from fastapi import FastAPI, Request, Response
    from fastapi.responses import JSONResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.started_at = time.time()
        yield {"pool": "ready"}

    app = FastAPI(lifespan=lifespan)

    @app.get("/")
    def root():
        return {"ok": True}

    @app.get("/hello")
    def hello(name: str = "world"):
        return {"hello": name}

    @app.get("/inspect")
    async def inspect(request: Request):
        return {
            "multi": request.headers.getlist("x-multi"),
            "root_path": request.scope["root_path"],
            "path": request.url.path,
            "url": str(request.url),
            "cookies": request.cookies,
            "query": request.url.query,
            "state": request.state.pool,
            "url_for": str(request.url_for("hello")),
        }

    @app.get("/cookies")
    def cookies():
        response = JSONResponse({"set": 2})
        response.set_cookie("a", "1")
        response.set_cookie("b", "2")
        return response

    @app.post("/upload")
    async def upload(request: Request):
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        return {"size": size, "sha256": digest.hexdigest()}

    @app.get("/download")
    def download(chunks: int, pause: float = 0.0):
        def produce():
            for i in range(chunks):
                if pause:
                    time.sleep(pause)
                yield bytes([i % 256]) * (1024 * 1024)
        return StreamingResponse(produce(), media_type="application/octet-stream")

    @app.get("/events")
    async def events():
        async def produce():
            for i in range(3):
                yield f"data: {i}\\n\\n"
                await asyncio.sleep(0.2)
        return StreamingResponse(produce(), media_type="text/event-stream")

    @app.get("/boom")
    def boom():
        raise RuntimeError("boom")

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(30)
"""

FLASK_APP = """
    import hashlib
    from flask import Flask, Response, request, url_for

    app = Flask(__name__)

    @app.get("/")
    def root():
        return "ok"

    @app.get("/inspect")
    def inspect():
        return {
            "multi": request.headers.get("X-Multi"),
            "script_name": request.environ["SCRIPT_NAME"],
            "path": request.path,
            "url_for": url_for("inspect"),
            "query": request.args.getlist("q"),
            "cookies": dict(request.cookies),
        }

    @app.get("/cookies")
    def cookies():
        response = Response("set")
        response.set_cookie("a", "1")
        response.set_cookie("b", "2")
        return response

    @app.post("/upload")
    def upload():
        digest, size = hashlib.sha256(), 0
        while chunk := request.stream.read(65536):
            digest.update(chunk)
            size += len(chunk)
        return {"size": size, "sha256": digest.hexdigest()}

    @app.get("/download")
    def download():
        chunks = int(request.args["chunks"])
        return Response((bytes([i % 256]) * (1024 * 1024) for i in range(chunks)), mimetype="application/octet-stream")

    @app.get("/boom")
    def boom():
        raise RuntimeError("boom")
"""


def distributions(*roots: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``roots`` need, with their dependencies (extras left out)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        dist = found[name] = importlib.metadata.distribution(name)
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def vendored(app_code: str, *roots: str) -> bytes:
    """A code archive of ``app.py`` and the distributions it needs as installed here, as ``faas deploy``
    vendors ``requirements.txt`` (files only: no metadata, no scripts, no bytecode)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("app.py", textwrap.dedent(app_code))
        for dist in distributions(*roots):
            for file in dist.files or []:
                parts = Path(str(file)).parts
                if parts[0] == ".." or "__pycache__" in parts or parts[0].endswith((".dist-info", ".egg-info")):
                    continue
                zf.write(Path(str(dist.locate_file(file))), str(file))
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives() -> dict[str, bytes]:
    return {"fastapi": vendored(FASTAPI_APP, "fastapi"), "flask": vendored(FLASK_APP, "flask")}


async def start_app(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer, archive: bytes, **overrides: Any
) -> tuple[Host, httpx.Response]:
    host = await spawn_host()
    url, _, sha = code_server.publish(archive)
    body = specialize_body(url, sha, len(archive), kind="app", handler="app:app", concurrency=8, timeout_s=20)
    body.update(overrides)
    return host, await host.client.post("/_/specialize", json=body, timeout=60)


def app_headers(**extra: str) -> dict[str, str]:
    return {"x-faas-root-path": "/app/shop", **extra}


@pytest.fixture
async def fastapi_host(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer, archives: dict[str, bytes]
) -> AsyncIterator[Host]:
    host, specialized = await start_app(spawn_host, code_server, archives["fastapi"])
    assert specialized.status_code == 200, specialized.text
    yield host


@pytest.fixture
async def flask_host(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer, archives: dict[str, bytes]
) -> AsyncIterator[Host]:
    host, specialized = await start_app(spawn_host, code_server, archives["flask"])
    assert specialized.status_code == 200, specialized.text
    yield host


async def test_an_asgi_app_sees_the_request_as_sent(fastapi_host: Host) -> None:
    client = fastapi_host.client
    hello = await client.get("/_/app/hello", params={"name": "Ada"}, headers=app_headers())
    assert hello.status_code == 200 and hello.json() == {"hello": "Ada"}

    seen = await client.get(
        "/_/app/inspect?q=1&q=2",
        headers=[("x-faas-root-path", "/app/shop"), ("x-multi", "a"), ("x-multi", "b"), ("cookie", "c=3; d=4"),
                 ("host", "shop.example")],  # fmt: skip
    )
    assert seen.status_code == 200, seen.text
    assert seen.json() == {
        "multi": ["a", "b"],
        "root_path": "/app/shop",
        "path": "/app/shop/inspect",
        "url": "http://shop.example/app/shop/inspect?q=1&q=2",
        "cookies": {"c": "3", "d": "4"},
        "query": "q=1&q=2",
        "state": "ready",
        "url_for": "http://shop.example/app/shop/hello",
    }
    cookies = await client.get("/_/app/cookies", headers=app_headers())
    assert [v.split(";")[0] for v in cookies.headers.get_list("set-cookie")] == ["a=1", "b=2"]
    missing = await client.get("/_/app/nope", headers=app_headers())
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}  # the app's own 404
    head = await client.head("/_/app/hello", headers=app_headers())
    assert head.status_code in (200, 405) and head.content == b""


async def test_a_wsgi_app_sees_the_request_as_sent(flask_host: Host) -> None:
    client = flask_host.client
    root = await client.get("/_/app/", headers=app_headers())
    assert root.status_code == 200 and root.text == "ok"
    seen = await client.get(
        "/_/app/inspect?q=1&q=2",
        headers=[("x-faas-root-path", "/app/shop"), ("x-multi", "a"), ("x-multi", "b"), ("cookie", "c=3"),
                 ("cookie", "d=4")],  # fmt: skip
    )
    assert seen.status_code == 200, seen.text
    assert seen.json() == {
        "multi": "a, b",
        "script_name": "/app/shop",
        "path": "/inspect",
        "url_for": "/app/shop/inspect",
        "query": ["1", "2"],
        "cookies": {"c": "3", "d": "4"},
    }
    cookies = await client.get("/_/app/cookies", headers=app_headers())
    assert [v.split(";")[0] for v in cookies.headers.get_list("set-cookie")] == ["a=1", "b=2"]
    missing = await client.get("/_/app/nope", headers=app_headers())
    assert missing.status_code == 404 and b"Not Found" in missing.content


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
async def test_bodies_stream_both_ways(
    kind: str, spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer, archives: dict[str, bytes]
) -> None:
    host, specialized = await start_app(spawn_host, code_server, archives[kind])
    assert specialized.status_code == 200, specialized.text
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the upload is chunked
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    uploaded = await host.client.post("/_/app/upload", content=chunks(), headers=app_headers())
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    expected = hashlib.sha256(b"".join(bytes([i % 256]) * (1024 * 1024) for i in range(50))).hexdigest()
    digest, size = hashlib.sha256(), 0
    async with host.client.stream("GET", "/_/app/download", params={"chunks": 50}, headers=app_headers()) as resp:
        assert resp.status_code == 200
        async for piece in resp.aiter_bytes():
            digest.update(piece)
            size += len(piece)
    assert size == 50 * 1024 * 1024 and digest.hexdigest() == expected
    # The same connection (keep-alive) serves the next request.
    again = await host.client.get("/_/app/", headers=app_headers())
    assert again.status_code == 200


async def test_the_first_byte_comes_before_the_last_is_produced(fastapi_host: Host) -> None:
    started = time.monotonic()
    async with fastapi_host.client.stream(
        "GET", "/_/app/download", params={"chunks": 10, "pause": 0.1}, headers=app_headers()
    ) as resp:
        first_at = None
        async for _ in resp.aiter_raw():
            first_at = first_at or time.monotonic() - started
        total = time.monotonic() - started
    assert first_at is not None and first_at < 0.5 and total >= 1.0, (first_at, total)

    seen: list[tuple[float, str]] = []
    async with fastapi_host.client.stream("GET", "/_/app/events", headers=app_headers()) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        async for line in events.aiter_lines():
            if line.startswith("data:"):
                seen.append((time.monotonic(), line))
    assert [line for _, line in seen] == ["data: 0", "data: 1", "data: 2"]
    assert seen[-1][0] - seen[0][0] >= 0.3  # each event as it was sent, not all at the end


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
async def test_an_exception_is_a_500_and_the_app_keeps_serving(
    kind: str, spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer, archives: dict[str, bytes]
) -> None:
    host, specialized = await start_app(spawn_host, code_server, archives[kind])
    assert specialized.status_code == 200
    boom = await host.client.get("/_/app/boom", headers=app_headers())
    assert boom.status_code == 500
    fine = await host.client.get("/_/app/", headers=app_headers())
    assert fine.status_code == 200
    health = await host.client.get("/_/health")
    assert health.json()["state"] == "ready"


async def test_a_request_past_its_deadline_is_answered_504(fastapi_host: Host) -> None:
    deadline_ms = int((time.time() + 0.5) * 1000)
    started = time.monotonic()
    slow = await fastapi_host.client.get("/_/app/slow", headers=app_headers(**{"x-faas-deadline-ms": str(deadline_ms)}))
    assert slow.status_code == 504 and slow.json()["error"]["kind"] == "function_timeout"
    assert time.monotonic() - started < 2.0
    assert (await fastapi_host.client.get("/_/app/hello", headers=app_headers())).status_code == 200


async def raw_exchange(host: Host, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(host.socket_path))
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return answer


async def test_a_malformed_request_is_refused(fastapi_host: Host) -> None:
    for request, status in (
        (b"GET /_/app/hello HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n", b"501"),
        (b"POST /_/app/upload HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", b"400"),
        (b"GET /_/app/hello HTTP/1.1\r\nbad header line\r\n\r\n", b"400"),
        (b"GET /_/app/hello HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n", b"400"),
    ):
        answer = await raw_exchange(fastapi_host, request)
        assert answer.startswith(b"HTTP/1.1 " + status), (request, answer[:200])
    upgrade = await fastapi_host.client.get("/_/app/hello", headers={**app_headers(), "upgrade": "websocket"})
    assert upgrade.status_code == 501
    assert (await fastapi_host.client.get("/_/app/hello", headers=app_headers())).status_code == 200
    fresh = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(fastapi_host.socket_path)), base_url="http://host")
    async with fresh:  # a connection of its own: one that served the app answers only /_/app and /_/health
        refused = await fresh.post("/_/invoke", json={})
    assert refused.status_code == 409 and "serves an app" in refused.text


@pytest.mark.parametrize(
    ("code", "overrides", "kind", "text"),
    [
        ("app = 5\n", {}, "TypeError", "not a WSGI or ASGI app"),
        ("application = None\n", {}, "AttributeError", "has no app 'app'"),
        ("raise ImportError('no database driver')\n", {}, "ImportError", "no database driver"),
        (
            "async def app(scope, receive, send):\n"
            "    if scope['type'] == 'lifespan':\n"
            "        await receive()\n"
            "        await send({'type': 'lifespan.startup.failed', 'message': 'no database'})\n",
            {},
            "AppStartError",
            "lifespan startup failed: no database",
        ),
        (
            "def app(environ, start_response):\n    raise RuntimeError('broken at ' + environ['PATH_INFO'])\n",
            {"readiness_path": "/ready"},
            "AppStartError",
            "RuntimeError answering GET /ready: broken at /ready",
        ),
    ],
)
async def test_an_app_that_cannot_start_says_why(
    code: str, overrides: dict[str, Any], kind: str, text: str,
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer,
) -> None:  # fmt: skip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", code)
    host, specialized = await start_app(spawn_host, code_server, buf.getvalue(), **overrides)
    assert specialized.status_code == 502, specialized.text
    error = specialized.json()["error"]
    assert error["kind"] == "instance_start_error" and error["type"] == kind and error["fault"] == "function"
    assert text in error["message"], error
    assert await host.exited() == 3


async def test_a_plain_asgi_callable_without_lifespan_serves(
    spawn_host: Callable[[], Awaitable[Host]], code_server: CodeServer
) -> None:
    code = (
        "async def app(scope, receive, send):\n"
        "    assert scope['type'] == 'http'\n"
        "    body = b''\n"
        "    while True:\n"
        "        message = await receive()\n"
        "        body += message.get('body', b'')\n"
        "        if not message.get('more_body'):\n"
        "            break\n"
        "    await send({'type': 'http.response.start', 'status': 201, 'headers': [(b'x-got', str(len(body)).encode())]})\n"
        "    await send({'type': 'http.response.body', 'body': body[::-1]})\n"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", code)
    host, specialized = await start_app(spawn_host, code_server, buf.getvalue())
    assert specialized.status_code == 200, specialized.text
    resp = await host.client.post("/_/app/x", content=b"abc", headers=app_headers())
    assert resp.status_code == 201 and resp.content == b"cba" and resp.headers["x-got"] == "3"
    assert resp.headers["content-length"] == "3"


def test_the_archives_hold_what_the_apps_import(archives: dict[str, bytes]) -> None:
    for kind, archive in archives.items():
        names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
        assert "app.py" in names and any(n.startswith(f"{kind}/") for n in names), kind
    assert json.loads(json.dumps(specialize_body("u", "0" * 64, 1)))["handler"] == "app.handler"


async def test_every_request_on_many_kept_alive_connections_is_answered(flask_host: Host) -> None:
    """Adopted connections live as long as they are used (a task the loop held only weakly was once
    collected mid-request, resetting its connection: about one request in 500)."""
    statuses: dict[int | str, int] = {}
    transport = httpx.AsyncHTTPTransport(uds=str(flask_host.socket_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://host", timeout=30,
                                 limits=httpx.Limits(max_connections=8)) as client:  # fmt: skip (8: its concurrency)

        async def caller() -> None:
            for _ in range(500):
                try:
                    key: int | str = (await client.get("/_/app/", headers=app_headers())).status_code
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(caller() for _ in range(8)))
    assert statuses == {200: 4000}, statuses
