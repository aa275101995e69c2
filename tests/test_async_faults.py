"""Async events through platform faults: a dead node agent and a Valkey restart lose no acknowledged
event, and platform faults do not use up a function's max_retries while its own failures still do.

These tests kill platform processes (the node agent, Valkey), so they run on a platform of their own
(module fixture).  Its visibility timeout is far above every wait here: an event that recovers must
do so because the consumer noticed, not because it idled past the timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from faas.core import redis_keys
from faas.core.queue import AsyncEnvelope, InvocationQueue
from faas.launcher.embedded import ProcessRecord
from tests.conftest import Platform, running_platform
from tests.helpers import deploy, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ECHO = """
def handler(event, context):
    if "Records" in event:  # a queue batch
        return len(event["Records"])
    return event["n"]
"""


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    async with running_platform(
        tmp_path_factory,
        "faas-async-faults",
        async_visibility_s=900.0,
        # A cold start gives up after 1 s without a node agent that answers (default 10 s), so an
        # outage of a few seconds makes attempts fail instead of wait.
        node_wait_s=1.0,
        async_platform_retry_cap_s=4.0,
    ) as p:
        yield p


def _component(platform: Platform, name: str) -> ProcessRecord:
    return next(r for r in platform.cluster.records if r.name == name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _kill(platform: Platform, name: str) -> None:
    pid = _component(platform, name).pid
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: _dead(pid), timeout_s=5, interval_s=0.05, what=f"{name} to die")


async def _dead(pid: int) -> bool:
    # A killed child stays a zombie until reaped; poll() through the cluster reaps it.
    return not _alive(pid) or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def _status(gw: httpx.AsyncClient, invocation_id: str) -> dict[str, Any]:
    resp = await gw.get(f"/v1/invocations/{invocation_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _wait_final(gw: httpx.AsyncClient, invocation_id: str, timeout_s: float = 30) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        body = await _status(gw, invocation_id)
        return body if body["status"] in ("succeeded", "dead-lettered") else None

    return await wait_until(final, timeout_s=timeout_s, what=f"invocation {invocation_id} to finish")


@pytest.mark.parametrize(
    ("name", "code", "error_kind", "error_type"),
    [
        pytest.param("fault-raises", "def handler(event, context):\n    raise ValueError('no')\n",
                     "function_error", "ValueError", id="handler-raises"),
        pytest.param("fault-import", "raise TimeoutError('the database did not answer')\n",
                     "instance_start_error", "TimeoutError", id="import-raises-timeout"),
    ],
)  # fmt: skip
async def test_function_faults_still_use_up_max_retries(
    gw: httpx.AsyncClient, name: str, code: str, error_kind: str, error_type: str
) -> None:
    await deploy(gw, name, code, max_retries=1)
    resp = await gw.post(f"/v1/functions/{name}/invoke-async", json={"n": 1})
    assert resp.status_code == 202, resp.text
    final = await _wait_final(gw, resp.json()["id"])
    assert final["status"] == "dead-lettered", final
    assert (final["attempts"], final["platform_retries"]) == (2, 0), final
    assert (final["error"]["kind"], final["error"]["type"], final["error"]["fault"]) == (error_kind, error_type, "function")
    letters = (await gw.get("/v1/dead-letters", params={"function": name})).json()["dead_letters"]
    assert [(d["invocation_id"], d["fault"], d["attempts"], d["platform_retries"]) for d in letters] == [
        (resp.json()["id"], "function", 2, 0)
    ]


async def test_platform_faults_do_not_use_up_max_retries(platform: Platform, gw: httpx.AsyncClient) -> None:
    name, node_id = "fault-no-agent", platform.settings.node_id
    # max_retries 0: a single failure of the function's own would dead-letter the event.
    await deploy(gw, name, ECHO, max_retries=0)
    await _kill(platform, node_id)
    killed_at = time.monotonic()
    ids: list[str] = []
    try:
        for n in range(8):  # never invoked before: every event needs a cold start, which needs the agent
            resp = await gw.post(f"/v1/functions/{name}/invoke-async", json={"n": n})
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
            await asyncio.sleep(0.2)
        seen: dict[str, dict[str, Any]] = {}
        last: dict[str, dict[str, Any]] = {}

        async def every_event_failed_for_the_platform() -> bool:
            for i in ids:
                body = last[i] = await _status(gw, i)
                assert body["status"] not in ("dead-lettered", "succeeded"), body
                if body["status"] == "failed":
                    seen.setdefault(i, body)
            return len(seen) == len(ids)

        try:
            await wait_until(
                every_event_failed_for_the_platform, timeout_s=30, what="every event to fail for the platform"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {list(last.values())}") from None
    finally:
        platform.cluster.restart(node_id)
    outage_s = time.monotonic() - killed_at
    for body in seen.values():
        assert body["error"]["fault"] == "platform", body
        # "no node agent answers" (or, on a slow machine, no instance before the deadline)
        assert body["error"]["kind"] in ("unavailable", "deadline_exceeded"), body
        assert (body["attempts"], body["platform_retries"] >= 1) == (1, True), body

    async def all_succeeded() -> list[dict[str, Any]] | None:
        bodies = [await _status(gw, i) for i in ids]
        assert not [b for b in bodies if b["status"] == "dead-lettered"], bodies
        return bodies if all(b["status"] == "succeeded" for b in bodies) else None

    finals = await wait_until(all_succeeded, timeout_s=60, interval_s=0.5, what="every event to succeed")
    assert sorted(f["result"] for f in finals) == list(range(8))
    assert all(f["attempts"] == 1 and f["platform_retries"] >= 1 for f in finals), finals
    retries = sorted(f["platform_retries"] for f in finals)
    print(f"\nnode agent down {outage_s:.1f} s: platform retries per event {retries}, all 8 succeeded")
    assert not (await gw.get("/v1/dead-letters", params={"function": name})).json()["dead_letters"]


async def test_acknowledged_events_survive_a_valkey_restart(platform: Platform, gw: httpx.AsyncClient) -> None:
    name, stream, subscription = "fault-valkey", "fault-valkey-orders", "orders"
    deployed = await deploy(gw, name, ECHO, max_instances=4)
    resp = await gw.put(
        f"/v1/functions/{name}/subscriptions/{subscription}", json={"queue": {"stream": stream, "batch_window_s": 0}}
    )
    assert resp.status_code == 201, resp.text
    assert (await gw.post(f"/v1/functions/{name}/invoke", json={"n": -1})).status_code == 200  # warm

    redis = aioredis.from_url(platform.settings.redis_url, socket_timeout=5)
    try:
        # A reply lost to the crash, made on purpose: an event enters dispatcher-1's pending list in
        # the same transaction that queues it, so dispatcher-1 (alive) never received it.  Before the
        # restart nothing hands it over: only the visibility timeout (900 s) would.
        lost = AsyncEnvelope(
            id=uuid.uuid4().hex, namespace="default", function=name, version=deployed["latest_version"],
            payload='{"n": 1000}',
        )  # fmt: skip
        async with redis.pipeline(transaction=True) as pipe:
            InvocationQueue(redis, status_ttl_s=3600).add_enqueue(pipe, lost)
            pipe.xreadgroup(redis_keys.ASYNC_GROUP, "dispatcher-1", {redis_keys.ASYNC_STREAM: ">"}, count=1)
            delivered = (await pipe.execute())[-1]
        assert lost.id.encode() in delivered[0][1][0][1][b"e"], delivered
        await asyncio.sleep(2.0)
        assert (await _status(gw, lost.id))["status"] == "queued"
    finally:
        await redis.aclose()

    acknowledged: dict[str, float] = {}  # invocation id -> when it was acknowledged
    refused = 0

    async def load() -> None:
        nonlocal refused
        async with httpx.AsyncClient(base_url=platform.url, timeout=10, headers=platform.admin_headers) as client:
            for n in range(100):  # 100 events over 5 s
                try:
                    resp = await client.post(f"/v1/functions/{name}/invoke-async", json={"n": n})
                except httpx.HTTPError:
                    resp = None
                if resp is not None and resp.status_code == 202:
                    acknowledged[resp.json()["id"]] = time.monotonic()
                else:
                    refused += 1
                await asyncio.sleep(0.05)

    loader = asyncio.ensure_future(load())
    try:
        await asyncio.sleep(1.5)
        await _kill(platform, "valkey")
        await asyncio.sleep(1.5)
        platform.cluster.restart("valkey")
        restarted_at = time.monotonic()
    finally:
        await loader
    assert len(acknowledged) >= 40, (len(acknowledged), refused)
    assert any(at > restarted_at for at in acknowledged.values()), "no event was acknowledged after the restart"

    # The trigger's queue poller reads again: a message added now is delivered and settled.
    redis = aioredis.from_url(platform.settings.redis_url, socket_timeout=5)
    try:
        message_id = await redis.xadd(stream, {"n": "1"})
        group = redis_keys.queue_subscription_group("default", name, subscription)

        async def settled() -> bool:
            groups = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
            info = groups.get(group)
            # The stream had no message before this one: delivered and settled means it is the last
            # delivered and none is pending.
            return info is not None and info["last-delivered-id"] == message_id and info["pending"] == 0

        ids = [lost.id, *acknowledged]

        async def all_succeeded() -> list[dict[str, Any]] | None:
            bodies = [await _status(gw, i) for i in ids]
            return bodies if all(b["status"] == "succeeded" for b in bodies) else None

        finals = await wait_until(all_succeeded, timeout_s=30, interval_s=0.5, what="every acknowledged event")
        recovered_s = time.monotonic() - restarted_at
        await wait_until(settled, timeout_s=30, what="the queue subscription to deliver after the restart")
    finally:
        await redis.aclose()
    assert finals[0]["result"] == 1000  # the event whose reply was lost ran, with dispatcher-1 alive
    duplicates = [f["id"] for f in finals if f.get("runs", 1) > 1]
    print(
        f"\nvalkey restart: {len(acknowledged)} acknowledged, {refused} refused while it was down, "
        f"all done {recovered_s:.1f} s after the restart, {len(duplicates)} run twice"
    )
    # The dispatchers' log sink reconnected too: invocations after the restart have their records.
    logs = (await gw.get(f"/v1/functions/{name}/logs", params={"limit": 1000})).json()["logs"]
    late = {i for i, at in acknowledged.items() if at > restarted_at}
    assert late and late & {entry["request_id"] for entry in logs}
