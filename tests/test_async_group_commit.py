"""Async ingestion by group commit and batched consumption, on the real Valkey (appendfsync always):
a failed group commit fails every caller in it and queues none of their events; SIGKILL of Valkey
during a burst of async calls loses no event that got a 202; a backlog is consumed in batches with
exactly one outcome per event.

Valkey is killed here, so the module runs on a platform of its own.  Its visibility timeout is far
above every wait: an event that recovers must do so because the consumer noticed, not because it
idled past the timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
import redis.asyncio as aioredis

from faas.core import redis_keys
from faas.core.errors import Unavailable
from faas.core.queue import AsyncEnvelope, EnqueueBatcher, EnqueueRequest, InvocationQueue
from tests.conftest import Platform, running_platform
from tests.helpers import deploy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ECHO = "def handler(event, context):\n    return event['n']\n"


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    async with running_platform(tmp_path_factory, "faas-group-commit", async_visibility_s=900.0) as p:
        yield p


@pytest.fixture
async def redis(platform: Platform) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(platform.settings.redis_url, socket_timeout=5)
    yield client
    await client.aclose()


def envelope(function: str, version: int, n: int) -> AsyncEnvelope:
    return AsyncEnvelope(
        id=uuid.uuid4().hex, namespace="default", function=function, version=version, payload=json.dumps({"n": n})
    )


async def outcomes(redis: aioredis.Redis, ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """The status hash of each invocation (empty when it has none)."""
    async with redis.pipeline(transaction=False) as pipe:
        for invocation_id in ids:
            pipe.hgetall(redis_keys.invocation(invocation_id))
        rows = await pipe.execute()
    return {i: {k.decode(): v.decode() for k, v in row.items()} for i, row in zip(ids, rows, strict=True)}


async def wait_succeeded(redis: aioredis.Redis, ids: Sequence[str], *, timeout_s: float) -> dict[str, dict[str, str]]:
    async def all_final() -> dict[str, dict[str, str]] | None:
        found = await outcomes(redis, ids)
        return found if all(o.get("status") in ("succeeded", "dead-lettered") for o in found.values()) else None

    try:
        found: dict[str, dict[str, str]] = await wait_until(all_final, timeout_s=timeout_s, interval_s=0.3)
    except AssertionError:
        statuses = Counter(o.get("status", "missing") for o in (await outcomes(redis, ids)).values())
        raise AssertionError(f"not every event finished within {timeout_s} s: {dict(statuses)}") from None
    assert Counter(o["status"] for o in found.values()) == {"succeeded": len(ids)}
    return found


async def stream_ids(redis: aioredis.Redis) -> set[str]:
    """The invocation ids of the events on the queue's stream now."""
    entries = await redis.xrange(redis_keys.ASYNC_STREAM)
    return {json.loads(fields[b"e"])["id"] for _, fields in entries if b"e" in fields}


async def test_a_failed_group_commit_fails_every_caller_in_it_and_queues_none_of_their_events(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    version = (await deploy(gw, "gc-batch", ECHO))["latest_version"]
    batcher = EnqueueBatcher(InvocationQueue(redis, status_ttl_s=600))
    writer = asyncio.ensure_future(batcher.run_forever())
    try:
        envs = [envelope("gc-batch", version, n) for n in range(20)]
        scope, poisoned = f"gc-test:{uuid.uuid4().hex}", f"gc-test:{uuid.uuid4().hex}"
        # Someone else's value of the wrong type under one caller's idempotency scope: Valkey rejects
        # that caller's check, and with it the one transaction all these concurrent callers share.
        await redis.rpush(redis_keys.once(poisoned), "not an invocation id")
        failed = await asyncio.gather(
            *(batcher.enqueue_new(env) for env in envs[:18]),
            batcher.enqueue_once(envs[18], scope, 60),
            batcher.enqueue_once(envs[19], poisoned, 60),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, Unavailable) for outcome in failed), failed
        assert "WRONGTYPE" in str(failed[0])
        assert not any((await outcomes(redis, [env.id for env in envs])).values())
        assert not await redis.exists(redis_keys.once(scope))
        assert not {env.id for env in envs} & await stream_ids(redis)

        # The same callers again, without the poisoned one: one transaction queues all of them, once
        # each, even the id sent twice in it.
        queued = await asyncio.gather(
            *(batcher.enqueue_new(env) for env in envs[:18]),
            batcher.enqueue_new(envs[0]),
            batcher.enqueue_once(envs[18], scope, 60),
            batcher.enqueue_once(envs[19], scope, 60),
        )
        assert queued == [True] * 18 + [False, None, envs[18].id]
        done = await wait_succeeded(redis, [env.id for env in envs[:19]], timeout_s=30)
        assert sorted(int(o["result"]) for o in done.values()) == list(range(19))
        assert all(o["runs"] == "1" for o in done.values()), done
        assert (await outcomes(redis, [envs[19].id]))[envs[19].id] == {}  # its scope was taken: never queued
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def test_an_enqueue_valkey_rejects_answers_503_unavailable_and_queues_nothing(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    deployed = await deploy(gw, "gc-reject", ECHO)
    key = f"order-{uuid.uuid4().hex}"
    scope = redis_keys.idempotency_scope("default", "gc-reject", key, deployed["uid"])
    await redis.rpush(redis_keys.once(scope), "not an invocation id")
    resp = await gw.post("/v1/functions/gc-reject/invoke-async", json={"n": 1}, headers={"X-Faas-Idempotency-Key": key})
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["kind"] == "unavailable" and "WRONGTYPE" in error["message"], error
    assert await redis.lrange(redis_keys.once(scope), 0, -1) == [b"not an invocation id"]
    # Only that transaction failed: the next call is queued and runs.
    resp = await gw.post("/v1/functions/gc-reject/invoke-async", json={"n": 2})
    assert resp.status_code == 202, resp.text
    assert int((await wait_succeeded(redis, [resp.json()["id"]], timeout_s=30))[resp.json()["id"]]["result"]) == 2


async def test_no_event_acknowledged_in_a_burst_is_lost_when_valkey_is_killed(
    platform: Platform, gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    name = "gc-burst"
    await deploy(gw, name, ECHO, concurrency=16, max_instances=2)
    assert (await gw.post(f"/v1/functions/{name}/invoke", json={"n": -1})).status_code == 200  # warm
    acknowledged: dict[str, int] = {}  # invocation id -> the n it was sent with
    acknowledged_at: dict[str, float] = {}
    refused: Counter[str] = Counter()
    sent = 0
    stop = asyncio.Event()

    async def caller(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while not stop.is_set():
            n = sent
            sent += 1
            try:
                resp = await client.post(f"/v1/functions/{name}/invoke-async", json={"n": n})
            except httpx.HTTPError as exc:
                refused[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            if resp.status_code == 202:
                acknowledged[resp.json()["id"]] = n
                acknowledged_at[resp.json()["id"]] = time.monotonic()
            else:
                refused[f"HTTP {resp.status_code} {resp.json()['error']['kind']}"] += 1
                await asyncio.sleep(0.05)

    valkey = next(r for r in platform.cluster.records if r.name == "valkey")
    async with httpx.AsyncClient(base_url=platform.url, timeout=15, headers=platform.admin_headers) as client:
        callers = [asyncio.ensure_future(caller(client)) for _ in range(32)]
        restarted_at = math.inf

        async def acknowledged_since(since: float) -> bool:
            return sum(1 for at in acknowledged_at.values() if at > since) >= 50

        try:
            await wait_until(lambda: acknowledged_since(0.0), timeout_s=20, what="50 acknowledged events")
            before_kill = len(acknowledged)
            os.kill(valkey.pid, signal.SIGKILL)
            await asyncio.sleep(1.0)
            platform.cluster.restart("valkey")
            restarted_at = time.monotonic()
            await wait_until(
                lambda: acknowledged_since(restarted_at), timeout_s=20, what="50 events acknowledged after the restart"
            )
        finally:
            stop.set()
            await asyncio.gather(*callers)
    after_restart = sum(1 for at in acknowledged_at.values() if at > restarted_at)
    assert refused, "no call was refused while Valkey was down"

    done = await wait_succeeded(redis, list(acknowledged), timeout_s=40)
    assert {i: int(o["result"]) for i, o in done.items()} == acknowledged  # every 202'd event ran, with its own payload
    twice = [i for i, o in done.items() if int(o.get("runs", "1")) > 1]
    print(
        f"\nvalkey SIGKILL in a burst: {sent} sent, {len(acknowledged)} acknowledged ({before_kill} before the kill, "
        f"{after_restart} after the restart), refused {dict(refused)}; lost 0, run twice {len(twice)}"
    )


async def test_a_backlog_is_consumed_in_batches_with_one_outcome_and_ack_per_event(
    gw: httpx.AsyncClient, redis: aioredis.Redis
) -> None:
    name, outcomes_stream = "gc-backlog", "gc-backlog-outcomes"
    version = (
        await deploy(gw, name, ECHO, concurrency=16, max_instances=2, on_success={"stream": outcomes_stream})
    )["latest_version"]
    assert (await gw.post(f"/v1/functions/{name}/invoke", json={"n": -1})).status_code == 200  # warm
    envs = [envelope(name, version, n) for n in range(400)]
    # Queued at once, so that the dispatchers find a backlog and read it in batches.
    assert await InvocationQueue(redis, status_ttl_s=600).enqueue_batch([EnqueueRequest(e) for e in envs]) == [None] * 400
    ids = [env.id for env in envs]
    done = await wait_succeeded(redis, ids, timeout_s=60)
    assert sorted(int(o["result"]) for o in done.values()) == list(range(400))
    assert all((o["runs"], o["attempts"]) == ("1", "1") for o in done.values()), done
    # Exactly one outcome each: the destination record is written in the outcome's transaction.
    records = [json.loads(fields[b"record"]) for _, fields in await redis.xrange(outcomes_stream)]
    assert Counter(r["requestContext"]["requestId"] for r in records) == Counter(ids)
    # Each acknowledged (and deleted) in that transaction: none pending, none left on the stream.
    assert not set(ids) & await stream_ids(redis)
    assert (await redis.xpending(redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP))["pending"] == 0
    # And every invocation left its log record (written in batches, one LPUSH per function).
    logs = (await gw.get(f"/v1/functions/{name}/logs", params={"limit": 1000})).json()["logs"]
    assert set(ids) <= {entry["request_id"] for entry in logs}
