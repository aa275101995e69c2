"""ProcessBackend with real host processes: pool, launch, stop, exit callbacks, close, restarts;
each test once with hosts unsandboxed and once sandboxed (``sandbox``: bubblewrap, a user and a cgroup
per host; it needs root, bwrap and cgroups, which CI has).

Code archives come from a local http.server, as they would from a presigned S3 URL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from faas.core.errors import InstanceStartError, Unavailable
from faas.core.procs import proc_stat, processes_matching
from faas.runtime.backend import InstanceExit
from faas.runtime.process_backend import ProcessBackend
from faas.runtime.sandbox import is_sandbox, same_pid_namespace
from tests.code_server import CodeServer
from tests.conftest import missing_service
from tests.helpers import HostAnswer

pytestmark = pytest.mark.timeout(30)

APP = {
    "app.py": """
        import time

        def handler(event, context):
            if event.get("sleep"):
                time.sleep(event["sleep"])
            print("invoked", context.function_name)
            return {"echo": event, "instance_function": context.function_name}
    """
}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def sockets_in(run_dir: Path) -> list[str]:
    """Every host socket: ``instances/<name>.sock``, or ``sb/<name>/host.sock`` when sandboxed."""
    paths = [*(run_dir / "instances").glob("*.sock"), *(run_dir / "sb").glob("*/host.sock")]
    return [str(path) for path in paths]


def host_name(socket_path: str | Path) -> str:
    path = Path(socket_path)
    return path.parent.name if path.name == "host.sock" else path.stem


def sandbox_pid(run_dir: Path, name: str) -> int | None:
    """The pid of the bubblewrap process of sandboxed host ``name`` (what the backend watches)."""
    socket_dir = str(run_dir / "sb" / name)
    found = processes_matching(lambda argv: is_sandbox(argv) and socket_dir in argv)
    return next((pid for pid, _ in found if same_pid_namespace(pid)), None)


async def health_pids(run_dir: Path) -> dict[str, int]:
    """The pid the backend knows (the host's, or its sandbox's) of every host answering, by host name."""
    pids = {}
    for sock in sorted(sockets_in(run_dir)):
        async with uds_client(sock) as client:
            try:
                reported = (await client.get("/_/health")).json()["pid"]
            except httpx.TransportError:
                continue
        name = host_name(sock)
        pid = sandbox_pid(run_dir, name) if Path(sock).name == "host.sock" else reported
        if pid is not None:
            pids[name] = pid
    return pids


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return tree


def uds_client(path: str | Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path), verify=False),
        base_url="http://host",
        verify=False,
        trust_env=False,
        timeout=10,
    )


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 5.0) -> None:
    give_up_at = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < give_up_at, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(params=["none", "sandbox"])
async def make_backend(
    request: pytest.FixtureRequest, run_dir: Path
) -> AsyncIterator[Callable[..., Awaitable[ProcessBackend]]]:
    backends: list[ProcessBackend] = []
    started_pids: set[int] = set()

    async def make(pool_size: int = 1) -> ProcessBackend:
        backend = ProcessBackend(
            run_dir=run_dir, cache_dir=run_dir / "cache", pool_size=pool_size, isolation=request.param
        )
        backends.append(backend)
        try:
            await backend.start()
        except Unavailable as exc:
            if request.param == "sandbox" and "cannot sandbox" in str(exc):
                missing_service(str(exc))
            raise
        assert backend.sandboxed == (request.param == "sandbox")
        return backend

    yield make
    for backend in backends:
        started_pids.update((await health_pids(run_dir)).values())
        await backend.close()
    leftovers = [pid for pid in started_pids if alive(pid)]
    for pid in leftovers:
        os.killpg(pid, signal.SIGKILL)
    assert not leftovers, f"hosts left running: {leftovers}"


async def test_start_fills_the_pool(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path
) -> None:
    backend = await make_backend(pool_size=2)
    pids = await health_pids(run_dir)
    assert len(pids) == 2
    assert all(alive(pid) for pid in pids.values())
    assert await backend.list_instances() == []


async def test_launch_specialises_a_pooled_host_and_refills(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path, code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    pooled = await health_pids(run_dir)
    spec = code_server.spec(APP)

    address = await backend.launch(spec, timeout_s=10)

    assert address.startswith("unix://")
    socket_path = address.removeprefix("unix://")
    assert host_name(socket_path) in pooled  # the warm host was used, not a new one
    async with uds_client(socket_path) as client:
        response = HostAnswer(await client.post("/_/invoke", json={"x": 1}, headers={"X-Faas-Request-Id": "r1"}))
    assert response.status_code == 200
    assert response.json()["result"] == {"echo": {"x": 1}, "instance_function": "echo"}
    assert response.json()["logs"] == "invoked echo\n"

    [status] = await backend.list_instances()
    assert (status.instance_id, status.address, status.alive, status.state) == (
        spec.instance_id,
        address,
        True,
        "ready",
    )
    assert status.invocations == 1 and status.pid == pooled[host_name(socket_path)]

    async def pool_refilled() -> bool:
        return len(await health_pids(run_dir)) == 2  # the instance plus a new warm host

    await eventually(pool_refilled)


async def test_launch_with_empty_pool_starts_a_host(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=0)
    address = await backend.launch(code_server.spec(APP), timeout_s=10)
    async with uds_client(address.removeprefix("unix://")) as client:
        assert (await client.post("/_/invoke", json={})).status_code == 200


async def test_concurrent_launches_get_distinct_hosts(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    specs = [code_server.spec(APP) for _ in range(3)]
    addresses = await asyncio.gather(*(backend.launch(spec, timeout_s=10) for spec in specs))
    assert len(set(addresses)) == 3
    statuses = await backend.list_instances()
    assert {s.instance_id for s in statuses} == {spec.instance_id for spec in specs}
    assert len({s.pid for s in statuses}) == 3


@pytest.mark.parametrize(
    "files, handler, error_type, message",
    [
        (
            APP,
            "missing.handler",
            "ModuleNotFoundError",
            "handler module 'missing' not found in the code archive",
        ),
        (APP, "app.main", "AttributeError", "module 'app' has no function 'main'"),
        ({"app.py": "1/0\n"}, "app.handler", "ZeroDivisionError", "division by zero"),
    ],
)
async def test_failed_launch_raises_start_error_and_destroys_the_host(
    make_backend: Callable[..., Awaitable[ProcessBackend]],
    run_dir: Path,
    code_server: CodeServer,
    files: dict[str, str],
    handler: str,
    error_type: str,
    message: str,
) -> None:
    backend = await make_backend(pool_size=1)
    [pid] = (await health_pids(run_dir)).values()
    with pytest.raises(InstanceStartError) as raised:
        await backend.launch(code_server.spec(files, handler=handler), timeout_s=10)
    assert raised.value.error_type == error_type
    assert message in raised.value.message
    assert raised.value.to_body()["error"]["kind"] == "instance_start_error"
    assert not alive(pid)
    assert await backend.list_instances() == []


async def test_sha256_mismatch_fails_the_launch(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    spec = code_server.spec(APP)
    wrong = spec.model_copy(update={"sha256": "f" * 64})
    with pytest.raises(InstanceStartError, match="code archive sha256 mismatch: expected f{64}, got "):
        await backend.launch(wrong, timeout_s=10)


async def test_specialise_timeout_raises_start_error(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path, code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    [pid] = (await health_pids(run_dir)).values()
    slow_import = {"app.py": "import time\ntime.sleep(20)\ndef handler(e, c):\n    return 1\n"}
    started = time.monotonic()
    with pytest.raises(InstanceStartError) as raised:
        await backend.launch(code_server.spec(slow_import), timeout_s=0.5)
    assert time.monotonic() - started < 4
    assert raised.value.error_type == "TimeoutError"
    assert not alive(pid)


async def test_stop_ends_the_instance(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path, code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    exits: list[str] = []

    async def on_exit(exit: InstanceExit) -> None:
        exits.append(exit.instance_id)

    backend.set_exit_callback(on_exit)
    spec = code_server.spec(APP)
    address = await backend.launch(spec, timeout_s=10)
    [status] = await backend.list_instances()
    assert status.pid is not None

    await backend.stop(spec.instance_id)

    assert not alive(status.pid)
    assert address.removeprefix("unix://") not in sockets_in(run_dir)
    assert await backend.list_instances() == []
    await backend.stop(spec.instance_id)  # already gone: a no-op
    await asyncio.sleep(0.1)
    assert exits == []  # a requested stop is not an unexpected exit


async def test_exit_callback_fires_when_an_instance_dies(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    exited = asyncio.Queue[InstanceExit]()
    backend.set_exit_callback(exited.put)
    spec = code_server.spec(APP)
    await backend.launch(spec, timeout_s=10)
    [status] = await backend.list_instances()
    assert status.pid is not None

    os.kill(status.pid, signal.SIGKILL)

    ended = await asyncio.wait_for(exited.get(), 5)
    assert (ended.instance_id, ended.exit_code) == (spec.instance_id, -signal.SIGKILL)
    assert await backend.list_instances() == []


async def test_exit_callback_fires_when_a_sync_timeout_retires_the_host(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    exited = asyncio.Queue[InstanceExit]()
    backend.set_exit_callback(exited.put)
    spec = code_server.spec(APP, timeout_s=0.2)
    address = await backend.launch(spec, timeout_s=10)
    async with uds_client(address.removeprefix("unix://")) as client:
        response = await client.post("/_/invoke", json={"sleep": 10})
    assert response.status_code == 504
    assert response.headers["X-Faas-Retire"] == "1"
    assert (await asyncio.wait_for(exited.get(), 5)).instance_id == spec.instance_id


async def test_dead_pool_member_is_replaced_without_callback(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path
) -> None:
    backend = await make_backend(pool_size=1)
    exits: list[str] = []

    async def on_exit(exit: InstanceExit) -> None:
        exits.append(exit.instance_id)

    backend.set_exit_callback(on_exit)
    [(name, pid)] = (await health_pids(run_dir)).items()

    os.kill(pid, signal.SIGKILL)

    async def replaced() -> bool:
        pids = await health_pids(run_dir)
        return len(pids) == 1 and name not in pids

    await eventually(replaced)
    assert exits == []


async def test_unreachable_instance_is_listed_as_not_alive(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=0)
    spec = code_server.spec(APP)
    await backend.launch(spec, timeout_s=10)
    [status] = await backend.list_instances()
    assert status.pid is not None
    # A sandbox's host is under its bubblewrap: freeze every process named after the host as well.
    name = host_name(status.address.removeprefix("unix://"))
    named = [pid for pid, argv in processes_matching(lambda argv: name in argv)]
    frozen_pids = sorted(set(process_tree(status.pid)) | set(named))
    for pid in frozen_pids:
        os.kill(pid, signal.SIGSTOP)  # alive but not answering
    try:
        # A stop is delivered when the process next runs: on a busy machine a thread may still answer
        # a moment after kill() returned.  Query once every process shows as stopped.
        deadline = time.monotonic() + 5
        while not all((proc_stat(pid) or ("T", 0))[0] in ("T", "t", "X", "Z") for pid in frozen_pids):
            assert time.monotonic() < deadline, "the host's processes did not stop"
            await asyncio.sleep(0.01)
        [frozen] = await backend.list_instances()
        assert frozen.instance_id == spec.instance_id and frozen.alive is False
    finally:
        for pid in frozen_pids:
            os.kill(pid, signal.SIGCONT)


async def test_close_stops_pool_and_instances(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path, code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=2)
    await backend.launch(code_server.spec(APP), timeout_s=10)

    async def pool_refilled() -> bool:
        return len(await health_pids(run_dir)) == 3

    await eventually(pool_refilled)
    pids = list((await health_pids(run_dir)).values())

    await backend.close()

    assert not any(alive(pid) for pid in pids)
    assert sockets_in(run_dir) == []


async def test_a_restarted_backend_adopts_its_instances_and_kills_the_rest(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path, code_server: CodeServer
) -> None:
    old = await make_backend(pool_size=2)
    spec = code_server.spec(APP)
    address = await old.launch(spec, timeout_s=10)
    [status] = await old.list_instances()
    pool_pids = set((await health_pids(run_dir)).values()) - {status.pid}
    assert pool_pids
    # What a SIGKILL of the node agent leaves: hosts running on in sessions of their own.
    old._closed = True
    await old._tasks.cancel_all()

    new = await make_backend(pool_size=1)
    assert [(s.instance_id, a) for s, a in new.adopted()] == [(spec.instance_id, address)]
    assert all(not alive(pid) for pid in pool_pids), "the old pool members must be killed, not adopted"
    async with uds_client(address.removeprefix("unix://")) as client:
        resp = await client.post("/_/invoke", json={"n": 2}, headers={"X-Faas-Request-Id": "r"})
    assert resp.status_code == 200, resp.text
    assert [s.instance_id for s in await new.list_instances()] == [spec.instance_id]

    # An adopted host is watched like a child: its death fires the exit callback.
    exits: list[InstanceExit] = []

    async def on_exit(exit: InstanceExit) -> None:
        exits.append(exit)

    new.set_exit_callback(on_exit)
    assert status.pid is not None
    os.kill(status.pid, signal.SIGKILL)
    await eventually(lambda: asyncio.sleep(0, bool(exits)))
    assert exits[0].instance_id == spec.instance_id
    assert await new.list_instances() == []
