"""Eviction from the node's code cache: what is kept, what goes, and launches around an eviction.

The eviction rules are checked against a real temp dir with an explicit ``now`` (no sleeping out a
TTL); the guarantees that need the backend's bookkeeping (in use while launching or running, released
when an instance stops, exits or fails to start; a launch after an eviction downloads again) against
the real ``ProcessBackend`` with real host processes and a local code server.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from faas.core.errors import InstanceStartError, Unavailable
from faas.core.settings import Settings
from faas.runtime.agent import start_backend
from faas.runtime.backend import InstanceSpec
from faas.runtime.code_cache import STAGING_MAX_AGE_S, CodeCache
from faas.runtime.process_backend import ProcessBackend
from tests.code_server import CodeServer
from tests.helpers import HostAnswer

pytestmark = pytest.mark.timeout(30)

DAY = 24 * 3600.0
HOUR = 3600.0


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def cached(root: Path, name: str, *, age_s: float = 0.0) -> Path:
    """A code dir ``root/name`` whose mtime is ``age_s`` in the past."""
    path = root / name
    path.mkdir(parents=True)
    (path / "app.py").write_text("def handler(event, context):\n    return 1\n")
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def names(root: Path) -> set[str]:
    return {path.name for path in root.iterdir()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


# -- the eviction rules, on a real dir ----------------------------------------------------------------


async def test_unused_code_older_than_the_ttl_is_evicted_and_recent_code_kept(root: Path) -> None:
    cached(root, sha(1), age_s=2 * DAY)
    cached(root, sha(2), age_s=HOUR)
    cache = CodeCache(root, ttl_s=DAY)

    assert await cache.sweep() == [sha(1)]

    assert names(root) == {sha(2)}  # nothing renamed away is left behind either


async def test_code_in_use_is_kept_however_old(root: Path) -> None:
    cached(root, sha(1), age_s=10 * DAY)
    cache = CodeCache(root, ttl_s=DAY)
    cache.acquire(sha(1))  # a launch under way
    cache.acquire(sha(1))  # and a running instance

    assert await cache.sweep(now=time.time() + 10 * DAY) == []
    cache.release(sha(1))
    assert await cache.sweep(now=time.time() + 10 * DAY) == []  # still one user
    cache.release(sha(1))

    assert cache.users(sha(1)) == 0
    assert await cache.sweep(now=time.time() + 10 * DAY) == [sha(1)]
    assert names(root) == set()


async def test_last_use_in_memory_counts_not_only_the_mtime(root: Path) -> None:
    cached(root, sha(1), age_s=2 * DAY)  # unpacked long ago...
    cache = CodeCache(root, ttl_s=DAY)
    cache.acquire(sha(1))  # ...but launched and stopped just now
    cache.release(sha(1))

    assert await cache.sweep() == []
    assert await cache.sweep(now=time.time() + DAY - 60) == []
    assert await cache.sweep(now=time.time() + DAY + 60) == [sha(1)]


async def test_stale_staging_dirs_go_and_fresh_or_active_ones_stay(root: Path) -> None:
    cached(root, f".unpack-{sha(1)[:16]}-crashed", age_s=2 * HOUR)
    cached(root, f".evict-{sha(2)}-abcd1234", age_s=2 * HOUR)
    cached(root, f".unpack-{sha(3)[:16]}-downloading", age_s=60)
    cached(root, f".unpack-{sha(4)[:16]}-slow", age_s=2 * HOUR)
    cached(root, "not-a-sha", age_s=10 * DAY)  # not ours: never touched
    (root / "stray-file").write_text("x")
    cache = CodeCache(root, ttl_s=DAY)
    cache.acquire(sha(4))  # its launch is still downloading

    assert await cache.sweep() == []

    assert names(root) == {
        f".unpack-{sha(3)[:16]}-downloading",
        f".unpack-{sha(4)[:16]}-slow",
        "not-a-sha",
        "stray-file",
    }
    cache.release(sha(4))
    await cache.sweep(now=time.time() + STAGING_MAX_AGE_S + 120)
    assert names(root) == {"not-a-sha", "stray-file"}


async def test_code_made_read_only_by_its_handler_is_still_removed(root: Path) -> None:
    code = cached(root, sha(1))
    (code / "data").mkdir()
    (code / "data" / "model.bin").write_bytes(b"\0" * 10)
    (code / "data").chmod(stat.S_IRUSR | stat.S_IXUSR)
    code.chmod(stat.S_IRUSR | stat.S_IXUSR)
    os.utime(code, (time.time() - 2 * DAY,) * 2)

    assert await CodeCache(root, ttl_s=DAY).sweep() == [sha(1)]
    assert names(root) == set()


async def test_a_failing_sweep_is_logged_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("")
    cache = CodeCache(not_a_dir, sweep_interval_s=0.01)
    caplog.set_level(logging.ERROR, logger="faas.runtime.code_cache")

    loop = asyncio.create_task(cache.sweep_forever())
    try:
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if "sweeping the code cache" in r.message]) < 2:
            assert time.monotonic() < deadline, "the loop stopped sweeping"
            await asyncio.sleep(0.01)
        assert not loop.done()

        not_a_dir.unlink()
        cached(not_a_dir, sha(1), age_s=2 * DAY)  # the loop recovers once the dir is there
        deadline = time.monotonic() + 5
        while (not_a_dir / sha(1)).exists():
            assert time.monotonic() < deadline, "the loop did not evict after recovering"
            await asyncio.sleep(0.01)
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


# -- with the real process backend ---------------------------------------------------------------------


def app(marker: str) -> dict[str, str]:
    """An archive of its own (its sha256 differs by ``marker``) whose handler reports its working dir."""
    return {
        "app.py": f"""
            import os

            MARKER = {marker!r}

            def handler(event, context):
                if event.get("exit"):
                    os._exit(3)
                return {{"marker": MARKER, "cwd": os.getcwd()}}
        """
    }


def again(spec: InstanceSpec) -> InstanceSpec:
    """The same archive, launched as a new instance."""
    return spec.model_copy(update={"instance_id": f"i-{uuid.uuid4().hex[:8]}"})


def downloads(code_server: CodeServer, spec: InstanceSpec) -> int:
    return code_server.hits[urlparse(spec.code_url).path]


def uds_client(address: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=address.removeprefix("unix://"), verify=False),
        base_url="http://host",
        verify=False,
        trust_env=False,
        timeout=10,
    )


async def invoke(address: str, event: dict[str, Any] | None = None) -> HostAnswer:
    async with uds_client(address) as client:
        return HostAnswer(await client.post("/_/invoke", json=event or {}, headers={"X-Faas-Request-Id": uuid.uuid4().hex}))


async def eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    give_up_at = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < give_up_at, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def make_backend(run_dir: Path) -> AsyncIterator[Callable[..., Awaitable[ProcessBackend]]]:
    backends: list[ProcessBackend] = []

    async def make(pool_size: int = 1, **cache: float) -> ProcessBackend:
        backend = ProcessBackend(run_dir=run_dir, cache_dir=run_dir / "cache", pool_size=pool_size, **cache)
        backends.append(backend)
        await backend.start()
        return backend

    yield make
    for backend in backends:
        pids = [h.process.pid for h in backend._started_hosts()]
        await backend.close()
        for pid in pids:  # nothing may outlive the test, whatever it asserted
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def test_a_sweep_keeps_running_code_and_evicts_stopped_code(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path, code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    running, stopped = code_server.spec(app("running")), code_server.spec(app("stopped"))
    address = await backend.launch(running, timeout_s=10)
    await backend.launch(stopped, timeout_s=10)
    await backend.stop(stopped.instance_id)
    cache = run_dir / "cache"
    assert {running.sha256, stopped.sha256} <= names(cache)

    evicted = await backend.code_cache.sweep(now=time.time() + 2 * DAY)

    assert evicted == [stopped.sha256]
    assert running.sha256 in names(cache) and stopped.sha256 not in names(cache)
    response = await invoke(address)  # the running instance never noticed
    assert response.status_code == 200
    # A sandboxed host runs in its read-only view of the cache (its own hard links), on /code.
    run_in = f"/code/{running.sha256}" if backend.sandboxed else str(cache / running.sha256)
    assert response.json()["result"] == {"marker": "running", "cwd": run_in}


async def test_a_launch_after_eviction_downloads_again_and_works(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    spec = code_server.spec(app("evicted"))
    await backend.launch(spec, timeout_s=10)
    await backend.stop(spec.instance_id)
    assert await backend.code_cache.sweep(now=time.time() + 2 * DAY) == [spec.sha256]
    assert downloads(code_server, spec) == 1

    address = await backend.launch(again(spec), timeout_s=10)

    assert downloads(code_server, spec) == 2
    response = await invoke(address)
    assert response.status_code == 200
    assert response.json()["result"]["marker"] == "evicted"


async def test_every_way_an_instance_ends_releases_its_code(
    make_backend: Callable[..., Awaitable[ProcessBackend]], code_server: CodeServer
) -> None:
    backend = await make_backend(pool_size=1)
    cache = backend.code_cache

    failed = code_server.spec({"app.py": f"# {uuid.uuid4()}\n1/0\n"})
    with pytest.raises(InstanceStartError):
        await backend.launch(failed, timeout_s=10)
    assert cache.users(failed.sha256) == 0

    stopped = code_server.spec(app("stopped"))
    await backend.launch(stopped, timeout_s=10)
    assert cache.users(stopped.sha256) == 1
    await backend.stop(stopped.instance_id)
    assert cache.users(stopped.sha256) == 0

    crashed = code_server.spec(app("crashed"))
    address = await backend.launch(crashed, timeout_s=10)
    with pytest.raises(httpx.TransportError):
        await invoke(address, {"exit": True})
    await eventually(lambda: cache.users(crashed.sha256) == 0)

    closed = code_server.spec(app("closed"))
    await backend.launch(closed, timeout_s=10)
    await backend.close()
    assert cache.users(closed.sha256) == 0


async def test_the_backend_sweeps_on_its_own_and_never_under_a_launch(
    make_backend: Callable[..., Awaitable[ProcessBackend]], run_dir: Path, code_server: CodeServer
) -> None:
    # A zero TTL and a sweep every few milliseconds: whatever is not in use goes at once, so every
    # launch below races a sweep, and each must still find its code.
    backend = await make_backend(pool_size=2, code_cache_ttl_s=0.0, code_cache_sweep_s=0.005)
    spec = code_server.spec(app("raced"))

    for _ in range(3):
        specs = [again(spec) for _ in range(3)]
        addresses = await asyncio.gather(*(backend.launch(s, timeout_s=10) for s in specs))
        responses = await asyncio.gather(*(invoke(a) for a in addresses))
        assert [r.json()["result"]["marker"] for r in responses] == ["raced"] * 3
        assert spec.sha256 in names(run_dir / "cache")  # in use: kept
        await asyncio.gather(*(backend.stop(s.instance_id) for s in specs))
        await eventually(lambda: spec.sha256 not in names(run_dir / "cache"))

    assert downloads(code_server, spec) >= 3  # once per round at least: each round evicted it


async def test_the_agent_passes_the_cache_settings_to_its_backend(run_dir: Path) -> None:
    settings = Settings(home=run_dir / "h", pool_size=0, code_cache_ttl_s=120.0, code_cache_sweep_s=7.0)
    backend = await start_backend(settings, "node-cache")
    try:
        assert isinstance(backend, ProcessBackend)
        assert backend.code_cache.root == (settings.node_dir("node-cache") / "cache").absolute()
        assert (backend.code_cache.ttl_s, backend.code_cache.sweep_interval_s) == (120.0, 7.0)
    finally:
        await backend.close()


async def test_the_quota_evicts_least_recently_used_code_and_refuses_when_all_is_in_use(tmp_path: Path) -> None:
    """The node's code cache stays under its disk quota: unused code goes first, oldest first; with
    everything in use, a launch of new code is refused (503) rather than filling the disk."""
    cache = CodeCache(tmp_path, max_bytes=3 * 1024 * 1024)
    shas = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(4)]
    for n, sha in enumerate(shas[:3]):
        (tmp_path / sha).mkdir()
        (tmp_path / sha / "blob.bin").write_bytes(os.urandom(1024 * 1024))
        os.utime(tmp_path / sha, (1000.0 + n, 1000.0 + n))  # the first is the least recently used
    cache.acquire(shas[1])  # in use: never evicted

    await cache.make_room(shas[0])  # cached already: nothing to do
    assert all((tmp_path / sha).is_dir() for sha in shas[:3])

    await cache.make_room(shas[3])  # 3 MiB held, at the quota: the oldest unused one goes
    assert not (tmp_path / shas[0]).exists()
    assert (tmp_path / shas[1]).is_dir() and (tmp_path / shas[2]).is_dir()

    (tmp_path / shas[3]).mkdir()
    (tmp_path / shas[3] / "blob.bin").write_bytes(os.urandom(1024 * 1024))
    cache.acquire(shas[2])
    cache.acquire(shas[3])
    with pytest.raises(Unavailable, match="at its quota"):
        await cache.make_room(hashlib.sha256(b"new").hexdigest())
    assert all((tmp_path / sha).is_dir() for sha in shas[1:])  # nothing in use was touched
    cache.release(shas[2])
    await cache.make_room(hashlib.sha256(b"new").hexdigest())  # now there is something to evict
    assert not (tmp_path / shas[2]).exists()
