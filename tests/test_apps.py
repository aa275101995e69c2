"""Web apps on the real platform: a FastAPI and a Flask app deployed as ``kind: app`` and reached at
``/app/{name}/...`` through the gateway, the trigger and a dispatcher, on both backends.

What is checked end to end: the request as the client sent it (method, path below the root path,
query, repeated headers, cookies), the app's own answers (status, repeated ``Set-Cookie``, its 404),
bodies streamed both ways (a chunked upload, a 50 MB download checked by hash), server-sent events
as they are sent, an API key needed unless the app is public (and never shown to the app), always
warm (an instance from the deploy on, replaced when it dies), and a function is not an app.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import textwrap
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from faas.core.models import InstanceRecord
from faas.core.procs import processes_matching
from tests.conftest import Platform, running_platform
from tests.helpers import deploy, instances_of, wait_until
from tests.test_app_host import FASTAPI_APP, FLASK_APP, vendored

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

KEY_SEEN_APP = """
    def app(environ, start_response):
        seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        start_response("200 OK", [("content-type", "application/json")])
        import json
        return [json.dumps(seen).encode()]
"""


async def deploy_app(gw: httpx.AsyncClient, name: str, archive: bytes, **config: Any) -> dict[str, Any]:
    resp = await gw.put(
        f"/v1/functions/{name}",
        data={"config": json.dumps({"kind": "app", "handler": "app:app", **config})},
        files={"code": ("code.zip", archive, "application/zip")},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def ready(gw: httpx.AsyncClient, path: str, timeout_s: float = 60) -> httpx.Response:
    """The first answer of the app at ``path`` (its first instance may still be starting)."""
    answer: list[httpx.Response] = []

    async def answered() -> bool:
        resp = await gw.get(path)
        if resp.status_code < 500:
            answer.append(resp)
            return True
        return False

    await wait_until(answered, timeout_s=timeout_s, interval_s=0.5, what=f"{path} to answer")
    return answer[0]


async def test_a_fastapi_app_is_served_as_sent(platform: Platform, gw: httpx.AsyncClient) -> None:
    deployed = await deploy_app(gw, "shop", vendored(FASTAPI_APP, "fastapi"))
    assert deployed["config"]["kind"] == "app" and deployed["config"]["min_instances"] == 1
    assert deployed["config"]["concurrency"] == 32
    hello = await ready(gw, "/app/shop/hello?name=Ada")
    assert hello.status_code == 200 and hello.json() == {"hello": "Ada"}, hello.text

    seen = await gw.get(
        "/app/shop/inspect?q=1&q=2",
        headers=[("x-multi", "a"), ("x-multi", "b"), ("cookie", "c=3; d=4"), ("x-faas-root-path", "/evil")],
    )
    assert seen.status_code == 200, seen.text
    body = seen.json()
    assert body["multi"] == ["a", "b"] and body["cookies"] == {"c": "3", "d": "4"}
    assert body["root_path"] == "/app/shop" and body["path"] == "/app/shop/inspect"
    assert body["query"] == "q=1&q=2" and body["url_for"].endswith("/app/shop/hello")
    cookies = await gw.get("/app/shop/cookies")
    assert [v.split(";")[0] for v in cookies.headers.get_list("set-cookie")] == ["a=1", "b=2"]
    missing = await gw.get("/app/shop/nope")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    head = await asyncio.wait_for(gw.head("/app/shop/hello"), 10)  # no body, whatever length the app gave
    assert head.status_code in (200, 405) and head.content == b""
    boom = await gw.get("/app/shop/boom")
    assert boom.status_code == 500
    assert (await gw.get("/app/shop/hello")).status_code == 200


async def test_bodies_stream_through_every_hop(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy_app(gw, "bulk", vendored(FASTAPI_APP, "fastapi"), memory_mb=512)
    await ready(gw, "/app/bulk/")
    payload = os.urandom(8 * 1024 * 1024 + 3)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 256 * 1024):
            yield payload[start : start + 256 * 1024]

    uploaded = await gw.post("/app/bulk/upload", content=chunks())
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    expected = hashlib.sha256(b"".join(bytes([i % 256]) * (1024 * 1024) for i in range(50))).hexdigest()
    digest, size = hashlib.sha256(), 0
    async with gw.stream("GET", "/app/bulk/download", params={"chunks": 50}) as resp:
        assert resp.status_code == 200
        async for piece in resp.aiter_bytes():
            digest.update(piece)
            size += len(piece)
    assert size == 50 * 1024 * 1024 and digest.hexdigest() == expected

    started = time.monotonic()
    async with gw.stream("GET", "/app/bulk/download", params={"chunks": 10, "pause": 0.1}) as slow:
        first_at = None
        async for _ in slow.aiter_raw():
            first_at = first_at or time.monotonic() - started
        total = time.monotonic() - started
    assert first_at is not None and first_at < 0.6 and total >= 1.0, (first_at, total)

    seen: list[tuple[float, str]] = []
    async with gw.stream("GET", "/app/bulk/events") as events:
        async for line in events.aiter_lines():
            if line.startswith("data:"):
                seen.append((time.monotonic(), line))
    assert [line for _, line in seen] == ["data: 0", "data: 1", "data: 2"]
    assert seen[-1][0] - seen[0][0] >= 0.3


async def test_a_flask_app_and_keys(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy_app(gw, "admin", vendored(FLASK_APP, "flask"))
    root = await ready(gw, "/app/admin/")
    assert root.status_code == 200 and root.text == "ok"
    seen = await gw.get("/app/admin/inspect?q=1", headers=[("x-multi", "a"), ("x-multi", "b")])
    assert seen.json()["script_name"] == "/app/admin" and seen.json()["url_for"] == "/app/admin/inspect"
    assert seen.json()["multi"] == "a, b"

    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as anonymous:
        refused = await anonymous.get("/app/admin/")
        assert refused.status_code == 401  # not public: a key is needed
        await deploy_app(gw, "open", vendored(KEY_SEEN_APP, "flask"), public=True)
        opened = await ready(anonymous, "/app/open/")
        assert opened.status_code == 200
        own = await anonymous.get("/app/open/", headers={"authorization": "Basic dTpw"})
        assert own.json()["HTTP_AUTHORIZATION"] == "Basic dTpw"  # the app's own scheme passes
    keyed = await gw.get("/app/open/")  # the platform's key does not reach the app
    assert "HTTP_AUTHORIZATION" not in keyed.json() and "HTTP_X_API_KEY" not in keyed.json()


def host_pid(record: InstanceRecord) -> int:
    """The pid of the host serving ``record`` on the process backend (sandboxed or not)."""
    socket_path = Path(record.address.removeprefix("unix://"))
    if socket_path.parent.parent.name == "sb":  # sandboxed: found by its host name, not the bubblewraps
        name = socket_path.parent.name
        found = processes_matching(lambda a: "/faas/host.py" in a and name in a and not a[0].endswith("bwrap"))
    else:
        found = processes_matching(lambda a: any(x.endswith("host.py") for x in a) and str(socket_path) in a)
    assert len(found) == 1, found
    return found[0][0]


@pytest.mark.parametrize("platform", ["process"], indirect=True)
async def test_an_app_is_always_warm_and_replaced_when_it_dies(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy_app(gw, "warm", vendored(KEY_SEEN_APP, "flask"))

    async def one_instance() -> bool:
        return len(await instances_of(platform.settings, "warm")) == 1

    await wait_until(one_instance, timeout_s=60, what="the app's instance to start at deploy")
    await ready(gw, "/app/warm/")
    await asyncio.sleep(platform.settings.keepalive_s + 2 * platform.settings.reap_interval_s)
    records = await instances_of(platform.settings, "warm")
    assert len(records) == 1, "an idle app lost its instance"
    victim = records[0]
    os.kill(host_pid(victim), signal.SIGKILL)  # from outside the platform

    async def replaced() -> bool:
        now = await instances_of(platform.settings, "warm")
        return len(now) == 1 and now[0].instance_id != victim.instance_id

    await wait_until(replaced, timeout_s=60, what="the killed instance to be replaced")
    assert (await ready(gw, "/app/warm/")).status_code == 200


async def test_a_function_is_not_an_app(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(gw, "plainfn", "def handler(event, context):\n    return 1\n")
    resp = await gw.get("/app/plainfn/")
    assert resp.status_code == 404 and "not an app" in resp.json()["error"]["message"]
    bad = await gw.put(
        "/v1/functions/badapp",
        data={"config": json.dumps({"kind": "app", "handler": "app.app"})},
        files={"code": ("code.zip", vendored(KEY_SEEN_APP, "flask"), "application/zip")},
    )
    assert bad.status_code == 400 and "module:app" in bad.json()["error"]["message"]


def wsgi_archive(code: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", textwrap.dedent(code))
    return buf.getvalue()


def version_app(version: int) -> str:
    return f"""
        def app(environ, start_response):
            start_response("200 OK", [("content-type", "text/plain")])
            return [b"v{version}"]
    """


async def test_an_app_that_does_not_start_is_not_made_latest(platform: Platform, gw: httpx.AsyncClient) -> None:
    first = await gw.put(
        "/v1/functions/fragile",
        data={"config": json.dumps({"kind": "app", "handler": "app:app"})},
        files={"code": ("code.zip", wsgi_archive("raise RuntimeError('no database at startup')\n"), "application/zip")},
    )
    assert first.status_code == 502, first.text
    error = first.json()["error"]
    assert error["kind"] == "instance_start_error" and error["fault"] == "function"
    assert "no database at startup" in error["message"] and "no version that started" in error["message"]

    await deploy_app(gw, "fragile", wsgi_archive(version_app(2)))
    assert (await ready(gw, "/app/fragile/")).text == "v2"
    broken = await gw.put(
        "/v1/functions/fragile",
        data={"config": json.dumps({"kind": "app", "handler": "app:app"})},
        files={"code": ("code.zip", wsgi_archive("app = 'not an app'\n"), "application/zip")},
    )
    assert broken.status_code == 502, broken.text
    message = broken.json()["error"]["message"]
    assert "version 3" in message and "version 2 keeps serving" in message and "not a WSGI or ASGI app" in message
    for _ in range(5):
        assert (await gw.get("/app/fragile/")).text == "v2"
    fixed = await deploy_app(gw, "fragile", wsgi_archive(version_app(4)))
    assert fixed["aliases"]["latest"] == 4 and fixed["routes"]["latest"]["previous"] == 2
    assert (await ready(gw, "/app/fragile/")).text == "v4"
    called = await gw.post("/v1/functions/fragile/invoke", json={})
    assert called.status_code == 400 and "web app" in called.json()["error"]["message"]


@pytest.mark.parametrize("platform", ["process"], indirect=True)
async def test_a_new_version_rolls_out_under_a_steady_stream_with_no_failed_request(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    await deploy_app(gw, "rolling", wsgi_archive(version_app(1)), concurrency=4)
    assert (await ready(gw, "/app/rolling/")).text == "v1"
    answers: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def stream() -> None:  # four callers back to back, as a small site's traffic
        while not stop.is_set():
            resp = await gw.get("/app/rolling/")
            answers.append((resp.status_code, resp.text))

    callers = [asyncio.create_task(stream()) for _ in range(4)]
    try:
        await asyncio.sleep(1.0)
        await deploy_app(gw, "rolling", wsgi_archive(version_app(2)), concurrency=4)
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        await asyncio.gather(*callers)
    failed = [a for a in answers if a[0] != 200]
    assert not failed, failed[:5]
    served = [text for _, text in answers]
    assert served[0] == "v1" and served[-1] == "v2", (served[:3], served[-3:])
    switched = served.index("v2")
    assert set(served[switched + 4 :]) == {"v2"}, "requests went back to the old version after the switch"
    assert len(answers) > 50


BURNER_APP = """
    import os, threading, time

    TOKEN = os.urandom(4).hex()  # which instance answered (pids repeat across sandboxes)

    def burn(seconds):
        end = time.time() + seconds
        while time.time() < end:
            pass

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/burn":  # keeps this instance's CPU busy, off any request
            threading.Thread(target=burn, args=(float(environ["QUERY_STRING"]),), daemon=True).start()
        start_response("200 OK", [("content-type", "text/plain")])
        return [TOKEN.encode()]
"""


async def test_light_requests_go_to_the_instance_that_is_not_busy(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy_app(gw, "burner", wsgi_archive(BURNER_APP), min_instances=2, concurrency=8)
    seen: set[str] = set()

    async def both_serving() -> bool:
        seen.add((await gw.get("/app/burner/")).text)
        return len(seen) == 2

    await wait_until(both_serving, timeout_s=60, interval_s=0.05, what="both instances to answer")
    burn = await gw.get("/app/burner/burn?20")
    busy = burn.text
    # The node agents measure each instance's CPU every 2 s; give the dispatcher a report of it.
    await asyncio.sleep(5.0)
    answers = [(await gw.get("/app/burner/")).text for _ in range(40)]
    elsewhere = sum(1 for token in answers if token != busy)
    assert elsewhere >= 32, f"{elsewhere} of 40 light requests avoided the busy instance"


async def test_an_app_answers_at_its_own_host_name(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With ``FAAS_APP_DOMAIN=apps.test``, ``shop.apps.test`` is the app ``shop`` at its host's root."""
    async with running_platform(tmp_path_factory, "faas-hostnames", runtime="process", app_domain="apps.test") as p:
        async with httpx.AsyncClient(base_url=p.url, timeout=120, headers=p.admin_headers) as gw:
            await deploy_app(gw, "shop", vendored(FASTAPI_APP, "fastapi"), public=True)
            await ready(gw, "/app/shop/")
            by_name = await gw.get("/inspect", headers={"host": "shop.apps.test"})
            assert by_name.status_code == 200, by_name.text
            body = by_name.json()
            assert body["root_path"] == "" and body["path"] == "/inspect"
            assert body["url_for"] == "http://shop.apps.test/hello"
            by_path = await gw.get("/app/shop/inspect")  # the path still works, with its prefix
            assert by_path.json()["root_path"] == "/app/shop"
            unknown = await gw.get("/", headers={"host": "nosuch.apps.test"})
            assert unknown.status_code in (401, 404)
            api = await gw.get("/v1/functions")  # another host name: the API as before
            assert api.status_code == 200
