"""The invocation path end to end with instances as Docker containers (runtime=docker).

A platform of its own whose node agent runs the Docker backend against the real dockerd; fails in CI
when no daemon answers (scripts/ensure-dockerd starts one there).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiodocker
import httpx
import pytest

from faas.core.errors import Unavailable
from faas.launcher.embedded import EmbeddedCluster, settings_for_test
from tests.conftest import Platform, require_docker, running_platform
from tests.helpers import deploy, instances_of

pytestmark = [pytest.mark.integration, pytest.mark.docker]


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    await require_docker()
    async with running_platform(tmp_path_factory, "faas-docker", runtime="docker", pool_size=1) as p:
        yield p


INSPECT = """
import os, socket

def handler(event, context):
    if event.get("fail"):
        raise RuntimeError("boom")
    try:
        open("/not-writable", "w")
        root_writable = True
    except OSError:
        root_writable = False
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=0.5)
        network = True
    except OSError:
        network = False
    return {"uid": os.getuid(), "root_writable": root_writable, "network": network, "pid": os.getpid()}
"""


async def test_cold_warm_isolation_and_errors_in_containers(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(gw, "boxed", INSPECT, memory_mb=256)
    cold = await gw.post("/v1/functions/boxed/invoke", json={})
    assert cold.status_code == 200, cold.text
    assert cold.headers["x-faas-cold"] == "1"
    body = cold.json()
    assert body == {"uid": 10001, "root_writable": False, "network": False, "pid": body["pid"]}
    warm = await gw.post("/v1/functions/boxed/invoke", json={})
    assert warm.headers["x-faas-cold"] == "0"
    assert warm.headers["x-faas-instance"] == cold.headers["x-faas-instance"]

    failed = await gw.post("/v1/functions/boxed/invoke", json={"fail": True})
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "RuntimeError"
    assert (await gw.post("/v1/functions/boxed/invoke", json={})).status_code == 200


async def test_container_killed_between_calls_is_replaced(platform: Platform, gw: httpx.AsyncClient) -> None:
    await deploy(gw, "victim", "def handler(event, context):\n    return 'ok'\n")
    first = await gw.post("/v1/functions/victim/invoke", json={})
    assert first.status_code == 200
    (record,) = await instances_of(platform.settings, "victim")
    socket_dir = record.address.removeprefix("unix://").rsplit("/", 1)[0]
    killed = 0
    async with aiodocker.Docker() as docker:
        for container in await docker.containers.list(filters={"label": ["faas.platform=1"]}):
            info = await container.show()
            if any(m.get("Source") == socket_dir for m in info.get("Mounts", [])):
                await container.kill()
                killed += 1
    assert killed == 1
    # The call right after the kill may report the crash (502); the one after that gets a new instance.
    statuses = []
    for _ in range(2):
        resp = await gw.post("/v1/functions/victim/invoke", json={})
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            break
    assert statuses in ([200], [502, 200]), statuses
    assert resp.headers["x-faas-instance"] != first.headers["x-faas-instance"]


async def test_out_of_memory_is_reported_and_the_instance_replaced(gw: httpx.AsyncClient) -> None:
    await deploy(
        gw,
        "hog",
        """
        def handler(event, context):
            if event.get("hog"):
                blocks = [bytearray(16 * 1024 * 1024) for _ in range(64)]  # 1 GiB, far over the limit
                return len(blocks)
            return "fine"
        """,
        memory_mb=128,
    )
    assert (await gw.post("/v1/functions/hog/invoke", json={})).status_code == 200
    hog = await gw.post("/v1/functions/hog/invoke", json={"hog": True})
    assert hog.status_code == 500, hog.text
    assert hog.json()["error"]["kind"] == "out_of_memory"
    assert hog.headers["x-faas-function-error"] == "Unhandled"
    after = await gw.post("/v1/functions/hog/invoke", json={})
    assert after.status_code == 200 and after.json() == "fine"


async def test_fork_bomb_is_stopped_by_the_pids_limit(gw: httpx.AsyncClient) -> None:
    await deploy(
        gw,
        "forker",
        """
        import os, time

        def handler(event, context):
            if not event.get("bomb"):
                return "calm"
            children = 0
            try:
                while True:
                    if os.fork() == 0:
                        time.sleep(30)
                        os._exit(0)
                    children += 1
            except OSError as exc:
                raise RuntimeError(f"fork refused after {children} children: {exc}") from exc
        """,
        memory_mb=1024,
    )
    bomb = await gw.post("/v1/functions/forker/invoke", json={"bomb": True})
    assert bomb.status_code in (500, 502), bomb.text
    assert bomb.json()["error"]["kind"] in ("function_error", "instance_start_error")
    calm = await gw.post("/v1/functions/forker/invoke", json={})
    assert calm.status_code == 200 and calm.json() == "calm"


async def test_unreachable_docker_daemon_is_a_clear_startup_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("faas-no-docker")
    settings = settings_for_test(home, runtime="docker", docker_url="unix:///nonexistent/docker.sock")
    cluster = EmbeddedCluster(settings)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await cluster.start()
    assert "Docker daemon" in info.value.message
    assert time.monotonic() - started < 60  # fails fast, no restart loop
    assert not cluster.is_running()


async def test_containers_of_a_killed_agent_are_removed_when_the_platform_stops(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    """Last in this module: it kills the node agent for good."""
    import asyncio
    import json
    import os
    import signal

    from faas.core.procs import pid_alive
    from faas.launcher.embedded import kill_leftover_hosts

    await deploy(gw, "left-behind", INSPECT, memory_mb=256)
    assert (await gw.post("/v1/functions/left-behind/invoke", json={})).status_code == 200
    filters = json.dumps({"label": ["faas.platform=1", f"faas.node={platform.settings.node_id}"]})
    async with aiodocker.Docker() as docker:
        # Let the pool refill after that cold start finish first: a create in flight when the agent
        # dies completes in dockerd later (kill_leftover_hosts waits for those too, up to a bound).
        for _ in range(600):
            containers = await docker.containers.list(all=True, filters=filters)
            if len(containers) >= 2 and all(c["State"] == "running" for c in containers):
                break
            await asyncio.sleep(0.1)
        assert await docker.containers.list(all=True, filters=filters)
        agent = next(r for r in platform.cluster.records if r.name == platform.settings.node_id)
        os.kill(agent.pid, signal.SIGKILL)  # it cannot remove its containers now
        while pid_alive(agent.pid, agent.start_ticks):  # noqa: ASYNC110 - a few milliseconds
            await asyncio.sleep(0.01)
        assert await docker.containers.list(all=True, filters=filters)  # left running
        kill_leftover_hosts(platform.settings)  # what stopping the platform does last
        assert await docker.containers.list(all=True, filters=filters) == []
