"""The embedded runtime backend: every instance is a local ``host.py`` process on a unix socket.

A cold start follows the Fission protocol, as ``host_pool.PooledBackend`` implements it: take a
generic host from the warm pool (or start one when the pool is empty), ``POST /_/specialize`` to it,
refill the pool in the background.  The address handed out is
``unix://<run_dir>/instances/<host name>.sock``; the socket keeps its pool name while the backend's
table knows the host by ``spec.instance_id``.

Invariants (besides those of ``host_pool``; destroying a host kills its process group):

- Every host runs in its own session (``start_new_session``); stopping it signals the whole process
  group, so processes the user's code started go with it.
- Hosts start with a minimal environment (``PATH``, locale, temp dir, proxies): the node agent's
  settings and credentials never reach user code.  The function's environment comes with specialise.
- The exit callback fires only for specialised instances that exit on their own (a crash, or a host
  retiring itself after a sync timeout or ``MemoryError``), never for ``stop`` or ``close``.  A pool
  member that dies is replaced without a callback.

Code: a host downloads and unpacks its archive into the node's cache, ``<cache_dir>/<sha256>/``
(``host._fetch_code``: a staging dir and an atomic rename), which hosts of one archive share and
run in.  The cache is swept every ``code_cache_sweep_s``: a ``<sha256>/`` dir no running or
launching instance of this backend uses, and unused for ``code_cache_ttl_s``, is evicted (see
``code_cache``); the next launch of that archive downloads it again.

Restarts (see ``host_pool``): a host runs in its own session, so it outlives a node agent killed
with SIGKILL.  On ``start`` the backend looks for every ``host.py`` process whose socket is in its
socket folder (by command line, in ``/proc``): the ones its journal names as instances, that are
still the same process (pid and start time) and answer their health check, are adopted (watched
through a pidfd, since they are no longer its children); every other one is killed with its whole
process group, and the files of what was not adopted are removed.  The agent's listening socket is
not inheritable, so a host never keeps the agent's port open.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from faas.core.errors import Unavailable
from faas.core.procs import pid_alive, proc_stat, processes_matching
from faas.runtime.backend import InstanceExit, InstanceSpec
from faas.runtime.code_cache import DEFAULT_SWEEP_INTERVAL_S, DEFAULT_TTL_S, CodeCache
from faas.runtime.host_pool import PooledBackend, check_socket_path, host_client

logger = logging.getLogger(__name__)

HOST_SCRIPT = Path(__file__).with_name("host.py")
HOST_READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 2.0
LOG_TAIL_BYTES = 2000
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


class HostProcess(Protocol):
    """What the backend needs of a host's process: a child it started, or one it adopted."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class AdoptedProcess:
    """A host process a previous agent started: not our child, so it is watched through a pidfd.

    Its exit code cannot be read (only a parent can); ``returncode`` is -1 once it has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._fd = os.pidfd_open(pid)  # ProcessLookupError if it is gone already
        self._loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self.returncode = -1
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        return -1


@dataclass(eq=False)
class _Host:
    """One host process: generic while ``instance_id`` is None, an instance afterwards."""

    name: str
    socket_path: Path
    log_path: Path
    process: HostProcess
    client: httpx.AsyncClient
    instance_id: str | None = None
    stopping: bool = False

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    def has_exited(self) -> bool:
        return self.process.returncode is not None

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
                return log.read().decode(errors="replace").strip()
        except OSError:
            return ""


class ProcessBackend(PooledBackend[_Host]):
    """Runs function hosts as local processes, keeping ``pool_size`` generic ones warm."""

    name = "process"
    _noun = "host"
    _log = logger

    def __init__(
        self,
        *,
        run_dir: Path,
        cache_dir: Path,
        pool_size: int,
        python: str = sys.executable,
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
        self._socket_dir = Path(run_dir) / "instances"
        self._cache_dir = Path(cache_dir)
        self._python = python
        self._host_env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
        self._host_env.update(HOST_ENV)
        self._hosts: set[_Host] = set()  # every started process not yet reaped

    # -- RuntimeBackend -----------------------------------------------------------------------------

    async def start(self) -> None:
        if not HOST_SCRIPT.is_file():
            raise Unavailable(f"function host script missing: {HOST_SCRIPT}")
        check_socket_path(self._socket_dir / f"{self._new_host_name()}.sock", self._socket_dir)
        try:
            self._socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            self.journal.prepare()
        except OSError as exc:
            raise Unavailable(f"cannot create the runtime directories: {exc}") from exc
        await self._adopt_leftovers()
        count = await self._fill_pool()
        self._sweep_code_cache_forever()
        logger.info("process backend started with %d warm hosts in %s", count, self._socket_dir)

    async def check(self) -> None:
        """Local processes need no daemon: nothing can be down here that start() did not check."""

    # -- PooledBackend hooks ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the process backend is closed")

    async def _acquire(self, spec: InstanceSpec, deadline: float) -> _Host:
        host = self._take_pooled()
        self._refill_pool()
        if host is None:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            host = await asyncio.wait_for(self._spawn(), remaining)
        return host

    def _started_hosts(self) -> list[_Host]:
        return list(self._hosts)

    async def _log_tail(self, host: _Host) -> str:
        return host.log_tail()

    async def _exited_while_starting(self, host: _Host) -> Unavailable:
        tail = host.log_tail()
        return Unavailable(
            f"function host exited with code {host.process.returncode} while starting"
            + (f": {tail}" if tail else "")
        )

    async def _not_ready(self, host: _Host, timeout_s: float) -> Unavailable:
        return Unavailable(f"function host did not become ready within {timeout_s:g} s")

    def _pid(self, host: _Host) -> int | None:
        return host.process.pid

    def _journal_handle(self, host: _Host) -> dict[str, Any]:
        stat = proc_stat(host.process.pid)
        return {"pid": host.process.pid, "start_ticks": stat[1] if stat else None}

    # -- restarts -----------------------------------------------------------------------------------

    def _leftover_hosts(self) -> list[tuple[int, str]]:
        """(pid, host name) of every host process serving a socket in this backend's folder."""
        prefix = f"{self._socket_dir}/"

        def ours(argv: list[str]) -> bool:
            return (
                str(HOST_SCRIPT) in argv
                and "--socket" in argv
                and argv.index("--socket") + 1 < len(argv)
                and argv[argv.index("--socket") + 1].startswith(prefix)
            )

        found = []
        for pid, argv in processes_matching(ours):
            if pid == os.getpid():
                continue
            socket_arg = argv[argv.index("--socket") + 1]
            found.append((pid, Path(socket_arg).stem))
        return found

    async def _adopt_leftovers(self) -> None:
        entries = self.journal.read_all()
        kept: set[str] = set()
        killed = 0
        for pid, name in self._leftover_hosts():
            entry = entries.get(name)
            if entry is not None and await self._adopt_process(pid, name, entry):
                kept.add(name)
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # a host leads its own session: its group goes too
            killed += 1
        for name in set(entries) - kept:
            self.journal.remove(name)
        # The files of every host that was not adopted: sockets, logs of pool members.
        for path in list(self._socket_dir.iterdir()) if self._socket_dir.is_dir() else []:
            if path.stem not in kept and path.suffix in (".sock", ".log"):
                with contextlib.suppress(OSError):
                    path.unlink()
        if killed:
            logger.warning("killed %d function hosts a previous agent left (not adoptable)", killed)

    async def _adopt_process(self, pid: int, name: str, entry: Any) -> bool:
        if entry.handle.get("pid") != pid or not pid_alive(pid, entry.handle.get("start_ticks")):
            return False
        socket_path = self._socket_dir / f"{name}.sock"
        try:
            process = AdoptedProcess(pid)
        except OSError:
            return False
        host = _Host(
            name=name,
            socket_path=socket_path,
            log_path=self._socket_dir / f"{name}.log",
            process=process,
            client=host_client(socket_path),
        )
        if not await self._is_ready_instance(host):
            await host.client.aclose()
            return False
        self._hosts.add(host)
        self._adopt(host, entry)
        self._tasks.spawn(self._watch(host), name=f"watch-{name}")
        return True

    # -- processes ----------------------------------------------------------------------------------

    @staticmethod
    def _new_host_name() -> str:
        return f"h-{secrets.token_hex(5)}"  # short: unix socket paths are limited to 107 bytes

    async def _spawn(self) -> _Host:
        """Start a generic host and wait until it answers ``GET /_/health``."""
        self._check_open()
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
        client = host_client(socket_path)
        host = _Host(name=name, socket_path=socket_path, log_path=log_path, process=process, client=client)
        self._hosts.add(host)
        self._tasks.spawn(self._watch(host), name=f"watch-{name}")
        async with self._destroy_on_failure(host):
            await self._wait_ready(host, HOST_READY_TIMEOUT_S)
        return host

    async def _watch(self, host: _Host) -> None:
        returncode = await host.process.wait()
        self._hosts.discard(host)
        if host.stopping:
            return
        self.journal.remove(host.name)
        _signal_group(host, signal.SIGKILL)  # whatever the user's code left behind in its session
        self._release_code(host)
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
        self.journal.remove(host.name)
        await host.client.aclose()
        for path in (host.socket_path, host.log_path):
            with contextlib.suppress(OSError):
                path.unlink()


def _signal_group(host: _Host, signum: int) -> None:
    # The host is its session's leader, so its pid is the group id.  The group outlives the leader
    # while the user's code has processes in it, and its id is not reused before the group is gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(host.process.pid, signum)
