"""What the runtime backends share: a warm pool of generic function hosts, specialised on demand.

A cold start follows the Fission protocol: take a generic host from the warm pool (or start one when
the pool is empty), ``POST /_/specialize`` to it, refill the pool in the background.  A host that
refuses the connection (nothing was sent: it died unnoticed in the pool) is destroyed and another one
tried, within the launch's deadline.  ``PooledBackend`` implements that protocol and the
``RuntimeBackend`` bookkeeping around it (``launch``, ``stop``, ``list_instances``, ``close``); a
backend says how a host is started, reached, watched and stopped through the hooks it implements
(``process_backend``: local processes, ``docker_backend``: containers).

Invariants:

- A host is specialised at most once.  A host whose specialisation failed, timed out or was cancelled
  is destroyed, never returned to the pool.  So is a host that fails, or is cancelled, while starting.
- ``launch`` holds no lock across I/O: concurrent launches each take their own pool member.
- An instance id is launched at most once at a time: a second ``launch`` of an id that exists or is
  being launched fails with ``InstanceStartError`` (``Conflict``).
- The node's code cache (``code_cache``) never evicts the code of a launch under way or of an
  instance this backend runs: ``launch`` acquires ``spec.sha256`` before any host is taken, a failed
  launch releases it, and a launched instance holds it until it is stopped (once its host is
  destroyed), exits on its own, or the backend closes.

- Restarts: every specialised instance has an entry in the backend's journal (``journal_dir``, one
  JSON file per host, readable by the agent only) from its registration until it is destroyed or
  exits.  A backend started after its predecessor died (``start`` calls ``_adopt_leftovers``) adopts
  each host that its journal names, that is still the same process or container, and that answers
  its health check as a ready instance; it kills every other host the predecessor left (pool
  members, half-started hosts, hosts that do not answer).  Nothing is orphaned: what is not adopted
  is killed.  ``adopted()`` lists the adopted instances, for the node agent to record again.

Every host listens on a unix socket whose path is its address (``unix://…``); the shared code logs
under the backend's own logger, and names a host by the backend's word for it ("host",
"container") in errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from faas.core.errors import Fault, InstanceStartError, Unavailable
from faas.core.tasks import TaskSet
from faas.runtime.backend import InstanceExitCallback, InstanceSpec, InstanceStatus
from faas.runtime.code_cache import CodeCache

READY_POLL_INTERVAL_S = 0.005
HEALTH_TIMEOUT_S = 0.5
FILL_RETRY_DELAY_S = 0.5  # before starting again a pool host that failed to start
# Limits of every instance, on both backends: tasks (processes and threads), and the memory of a
# generic pool member until specialising gives it the function's (the default function memory, so
# the common case needs no update).
PIDS_LIMIT = 128
POOL_MEMORY_MB = 256
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


class PooledHost(Protocol):
    """One function host: generic while ``instance_id`` is None, an instance afterwards."""

    name: str
    client: httpx.AsyncClient  # speaks to the host over its unix socket
    instance_id: str | None

    @property
    def socket_path(self) -> Path: ...

    @property
    def address(self) -> str: ...

    def has_exited(self) -> bool: ...


H = TypeVar("H", bound=PooledHost)


class JournalEntry(BaseModel):
    """What a restarted backend needs to adopt a specialised host its predecessor left."""

    host: str  # the host's name (process backend) or container name (Docker backend)
    spec: InstanceSpec  # with ``code_url`` blanked: it expires, and adoption needs no download
    address: str
    handle: dict[str, Any]  # how the backend finds the same host again (pid and start time, container id)


class InstanceJournal:
    """One small JSON file per specialised instance under ``directory`` (mode 700, files 600)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, host: str) -> Path:
        return self.directory / f"{host}.json"

    def write(self, entry: JournalEntry) -> None:
        path = self._path(entry.host)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the function's environment
        with os.fdopen(fd, "w") as fh:
            fh.write(entry.model_dump_json())
        os.replace(tmp, path)

    def remove(self, host: str) -> None:
        with contextlib.suppress(OSError):
            self._path(host).unlink()

    def read_all(self) -> dict[str, JournalEntry]:
        """Every readable entry by host name; unreadable files are removed."""
        out: dict[str, JournalEntry] = {}
        if not self.directory.is_dir():
            return out
        for path in self.directory.glob("*.json"):
            try:
                entry = JournalEntry.model_validate_json(path.read_bytes())
            except (OSError, ValidationError, ValueError):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            out[entry.host] = entry
        return out


def journal_spec(spec: InstanceSpec) -> InstanceSpec:
    return spec.model_copy(update={"code_url": ""})


def check_socket_path(probe: Path, run_dir: Path) -> None:
    """Raise ``Unavailable`` if ``probe``, a socket path under ``run_dir``, is too long for ``sun_path``."""
    if len(os.fsencode(probe)) > MAX_SOCKET_PATH_BYTES:
        raise Unavailable(
            f"run dir {run_dir} is too long for unix socket paths "
            f"(at most {MAX_SOCKET_PATH_BYTES} bytes); choose a shorter FAAS_HOME"
        )


def host_client(socket_path: Path) -> httpx.AsyncClient:
    """An HTTP client for the host listening on ``socket_path``."""
    # TLS is meaningless on a unix socket; verify=False also skips loading the CA bundle (~70 ms).
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=False),
        base_url="http://host",
        verify=False,
        trust_env=False,
        timeout=HEALTH_TIMEOUT_S,
    )


class PooledBackend(ABC, Generic[H]):
    """A runtime backend that keeps ``pool_size`` generic hosts warm and specialises them on demand.

    A subclass sets ``name``, ``_noun`` (its word for a host, in error messages) and ``_log``, and
    implements the hooks; ``start`` and ``check`` are its own.  ``start`` runs the code cache's sweeps
    (``_sweep_code_cache_forever``); a subclass calls ``_release_code`` when an instance's host exits
    on its own.
    """

    name: str
    _noun: str
    _log: logging.Logger

    def __init__(self, *, pool_size: int, code_cache: CodeCache, journal_dir: Path) -> None:
        self.code_cache = code_cache
        self.journal = InstanceJournal(journal_dir)
        self._adopted: list[tuple[InstanceSpec, str]] = []
        self._pool_size = pool_size
        self._pool: deque[H] = deque()
        self._pool_spawning = 0
        self._instances: dict[str, H] = {}
        self._launching: set[str] = set()  # instance ids with a launch under way
        self._code_holds: dict[H, str] = {}  # launched instances' hosts -> the sha256 they hold in the cache
        self._tasks = TaskSet(f"{self.name}-backend")  # pool refills, background destroys, the backend's own
        self._exit_callback: InstanceExitCallback | None = None
        self._closed = False

    # -- hooks --------------------------------------------------------------------------------------

    @abstractmethod
    def _check_open(self) -> None:
        """Raise ``Unavailable`` if the backend cannot launch now (closed, or not started)."""

    @abstractmethod
    async def _spawn(self) -> H:
        """Start a generic host and return it once ``_wait_ready`` says so; ``Unavailable`` if not.

        A host that fails or is cancelled while starting is destroyed (``_destroy_on_failure``).
        """

    @abstractmethod
    async def _acquire(self, spec: InstanceSpec, deadline: float) -> H:
        """A generic host ready to be specialised as ``spec``: a pooled one, or a new one.

        Raises ``TimeoutError`` when no host is ready by ``deadline`` (event-loop time).  A host it
        does not return is destroyed.
        """

    @abstractmethod
    async def _destroy(self, host: H) -> None:
        """Stop ``host`` and release what it holds; a no-op if it is gone already."""

    @abstractmethod
    def _started_hosts(self) -> list[H]:
        """Every host this backend started and has not destroyed yet."""

    @abstractmethod
    async def _log_tail(self, host: H) -> str:
        """The end of ``host``'s log, for an error message; empty if there is nothing to show."""

    @abstractmethod
    async def _exited_while_starting(self, host: H) -> Unavailable:
        """The error for a host that exited before it became ready."""

    @abstractmethod
    async def _not_ready(self, host: H, timeout_s: float) -> Unavailable:
        """The error for a host still not ready after ``timeout_s``."""

    def _pid(self, host: H) -> int | None:
        """The host's process id, if this backend knows it."""
        return None

    def _usage_pids(self, host: H) -> list[int]:
        """The processes whose CPU and memory are the host's use (as this machine numbers them)."""
        pid = self._pid(host)
        return [] if pid is None else [pid]

    def usage_pids(self) -> dict[str, list[int]]:
        """Each instance's processes (``_usage_pids``), for the node agent's load report."""
        return {instance_id: self._usage_pids(host) for instance_id, host in list(self._instances.items())}

    @abstractmethod
    def _journal_handle(self, host: H) -> dict[str, Any]:
        """How a restarted backend finds ``host`` again (written to the journal)."""

    @abstractmethod
    async def _adopt_leftovers(self) -> None:
        """Adopt the healthy instances a previous backend on this node left, kill everything else.

        Called by ``start`` before the pool is filled; uses ``journal`` and ``_adopt``."""

    def _specialize_body(self, spec: InstanceSpec) -> dict[str, object]:
        return spec.specialize_body()

    def _add_to_pool(self, host: H) -> None:
        self._pool.append(host)

    def _register_instance(self, host: H, spec: InstanceSpec) -> None:
        """Record a freshly specialised host as instance ``spec.instance_id``."""
        host.instance_id = spec.instance_id
        self._instances[spec.instance_id] = host
        try:
            self.journal.write(
                JournalEntry(
                    host=host.name,
                    spec=journal_spec(spec),
                    address=host.address,
                    handle=self._journal_handle(host),
                )
            )
        except OSError as exc:  # the instance runs; only its adoption after an agent restart is lost
            self._log.warning("cannot journal instance %s: %s", spec.instance_id, exc)
        pid = self._pid(host)
        self._log.info(
            "instance %s (%s/%s:%s) is %s %s%s",
            spec.instance_id,
            spec.namespace,
            spec.function,
            spec.version,
            self._noun,
            host.name,
            "" if pid is None else f" pid {pid}",
        )

    def _refill_failed(self, exc: Unavailable) -> None:
        """A pool refill could not start a host: by default it fails the refill task, whose guard logs it."""
        raise exc

    # -- code cache ---------------------------------------------------------------------------------

    def _sweep_code_cache_forever(self) -> None:
        """Evict unused code from the node cache periodically, until the backend closes."""
        self._tasks.spawn(self.code_cache.sweep_forever(), name="code-cache-sweep", long_lived=True)

    async def _is_ready_instance(self, host: H) -> bool:
        """True when ``host`` answers its health check as a specialised instance."""
        try:
            response = await host.client.get("/_/health", timeout=HEALTH_TIMEOUT_S)
            return response.status_code == 200 and response.json().get("state") == "ready"
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    def _adopt(self, host: H, entry: JournalEntry) -> None:
        """Take over a healthy instance a previous backend left (see ``_adopt_leftovers``)."""
        spec = entry.spec
        host.instance_id = spec.instance_id
        self._instances[spec.instance_id] = host
        self.code_cache.acquire(spec.sha256)
        self._code_holds[host] = spec.sha256
        self._adopted.append((spec, host.address))
        self._log.warning(
            "adopted instance %s (%s/%s:%s), %s %s left by a previous agent",
            spec.instance_id, spec.namespace, spec.function, spec.version, self._noun, host.name,
        )  # fmt: skip

    def adopted(self) -> list[tuple[InstanceSpec, str]]:
        """The instances ``start`` adopted that still run: (spec, address)."""
        return [(spec, address) for spec, address in self._adopted if spec.instance_id in self._instances]

    def _release_code(self, host: H) -> None:
        """``host`` no longer runs its instance's code: let the cache evict it once unused long enough."""
        sha256 = self._code_holds.pop(host, None)
        if sha256 is not None:
            self.code_cache.release(sha256)

    # -- RuntimeBackend -----------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        hosts = self._started_hosts()
        self._pool.clear()
        self._instances.clear()
        await asyncio.gather(*(self._destroy(host) for host in hosts), return_exceptions=True)
        await self._tasks.cancel_all()
        # A refill cancelled while its host was starting leaves that host behind: stop it here.
        leftovers = self._started_hosts()
        await asyncio.gather(*(self._destroy(host) for host in leftovers), return_exceptions=True)
        await self._tasks.cancel_all()
        for host in list(self._code_holds):
            self._release_code(host)
        for host in hosts + leftovers:
            self.journal.remove(host.name)

    async def launch(self, spec: InstanceSpec, *, timeout_s: float) -> str:
        self._check_open()
        if spec.instance_id in self._instances or spec.instance_id in self._launching:
            raise InstanceStartError(f"instance {spec.instance_id} already exists", error_type="Conflict")
        self._launching.add(spec.instance_id)
        try:
            await self.code_cache.make_room(spec.sha256)  # the disk quota: before anything is unpacked
        except BaseException:
            self._launching.discard(spec.instance_id)
            raise
        # Before any host can read <cache>/<sha256>: from here on a sweep keeps it.
        self.code_cache.acquire(spec.sha256)
        try:
            address = await self._launch(spec, timeout_s)
        except BaseException:
            self.code_cache.release(spec.sha256)
            raise
        finally:
            self._launching.discard(spec.instance_id)
        host = self._instances.get(spec.instance_id)
        if host is None:  # not expected: registering is the launch's last step, with no await after it
            self.code_cache.release(spec.sha256)
        else:
            self._code_holds[host] = spec.sha256  # the launch's hold passes to the instance
        return address

    async def _launch(self, spec: InstanceSpec, timeout_s: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                host = await self._acquire(spec, deadline)
            except TimeoutError:
                raise InstanceStartError(
                    f"no function {self._noun} became ready within {timeout_s:g} s", error_type="TimeoutError"
                ) from None
            try:
                return await self._specialize(host, spec, deadline, timeout_s)
            except httpx.ConnectError:
                # Nothing was sent: the pooled host died unnoticed.  Retry on another within the deadline.
                await self._destroy(host)
                if loop.time() >= deadline:
                    raise InstanceStartError(
                        f"no function {self._noun} could be reached within {timeout_s:g} s",
                        error_type="TimeoutError",
                    ) from None
                self._log.warning(
                    "function %s %s unreachable before specialise; trying another", self._noun, host.name
                )

    async def stop(self, instance_id: str) -> None:
        host = self._instances.pop(instance_id, None)
        if host is not None:
            try:
                await self._destroy(host)
            finally:
                self._release_code(host)
                self.journal.remove(host.name)

    async def list_instances(self) -> list[InstanceStatus]:
        return list(
            await asyncio.gather(*(self._status(iid, host) for iid, host in list(self._instances.items())))
        )

    def set_exit_callback(self, callback: InstanceExitCallback) -> None:
        self._exit_callback = callback

    # -- specialise ---------------------------------------------------------------------------------

    async def _specialize(self, host: H, spec: InstanceSpec, deadline: float, timeout_s: float) -> str:
        """Specialise ``host`` as ``spec``; on any failure but ``ConnectError`` the host is destroyed."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        body = self._specialize_body(spec)
        try:
            async with asyncio.timeout(remaining):
                response = await host.client.post("/_/specialize", json=body, timeout=remaining)
        except httpx.ConnectError:
            raise
        except (TimeoutError, httpx.TimeoutException):
            await self._destroy(host)
            raise InstanceStartError(
                f"specialising {spec.namespace}/{spec.function}:{spec.version} did not finish within {timeout_s:g} s",
                error_type="TimeoutError",
            ) from None
        except httpx.HTTPError as exc:
            tail = await self._log_tail(host)
            await self._destroy(host)
            raise InstanceStartError(
                f"the function {self._noun} failed while specialising: {exc!r}"
                + (f"; {self._noun} log: {tail}" if tail else ""),
                error_type="HostCrashed",
            ) from exc
        except BaseException:
            # Cancelled: the caller is gone, but the host must not outlive the attempt.
            self._destroy_later(host)
            raise
        if response.status_code != 200:
            await self._destroy(host)
            message, error_type, fault = _start_error_of(response)
            raise InstanceStartError(message, error_type=error_type, fault=fault)
        if host.has_exited():
            await self._destroy(host)
            raise InstanceStartError(
                f"the function {self._noun} exited right after specialising", error_type="HostCrashed"
            )
        self._register_instance(host, spec)
        return host.address

    # -- pool ---------------------------------------------------------------------------------------

    async def _fill_pool(self) -> int:
        """Start ``pool_size`` generic hosts into the pool and return how many.

        A host that fails to start is tried once more (a one-off crash must not stop the node agent
        from starting); if one still fails, the others are destroyed and ``Unavailable`` is raised.
        """
        results = await asyncio.gather(
            *(self._spawn() for _ in range(self._pool_size)), return_exceptions=True
        )
        hosts = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self._log.warning(
                "%d of %d pool %ss failed to start (%s); trying them again",
                len(failed),
                self._pool_size,
                self._noun,
                failed[0],
            )
            await asyncio.sleep(FILL_RETRY_DELAY_S)
            results = hosts + list(
                await asyncio.gather(*(self._spawn() for _ in failed), return_exceptions=True)
            )
        failures = [r for r in results if isinstance(r, BaseException)]
        hosts = [r for r in results if not isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(self._destroy(host) for host in hosts), return_exceptions=True)
            first = failures[0]
            if isinstance(first, Unavailable):
                raise first
            raise Unavailable(f"cannot start function {self._noun}s: {first}") from first
        for host in hosts:
            self._add_to_pool(host)
        return len(hosts)

    def _take_pooled(self) -> H | None:
        while self._pool:
            host = self._pool.popleft()
            if not host.has_exited():
                return host
        return None

    def _refill_pool(self) -> None:
        if self._closed:
            return
        for _ in range(self._pool_size - len(self._pool) - self._pool_spawning):
            self._pool_spawning += 1
            self._tasks.spawn(self._add_pool_member(), name="pool-refill")

    async def _add_pool_member(self) -> None:
        try:
            host = await self._spawn()
        except Unavailable as exc:
            if self._closed:
                return
            self._refill_failed(exc)
            return
        finally:
            self._pool_spawning -= 1
        if self._closed:
            await self._destroy(host)
            return
        self._add_to_pool(host)

    # -- hosts --------------------------------------------------------------------------------------

    async def _wait_ready(self, host: H, timeout_s: float) -> None:
        """Poll ``GET /_/health`` until it answers 200.

        Raises ``Unavailable`` if the host exits, the backend closes or ``timeout_s`` passes first.
        """
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout_s
        while True:
            if self._closed:
                raise Unavailable(f"the {self.name} backend is closed")
            if host.has_exited():
                raise await self._exited_while_starting(host)
            # The socket file appears once the host listens; before that, connecting is pointless.
            if host.socket_path.exists():
                try:
                    response = await host.client.get("/_/health")
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            if loop.time() > give_up_at:
                raise await self._not_ready(host, timeout_s)
            await asyncio.sleep(READY_POLL_INTERVAL_S)

    @contextlib.asynccontextmanager
    async def _destroy_on_failure(self, host: H) -> AsyncIterator[None]:
        """Destroy ``host`` if the block fails; in the background if it is cancelled."""
        try:
            yield
        except asyncio.CancelledError:
            self._destroy_later(host)
            raise
        except BaseException:
            await self._destroy(host)
            raise

    @contextlib.asynccontextmanager
    async def _handing_over(self, host: H, what: str) -> AsyncIterator[None]:
        """Give an acquired ``host`` ``what`` it needs (its code, its limits): if that fails, the host
        is destroyed in the background and an ``OSError`` becomes an ``InstanceStartError``."""
        try:
            yield
        except BaseException as exc:
            self._destroy_later(host)
            if isinstance(exc, OSError):
                raise InstanceStartError(
                    f"cannot give {what} to the {self._noun}: {exc}", error_type="OSError"
                ) from exc
            raise

    def _destroy_later(self, host: H) -> None:
        self._tasks.spawn(self._destroy(host), name=f"destroy-{host.name}")

    async def _status(self, instance_id: str, host: H) -> InstanceStatus:
        pid = self._pid(host)
        try:
            response = await host.client.get("/_/health", timeout=HEALTH_TIMEOUT_S)
            response.raise_for_status()
            health = response.json()
            return InstanceStatus(
                instance_id=instance_id,
                address=host.address,
                alive=True,
                state=str(health.get("state", "unknown")),
                inflight=int(health.get("inflight", 0)),
                idle_s=float(health.get("idle_s", 0.0)),
                invocations=int(health.get("invocations", 0)),
                pid=pid,
            )
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            return InstanceStatus(instance_id=instance_id, address=host.address, alive=False, pid=pid)


def _start_error_of(response: httpx.Response) -> tuple[str, str | None, Fault | None]:
    """The message, type and fault (set by the host when the user's code is the cause) of a failed specialise."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        fault: Fault | None = "function" if error.get("fault") == "function" else None
        return str(error["message"]), (str(error["type"]) if error.get("type") else None), fault
    return f"specialise failed with HTTP {response.status_code}: {response.text[:200]}", None, None
