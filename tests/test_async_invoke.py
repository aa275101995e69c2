"""Async invocation through the durable queue: 202 after the write, results by id, retries with
backoff, dead letters, payload limits. Real Valkey (appendfsync always), real platform."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from faas.core.queue import AsyncEnvelope, InvocationQueue
from tests.conftest import Platform
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
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = await gw.post(
        "/v1/functions/async-echo/invoke",
        json={"key": "a"},
        headers={"X-Faas-Invocation-Type": "async", "traceparent": traceparent},
    )
    assert resp.status_code == 202, resp.text
    invocation = resp.json()
    assert invocation["status"] == "queued"
    final = await _wait_final(gw, invocation["id"])
    assert final["status"] == "succeeded"
    assert final["result"] == {"key": "a", "attempts_seen": 1}
    assert final["attempts"] == 1
    assert final["trace"] == traceparent  # the caller's trace context travels with the event


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


async def test_dead_letters_are_listed_and_redriven(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "async-redrive", FLAKY, max_retries=0)
    resp = await gw.post("/v1/functions/async-redrive/invoke-async", json={"key": "d", "fail_times": 2})
    invocation_id = resp.json()["id"]
    for expected_attempt_seen in (1, 2):
        final = await _wait_final(gw, invocation_id)
        assert final["status"] == "dead-lettered", final
        assert final["error"]["message"] == f"attempt {expected_attempt_seen} fails"
        letters = (await gw.get("/v1/dead-letters", params={"function": "async-redrive"})).json()["dead_letters"]
        (letter,) = [d for d in letters if d["invocation_id"] == invocation_id]
        assert letter["error"]["type"] == "ValueError"
        redriven = await gw.post(f"/v1/dead-letters/{letter['dead_letter_id']}/redrive")
        # Redrive sets the status back to queued in the same transaction, so the next final status
        # seen is the outcome of the redriven attempt (which may already be there: it fails fast).
        assert redriven.status_code == 202 and redriven.json()["id"] == invocation_id
    final = await _wait_final(gw, invocation_id)
    assert final["status"] == "succeeded", final
    assert final["result"]["attempts_seen"] == 3
    assert (await gw.post("/v1/dead-letters/0-1/redrive")).status_code == 404


async def test_idempotency_key_deduplicates_enqueues(gw: httpx.AsyncClient) -> None:
    await deploy(gw, "async-once", FLAKY)
    headers = {"X-Faas-Idempotency-Key": "order-42"}
    first = await gw.post("/v1/functions/async-once/invoke-async", json={"key": "e"}, headers=headers)
    second = await gw.post("/v1/functions/async-once/invoke-async", json={"key": "e"}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json() == {"id": first.json()["id"], "status": "duplicate"}
    final = await _wait_final(gw, first.json()["id"])
    assert final["result"] == {"key": "e", "attempts_seen": 1}
    other = await gw.post("/v1/functions/async-once/invoke-async", json={"key": "e"}, headers={"X-Faas-Idempotency-Key": "order-43"})
    assert other.json()["id"] != first.json()["id"]
    assert (await _wait_final(gw, other.json()["id"]))["result"] == {"key": "e", "attempts_seen": 2}


async def test_events_older_than_max_event_age_are_dead_lettered(platform: Platform, gw: httpx.AsyncClient) -> None:
    deployed = await deploy(gw, "async-stale", FLAKY, max_event_age_s=60)
    redis = aioredis.from_url(platform.settings.redis_url)
    try:
        # An event that waited two minutes (as if every dispatcher had been down) is not run.
        stale = AsyncEnvelope(
            id=uuid.uuid4().hex, namespace="default", function="async-stale",
            version=deployed["latest_version"], payload='{"key": "f"}', enqueued_at=time.time() - 120,
        )  # fmt: skip
        await InvocationQueue(redis, status_ttl_s=600).enqueue(stale)
    finally:
        await redis.aclose()
    final = await _wait_final(gw, stale.id)
    assert final["status"] == "dead-lettered"
    assert final["error"]["kind"] == "event_too_old"
