"""The embedded runtime backend: every instance is a local ``host.py`` process on a unix socket.

A cold start follows the Fission protocol: take a generic host from the warm pool (or start one when
the pool is empty), ``POST /_/specialize`` to it, refill the pool in the background.  The address
handed out is ``unix://<run_dir>/instances/<host name>.sock``; the socket keeps its pool name while
the backend's table knows the host by ``spec.instance_id``.

Invariants:

- A host is specialised at most once.  A host whose specialisation failed, timed out or was cancelled
  is killed, never returned to the pool.
- Every host runs in its own session (``start_new_session``); stopping it signals the whole process
  group, so processes the user's code started go with it.
- Hosts start with a minimal environment (``PATH``, locale, temp dir, proxies): the node agent's
  settings and credentials never reach user code.  The function's environment comes with specialise.
- The exit callback fires only for specialised instances that exit on their own (a crash, or a host
  retiring itself after a sync timeout or ``MemoryError``), never for ``stop`` or ``close``.  A pool
  member that dies is replaced without a callback.
- ``launch`` holds no lock across I/O: concurrent launches each take their own pool member.

Caveats: the per-host log file (``<host name>.log`` beside the socket: host diagnostics and anything
the user's code prints outside an invocation) is deleted when the backend stops the host and kept when
the host exits on its own, for the post-mortem.  Nothing rotates the kept ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx

from faas.core.errors import InstanceStartError, Unavailable
from faas.core.tasks import TaskSet
from faas.runtime.backend import InstanceExit, InstanceExitCallback, InstanceSpec, InstanceStatus

logger = logging.getLogger(__name__)

HOST_SCRIPT = Path(__file__).with_name("host.py")
HOST_READY_TIMEOUT_S = 10.0
READY_POLL_INTERVAL_S = 0.005
HEALTH_TIMEOUT_S = 0.5
STOP_GRACE_S = 2.0
LOG_TAIL_BYTES = 2000
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# What a host inherits from the node agent's environment; everything else is withheld.
# glibc gives each thread its own malloc arena, reserving 64 MiB of address space apiece; under the
# host's RLIMIT_AS cap a concurrency-16 instance then fails with "can't start new thread".
HOST_ENV = {"MALLOC_ARENA_MAX": "2"}

INHERITED_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "HOME",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)


@dataclass(eq=False)
class _Host:
    """One host process: generic while ``instance_id`` is None, an instance afterwards."""

    name: str
    socket_path: Path
    log_path: Path
    process: asyncio.subprocess.Process
    client: httpx.AsyncClient
    instance_id: str | None = None
    stopping: bool = False

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
                return log.read().decode(errors="replace").strip()
        except OSError:
            return ""


class ProcessBackend:
    """Runs function hosts as local processes, keeping ``pool_size`` generic ones warm."""

    name = "process"

    def __init__(
        self, *, run_dir: Path, cache_dir: Path, pool_size: int, python: str = sys.executable
    ) -> None:
        self._socket_dir = Path(run_dir) / "instances"
        self._cache_dir = Path(cache_dir)
        self._pool_size = pool_size
        self._python = python
        self._host_env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
        self._host_env.update(HOST_ENV)
        self._pool: deque[_Host] = deque()
        self._pool_spawning = 0
        self._instances: dict[str, _Host] = {}
        self._launching: set[str] = set()  # instance ids with a launch under way
        self._hosts: set[_Host] = set()  # every started process not yet reaped
        self._tasks = TaskSet("process-backend")  # pool refills, process watchers, orphan cleanup
        self._exit_callback: InstanceExitCallback | None = None
        self._closed = False

    # -- RuntimeBackend -----------------------------------------------------------------------------

    async def start(self) -> None:
        if not HOST_SCRIPT.is_file():
            raise Unavailable(f"function host script missing: {HOST_SCRIPT}")
        probe = self._socket_dir / f"{self._new_host_name()}.sock"
        if len(os.fsencode(probe)) > MAX_SOCKET_PATH_BYTES:
            raise Unavailable(
                f"run dir {self._socket_dir} is too long for unix socket paths "
                f"(at most {MAX_SOCKET_PATH_BYTES} bytes); choose a shorter FAAS_HOME"
            )
        try:
            self._socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create the runtime directories: {exc}") from exc
        results = await asyncio.gather(
            *(self._spawn() for _ in range(self._pool_size)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        hosts = [r for r in results if isinstance(r, _Host)]
        if failures:
            await asyncio.gather(*(self._destroy(host) for host in hosts))
            first = failures[0]
            if isinstance(first, Unavailable):
                raise first
            raise Unavailable(f"cannot start function hosts: {first}") from first
        self._pool.extend(hosts)
        logger.info("process backend started with %d warm hosts in %s", len(hosts), self._socket_dir)

    async def close(self) -> None:
        self._closed = True
        hosts = list(self._hosts)
        self._pool.clear()
        self._instances.clear()
        await asyncio.gather(*(self._destroy(host) for host in hosts), return_exceptions=True)
        await self._tasks.cancel_all()
        # A refill cancelled while its host was starting leaves that host behind: stop it here.
        leftovers = list(self._hosts)
        await asyncio.gather(*(self._destroy(host) for host in leftovers), return_exceptions=True)
        await self._tasks.cancel_all()

    async def launch(self, spec: InstanceSpec, *, timeout_s: float) -> str:
        if self._closed:
            raise Unavailable("the process backend is closed")
        if spec.instance_id in self._instances or spec.instance_id in self._launching:
            raise InstanceStartError(f"instance {spec.instance_id} already exists", error_type="Conflict")
        self._launching.add(spec.instance_id)
        try:
            return await self._launch(spec, timeout_s)
        finally:
            self._launching.discard(spec.instance_id)

    async def _launch(self, spec: InstanceSpec, timeout_s: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            host = self._take_pooled_host()
            self._refill_pool()
            if host is None:
                try:
                    host = await asyncio.wait_for(self._spawn(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise InstanceStartError(
                        f"no function host became ready within {timeout_s:g} s", error_type="TimeoutError"
                    ) from None
            try:
                return await self._specialize(host, spec, deadline, timeout_s)
            except httpx.ConnectError:
                # Nothing was sent: the pooled host died unnoticed.  Retry on another within the deadline.
                await self._destroy(host)
                if loop.time() >= deadline:
                    raise InstanceStartError(
                        f"no function host could be reached within {timeout_s:g} s", error_type="TimeoutError"
                    ) from None
                logger.warning("function host %s unreachable before specialise; trying another", host.name)

    async def stop(self, instance_id: str) -> None:
        host = self._instances.pop(instance_id, None)
        if host is not None:
            await self._destroy(host)

    async def list_instances(self) -> list[InstanceStatus]:
        return list(
            await asyncio.gather(*(self._status(iid, host) for iid, host in list(self._instances.items())))
        )

    async def check(self) -> None:
        """Local processes need no daemon: nothing can be down here that start() did not check."""

    def set_exit_callback(self, callback: InstanceExitCallback) -> None:
        self._exit_callback = callback

    # -- specialise ---------------------------------------------------------------------------------

    async def _specialize(self, host: _Host, spec: InstanceSpec, deadline: float, timeout_s: float) -> str:
        """Specialise ``host`` as ``spec``; on any failure but ``ConnectError`` the host is destroyed."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(remaining):
                response = await host.client.post(
                    "/_/specialize", json=spec.specialize_body(), timeout=remaining
                )
        except httpx.ConnectError:
            raise
        except (TimeoutError, httpx.TimeoutException):
            await self._destroy(host)
            raise InstanceStartError(
                f"specialising {spec.namespace}/{spec.function}:{spec.version} did not finish within {timeout_s:g} s",
                error_type="TimeoutError",
            ) from None
        except httpx.HTTPError as exc:
            tail = host.log_tail()
            await self._destroy(host)
            raise InstanceStartError(
                f"the function host failed while specialising: {exc!r}"
                + (f"; host log: {tail}" if tail else ""),
                error_type="HostCrashed",
            ) from exc
        except BaseException:
            # Cancelled: the caller is gone, but the host must not outlive the attempt.
            self._tasks.spawn(self._destroy(host), name=f"destroy-{host.name}")
            raise
        if response.status_code != 200:
            await self._destroy(host)
            message, error_type = _start_error_of(response)
            raise InstanceStartError(message, error_type=error_type)
        if host.process.returncode is not None:
            await self._destroy(host)
            raise InstanceStartError(
                "the function host exited right after specialising", error_type="HostCrashed"
            )
        host.instance_id = spec.instance_id
        self._instances[spec.instance_id] = host
        logger.info(
            "instance %s (%s/%s:%s) is host %s pid %s",
            spec.instance_id,
            spec.namespace,
            spec.function,
            spec.version,
            host.name,
            host.process.pid,
        )
        return host.address

    # -- pool ---------------------------------------------------------------------------------------

    def _take_pooled_host(self) -> _Host | None:
        while self._pool:
            host = self._pool.popleft()
            if host.process.returncode is None:
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
        except Unavailable:
            if self._closed:
                return
            raise
        finally:
            self._pool_spawning -= 1
        if self._closed:
            await self._destroy(host)
            return
        self._pool.append(host)

    # -- processes ----------------------------------------------------------------------------------

    @staticmethod
    def _new_host_name() -> str:
        return f"h-{secrets.token_hex(5)}"  # short: unix socket paths are limited to 107 bytes

    async def _spawn(self) -> _Host:
        """Start a generic host and wait until it answers ``GET /_/health``."""
        if self._closed:
            raise Unavailable("the process backend is closed")
        name = self._new_host_name()
        socket_path = self._socket_dir / f"{name}.sock"
        log_path = self._socket_dir / f"{name}.log"
        try:
            with log_path.open("ab") as log:
                process = await asyncio.create_subprocess_exec(
                    self._python,
                    "-S",
                    "-E",
                    str(HOST_SCRIPT),
                    "--socket",
                    str(socket_path),
                    "--cache-dir",
                    str(self._cache_dir),
                    "--instance-id",
                    name,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    env=self._host_env,
                    cwd=self._cache_dir,
                )
        except OSError as exc:
            raise Unavailable(f"cannot start a function host with {self._python}: {exc}") from exc
        # TLS is meaningless on a unix socket; verify=False also skips loading the CA bundle (~70 ms).
        client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=False),
            base_url="http://host",
            verify=False,
            trust_env=False,
            timeout=HEALTH_TIMEOUT_S,
        )
        host = _Host(name=name, socket_path=socket_path, log_path=log_path, process=process, client=client)
        self._hosts.add(host)
        self._tasks.spawn(self._watch(host), name=f"watch-{name}")
        try:
            await self._wait_ready(host)
        except asyncio.CancelledError:
            self._tasks.spawn(self._destroy(host), name=f"destroy-{name}")
            raise
        except BaseException:
            await self._destroy(host)
            raise
        return host

    async def _wait_ready(self, host: _Host) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + HOST_READY_TIMEOUT_S
        while True:
            if self._closed:
                raise Unavailable("the process backend is closed")
            if host.process.returncode is not None:
                tail = host.log_tail()
                raise Unavailable(
                    f"function host exited with code {host.process.returncode} while starting"
                    + (f": {tail}" if tail else "")
                )
            # The socket file appears once the host listens; before that, connecting is pointless.
            if host.socket_path.exists():
                try:
                    response = await host.client.get("/_/health")
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            if loop.time() > give_up_at:
                raise Unavailable(f"function host did not become ready within {HOST_READY_TIMEOUT_S:g} s")
            await asyncio.sleep(READY_POLL_INTERVAL_S)

    async def _watch(self, host: _Host) -> None:
        returncode = await host.process.wait()
        self._hosts.discard(host)
        if host.stopping:
            return
        _signal_group(host, signal.SIGKILL)  # whatever the user's code left behind in its session
        await host.client.aclose()
        with contextlib.suppress(OSError):
            host.socket_path.unlink()
        if self._closed:
            return
        iid = host.instance_id
        if iid is not None and self._instances.get(iid) is host:
            del self._instances[iid]
            logger.warning(
                "instance %s (host %s) exited on its own with code %s; log kept at %s",
                iid,
                host.name,
                returncode,
                host.log_path,
            )
            if self._exit_callback is not None:
                # Memory over the limit shows in-band here (RLIMIT_AS raises MemoryError: a 507), so an
                # exit is reported as such; a SIGKILL may be anyone's, the kernel's OOM killer included.
                await self._exit_callback(
                    InstanceExit(
                        instance_id=iid, exit_code=returncode, detail=f"function host exited with code {returncode}"
                    )
                )
        elif host in self._pool:
            self._pool.remove(host)
            logger.warning("warm host %s exited with code %s; replacing it", host.name, returncode)
            self._refill_pool()

    async def _destroy(self, host: _Host) -> None:
        """SIGTERM the host's process group, SIGKILL after ``STOP_GRACE_S``; remove socket and log."""
        host.stopping = True
        if host.process.returncode is None:
            _signal_group(host, signal.SIGTERM)
            try:
                await asyncio.wait_for(host.process.wait(), STOP_GRACE_S)
            except TimeoutError:
                _signal_group(host, signal.SIGKILL)
                await host.process.wait()
        _signal_group(host, signal.SIGKILL)
        self._hosts.discard(host)
        await host.client.aclose()
        for path in (host.socket_path, host.log_path):
            with contextlib.suppress(OSError):
                path.unlink()

    async def _status(self, instance_id: str, host: _Host) -> InstanceStatus:
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
                pid=host.process.pid,
            )
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            return InstanceStatus(
                instance_id=instance_id, address=host.address, alive=False, pid=host.process.pid
            )


def _signal_group(host: _Host, signum: int) -> None:
    # The host is its session's leader, so its pid is the group id.  The group outlives the leader
    # while the user's code has processes in it, and its id is not reused before the group is gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(host.process.pid, signum)


def _start_error_of(response: httpx.Response) -> tuple[str, str | None]:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"]), (str(error["type"]) if error.get("type") else None)
    return f"specialise failed with HTTP {response.status_code}: {response.text[:200]}", None
