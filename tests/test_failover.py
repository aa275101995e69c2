"""Leaders and standbys: standbys refuse work, a killed leader is replaced, min_instances is kept.

These tests kill platform processes, so they run on a platform of their own (module fixture), not
the session's.  Each failover test starts one extra trigger or scheduler first, so that after the
leader is killed there is still a standby.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from faas.core import keys
from faas.core.models import LeaderRecord, MemberRecord
from faas.core.service import etcd_from_settings
from faas.launcher.embedded import settings_env
from tests.conftest import ROOT, Platform, running_platform
from tests.helpers import deploy, instances_of, internal_headers, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    # A visibility timeout far above the tests' waits: a killed dispatcher's events must be taken
    # over because it left the membership, not because they idled past the timeout.
    async with running_platform(tmp_path_factory, "faas-failover", async_visibility_s=600.0) as p:
        yield p


async def _members(platform: Platform, role: str) -> dict[str, MemberRecord]:
    etcd = etcd_from_settings(platform.settings)
    try:
        kvs, _ = await etcd.get_prefix(keys.members_prefix(role))
        leader_kv = await etcd.get(keys.election(role))
    finally:
        await etcd.close()
    members = {m.member_id: m for m in (MemberRecord.model_validate_json(kv.value) for kv in kvs)}
    if leader_kv is not None:
        # The election key of a leader killed a moment ago outlives its membership until its lease
        # lapses: only a leader that is still a member counts.
        leader_id = LeaderRecord.model_validate_json(leader_kv.value).member_id
        if leader_id in members:
            members["__leader__"] = members[leader_id]
    return members


async def _live_leader(platform: Platform, role: str) -> MemberRecord:
    """The current leader of ``role``, once it is a live member (waits out a lapsing election key)."""

    async def found() -> MemberRecord | None:
        return (await _members(platform, role)).get("__leader__")

    return await wait_until(found, timeout_s=20, what=f"a live {role} leader")


@pytest.fixture(scope="module")
def lasting() -> Iterator[ExitStack]:
    """Services a test starts that must outlive it (stopped with the module's platform)."""
    with ExitStack() as stack:
        yield stack


@contextmanager
def extra_service(platform: Platform, module: str, member_id: str) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ)
    env.update(settings_env(platform.settings))
    env["PYTHONPATH"] = str(ROOT)
    log = open(platform.settings.log_dir / f"{member_id}.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", module, "--id", member_id], env=env, stderr=log)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("role", ["trigger", "scheduler"])
async def test_standby_answers_503_not_leader(platform: Platform, role: str) -> None:
    members = await _members(platform, role)
    members.pop("__leader__", None)
    leader = await _live_leader(platform, role)
    standbys = [m for m in members.values() if m.member_id != leader.member_id]
    assert standbys, f"no standby {role}"
    path = "/v1/invoke/default/x/1" if role == "trigger" else "/v1/acquire/default/x/1?uid=0"
    async with httpx.AsyncClient(headers=internal_headers(platform.settings)) as client:
        resp = await client.post(standbys[0].address + path, content=b"{}")
    assert resp.status_code == 503
    assert resp.json()["error"]["kind"] == "not_leader"


@pytest.mark.parametrize(("role", "module"), [("trigger", "faas.trigger"), ("scheduler", "faas.scheduler")])
async def test_killed_leader_is_replaced_and_calls_keep_working(
    platform: Platform, gw: httpx.AsyncClient, role: str, module: str
) -> None:
    name = f"survivor-{role}"
    await deploy(gw, name, "def handler(event, context):\n    return 'alive'\n")
    assert (await gw.post(f"/v1/functions/{name}/invoke", json={})).status_code == 200
    with extra_service(platform, module, f"{role}-extra"):
        await wait_until(
            lambda: _has_member(platform, role, f"{role}-extra"),
            timeout_s=20,
            what=f"{role}-extra to register",
        )
        leader = await _live_leader(platform, role)
        os.kill(leader.pid, signal.SIGKILL)
        started = time.monotonic()
        # A call made right away waits for the new leader instead of failing.
        if role == "scheduler":
            # Force a cold start, which needs the scheduler.
            await deploy(gw, name, "def handler(event, context):\n    return 'alive again'\n")
        resp = await gw.post(f"/v1/functions/{name}/invoke", json={})
        assert resp.status_code == 200, f"{resp.text} after {time.monotonic() - started:.1f} s"
        assert time.monotonic() - started < platform.settings.lease_ttl_s + 10
        new_leader = await _live_leader(platform, role)
        assert new_leader.member_id != leader.member_id
        status = platform.cli("status", "--home", str(platform.settings.home))
        assert status.returncode == 1, status.stdout  # the killed member is reported down


async def _has_member(platform: Platform, role: str, member_id: str) -> bool:
    return member_id in await _members(platform, role)


async def test_min_instances_are_kept_warm(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(gw, "always-on", "def handler(event, context):\n    return 'on'\n", min_instances=1)
    await wait_until(
        lambda: instances_of(platform.settings, "always-on"), timeout_s=20, what="min_instances to be started"
    )
    first = await instances_of(platform.settings, "always-on")
    # Well past the test platform's 4 s keep-alive, the instance is still there.
    await wait_until(
        lambda: _older_than(platform, 6.0), timeout_s=20, what="the instance to outlive its keep-alive"
    )
    after = await instances_of(platform.settings, "always-on")
    assert [i.instance_id for i in after] == [i.instance_id for i in first]
    resp = await gw.post("/v1/functions/always-on/invoke", json={})
    assert resp.headers["x-faas-cold"] == "0" or resp.headers["x-faas-instance"] == first[0].instance_id


async def _older_than(platform: Platform, seconds: float) -> bool:
    found = await instances_of(platform.settings, "always-on")
    return bool(found) and all(time.time() - i.started_at > seconds for i in found)


async def test_async_events_survive_a_killed_dispatcher(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(
        gw,
        "async-slow",
        "import time\n\ndef handler(event, context):\n    time.sleep(0.5)\n    return event['n']\n",
        timeout_s=3,
        max_instances=4,
    )
    ids = []
    for n in range(12):
        resp = await gw.post("/v1/functions/async-slow/invoke-async", json={"n": n})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    await asyncio.sleep(0.8)  # both dispatchers now hold events in flight
    victim = next(m for m in (await _members(platform, "dispatcher")).values() if m.member_id != "__leader__")
    os.kill(victim.pid, signal.SIGKILL)

    async def all_done() -> bool:
        statuses = [(await gw.get(f"/v1/invocations/{i}")).json() for i in ids]
        return all(s["status"] == "succeeded" for s in statuses)

    # Within the member lease (3 s) plus two orphan scans, far below the 600 s visibility timeout.
    await wait_until(all_done, timeout_s=30, interval_s=0.5, what="every acknowledged event to complete")
    finals = [(await gw.get(f"/v1/invocations/{i}")).json() for i in ids]
    assert sorted(f["result"] for f in finals) == list(range(12))
    # Events the victim was running ran again elsewhere: "runs" counts every start.
    assert all(f["runs"] >= 1 for f in finals) and any(f["runs"] >= 2 for f in finals), finals


async def test_timer_fires_no_tick_twice_across_a_trigger_failover(
    platform: Platform, gw: httpx.AsyncClient, lasting: ExitStack
) -> None:
    import redis.asyncio as aioredis

    from faas.core import redis_keys

    name = "ticker"
    await deploy(gw, name, "def handler(event, context):\n    return event['tick']\n")
    # Not stopped after this test: it may be the only trigger left for the next ones.
    lasting.enter_context(extra_service(platform, "faas.trigger", "trigger-timer-standby"))
    await wait_until(
        lambda: _has_member(platform, "trigger", "trigger-timer-standby"),
        timeout_s=20,
        what="a standby trigger",
    )
    resp = await gw.put(
        f"/v1/functions/{name}/subscriptions/every-second", json={"timer": {"schedule": "rate(1 second)"}}
    )
    assert resp.status_code == 201, resp.text
    await asyncio.sleep(3)
    leader = await _live_leader(platform, "trigger")
    os.kill(leader.pid, signal.SIGKILL)
    killed_at = time.time()
    await wait_until(
        lambda: _new_leader(platform, leader.member_id), timeout_s=30, what="the standby to take over"
    )
    await asyncio.sleep(3)
    assert (await gw.delete(f"/v1/functions/{name}/subscriptions/every-second")).status_code == 204
    await asyncio.sleep(2.5)  # the timer has stopped: the SCAN below sees every tick

    client = aioredis.from_url(platform.settings.redis_url)
    try:
        ids = []
        async for key in client.scan_iter(match=redis_keys.invocation("*"), count=1000):
            if (await client.hget(key, "function") or b"").decode() == name:
                ids.append(key.decode().rsplit(":", 1)[-1])
    finally:
        await client.aclose()

    async def results() -> list[int] | None:
        bodies = [(await gw.get(f"/v1/invocations/{i}")).json() for i in ids]
        return [b["result"] for b in bodies] if all(b["status"] == "succeeded" for b in bodies) else None

    ticks = sorted(await wait_until(results, timeout_s=30, what="every tick's invocation to finish"))
    assert len(ticks) == len(set(ticks)), f"a tick fired twice: {ticks}"
    assert any(t < killed_at for t in ticks) and any(t > killed_at + 1 for t in ticks), ticks
    # Ticks missed while no trigger led are caught up by the new primary: none is lost either.
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), ticks


async def _new_leader(platform: Platform, old_member_id: str) -> bool:
    leader = (await _members(platform, "trigger")).get("__leader__")
    return leader is not None and leader.member_id != old_member_id


async def test_queue_subscription_keeps_delivering_across_a_trigger_failover(
    platform: Platform, gw: httpx.AsyncClient, lasting: ExitStack
) -> None:
    import json

    import redis.asyncio as aioredis

    name, stream, seen = "stream-reader", "failover-orders", "failover-seen"
    await deploy(gw, name, "def handler(event, context):\n    return len(event['Records'])\n", on_success={"stream": seen})
    resp = await gw.put(
        f"/v1/functions/{name}/subscriptions/orders", json={"queue": {"stream": stream, "batch_window_s": 0}}
    )
    assert resp.status_code == 201, resp.text
    client = aioredis.from_url(platform.settings.redis_url)

    async def delivered() -> set[str]:
        out = set()
        for _, fields in await client.xrange(seen):
            for record in json.loads(fields[b"record"])["requestPayload"]["Records"]:
                out.add(record["body"]["n"])
        return out

    try:
        # Not stopped after this test: it may be the only trigger left for the next ones.
        lasting.enter_context(extra_service(platform, "faas.trigger", "trigger-queue-standby"))
        await wait_until(
            lambda: _has_member(platform, "trigger", "trigger-queue-standby"), timeout_s=20, what="a standby"
        )
        for n in range(5):
            await client.xadd(stream, {"n": str(n)})
        await wait_until(lambda: _has_all(delivered, 5), timeout_s=20, what="messages before the failover")
        leader = await _live_leader(platform, "trigger")
        os.kill(leader.pid, signal.SIGKILL)
        for n in range(5, 10):  # while no trigger leads: they wait in the stream
            await client.xadd(stream, {"n": str(n)})
        await wait_until(
            lambda: _has_all(delivered, 10), timeout_s=30, what="the new primary to deliver the rest"
        )
        assert await delivered() == {str(n) for n in range(10)}
    finally:
        await client.aclose()


async def _has_all(delivered: Any, count: int) -> bool:
    return len(await delivered()) >= count
