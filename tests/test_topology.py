"""Several node agents and a three-member etcd, as ``faas up --nodes 2 --etcd-members 3`` runs them:
placement by free memory across nodes, a node's loss moving its functions to the other, and the
etcd leader killed under load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from faas.launcher.embedded import etcd_http_client, etcd_http_url, etcd_members, node_ids
from tests.conftest import SupervisedPlatform, supervised_platform
from tests.helpers import deploy, instances_of, wait_until
from tests.test_resilience import RECOVERY_S, healthy

pytestmark = pytest.mark.integration

NODE_MEMORY_MB = 1024


@pytest.fixture(scope="module")
async def up(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SupervisedPlatform]:
    async with supervised_platform(
        tmp_path_factory,
        "faas-topology",
        "--nodes", "2",
        "--etcd-members", "3",
        nodes=2,
        etcd_members=3,
        node_memory_mb=NODE_MEMORY_MB,  # each node offers 1 GB, so placement by memory shows
    ) as platform:  # fmt: skip
        yield platform


@pytest.fixture
async def client(up: SupervisedPlatform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=up.url, timeout=90, headers=up.admin_headers) as c:
        yield c


def test_faas_up_runs_every_node_and_etcd_member(up: SupervisedPlatform) -> None:
    records = up.records()
    assert {"etcd-1", "etcd-2", "etcd-3"} <= set(records), sorted(records)
    assert len(node_ids(up.settings)) == 2 and set(node_ids(up.settings)) <= set(records)
    status = up.status()
    assert status["ok"], status["problems"]
    assert {n["node_id"] for n in status["nodes"]} == set(node_ids(up.settings))  # type: ignore[union-attr]


async def test_instances_spread_by_free_memory_and_move_when_a_node_is_lost(
    up: SupervisedPlatform, client: httpx.AsyncClient
) -> None:
    name = "spread"
    await deploy(client, name, "def handler(event, context):\n    return 'ok'\n", memory_mb=256, min_instances=4)

    async def placed() -> Counter[str] | None:
        records = await instances_of(up.settings, name)
        return Counter(r.node_id for r in records) if len(records) >= 4 else None

    spread = await wait_until(placed, timeout_s=RECOVERY_S, what="4 instances")
    assert sorted(spread.values()) == [2, 2], spread  # 1 GB each: two of 256 MB on each node

    # A node is lost (its agent frozen, so it cannot even clean up): its lease lapses, its records go,
    # and the scheduler starts the missing instances on the node that is left.
    lost = node_ids(up.settings)[1]
    agent = up.records()[lost]
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for _ in range(10):
            resp = await client.post(f"/v1/functions/{name}/invoke", json={})
            assert resp.status_code == 200, resp.text
            await asyncio.sleep(0.2)

        async def moved() -> Counter[str] | None:
            records = await instances_of(up.settings, name)
            nodes = Counter(r.node_id for r in records)
            return nodes if nodes.get(lost, 0) == 0 and sum(nodes.values()) >= 4 else None

        after = await wait_until(moved, timeout_s=RECOVERY_S, what="the lost node's instances to move")
        assert set(after) == {node_ids(up.settings)[0]}, after
        print(f"instances moved off the lost node in {time.monotonic() - started:.1f} s")
        resp = await client.post(f"/v1/functions/{name}/invoke", json={})
        assert resp.status_code == 200, resp.text
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    await healthy(up)


async def _etcd_leader(up: SupervisedPlatform) -> str:
    """The record name (etcd-N) of the member that leads the etcd cluster now."""
    async with etcd_http_client(up.settings, timeout_s=3) as http:
        for member in etcd_members(up.settings):
            url = etcd_http_url(up.settings, "127.0.0.1", member.client_port, "/v3/maintenance/status")
            try:
                body = (await http.post(url, json={})).json()
            except (httpx.HTTPError, ValueError):
                continue
            if body.get("leader") and body.get("leader") == body.get("header", {}).get("member_id"):
                return member.name
    raise AssertionError("no etcd member says it leads")


async def test_the_etcd_leader_killed_under_load(up: SupervisedPlatform, client: httpx.AsyncClient) -> None:
    name = "quorum"
    await deploy(client, name, "def handler(event, context):\n    return event\n")
    assert (await client.post(f"/v1/functions/{name}/invoke", json={})).status_code == 200
    leader = await _etcd_leader(up)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            resp = await client.post(f"/v1/functions/{name}/invoke", json={"n": len(statuses)})
            statuses.append(resp.status_code)
            await asyncio.sleep(0.05)

    loader = asyncio.create_task(load())
    await asyncio.sleep(1.0)
    os.kill(up.records()[leader].pid, signal.SIGKILL)
    await asyncio.sleep(3.0)
    # Something that needs etcd, right after the election: a deploy and its cold start.
    await deploy(client, name, "def handler(event, context):\n    return 'after'\n")
    resp = await client.post(f"/v1/functions/{name}/invoke", json={})
    assert resp.status_code == 200 and resp.json() == "after", resp.text
    await healthy(up)
    stop.set()
    await loader
    assert statuses and all(s == 200 for s in statuses), Counter(statuses)
    assert up.records()[leader].restarts >= 1
    assert await _etcd_leader(up) in {m.name for m in etcd_members(up.settings)}
