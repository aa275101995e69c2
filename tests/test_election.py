"""Leader election and fencing against the real etcd of the test platform."""

from __future__ import annotations

import asyncio

import pytest

from faas.core.election import Election, LeaderWatch
from faas.core.errors import NotLeader
from faas.core.etcd import Etcd
from faas.core.service import etcd_from_settings
from tests.conftest import Platform

pytestmark = pytest.mark.integration


async def _etcd(platform: Platform) -> Etcd:
    etcd = etcd_from_settings(platform.settings)
    await etcd.connect()
    return etcd


async def test_one_leader_fencing_and_takeover(platform: Platform) -> None:
    etcd = await _etcd(platform)
    role = "test-election"
    a = Election(etcd, role=role, member_id="a", address="http://a", ttl_s=2)
    b = Election(etcd, role=role, member_id="b", address="http://b", ttl_s=2)
    watch = LeaderWatch(etcd, role)
    watch.start()
    tasks = [asyncio.create_task(a.campaign_forever()), asyncio.create_task(b.campaign_forever())]
    try:
        leader = await watch.wait_for_leader(10)
        first, second = (a, b) if leader.member_id == "a" else (b, a)
        await asyncio.wait_for(first.became_leader.wait(), 5)
        assert first.is_leader and not second.is_leader
        with pytest.raises(NotLeader):
            second.fence()
        old_fence = first.fence()
        key = b"/faas/test-election/fenced"
        ok, _ = await etcd.txn([old_fence], [etcd.op_put(key, b"by-first")])
        assert ok

        await first.resign()
        tasks[0 if first is a else 1].cancel()
        await asyncio.wait_for(second.became_leader.wait(), 10)
        assert (await watch.wait_for_leader(10, not_address=first.address)).member_id == second.member_id
        # The deposed leader's fence no longer holds: its write is refused, not applied.
        ok, _ = await etcd.txn([old_fence], [etcd.op_put(key, b"by-deposed")])
        assert not ok
        assert (await etcd.get(key)).value == b"by-first"  # type: ignore[union-attr]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a.resign()
        await b.resign()
        await watch.stop()
        await etcd.delete_prefix(b"/faas/test-election/")
        await etcd.close()
