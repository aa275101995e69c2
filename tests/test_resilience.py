"""The platform as ``faas up`` runs it (under its supervisor) survives its components being killed,
frozen and restarted in any order, with no human action.

Every test here kills or freezes real processes of one platform of its own (module fixture), started
and stopped through the CLI exactly as a user does.  The supervisor, not the test, brings back what
was killed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from faas.core.procs import pid_alive, processes_matching
from faas.launcher.embedded import read_members
from faas.runtime.sandbox import is_sandbox, same_pid_namespace
from tests.conftest import SupervisedPlatform, supervised_platform
from tests.helpers import deploy, instances_of, wait_until

pytestmark = pytest.mark.integration

RECOVERY_S = 60.0  # generous: two cores shared by a dozen processes that all restart at once


@pytest.fixture(scope="module")
async def up(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SupervisedPlatform]:
    async with supervised_platform(tmp_path_factory, "faas-resilience") as platform:
        yield platform


@pytest.fixture
async def client(up: SupervisedPlatform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=up.url, timeout=90, headers=up.admin_headers) as c:
        yield c


async def leader_pid(platform: SupervisedPlatform, role: str) -> tuple[str, int]:
    async def found() -> tuple[str, int] | None:
        members, leaders = await read_members(platform.settings)
        leader = leaders.get(role, {}).get("member_id")
        member = members.get(str(leader))
        return (str(leader), int(member["pid"])) if member else None

    return await wait_until(found, timeout_s=RECOVERY_S, what=f"a {role} leader")  # type: ignore[no-any-return]


async def healthy(platform: SupervisedPlatform) -> dict[str, Any]:
    """Wait until ``faas status`` reports every component up, registered and elected."""

    async def ok() -> dict[str, Any] | None:
        status = await asyncio.to_thread(platform.status)
        return status if status.get("ok") else None

    try:
        return await wait_until(ok, timeout_s=RECOVERY_S, interval_s=0.5, what="faas status to be ok")  # type: ignore[no-any-return]
    except AssertionError:
        raise AssertionError(f"not recovered: {(await asyncio.to_thread(platform.status)).get('problems')}") from None


def host_processes(platform: SupervisedPlatform) -> list[int]:
    """One pid per function host under the platform's home: the host, or its sandbox's bubblewrap
    (not the copy of it that is PID 1 inside the sandbox)."""
    prefix = f"{platform.settings.home}/"
    return [
        pid
        for pid, argv in processes_matching(
            lambda a: any(x.endswith("host.py") for x in a) and any(x.startswith(prefix) for x in a)
        )
        if not is_sandbox(argv) or same_pid_namespace(pid)
    ]


async def test_a_killed_node_agent_comes_back_adopts_its_instances_and_orphans_nothing(
    up: SupervisedPlatform, client: httpx.AsyncClient
) -> None:
    await deploy(client, "adoptee", "def handler(event, context):\n    return 'warm'\n")
    first = await client.post("/v1/functions/adoptee/invoke", json={})
    assert first.status_code == 200, first.text
    instance = first.headers["x-faas-instance"]
    agent = up.records()[up.settings.node_id]
    hosts_before = set(host_processes(up))
    [node] = (await asyncio.to_thread(up.status))["nodes"]  # type: ignore[misc]
    agent_port = int(str(node["address"]).rsplit(":", 1)[1])

    os.kill(agent.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    # No function host inherited the agent's listening socket: the port refuses connections as soon as
    # the agent's last thread is gone (within a second), instead of accepting them for ever.
    async def refuses() -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", agent_port), 1.0)
        except ConnectionRefusedError:
            return True
        writer.close()
        return False

    await wait_until(refuses, timeout_s=2.0, interval_s=0.02, what=f"the killed agent's port {agent_port} to refuse")
    # Warm calls go on while the agent is away: the instance runs in a session of its own.
    for _ in range(5):
        resp = await client.post("/v1/functions/adoptee/invoke", json={})
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(0.2)
    await healthy(up)
    restarted = up.records()[up.settings.node_id]
    assert restarted.pid != agent.pid and restarted.restarts >= 1

    # The instance was adopted, not replaced: the same instance answers, with no cold start.
    resp = await client.post("/v1/functions/adoptee/invoke", json={})
    assert resp.status_code == 200 and resp.headers["x-faas-instance"] == instance, resp.headers
    assert [r.instance_id for r in await instances_of(up.settings, "adoptee")] == [instance]
    # No orphan: every function host under this home is the adopted instance or a new pool member;
    # the old agent's pool members were killed.
    hosts_after = set(host_processes(up))
    survivors = hosts_before & hosts_after
    assert len(survivors) == 1, f"kept {survivors} of {hosts_before}; now {hosts_after}"
    assert len(hosts_after) == 1 + up.settings.pool_size, hosts_after
    print(f"node agent back and healthy {time.monotonic() - killed_at:.1f} s after kill -9")


async def test_etcd_killed_under_load_every_service_registers_again(
    up: SupervisedPlatform, client: httpx.AsyncClient
) -> None:
    await deploy(client, "through-etcd", "def handler(event, context):\n    return event\n")
    assert (await client.post("/v1/functions/through-etcd/invoke", json={})).status_code == 200
    etcd = up.records()["etcd"]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            resp = await client.post("/v1/functions/through-etcd/invoke", json={"n": len(statuses)})
            statuses.append(resp.status_code)
            await asyncio.sleep(0.05)

    loader = asyncio.create_task(load())
    await asyncio.sleep(1.0)
    os.kill(etcd.pid, signal.SIGKILL)
    await asyncio.sleep(4.0)
    status = await healthy(up)
    stop.set()
    await loader
    assert up.records()["etcd"].restarts >= 1
    members = {c["id"] for c in status["components"] if c["status"] == "up"}
    for expected in ("gateway-1", "trigger-1", "trigger-2", "dispatcher-1", "dispatcher-2", "scheduler-1", "scheduler-2"):
        assert expected in members, status
    # Warm calls need no etcd: none failed while it was down and restarting.
    assert statuses and all(s == 200 for s in statuses), statuses
    # And what needs etcd works again: a deploy and its cold start.
    await deploy(client, "through-etcd", "def handler(event, context):\n    return 'v2'\n")
    resp = await client.post("/v1/functions/through-etcd/invoke", json={})
    assert resp.status_code == 200 and resp.json() == "v2", resp.text


async def test_a_frozen_scheduler_leader_is_fenced_and_its_cold_starts_go_to_the_new_one(
    up: SupervisedPlatform, client: httpx.AsyncClient
) -> None:
    name = "frozen-sched"
    await deploy(client, name, "def handler(event, context):\n    return 'v1'\n")
    assert (await client.post(f"/v1/functions/{name}/invoke", json={})).status_code == 200
    leader_id, pid = await leader_pid(up, "scheduler")
    await deploy(client, name, "def handler(event, context):\n    return 'v2'\n")  # the next call cold-starts
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        resp = await client.post(f"/v1/functions/{name}/invoke", json={})
        took = time.monotonic() - started
        assert resp.status_code == 200 and resp.json() == "v2", resp.text
        # Re-sent to the new leader once elected (TTL 3 s), not held until the frozen one resumes.
        assert took < up.settings.lease_ttl_s + 8, f"the cold start took {took:.1f} s"
        new_id, _ = await leader_pid(up, "scheduler")
        assert new_id != leader_id
    finally:
        os.kill(pid, signal.SIGCONT)
    # The resumed leader acts no more: no second instance of v2, and it does not lead again.
    await asyncio.sleep(up.settings.lease_ttl_s + 1)
    assert pid_alive(pid)
    records = [r for r in await instances_of(up.settings, name) if r.version == 2]
    assert len(records) == 1, records
    await healthy(up)


async def test_components_killed_in_any_order_come_back_and_converge(
    up: SupervisedPlatform, client: httpx.AsyncClient
) -> None:
    await deploy(client, "converge", "def handler(event, context):\n    return event\n")
    assert (await client.post("/v1/functions/converge/invoke", json={"a": 1})).status_code == 200
    victims = [
        "etcd", "valkey", "seaweedfs", "gateway-1", "trigger-1", "trigger-2", "dispatcher-1",
        "dispatcher-2", "scheduler-1", "scheduler-2", up.settings.node_id,
    ]  # fmt: skip
    random.shuffle(victims)
    records = up.records()
    for name in victims:
        os.kill(records[name].pid, signal.SIGKILL)
        await asyncio.sleep(random.uniform(0.0, 0.6))
    print("killed in order:", ", ".join(victims))
    await healthy(up)
    assert all(up.records()[name].restarts >= 1 for name in victims)

    async def works() -> bool:
        try:
            sync = await client.post("/v1/functions/converge/invoke", json={"b": 2})
            queued = await client.post("/v1/functions/converge/invoke-async", json={"c": 3})
        except httpx.TransportError:
            return False
        return sync.status_code == 200 and queued.status_code == 202

    await wait_until(works, timeout_s=RECOVERY_S, what="sync and async calls to work again")
