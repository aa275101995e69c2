"""End-to-end over HTTP against the real platform: cold and warm calls, versions, reaping, HTTP
trigger, concurrency limits and every user-visible error of a synchronous invocation.

Like every test on the shared ``platform`` fixture, each runs twice: with instances as local
processes and as Docker containers (the latter fails in CI when no Docker daemon answers).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import pytest

from tests.conftest import Platform
from tests.helpers import deploy, instances_of, internal_headers, make_zip, members_of, wait_until

pytestmark = pytest.mark.integration


ECHO = """
import os

def handler(event, context):
    print("hello from", context.function_name)
    return {"event": event, "pid": os.getpid(), "version": context.function_version,
            "request_id": context.request_id, "remaining_ms": context.get_remaining_time_in_millis()}
"""


async def test_cold_then_warm_then_new_version_then_reaped(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(gw, "echo", ECHO)
    first = await gw.post("/v1/functions/echo/invoke", json={"n": 1})
    assert first.status_code == 200, first.text
    assert first.json()["event"] == {"n": 1}
    assert first.headers["x-faas-cold"] == "1"
    second = await gw.post("/v1/functions/echo/invoke", json={"n": 2})
    assert second.status_code == 200
    assert second.headers["x-faas-cold"] == "0"
    assert second.headers["x-faas-instance"] == first.headers["x-faas-instance"]
    assert second.json()["pid"] == first.json()["pid"]
    assert 0 < second.json()["remaining_ms"] <= 30_000

    await deploy(gw, "echo", ECHO.replace('"version": context.function_version', '"version": "two"'))
    third = await gw.post("/v1/functions/echo/invoke", json={})
    assert third.json()["version"] == "two"
    assert third.headers["x-faas-version"] == "2"
    assert third.headers["x-faas-instance"] != first.headers["x-faas-instance"]
    old = await gw.post("/v1/functions/echo/invoke", params={"qualifier": "1"}, json={})
    assert old.headers["x-faas-version"] == "1"

    assert ("echo", 1) in await _pooled(platform)
    # keepalive_s is 4 s in the test platform: every instance goes away when idle, and with them the
    # dispatchers' tables for those versions.
    await wait_until(
        lambda: _none_left(platform), timeout_s=20, what="idle instances of 'echo' to be reaped"
    )
    await wait_until(
        lambda: _not_pooled(platform, "echo"), timeout_s=10, what="the dispatchers to forget idle versions"
    )
    fourth = await gw.post("/v1/functions/echo/invoke", json={})
    assert fourth.status_code == 200
    assert fourth.headers["x-faas-cold"] == "1"

    logs = (await gw.get("/v1/functions/echo/logs")).json()["logs"]
    assert any("hello from echo" in entry["output"] for entry in logs)


async def _pooled(platform: Platform) -> set[tuple[str, int]]:
    """(function, version) of every pool any dispatcher keeps."""
    out: set[tuple[str, int]] = set()
    async with httpx.AsyncClient(headers=internal_headers(platform.settings)) as client:
        for member in await members_of(platform.settings, "dispatcher"):
            pools = (await client.get(member.address + "/v1/pools")).json()["pools"]
            out |= {(p["function"], p["version"]) for p in pools}
    return out


async def _not_pooled(platform: Platform, name: str) -> bool:
    return not any(function == name for function, _ in await _pooled(platform))


async def _none_left(platform: Platform) -> bool:
    return not await instances_of(platform.settings, "echo")


async def test_async_handler_and_http_trigger(gw: httpx.AsyncClient) -> None:
    await deploy(
        gw,
        "web",
        """
        import asyncio, json

        async def handler(event, context):
            await asyncio.sleep(0.01)
            if event["rawPath"] == "/teapot":
                return {"statusCode": 418, "headers": {"x-kind": "teapot"}, "body": "short and stout"}
            return {"statusCode": 200, "headers": {"content-type": "application/json"},
                    "body": json.dumps({"method": event["requestContext"]["http"]["method"],
                                        "path": event["rawPath"], "query": event["queryStringParameters"],
                                        "body": event["body"]})}
        """,
    )
    resp = await gw.post("/fn/web/items/7?color=red", content=b'{"a": 1}', headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"method": "POST", "path": "/items/7", "query": {"color": "red"}, "body": '{"a": 1}'}
    teapot = await gw.get("/fn/web/teapot")
    assert teapot.status_code == 418
    assert teapot.headers["x-kind"] == "teapot"
    assert teapot.text == "short and stout"


async def test_twenty_concurrent_calls_never_exceed_max_instances(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(
        gw,
        "slow",
        """
        import time

        def handler(event, context):
            time.sleep(0.4)
            return event["i"]
        """,
        concurrency=1,
        max_instances=4,
    )
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(await instances_of(platform.settings, "slow")))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(*(gw.post("/v1/functions/slow/invoke", json={"i": i}) for i in range(20)))
    stop.set()
    await sampler
    assert [r.status_code for r in results] == [200] * 20, [r.text for r in results if r.status_code != 200]
    assert sorted(r.json() for r in results) == list(range(20))
    used = {r.headers["x-faas-instance"] for r in results}
    assert 1 <= len(used) <= 4
    assert peak <= 4


async def test_handler_exception_is_a_function_error_and_instance_survives(gw: httpx.AsyncClient) -> None:
    await deploy(
        gw,
        "flaky",
        """
        def handler(event, context):
            if event.get("fail"):
                raise ValueError("asked to fail")
            return "fine"
        """,
    )
    bad = await gw.post("/v1/functions/flaky/invoke", json={"fail": True})
    assert bad.status_code == 500
    assert bad.headers["x-faas-function-error"] == "Unhandled"
    err = bad.json()["error"]
    assert (err["kind"], err["type"], err["message"]) == ("function_error", "ValueError", "asked to fail")
    good = await gw.post("/v1/functions/flaky/invoke", json={})
    assert good.status_code == 200 and good.json() == "fine"
    assert good.headers["x-faas-instance"] == bad.headers["x-faas-instance"]


async def test_timeout_is_504_and_next_call_works(gw: httpx.AsyncClient) -> None:
    await deploy(
        gw,
        "sleepy",
        """
        import time

        def handler(event, context):
            time.sleep(event.get("sleep", 0))
            return "awake"
        """,
        timeout_s=1,
    )
    assert (await gw.post("/v1/functions/sleepy/invoke", json={})).status_code == 200
    started = time.monotonic()
    slow = await gw.post("/v1/functions/sleepy/invoke", json={"sleep": 10})
    elapsed = time.monotonic() - started
    assert slow.status_code == 504
    assert slow.json()["error"]["kind"] == "function_timeout"
    assert elapsed < 1 + 1.0  # the error arrives within timeout + 1 s
    again = await gw.post("/v1/functions/sleepy/invoke", json={})
    assert again.status_code == 200 and again.json() == "awake"


async def test_payload_limits_unknown_function_and_bad_input(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "sink", "def handler(event, context):\n    return len(event['blob'])\n")
    big = json.dumps({"blob": "x" * (6 * 1024 * 1024)}).encode()
    resp = await gw.post("/v1/functions/sink/invoke", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["kind"] == "payload_too_large"
    ok = await gw.post("/v1/functions/sink/invoke", json={"blob": "x" * (5 * 1024 * 1024)})
    assert ok.status_code == 200 and ok.json() == 5 * 1024 * 1024

    missing = await gw.post("/v1/functions/nobody-here/invoke", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["kind"] == "not_found"
    not_json = await gw.post("/v1/functions/sink/invoke", content=b"{oops")
    assert not_json.status_code == 400


async def test_deploy_rejects_bad_names_configs_and_archives(gw: httpx.AsyncClient) -> None:
    archive = make_zip({"handler.py": "def handler(e, c):\n    return 1\n"})

    async def put(name: str, config: dict[str, object], code: bytes = archive) -> httpx.Response:
        return await gw.put(
            f"/v1/functions/{name}",
            data={"config": json.dumps(config)},
            files={"code": ("code.zip", code, "application/zip")},
        )

    bad_name = await put("Bad_Name", {"handler": "handler.handler"})
    assert bad_name.status_code == 400
    assert "invalid function name 'Bad_Name'" in bad_name.json()["error"]["message"]
    bad_memory = await put("okname", {"handler": "handler.handler", "memory_mb": 1})
    assert bad_memory.status_code == 400 and "memory_mb" in bad_memory.json()["error"]["message"]
    no_module = await put("okname", {"handler": "main.handler"})
    assert no_module.status_code == 400
    assert "handler module 'main' not found" in no_module.json()["error"]["message"]
    not_zip = await put("okname", {"handler": "handler.handler"}, b"this is not a zip")
    assert not_zip.status_code == 400 and "not a valid zip" in not_zip.json()["error"]["message"]
    # Nothing of the above was created.
    assert (await gw.get("/v1/functions/okname")).status_code == 404


async def test_import_error_in_handler_module_is_reported(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "broken", "import does_not_exist_anywhere\n\ndef handler(e, c):\n    return 1\n")
    resp = await gw.post("/v1/functions/broken/invoke", json={})
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert err["kind"] == "instance_start_error"
    assert "does_not_exist_anywhere" in err["message"]


async def test_bodies_larger_than_the_hop_buffers_pass_every_hop_intact(gw: httpx.AsyncClient) -> None:
    """A 5 MiB event in and a 5 MiB result out, through gateway, trigger, dispatcher and host: far more
    than a hop buffers (faas.core.body.HIGH_WATER), so the responses are relayed as they stream."""
    await deploy(
        gw, "mirror",
        "import hashlib\n"
        "def handler(event, context):\n"
        "    blob = event['blob']\n"
        "    return {'in': hashlib.sha256(blob.encode()).hexdigest(), 'out': blob[::-1]}\n",
    )  # fmt: skip
    blob = "".join(chr(ord("a") + i % 26) for i in range(5 * 1024 * 1024))
    resp = await gw.post("/v1/functions/mirror/invoke", json={"blob": blob})
    assert resp.status_code == 200, resp.text[:200]
    body = resp.json()
    assert body["in"] == hashlib.sha256(blob.encode()).hexdigest()
    assert body["out"] == blob[::-1]
    assert int(resp.headers["content-length"]) == len(resp.content) > 10 * 1024 * 1024 // 2
