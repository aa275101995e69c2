"""DockerBackend against the real dockerd: image, pool, isolation, limits, failures, clean-up.

Code archives come from a local http.server on 127.0.0.1, as they would from a presigned S3 URL;
the backend downloads them on the node (the containers have no network).  Every backend gets its
own node id; every container carrying it is removed after the test, whatever happened, and a test
fails if the backend itself left one behind.  Skipped without a Docker daemon, failed in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import httpx
import pytest

from faas.core.errors import InstanceStartError, Unavailable
from faas.core.models import InstanceExit
from faas.runtime.docker_backend import DockerBackend
from faas.runtime.image import DEFAULT_TAG, ensure_runtime_image
from tests.code_server import CodeServer
from tests.conftest import missing_service
from tests.helpers import HostAnswer

pytestmark = [pytest.mark.docker, pytest.mark.timeout(60)]

# Every node id this module uses starts with this, so a run killed before its clean-up is swept by
# the next one, and no other container on the daemon is touched.
NODE_PREFIX = "pytest-dkr-"

MIB = 1024 * 1024

ECHO = {
    "app.py": """
        def handler(event, context):
            print("invoked", context.function_name)
            return {"echo": event}
    """
}

PROBE = {
    "app.py": """
        import os
        import socket
        import time

        def attempt(action):
            try:
                action()
                return "ok"
            except OSError as exc:
                return f"{type(exc).__name__}: {exc.strerror}"

        def status(field):
            with open("/proc/self/status") as lines:
                return next(line.split()[1] for line in lines if line.startswith(field + ":"))

        def zombies_after_orphaning():
            child = os.fork()
            if child == 0:
                if os.fork() == 0:
                    os._exit(0)  # the grandchild: re-parented to PID 1 when its parent exits
                os._exit(0)
            os.waitpid(child, 0)
            time.sleep(0.2)
            zombies = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        zombies += stat.read().rsplit(")", 1)[1].split()[0] == "Z"
                except OSError:
                    pass
            return zombies

        def handler(event, context):
            return {
                "zombies": zombies_after_orphaning(),
                "uid": os.getuid(),
                "gid": os.getgid(),
                "write_root": attempt(lambda: open("/escape", "w").close()),
                "write_code": attempt(lambda: open(os.path.join(os.getcwd(), "escape"), "w").close()),
                "write_tmp": attempt(lambda: open("/tmp/scratch", "w").close()),
                "connect": attempt(
                    lambda: socket.create_connection(("127.0.0.1", event["port"]), timeout=2).close()
                ),
                "interfaces": sorted(os.listdir("/sys/class/net")),
                "code": sorted(os.listdir("/code")),
                "node_cache_visible": os.path.exists(event["node_cache"]),
                "cap_eff": status("CapEff"),
                "no_new_privs": status("NoNewPrivs"),
                "seccomp": status("Seccomp"),
            }
    """
}

MEMORY_HOG = {
    "app.py": """
        def handler(event, context):
            hoard = []
            while True:
                hoard.append(b"x" * (4 << 20))  # written, so resident
    """
}

FORK_BOMB = {
    "app.py": """
        import os
        import time

        def handler(event, context):
            children = 0
            while True:
                try:
                    pid = os.fork()
                except OSError as exc:
                    raise RuntimeError(f"fork refused after {children} children: {exc}") from None
                if pid == 0:  # every child keeps forking, for ever
                    while True:
                        try:
                            os.fork()
                        except OSError:
                            time.sleep(0.05)
                children += 1
    """
}

SLEEPER = {
    "app.py": """
        import time

        def handler(event, context):
            time.sleep(event.get("sleep", 0))
            return "awake"
    """
}


@pytest.fixture(scope="module")
def code_server() -> Iterator[CodeServer]:
    server = CodeServer(function="probe", version=3)
    yield server
    server.close()


@pytest.fixture(scope="module")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    try:
        client = aiodocker.Docker()
    except (AssertionError, ValueError) as exc:
        missing_service(f"no Docker daemon socket: {exc}")
    try:
        await asyncio.wait_for(client.version(), 5)
    except (aiodocker.DockerError, OSError, TimeoutError) as exc:
        await client.close()
        missing_service(f"Docker daemon unreachable: {exc}")
    await sweep(client)
    yield client
    await sweep(client)
    await client.close()


async def sweep(docker: aiodocker.Docker) -> None:
    """Remove every container an earlier (killed) run of this module left."""
    for container in await docker.containers.list(
        all=True, filters=json.dumps({"label": ["faas.platform=1"]})
    ):
        if container["Labels"].get("faas.node", "").startswith(NODE_PREFIX):
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)


def new_node_id() -> str:
    return f"{NODE_PREFIX}{uuid.uuid4().hex[:6]}"


def node_filters(node_id: str, **more: list[str]) -> str:
    return json.dumps({"label": ["faas.platform=1", f"faas.node={node_id}"], **more})


async def node_containers(docker: aiodocker.Docker, node_id: str, *, running_only: bool = True) -> list[Any]:
    filters = node_filters(node_id, status=["running"]) if running_only else node_filters(node_id)
    return await docker.containers.list(all=not running_only, filters=filters)


def container_name(node_id: str, address: str) -> str:
    """The container behind an instance address: its socket folder is ``c-<token>``."""
    folder = Path(address.removeprefix("unix://")).parent.name
    return f"faas-{node_id}-{folder.removeprefix('c-')}"


def uds_client(address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=address.removeprefix("unix://"), verify=False),
        base_url="http://host",
        verify=False,
        trust_env=False,
        timeout=20,
    )


async def invoke(address: str, event: dict[str, Any]) -> HostAnswer:
    async with uds_client(address) as client:
        return HostAnswer(await client.post("/_/invoke", json=event, headers={"X-Faas-Request-Id": uuid.uuid4().hex}))


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    give_up_at = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < give_up_at, "condition not met in time"
        await asyncio.sleep(0.05)


class Backends:
    """Makes backends on fresh node ids; closes them and removes every container they labelled."""

    def __init__(self, docker: aiodocker.Docker, run_dir: Path) -> None:
        self.docker = docker
        self.run_dir = run_dir
        self.made: list[tuple[DockerBackend, str]] = []
        self.exits: dict[str, asyncio.Queue[InstanceExit]] = {}

    async def make(self, pool_size: int = 1, *, node_id: str | None = None) -> tuple[DockerBackend, str]:
        node_id = node_id or new_node_id()
        backend = DockerBackend(
            run_dir=self.run_dir / node_id,
            cache_dir=self.run_dir / "cache",
            pool_size=pool_size,
            node_id=node_id,
        )
        self.made.append((backend, node_id))
        exits: asyncio.Queue[InstanceExit] = asyncio.Queue()
        self.exits[node_id] = exits
        backend.set_exit_callback(exits.put)
        await backend.start()
        return backend, node_id

    async def cleanup(self) -> list[str]:
        leftovers: list[str] = []
        for backend, node_id in self.made:
            await backend.close()
            for container in await node_containers(self.docker, node_id, running_only=False):
                leftovers.append(container.id)
                try:
                    await container.delete(force=True)
                except aiodocker.DockerError as exc:
                    if exc.status not in (404, 409):
                        raise
        return leftovers


@pytest.fixture
async def backends(docker: aiodocker.Docker, run_dir: Path) -> AsyncIterator[Backends]:
    made = Backends(docker, run_dir)
    try:
        yield made
    finally:
        leftovers = await made.cleanup()
    assert not leftovers, f"the backend left containers behind: {leftovers}"


async def test_daemon_unreachable_is_unavailable(run_dir: Path) -> None:
    backend = DockerBackend(
        run_dir=run_dir,
        cache_dir=run_dir / "cache",
        pool_size=1,
        docker_url=f"unix://{run_dir}/no-such-docker.sock",
        node_id="nowhere",
    )
    with pytest.raises(Unavailable, match=r"Docker daemon at unix://.*no-such-docker\.sock unreachable"):
        await backend.start()
    await backend.close()


async def test_runtime_image_is_built_once(docker: aiodocker.Docker) -> None:
    first = await ensure_runtime_image(docker)
    created = (await docker.images.inspect(DEFAULT_TAG))["Created"]
    started = time.monotonic()
    assert await ensure_runtime_image(docker) == first
    assert time.monotonic() - started < 1.0
    image = await docker.images.inspect(DEFAULT_TAG)
    assert image["Created"] == created  # reused, not rebuilt
    assert image["Config"]["User"] == "10001:10001"
    assert image["Config"]["Labels"]["faas.runtime.kind"] == "local"


async def test_launch_runs_the_function_isolated_and_refills_the_pool(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer, run_dir: Path
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    [pooled] = await node_containers(docker, node_id)
    spec = code_server.spec(PROBE)

    address = await backend.launch(spec, timeout_s=20)

    name = container_name(node_id, address)
    assert pooled["Names"] == [f"/{name}"]  # the warm container was used
    response = await invoke(address, {"port": code_server.port, "node_cache": str(run_dir / "cache")})
    assert response.status_code == 200, response.text
    seen = response.json()["result"]
    assert (seen["uid"], seen["gid"]) == (10001, 10001)
    assert seen["write_root"] == "OSError: Read-only file system"
    assert seen["write_code"] == "OSError: Read-only file system"
    assert seen["write_tmp"] == "ok"
    assert (
        seen["connect"] == "ConnectionRefusedError: Connection refused"
    )  # the node's server is out of reach
    assert seen["interfaces"] == ["lo"]
    assert seen["code"] == [spec.sha256]  # its own code only
    assert seen["node_cache_visible"] is False
    assert (seen["cap_eff"], seen["no_new_privs"], seen["seccomp"]) == ("0000000000000000", "1", "2")
    assert seen["zombies"] == 0  # an init reaps orphans, so they cannot eat the pids limit

    info = await docker.containers.container(name).show()
    host = info["HostConfig"]
    assert (host["Memory"], host["MemorySwap"]) == (128 * MIB, 128 * MIB)  # set when specialised
    assert (host["NanoCpus"], host["PidsLimit"]) == (1_000_000_000, 128)
    assert host["ReadonlyRootfs"] is True and host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Tmpfs"]["/tmp"].startswith("rw,size=64m,noexec")
    assert info["Config"]["Labels"]["faas.pool"] == "1"

    [status] = await backend.list_instances()
    assert (status.instance_id, status.address, status.alive, status.invocations) == (
        spec.instance_id,
        address,
        True,
        1,
    )

    async def pool_refilled() -> bool:
        return len(await node_containers(docker, node_id)) == 2  # the instance and a new warm one

    await eventually(pool_refilled)


async def test_launch_without_pool_creates_a_labelled_container(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=0)
    assert await node_containers(docker, node_id) == []
    spec = code_server.spec(ECHO, memory_mb=96)

    address = await backend.launch(spec, timeout_s=20)

    response = await invoke(address, {"x": 1})
    assert response.status_code == 200
    assert response.json()["result"] == {"echo": {"x": 1}}
    assert response.json()["logs"] == "invoked probe\n"
    info = await docker.containers.container(container_name(node_id, address)).show()
    labels = info["Config"]["Labels"]
    assert (labels["faas.instance"], labels["faas.function"], labels["faas.version"]) == (
        spec.instance_id,
        "default/probe",
        "3",
    )
    assert "faas.pool" not in labels
    assert info["HostConfig"]["Memory"] == 96 * MIB


async def test_concurrent_launches_get_distinct_containers(
    backends: Backends, code_server: CodeServer
) -> None:
    backend, _ = await backends.make(pool_size=1)
    specs = [code_server.spec(ECHO) for _ in range(3)]  # one archive: a single shared download

    addresses = await asyncio.gather(*(backend.launch(spec, timeout_s=20) for spec in specs))

    assert len(set(addresses)) == 3
    responses = await asyncio.gather(*(invoke(address, {"n": n}) for n, address in enumerate(addresses)))
    assert [r.json()["result"] for r in responses] == [{"echo": {"n": n}} for n in range(3)]
    assert {s.instance_id for s in await backend.list_instances()} == {s.instance_id for s in specs}


async def test_failed_specialisation_removes_the_container(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    [pooled] = await node_containers(docker, node_id)

    with pytest.raises(InstanceStartError) as raised:
        await backend.launch(code_server.spec({"app.py": "1/0\n"}), timeout_s=20)

    assert raised.value.error_type == "ZeroDivisionError"

    async def replaced() -> bool:
        running = await node_containers(docker, node_id)
        return len(running) == 1 and running[0].id != pooled.id

    await eventually(replaced)
    assert await backend.list_instances() == []


async def test_checksum_mismatch_fails_before_any_container_is_used(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    [pooled] = await node_containers(docker, node_id)
    spec = code_server.spec(ECHO).model_copy(update={"sha256": "f" * 64})

    with pytest.raises(
        InstanceStartError, match="code archive sha256 mismatch: expected f{64}, got "
    ) as raised:
        await backend.launch(spec, timeout_s=20)

    assert raised.value.error_type == "ChecksumMismatch"
    assert [c.id for c in await node_containers(docker, node_id)] == [pooled.id]  # still warm, untouched
    assert await backend.launch(code_server.spec(ECHO), timeout_s=20)


async def test_memory_hog_is_killed_and_the_node_carries_on(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    bystander = await backend.launch(code_server.spec(ECHO), timeout_s=20)
    hog = code_server.spec(MEMORY_HOG, memory_mb=64, timeout_s=20)
    address = await backend.launch(hog, timeout_s=20)

    try:
        response = await invoke(address, {})
    except httpx.TransportError:
        pass  # OOM-killed mid-invocation: the connection breaks
    else:
        assert response.status_code == 507, response.text  # or host.py's own MemoryError
    ended = await asyncio.wait_for(backends.exits[node_id].get(), 10)
    assert ended.instance_id == hog.instance_id
    assert [s.instance_id for s in await backend.list_instances()] != [hog.instance_id]

    assert (await invoke(bystander, {"still": "here"})).json()["result"] == {"echo": {"still": "here"}}
    again = await backend.launch(code_server.spec(ECHO), timeout_s=20)
    assert (await invoke(again, {})).status_code == 200


async def test_fork_bomb_hits_the_pids_limit(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    bystander = await backend.launch(code_server.spec(ECHO), timeout_s=20)
    # Enough memory that the pids limit, not the memory limit, is what stops it (at 128 MB the
    # children's copied pages often reach the memory limit first: an OOM kill, contained just as well).
    bomb = code_server.spec(FORK_BOMB, timeout_s=20, memory_mb=1024)
    address = await backend.launch(bomb, timeout_s=20)
    name = container_name(node_id, address)

    started = time.monotonic()
    response = await invoke(address, {})

    assert time.monotonic() - started < 10
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert (error["kind"], error["type"]) == ("function_error", "RuntimeError")
    assert "fork refused after" in error["message"]
    assert (await invoke(bystander, {})).status_code == 200

    await backend.stop(bomb.instance_id)
    with pytest.raises(aiodocker.DockerError) as gone:
        await docker.containers.container(name).show()
    assert gone.value.status == 404


async def test_sync_timeout_answers_in_time_and_recycles_the_container(
    backends: Backends, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    spec = code_server.spec(SLEEPER, timeout_s=1.0)
    address = await backend.launch(spec, timeout_s=20)

    started = time.monotonic()
    response = await invoke(address, {"sleep": 30})

    assert time.monotonic() - started < 2.0
    assert response.status_code == 504
    assert response.json()["error"]["kind"] == "function_timeout"
    assert (await asyncio.wait_for(backends.exits[node_id].get(), 10)).instance_id == spec.instance_id
    assert await backend.list_instances() == []


async def test_stop_removes_the_container_without_callback(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=0)
    spec = code_server.spec(ECHO)
    address = await backend.launch(spec, timeout_s=20)
    name = container_name(node_id, address)

    await backend.stop(spec.instance_id)

    with pytest.raises(aiodocker.DockerError) as gone:
        await docker.containers.container(name).show()
    assert gone.value.status == 404
    assert not Path(address.removeprefix("unix://")).parent.exists()
    assert await backend.list_instances() == []
    await backend.stop(spec.instance_id)  # already gone: a no-op
    await asyncio.sleep(0.3)
    assert backends.exits[node_id].empty()


async def test_killed_container_triggers_the_exit_callback(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    spec = code_server.spec(ECHO)
    address = await backend.launch(spec, timeout_s=20)

    await docker.containers.container(container_name(node_id, address)).kill()

    assert (await asyncio.wait_for(backends.exits[node_id].get(), 10)).instance_id == spec.instance_id
    assert await backend.list_instances() == []


async def test_code_cache_eviction_keeps_running_code_and_a_later_launch_downloads_again(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer, run_dir: Path
) -> None:
    backend, node_id = await backends.make(pool_size=1)

    def own_archive() -> dict[str, str]:
        return {"app.py": f"# {uuid.uuid4()}\ndef handler(event, context):\n    return {{'echo': event}}\n"}

    running, stopped, killed = (code_server.spec(own_archive()) for _ in range(3))
    address = await backend.launch(running, timeout_s=20)
    await backend.launch(stopped, timeout_s=20)
    await backend.stop(stopped.instance_id)
    killed_address = await backend.launch(killed, timeout_s=20)
    await docker.containers.container(container_name(node_id, killed_address)).kill()
    await asyncio.wait_for(backends.exits[node_id].get(), 10)

    evicted = await backend.code_cache.sweep(now=time.time() + 2 * 24 * 3600)

    assert sorted(evicted) == sorted([stopped.sha256, killed.sha256])
    assert sorted(p.name for p in (run_dir / "cache").iterdir()) == [running.sha256]
    assert (await invoke(address, {"still": "here"})).json()["result"] == {"echo": {"still": "here"}}
    path = stopped.code_url.split(str(code_server.port), 1)[1]
    assert code_server.hits[path] == 1
    relaunched = stopped.model_copy(update={"instance_id": f"i-{uuid.uuid4().hex[:8]}"})
    again = await backend.launch(relaunched, timeout_s=20)
    assert code_server.hits[path] == 2
    assert (await invoke(again, {"n": 2})).json()["result"] == {"echo": {"n": 2}}


async def test_killed_pool_member_is_replaced_without_callback(
    backends: Backends, docker: aiodocker.Docker
) -> None:
    backend, node_id = await backends.make(pool_size=1)
    [pooled] = await node_containers(docker, node_id)

    await pooled.kill()

    async def replaced() -> bool:
        running = await node_containers(docker, node_id)
        return len(running) == 1 and running[0].id != pooled.id

    await eventually(replaced)
    assert backends.exits[node_id].empty()


async def test_start_removes_containers_a_previous_agent_left(
    backends: Backends, docker: aiodocker.Docker
) -> None:
    node_id = new_node_id()
    image = await ensure_runtime_image(docker)
    orphan = await docker.containers.create(
        {"Image": image, "Cmd": ["/nothing"], "Labels": {"faas.platform": "1", "faas.node": node_id}},
        name=f"faas-{node_id}-orphan",
    )
    other = await docker.containers.create(
        {"Image": image, "Cmd": ["/nothing"], "Labels": {"faas.platform": "1", "faas.node": node_id + "x"}},
        name=f"faas-{node_id}x-other",
    )
    try:
        await backends.make(pool_size=1, node_id=node_id)

        running = await node_containers(docker, node_id, running_only=False)
        assert orphan.id not in [c.id for c in running] and len(running) == 1
        assert (await docker.containers.container(other.id).show())["Id"] == other.id  # another node's
    finally:
        await other.delete(force=True)


async def test_check_reports_an_unreachable_daemon(run_dir: Path) -> None:
    backend = DockerBackend(
        run_dir=run_dir / "run", cache_dir=run_dir / "cache", pool_size=0,
        docker_url="unix:///nonexistent/docker.sock", node_id="pytest-dkr-check",
    )  # fmt: skip
    with pytest.raises(Unavailable, match="Docker daemon"):
        await backend.check()


async def _abandon(backend: DockerBackend) -> None:
    """What a SIGKILL of the node agent does to its backend: it stops, cleaning nothing up."""
    backend._closed = True
    await backend._tasks.cancel_all()
    if backend._docker is not None:
        await backend._docker.close()
        backend._docker = None


async def test_a_restarted_backend_adopts_its_instances_and_removes_the_rest(
    backends: Backends, docker: aiodocker.Docker, code_server: CodeServer
) -> None:
    node_id = new_node_id()
    old, _ = await backends.make(pool_size=1, node_id=node_id)
    spec = code_server.spec(ECHO)
    address = await old.launch(spec, timeout_s=20)
    assert (await invoke(address, {"n": 1})).status_code == 200
    instance_container = container_name(node_id, address)

    async def refilled() -> bool:
        return len(await node_containers(docker, node_id)) == 2

    await eventually(refilled)
    pool_ids = {c.id for c in await node_containers(docker, node_id)} - {
        (await docker.containers.get(instance_container)).id
    }
    assert pool_ids
    await _abandon(old)  # the agent died: its containers run on
    backends.made.remove((old, node_id))  # nothing of it is left to clean but what the new one owns

    new, _ = await backends.make(pool_size=1, node_id=node_id)
    assert [(s.instance_id, a) for s, a in new.adopted()] == [(spec.instance_id, address)]
    assert (await invoke(address, {"n": 2})).status_code == 200  # the same container answers
    running = {c.id for c in await node_containers(docker, node_id)}
    assert not running & pool_ids, "the old pool member must be removed, not adopted"
    assert (await docker.containers.get(instance_container)).id in running
    # Adopted means owned: stopping it removes it, and a later death is noticed.
    await new.stop(spec.instance_id)
    assert instance_container not in {
        c["Names"][0].lstrip("/") for c in await node_containers(docker, node_id, running_only=False)
    }
