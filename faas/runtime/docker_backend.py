"""The production runtime backend: every instance is a Docker container driven through aiodocker.

A cold start follows the same protocol as ``process_backend`` (``host_pool.PooledBackend``): take a
generic container from the warm pool (or create one when the pool is empty), put the code where the
container can see it, apply the function's limits, ``POST /_/specialize`` to the host inside, refill
the pool in the background.  The host listens on ``/run/faas/host.sock`` inside the container, a bind
mount of ``<run_dir>/containers/<folder>/``, so the address handed out is
``unix://<run_dir>/containers/<folder>/host.sock``: nothing is reached over a container network.

Each container: ``--network none``; memory from the function (swap capped: ``MemorySwap ==
Memory``), one CPU, ``PidsLimit``; read-only root with a 64 MiB ``noexec`` tmpfs on ``/tmp``; every
capability dropped, ``no-new-privileges``, Docker's default seccomp profile; user 10001:10001;
``docker-init`` as PID 1.  A pool member is created with ``POOL_MEMORY_MB`` and given the function's
memory (``POST /containers/{id}/update``, ~25 ms, skipped when equal) before it is specialised, so
the handler's import already runs under the function's limit.

Code delivery (the container has no network, so it cannot use the presigned URL itself):

- The backend (``code_views``) downloads the archive by its presigned URL on the node, checks its sha256, and unpacks
  it into the node's cache, ``<cache_dir>/<sha256>/``, with host.py's own download and unpack
  functions (size caps, unsafe paths refused), through a staging dir and an atomic rename.  Only the
  backend writes the cache; concurrent launches of one archive share one download.
- Every container gets its own read-only view, ``<run_dir>/code/<folder>/`` bind-mounted on
  ``/code``, into which the backend hard-links exactly the one ``<sha256>/`` tree it is specialised
  with, just before specialising.  The host is started with ``--cache-dir /code``; it finds
  ``/code/<sha256>/`` already there and uses it without downloading (``host._fetch_code`` reuses an
  existing dir).  Containers of one version therefore share the same inodes, read-only, and a
  container never sees another function's code.
- Eviction: the cache is swept every ``code_cache_sweep_s``; a ``<sha256>/`` dir that no container
  of this backend runs or is being launched with, and that is unused for ``code_cache_ttl_s``, is
  renamed away and deleted (see ``code_cache``); the next launch of that archive downloads it again.
  A container's view holds its own hard links, so eviction never takes code from under a container.
- Integrity: a ``<sha256>/`` dir exists in the cache only after its archive matched that sha256 (the
  rename is the last step), and no container can write to the cache or to its view, so a container
  that finds ``/code/<sha256>/`` runs exactly the verified archive.  The host is told a
  ``file:///code/<sha256>`` URL instead of the presigned one: user code never holds a presigned URL.

Invariants (besides those of ``host_pool``; destroying a container removes it):

- The exit callback fires only for specialised instances whose container stops on its own (a crash,
  an OOM kill, the host retiring itself, ``docker kill`` from outside), never for ``stop`` or
  ``close``.  A pool member that dies is replaced without a callback.  Deaths are learnt from the
  daemon's event stream (filtered by this node's label), reconnected with ``since`` so none is lost.
- ``_destroy`` returns only once the daemon no longer has the container; concurrent calls share one
  removal, and ``close`` finally removes whatever the daemon still lists under this node's label.
- On ``start``, the containers labelled with this node id that a previous agent left behind are
  adopted when the journal (``host_pool``) names them as instances, they still run under the same
  container id and their host answers as a ready instance; every other one (pool members, half-
  started ones, ones that do not answer) is removed, with the folders of everything not adopted.

Labels: ``faas.platform=1`` and ``faas.node=<node id>`` on every container.  A container created
for a launch also carries ``faas.instance``, ``faas.function`` (``<namespace>/<name>``) and
``faas.version``; a pool member carries ``faas.pool=1`` instead, for ever: labels cannot change on a
running container, so which function a specialised pool member serves is known only to this
backend's memory and its journal (hence the adoption rule above).

Caveats:

- An OOM kill (the cgroup limit, unlike host.py's ``RLIMIT_AS`` backstop) kills the host mid-
  invocation: the caller sees a broken connection, not a 507; the backend logs ``OOMKilled`` and
  fires the exit callback.  Writes to ``/tmp`` are charged to the same memory limit.
- The host's socket belongs to uid 10001 with mode 600 (host.py restricts it to its owner), so only
  root (or uid 10001) can connect: the node agent and dispatchers run as root on a Docker node.
- ``docker_url`` must name a daemon on this machine (the default socket, a rootless daemon's socket):
  the bind mounts and the unix-socket addresses are paths on this machine.
- Container logs (host diagnostics, output outside invocations) are copied to this process's log
  when a container dies on its own, then removed with the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiodocker
import httpx

from faas.core.errors import InstanceStartError, Unavailable
from faas.core.procs import descendants
from faas.runtime.backend import InstanceExit, InstanceSpec
from faas.runtime.code_cache import DEFAULT_SWEEP_INTERVAL_S, DEFAULT_TTL_S, CodeCache
from faas.runtime.code_views import CodeFetcher, link_tree
from faas.runtime.host_pool import PIDS_LIMIT, POOL_MEMORY_MB, PooledBackend, check_socket_path, host_client
from faas.runtime.image import (
    CODE_DIR_IN_CONTAINER,
    DEFAULT_TAG,
    FAAS_GID,
    FAAS_UID,
    SOCKET_DIR_IN_CONTAINER,
    RuntimeLayout,
    ensure_runtime_image,
    runtime_layout,
)
from faas.runtime.process_backend import HOST_ENV

__all__ = ["DockerBackend"]

logger = logging.getLogger(__name__)

SOCKET_NAME = "host.sock"
LABEL_PLATFORM = "faas.platform"
LABEL_NODE = "faas.node"
LABEL_POOL = "faas.pool"
LABEL_INSTANCE = "faas.instance"
LABEL_FUNCTION = "faas.function"
LABEL_VERSION = "faas.version"

HOST_READY_TIMEOUT_S = 15.0
DOCKER_PING_TIMEOUT_S = 5.0
EVENTS_RECONNECT_S = 1.0
REMOVAL_WAIT_S = 10.0
LOG_TAIL_LINES = 30
NANO_CPUS = 1_000_000_000
TMPFS = {"/tmp": "rw,size=64m,noexec,nosuid,nodev"}
CONTAINER_ENV = (
    "HOME=/tmp",
    "TMPDIR=/tmp",
    "LANG=C.UTF-8",
    "PATH=/usr/local/bin:/usr/bin:/bin",
    *(f"{key}={value}" for key, value in HOST_ENV.items()),
)


def _api_error(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@dataclass(eq=False)
class _Container:
    """One container: generic while ``instance_id`` is None, an instance afterwards."""

    name: str  # the container's name
    folder: str  # its folder name under run_dir/containers and run_dir/code
    socket_dir: Path
    code_dir: Path
    client: httpx.AsyncClient
    container_id: str | None = None
    pid: int | None = None  # its main process, as this machine numbers it (its CPU and memory use)
    instance_id: str | None = None
    role: str = "spawning"  # spawning | pool | launching | instance
    stopping: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    removal: asyncio.Task[None] | None = None

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / SOCKET_NAME

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    def has_exited(self) -> bool:
        return self.exited.is_set()


class DockerBackend(PooledBackend[_Container]):
    """Runs function hosts as Docker containers, keeping ``pool_size`` generic ones warm."""

    name = "docker"
    _noun = "container"
    _log = logger
    isolation = "containers: namespaces, a non-root user, no network, cgroup limits"

    def __init__(
        self,
        *,
        run_dir: Path,
        cache_dir: Path,
        pool_size: int,
        docker_url: str | None = None,
        node_id: str,
        image_tag: str = DEFAULT_TAG,
        code_cache_ttl_s: float = DEFAULT_TTL_S,
        code_cache_sweep_s: float = DEFAULT_SWEEP_INTERVAL_S,
        code_cache_max_bytes: int = 0,
    ) -> None:
        super().__init__(
            pool_size=pool_size,
            code_cache=CodeCache(
                Path(cache_dir), ttl_s=code_cache_ttl_s, sweep_interval_s=code_cache_sweep_s, max_bytes=code_cache_max_bytes
            ),
            journal_dir=Path(run_dir) / "journal",
        )
        self._containers_dir = Path(run_dir) / "containers"
        self._views_dir = Path(run_dir) / "code"
        self._cache_dir = Path(cache_dir)
        self._docker_url = docker_url
        self._node_id = node_id
        self._name_prefix = "faas-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", node_id)
        self._image_tag = image_tag
        self._docker: aiodocker.Docker | None = None
        self._layout: RuntimeLayout | None = None
        self._by_id: dict[str, _Container] = {}  # every created container not yet removed
        self._code = CodeFetcher(self._cache_dir, self._tasks)

    @property
    def _daemon(self) -> str:
        return self._docker_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    # -- RuntimeBackend -----------------------------------------------------------------------------

    async def start(self) -> None:
        probe = self._containers_dir / f"c-{secrets.token_hex(5)}" / SOCKET_NAME
        check_socket_path(probe, self._containers_dir)
        docker = await self._connect()
        try:
            self._layout = await runtime_layout(
                docker, await ensure_runtime_image(docker, tag=self._image_tag)
            )
            for directory in (self._containers_dir, self._views_dir):
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            self.journal.prepare()
            self._docker = docker
            await self._adopt_leftovers()
        except OSError as exc:
            self._docker = None
            await docker.close()
            raise Unavailable(f"cannot create the runtime directories: {exc}") from exc
        except BaseException:
            self._docker = None
            await docker.close()
            raise
        # Events are replayed from this moment on, however late the stream is established.
        self._tasks.spawn(self._watch_events(since=time.time() - 1.0), name="events", long_lived=True)
        try:
            count = await self._fill_pool()
        except Unavailable:
            await self.close()
            raise
        self._sweep_code_cache_forever()
        logger.info(
            "docker backend started with %d warm containers (image %s, daemon %s)",
            count,
            self._layout.image[:19],
            self._daemon,
        )

    async def close(self) -> None:
        """Remove every container of this backend; safe to call twice, or after a failed ``start``."""
        await super().close()
        if self._docker is not None:
            # The daemon is the source of truth: a create cancelled in flight may still have made one.
            with contextlib.suppress(aiodocker.DockerError):
                for straggler in await self._docker.containers.list(
                    all=True, filters=json.dumps(self._node_filters())
                ):
                    await _remove_container(self._docker, straggler.id)
            await self._docker.close()
            self._docker = None

    # -- PooledBackend hooks ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._docker is None:
            raise Unavailable("the docker backend is not running")

    async def _acquire(self, spec: InstanceSpec, deadline: float) -> _Container:
        """A generic container with ``spec``'s limits and, in its view, ``spec``'s code."""
        async with asyncio.timeout_at(deadline):
            container, code = await self._take_or_spawn(spec)
        async with self._handing_over(container, "the code"):
            await asyncio.to_thread(link_tree, code, container.code_dir / spec.sha256)
        return container

    def _started_hosts(self) -> list[_Container]:
        return list(self._by_id.values())

    async def _exited_while_starting(self, container: _Container) -> Unavailable:
        tail = await self._log_tail(container)
        return Unavailable("function container exited while starting" + (f": {tail}" if tail else ""))

    async def _not_ready(self, container: _Container, timeout_s: float) -> Unavailable:
        tail = await self._log_tail(container)
        return Unavailable(
            f"function container did not become ready within {timeout_s:g} s" + (f": {tail}" if tail else "")
        )

    def _specialize_body(self, spec: InstanceSpec) -> dict[str, object]:
        body = spec.specialize_body()
        body["code_url"] = f"file://{CODE_DIR_IN_CONTAINER}/{spec.sha256}"
        return body

    def _add_to_pool(self, container: _Container) -> None:
        container.role = "pool"
        super()._add_to_pool(container)

    def _register_instance(self, container: _Container, spec: InstanceSpec) -> None:
        container.role = "instance"
        super()._register_instance(container, spec)

    def _refill_failed(self, exc: Unavailable) -> None:
        logger.error("cannot refill the warm pool: %s", exc)

    # -- acquire ------------------------------------------------------------------------------------

    async def _take_or_spawn(self, spec: InstanceSpec) -> tuple[_Container, Path]:
        """A generic container with ``spec``'s limits, and the cached code of ``spec``."""
        if not self._pool:
            # Nothing warm: create a container and fetch the code at the same time.
            self._refill_pool()
            return await self._spawn_and_prefetch(spec)
        # Fetch first, take a warm container after: a failed download then wastes no pool member.
        code = await self._code.fetch(spec)
        container = self._take_pooled()
        self._refill_pool()
        if container is None:
            container = await self._spawn(spec)
        else:
            try:
                await self._set_memory(container, spec)
            except BaseException:
                self._destroy_later(container)
                raise
        container.role = "launching"
        return container, code

    async def _spawn_and_prefetch(self, spec: InstanceSpec) -> tuple[_Container, Path]:
        spawn = asyncio.ensure_future(self._spawn(spec))  # awaited below on every path
        try:
            code = await self._code.fetch(spec)
        except BaseException:
            spawn.cancel()
            await asyncio.wait([spawn])
            if not spawn.cancelled() and spawn.exception() is None:
                await self._destroy(spawn.result())
            raise
        container = await spawn  # on failure or cancellation _spawn removes its container itself
        container.role = "launching"
        return container, code

    # -- daemon -------------------------------------------------------------------------------------

    async def _connect(self) -> aiodocker.Docker:
        try:
            docker = aiodocker.Docker(url=self._docker_url)
        except (AssertionError, ValueError) as exc:
            raise Unavailable(
                f"Docker daemon at {self._daemon} unreachable: no Docker socket found ({exc})"
            ) from exc
        try:
            async with asyncio.timeout(DOCKER_PING_TIMEOUT_S):
                await docker.version()
        except (aiodocker.DockerError, OSError, TimeoutError) as exc:
            await docker.close()
            raise Unavailable(f"Docker daemon at {self._daemon} unreachable: {_api_error(exc)}") from exc
        return docker

    async def check(self) -> None:
        """Raise ``Unavailable`` when the daemon does not answer now (the node agent reports it)."""
        if self._docker is None:
            raise Unavailable(f"Docker daemon at {self._daemon}: the backend is not started")
        try:
            async with asyncio.timeout(DOCKER_PING_TIMEOUT_S):
                await self._docker.version()
        except (aiodocker.DockerError, OSError, TimeoutError) as exc:
            raise Unavailable(f"Docker daemon at {self._daemon} unreachable: {_api_error(exc)}") from exc

    def _node_filters(self) -> dict[str, list[str]]:
        return {"label": [f"{LABEL_PLATFORM}=1", f"{LABEL_NODE}={self._node_id}"]}

    def _pid(self, host: _Container) -> int | None:
        return host.pid

    def _usage_pids(self, host: _Container) -> list[int]:
        # The container's main process is its init (docker-init); the host runs below it.
        return [] if host.pid is None else descendants(host.pid)

    def _journal_handle(self, container: _Container) -> dict[str, Any]:
        return {"container_id": container.container_id, "folder": container.folder}

    async def _adopt_leftovers(self) -> None:
        """Adopt the journalled, healthy instances a previous agent left; remove its other containers."""
        docker = self._docker
        assert docker is not None
        entries = self.journal.read_all()
        try:
            leftovers = await docker.containers.list(all=True, filters=json.dumps(self._node_filters()))
        except aiodocker.DockerError as exc:
            raise Unavailable(f"cannot list the containers a previous agent left: {exc}") from exc
        kept: set[str] = set()
        removed = 0
        for leftover in leftovers:
            info = leftover._container
            name = str((info.get("Names") or ["?"])[0]).lstrip("/")
            entry = entries.get(name)
            if entry is not None and info.get("State") == "running" and await self._adopt_container(leftover.id, name, entry):
                kept.add(entry.handle.get("folder", ""))
                continue
            await _remove_container(docker, leftover.id)
            removed += 1
        for name in set(entries) - {e.host for e in entries.values() if e.handle.get("folder") in kept}:
            self.journal.remove(name)
        if removed:
            logger.warning("removed %d containers left by a previous agent on node %s", removed, self._node_id)
        # The folders of everything not adopted (and any left by a crash): only this backend writes
        # under these dirs, for this node.
        for directory in (self._containers_dir, self._views_dir):
            for path in list(directory.iterdir()) if directory.is_dir() else []:
                if path.name not in kept:
                    await asyncio.to_thread(shutil.rmtree, path, True)

    async def _adopt_container(self, container_id: str, name: str, entry: Any) -> bool:
        folder = str(entry.handle.get("folder", ""))
        if entry.handle.get("container_id") != container_id or not folder:
            return False
        socket_dir = self._containers_dir / folder
        container = _Container(
            name=name,
            folder=folder,
            socket_dir=socket_dir,
            code_dir=self._views_dir / folder,
            client=host_client(socket_dir / SOCKET_NAME),
            container_id=container_id,
            role="instance",
        )
        if not await self._is_ready_instance(container):
            await container.client.aclose()
            return False
        self._by_id[container_id] = container
        self._adopt(container, entry)
        return True

    async def _watch_events(self, *, since: float) -> NoReturn:
        """Notice every container of this node that stops, for as long as the backend runs."""
        assert self._docker is not None
        docker = self._docker
        filters = json.dumps({"type": ["container"], "event": ["die"], **self._node_filters()})
        first = True
        while True:
            subscriber = docker.events.subscribe(create_task=False)
            # ``since`` replays what happened while the stream was not connected.
            runner = self._tasks.spawn(self._run_events(docker, filters, since), name="events-stream")
            if not first:
                await self._reconcile()
            first = False
            try:
                while (event := await subscriber.get()) is not None:
                    when = event.get("timeNano")
                    since = int(when) / 1e9 if when else time.time()
                    actor = event.get("Actor") or {}
                    container = self._by_id.get(str(actor.get("ID", "")))
                    if container is not None:
                        code = (actor.get("Attributes") or {}).get("exitCode", "?")
                        self._on_die(container, code)
            finally:
                runner.cancel()
                del subscriber
            logger.warning("Docker event stream ended; reconnecting in %g s", EVENTS_RECONNECT_S)
            await asyncio.sleep(EVENTS_RECONNECT_S)

    async def _run_events(self, docker: aiodocker.Docker, filters: str, since: float) -> None:
        try:
            await docker.events.run(filters=filters, since=f"{since:.9f}")
        except (aiodocker.DockerError, OSError) as exc:
            logger.warning("Docker event stream failed: %s", exc)

    async def _reconcile(self) -> None:
        """Treat every known container the daemon no longer runs as dead (a missed event)."""
        assert self._docker is not None
        try:
            running = await self._docker.containers.list(
                filters=json.dumps({"status": ["running"], **self._node_filters()})
            )
        except aiodocker.DockerError as exc:
            logger.warning("cannot list containers to reconcile: %s", exc)
            return
        alive = {c.id for c in running}
        for container_id, container in list(self._by_id.items()):
            if container_id not in alive and container.role != "spawning":
                self._on_die(container, "?")

    def _on_die(self, container: _Container, exit_code: str) -> None:
        if container.exited.is_set():
            return
        container.exited.set()
        if container.stopping or self._closed:
            return
        iid = container.instance_id
        if container.role == "instance" and iid is not None and self._instances.get(iid) is container:
            del self._instances[iid]
            self._release_code(container)
            self._tasks.spawn(self._instance_exited(container, iid, exit_code), name=f"exit-{container.name}")
        elif container.role == "pool":
            with contextlib.suppress(ValueError):
                self._pool.remove(container)
            logger.warning("warm container %s exited with code %s; replacing it", container.name, exit_code)
            self._destroy_later(container)
            self._refill_pool()
        # spawning / launching: whoever is starting it sees ``exited`` and removes it.

    async def _instance_exited(self, container: _Container, iid: str, exit_code: str) -> None:
        oom = False
        if self._docker is not None and container.container_id is not None:
            with contextlib.suppress(aiodocker.DockerError):
                info = await self._docker.containers.container(container.container_id).show()
                oom = bool((info.get("State") or {}).get("OOMKilled"))
        if self._exit_callback is not None:
            await self._exit_callback(
                InstanceExit(
                    instance_id=iid,
                    exit_code=int(exit_code) if exit_code.lstrip("-").isdigit() else None,
                    oom_killed=oom,
                    detail=f"container exited with code {exit_code}" + (" (OOM-killed)" if oom else ""),
                )
            )
        tail = await self._log_tail(container)
        logger.warning(
            "instance %s (container %s) exited on its own with code %s%s%s",
            iid,
            container.name,
            exit_code,
            " (OOM-killed: over its memory limit)" if oom else "",
            f"; container log: {tail}" if tail else "",
        )
        await self._destroy(container)

    async def _log_tail(self, container: _Container) -> str:
        if self._docker is None or container.container_id is None:
            return ""
        try:
            lines = await self._docker.containers.container(container.container_id).log(
                stdout=True, stderr=True, tail=LOG_TAIL_LINES
            )
        except aiodocker.DockerError:
            return ""
        return "".join(lines).strip()[-2000:]

    # -- specialise ---------------------------------------------------------------------------------

    async def _set_memory(self, container: _Container, spec: InstanceSpec) -> None:
        """Give a pool member the function's memory limit (swap capped the same)."""
        if spec.memory_mb == POOL_MEMORY_MB:
            return
        assert self._docker is not None and container.container_id is not None
        memory = spec.memory_mb * 1024 * 1024
        try:
            # aiodocker has no wrapper for POST /containers/{id}/update.
            await self._docker._query_json(
                f"containers/{container.container_id}/update",
                method="POST",
                data={"Memory": memory, "MemorySwap": memory},
            )
        except aiodocker.DockerError as exc:
            raise InstanceStartError(
                f"cannot set the container's memory limit to {spec.memory_mb} MB: {exc}",
                error_type="DockerError",
            ) from exc

    # -- containers ---------------------------------------------------------------------------------

    def _config(self, container: _Container, spec: InstanceSpec | None) -> dict[str, Any]:
        layout = self._layout
        assert layout is not None
        labels = {LABEL_PLATFORM: "1", LABEL_NODE: self._node_id}
        if spec is None:
            labels[LABEL_POOL] = "1"
            memory_mb = POOL_MEMORY_MB
        else:
            labels[LABEL_INSTANCE] = spec.instance_id
            labels[LABEL_FUNCTION] = f"{spec.namespace}/{spec.function}"
            labels[LABEL_VERSION] = str(spec.version)
            memory_mb = spec.memory_mb
        memory = memory_mb * 1024 * 1024
        return {
            "Image": layout.image,
            "Cmd": [
                layout.python,
                "-S",
                "-E",
                layout.host_script,
                "--socket",
                f"{SOCKET_DIR_IN_CONTAINER}/{SOCKET_NAME}",
                "--cache-dir",
                CODE_DIR_IN_CONTAINER,
                "--instance-id",
                container.name,
            ],
            "Env": list(CONTAINER_ENV),
            "User": f"{FAAS_UID}:{FAAS_GID}",
            "WorkingDir": "/tmp",
            "Labels": labels,
            "NetworkDisabled": True,
            "HostConfig": {
                "Binds": [
                    *layout.binds,
                    f"{container.socket_dir}:{SOCKET_DIR_IN_CONTAINER}:rw",
                    f"{container.code_dir}:{CODE_DIR_IN_CONTAINER}:ro",
                ],
                "NetworkMode": "none",
                "Memory": memory,
                "MemorySwap": memory,
                "NanoCpus": NANO_CPUS,
                "PidsLimit": PIDS_LIMIT,
                "ReadonlyRootfs": True,
                "Tmpfs": dict(TMPFS),
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}},
                "RestartPolicy": {"Name": "no"},
                # docker-init as PID 1 reaps orphaned grandchildren, which the host would not: left
                # as zombies they would use up the pids limit of a long-lived instance.
                "Init": True,
            },
        }

    def _new_container(self) -> _Container:
        token = secrets.token_hex(5)  # short: unix socket paths are limited to 107 bytes
        folder = f"c-{token}"
        socket_dir = self._containers_dir / folder
        code_dir = self._views_dir / folder
        return _Container(
            name=f"{self._name_prefix}-{token}",
            folder=folder,
            socket_dir=socket_dir,
            code_dir=code_dir,
            client=host_client(socket_dir / SOCKET_NAME),
        )

    async def _spawn(self, spec: InstanceSpec | None = None) -> _Container:
        """Create and start a generic container and wait until its host answers ``GET /_/health``."""
        if self._closed or self._docker is None:
            raise Unavailable("the docker backend is closed")
        docker = self._docker
        container = self._new_container()
        try:
            _make_folders(container)
        except OSError as exc:
            await container.client.aclose()
            raise Unavailable(f"cannot create the container's folders: {exc}") from exc
        async with self._destroy_on_failure(container):
            try:
                created = await docker.containers.create(self._config(container, spec), name=container.name)
                container.container_id = created.id
                self._by_id[created.id] = container
                await created.start()
                info = await created.show()
                container.pid = int((info.get("State") or {}).get("Pid") or 0) or None
            except aiodocker.DockerError as exc:
                raise Unavailable(f"cannot start a function container: {exc}") from exc
            await self._wait_ready(container, HOST_READY_TIMEOUT_S)
        return container

    async def _destroy(self, container: _Container) -> None:
        """Kill and remove the container (a no-op if it is gone), then its folders.

        Every caller waits for the same removal, which a caller's cancellation does not interrupt:
        when this returns, the daemon no longer has the container.
        """
        container.stopping = True
        if container.removal is None:
            container.removal = self._tasks.spawn(self._remove(container), name=f"remove-{container.name}")
        await asyncio.shield(container.removal)

    async def _remove(self, container: _Container) -> None:
        self.journal.remove(container.name)
        if self._docker is not None:
            # By name when the create call never returned (cancelled): the daemon may have made it.
            await _remove_container(self._docker, container.container_id or container.name)
        if container.container_id is not None:
            self._by_id.pop(container.container_id, None)
        await container.client.aclose()
        await asyncio.to_thread(_remove_folders, container)


async def _remove_container(docker: aiodocker.Docker, container_id: str) -> None:  # id or name
    """Kill and remove a container; wait for a removal already under way; a no-op if it is gone."""
    try:
        await docker.containers.container(container_id).delete(force=True)
        return
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return
        if exc.status != 409:  # 409: removal already in progress
            logger.warning("cannot remove container %s: %s", container_id[:12], exc)
            return
    give_up_at = time.monotonic() + REMOVAL_WAIT_S
    while time.monotonic() < give_up_at:
        try:
            await docker.containers.container(container_id).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return
        await asyncio.sleep(0.05)
    logger.warning("container %s is still being removed after %g s", container_id[:12], REMOVAL_WAIT_S)


def _make_folders(container: _Container) -> None:
    # The socket folder is the container user's (the host creates its socket there); the code view
    # stays the agent's, and is mounted read-only anyway.
    container.socket_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(container.socket_dir, FAAS_UID, FAAS_GID)
    else:
        container.socket_dir.chmod(0o777)  # its parent (mode 700) keeps other local users out
    container.code_dir.mkdir(mode=0o755)


def _remove_folders(container: _Container) -> None:
    shutil.rmtree(container.socket_dir, ignore_errors=True)
    shutil.rmtree(container.code_dir, ignore_errors=True)
