"""A function deleted and deployed again under the same name is a new function (issue 8).

Its version numbers start at 1 again, so only its uid tells it from the old one: these tests check
that no warm instance, start in flight, pool or queued event of the old function serves the new one.
The integration tests run on the shared platform, once per runtime backend; the first few are unit
tests of the pure parts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from faas.core import keys, redis_keys, wire
from faas.core.models import FunctionRecord, InstanceRecord, LeaderRecord, VersionSpec
from faas.core.queue import AsyncEnvelope
from faas.core.service import etcd_from_settings
from faas.scheduler.placement import StartBook
from tests.conftest import Platform
from tests.helpers import deploy, instances_of, internal_headers, members_of, wait_until

ANSWER = """
def handler(event, context):
    return {"code": "CODE"}
"""

FAILING = """
def handler(event, context):
    raise RuntimeError("the old function always fails")
"""

# -- unit tests ------------------------------------------------------------------------------


def test_records_stored_before_uids_still_load() -> None:
    record = FunctionRecord.model_validate_json('{"namespace": "default", "name": "f", "latest_version": 1}')
    assert record.uid == ""
    spec = VersionSpec.model_validate_json(
        '{"namespace": "default", "function": "f", "version": 1, "code": {"key": "k", "sha256": "s", "size": 1}}'
    )
    assert spec.function_uid == "" and spec.key == ("default", "f", 1, "")
    inst = InstanceRecord.model_validate_json(
        '{"instance_id": "i", "namespace": "default", "function": "f", "version": 1, "node_id": "n",'
        ' "address": "unix:///tmp/i.sock", "concurrency": 1}'
    )
    assert inst.key == spec.key  # an old instance still serves its (old, uid-less) function
    env = AsyncEnvelope.model_validate_json(
        '{"v": 1, "id": "e", "namespace": "default", "function": "f", "version": 1, "payload": "{}"}'
    )
    assert env.function_uid is None


async def test_a_start_for_the_old_function_is_not_shared_with_the_new_one() -> None:
    book = StartBook()
    old, new = ("default", "f", 1, "aaaa"), ("default", "f", 1, "bbbb")
    book.open(old, capacity=5)
    assert book.join(new) is None  # same name and version number, another function
    assert book.count(new) == 0 and book.count(old) == 1


def test_once_scopes_are_per_function_uid() -> None:
    # A function created again does not inherit the old one's idempotency keys or fired ticks.
    assert redis_keys.idempotency_scope("default", "f", "k", "aaaa") != redis_keys.idempotency_scope(
        "default", "f", "k", "bbbb"
    )
    assert redis_keys.timer_tick_scope("default", "f", "t", 60, "aaaa") != redis_keys.timer_tick_scope(
        "default", "f", "t", 60, "bbbb"
    )
    # Functions created before uids keep the scopes they had.
    assert redis_keys.idempotency_scope("default", "f", "k", "") == "idem:default:f:k"
    assert redis_keys.timer_tick_scope("default", "f", "t", 60) == "timer:default:f:t:60"


# -- against the platform ----------------------------------------------------------------------


async def _scheduler_leader(platform: Platform) -> str:
    etcd = etcd_from_settings(platform.settings)
    try:
        kv = await etcd.get(keys.election("scheduler"))
    finally:
        await etcd.close()
    assert kv is not None, "no scheduler leader"
    return LeaderRecord.model_validate_json(kv.value).address


async def _pool_uids(platform: Platform, name: str) -> set[str]:
    """The function uids of the pools any dispatcher keeps for ``name``."""
    out: set[str] = set()
    async with httpx.AsyncClient(headers=internal_headers(platform.settings)) as client:
        for member in await members_of(platform.settings, "dispatcher"):
            pools = (await client.get(member.address + "/v1/pools")).json()["pools"]
            out |= {p["function_uid"] for p in pools if p["function"] == name}
    return out


@pytest.mark.integration
async def test_deleted_and_redeployed_function_never_answers_with_old_code(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    name = "ident-sync"
    # min_instances keeps the old instance warm whatever its idleness: only the knowledge that its
    # function was deleted can remove it.
    old = await deploy(gw, name, ANSWER.replace("CODE", "A"), min_instances=1)
    first = await gw.post(f"/v1/functions/{name}/invoke", json={})
    assert first.status_code == 200, first.text
    assert first.json() == {"code": "A"}
    warm = await gw.post(f"/v1/functions/{name}/invoke", json={})
    assert warm.json() == {"code": "A"} and warm.headers["x-faas-cold"] == "0"
    old_uid = old["uid"]
    assert old_uid and old["config"]["function_uid"] == old_uid
    assert {r.function_uid for r in await instances_of(platform.settings, name)} == {old_uid}

    assert (await gw.delete(f"/v1/functions/{name}")).status_code == 204
    new = await deploy(gw, name, ANSWER.replace("CODE", "B"), min_instances=1)
    assert new["latest_version"] == 1  # the same name and version number as the old code...
    assert new["uid"] != old_uid  # ...but another function

    answers: list[Any] = []
    after_deploy = await gw.post(f"/v1/functions/{name}/invoke", json={})
    assert after_deploy.status_code == 200, after_deploy.text
    answers.append(after_deploy.json())
    for _ in range(15):
        await asyncio.sleep(0.2)
        resp = await gw.post(f"/v1/functions/{name}/invoke", json={})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-faas-instance"] != first.headers["x-faas-instance"]
        answers.append(resp.json())
    assert answers == [{"code": "B"}] * 16

    # A hop that still names the old function is refused, not served by the new one's instances.
    dispatcher = (await members_of(platform.settings, "dispatcher"))[0]
    async with httpx.AsyncClient(timeout=30, headers=internal_headers(platform.settings)) as client:
        stale = await client.post(
            f"{dispatcher.address}/v1/invoke/default/{name}/1", content=b"{}", headers={wire.FUNCTION_UID: old_uid}
        )
        assert stale.status_code == 404, stale.text
        assert stale.json()["error"]["kind"] == "not_found"
        acquire = await client.post(
            f"{await _scheduler_leader(platform)}/v1/acquire/default/{name}/1", params={"uid": old_uid}
        )
        assert acquire.status_code == 404, acquire.text
        missing_uid = await client.post(f"{await _scheduler_leader(platform)}/v1/acquire/default/{name}/1")
        assert missing_uid.status_code == 400, missing_uid.text

    async def old_instances_gone() -> bool:
        uids = {r.function_uid for r in await instances_of(platform.settings, name)}
        return old_uid not in uids and new["uid"] in uids

    await wait_until(old_instances_gone, timeout_s=20, what="the deleted function's instance to be reaped")

    async def old_pools_gone() -> bool:
        return old_uid not in await _pool_uids(platform, name)

    await wait_until(old_pools_gone, timeout_s=10, what="the dispatchers to forget the old function's pool")
    assert (await gw.delete(f"/v1/functions/{name}")).status_code == 204


@pytest.mark.integration
async def test_event_queued_for_the_old_function_is_dead_lettered_not_run_by_the_new_one(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    name = "ident-async"
    old = await deploy(gw, name, FAILING, max_retries=10)
    queued = await gw.post(f"/v1/functions/{name}/invoke-async", json={"n": 1})
    assert queued.status_code == 202, queued.text
    event_id = queued.json()["id"]

    # Let the old function fail twice: the next retry is then 1-3 s away, waiting in the queue.
    async def failed_twice() -> dict[str, Any] | None:
        status = (await gw.get(f"/v1/invocations/{event_id}")).json()
        return status if status["status"] == "failed" and status["attempts"] >= 2 else None

    await wait_until(failed_twice, timeout_s=30, what="two failed attempts of the old function")
    assert (await gw.delete(f"/v1/functions/{name}")).status_code == 204
    new = await deploy(gw, name, ANSWER.replace("CODE", "B"))
    assert new["uid"] != old["uid"]

    deadline = time.monotonic() + 30
    while True:
        final = (await gw.get(f"/v1/invocations/{event_id}")).json()
        if final["status"] in ("succeeded", "dead-lettered"):
            break
        assert time.monotonic() < deadline, final
        await asyncio.sleep(0.2)
    # Dead-lettered (kept for inspection), not dropped and never run by the new code.
    assert final["status"] == "dead-lettered", final
    assert final["error"]["kind"] == "not_found"
    letters = (await gw.get("/v1/dead-letters", params={"function": name})).json()["dead_letters"]
    letter = next(d for d in letters if d["invocation_id"] == event_id)
    assert letter["function_uid"] == old["uid"]
    logs = (await gw.get(f"/v1/functions/{name}/logs")).json()["logs"]
    assert not [e for e in logs if e["request_id"] == event_id and e["status"] == "ok"]

    # The new function runs the events queued for it.
    fresh = await gw.post(f"/v1/functions/{name}/invoke-async", json={"n": 2})
    fresh_id = fresh.json()["id"]

    async def fresh_done() -> dict[str, Any] | None:
        status = (await gw.get(f"/v1/invocations/{fresh_id}")).json()
        return status if status["status"] == "succeeded" else None

    assert (await wait_until(fresh_done, timeout_s=30, what="the new function's event"))["result"] == {"code": "B"}
    assert (await gw.delete(f"/v1/functions/{name}")).status_code == 204
