"""Async invocation through the durable queue: 202 after the write, results by id, retries with
backoff, dead letters, payload limits. Real Valkey (appendfsync always), real platform."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.helpers import deploy

pytestmark = pytest.mark.integration

FLAKY = """
seen = {}

def handler(event, context):
    key = event["key"]
    seen[key] = seen.get(key, 0) + 1
    if seen[key] <= event.get("fail_times", 0):
        raise ValueError(f"attempt {seen[key]} fails")
    return {"key": key, "attempts_seen": seen[key]}
"""


async def _wait_final(gw: httpx.AsyncClient, invocation_id: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await gw.get(f"/v1/invocations/{invocation_id}")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        if body["status"] in ("succeeded", "dead-lettered"):
            return body
        assert time.monotonic() < deadline, f"invocation still {body['status']}: {body}"
        await asyncio.sleep(0.2)


async def test_async_result_readable_by_id(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "async-echo", FLAKY)
    resp = await gw.post(
        "/v1/functions/async-echo/invoke", json={"key": "a"}, headers={"X-Faas-Invocation-Type": "async"}
    )
    assert resp.status_code == 202, resp.text
    invocation = resp.json()
    assert invocation["status"] == "queued"
    final = await _wait_final(gw, invocation["id"])
    assert final["status"] == "succeeded"
    assert final["result"] == {"key": "a", "attempts_seen": 1}
    assert final["attempts"] == 1


async def test_failing_twice_then_succeeding_takes_three_attempts(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "async-flaky", FLAKY, max_retries=2)
    resp = await gw.post("/v1/functions/async-flaky/invoke-async", json={"key": "b", "fail_times": 2})
    assert resp.status_code == 202
    final = await _wait_final(gw, resp.json()["id"])
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 3
    assert final["result"]["attempts_seen"] == 3


async def test_always_failing_event_is_dead_lettered_with_its_error(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "async-doomed", FLAKY, max_retries=1)
    resp = await gw.post("/v1/functions/async-doomed/invoke-async", json={"key": "c", "fail_times": 99})
    final = await _wait_final(gw, resp.json()["id"])
    assert final["status"] == "dead-lettered"
    assert final["attempts"] == 2
    assert final["error"]["type"] == "ValueError"


async def test_async_bad_input_is_refused_before_anything_is_queued(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "async-sink", FLAKY)
    big = await gw.post("/v1/functions/async-sink/invoke-async", json={"key": "x" * (1024 * 1024)})
    assert big.status_code == 413
    assert "asynchronous" in big.json()["error"]["message"]
    missing = await gw.post("/v1/functions/nobody-async/invoke-async", json={})
    assert missing.status_code == 404
    unknown_type = await gw.post(
        "/v1/functions/async-sink/invoke", json={}, headers={"X-Faas-Invocation-Type": "sometimes"}
    )
    assert unknown_type.status_code == 400
    assert (await gw.get("/v1/invocations/does-not-exist")).status_code == 404
