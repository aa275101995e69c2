"""The embedded runtime backend: every instance is a local ``host.py`` process on a unix socket,
sandboxed wherever the machine allows it.

A cold start follows the Fission protocol, as ``host_pool.PooledBackend`` implements it: take a
generic host from the warm pool (or start one when the pool is empty), ``POST /_/specialize`` to it,
refill the pool in the background.  The table knows a host by ``spec.instance_id``; its socket keeps
its pool name.

Isolation (``isolation``: ``auto``, ``sandbox``, ``none``; ``sandboxed`` says which one runs):

- Sandboxed (``sandbox``, and ``auto`` where ``sandbox.probe`` passes: root, bwrap, setpriv,
  cgroups): each host runs in a bubblewrap sandbox as a user of its own, in a cgroup of its own
  (``sandbox`` says what it holds).  Its files are under ``<run_dir>/sb/``: the socket folder
  ``<name>/`` (its user's; the address is ``unix://<run_dir>/sb/<name>/host.sock``), the code view
  ``<name>.code/`` and the log ``<name>.log``.  The host has no network: the backend fetches the
  archive into the node's cache itself (``code_views.CodeFetcher``), hard-links that one version into
  the view, sets the cgroup's memory to the function's, and tells the host ``file:///code/<sha256>``.
- Unsandboxed (``none``, or ``auto`` where the probe fails: said in ``isolation`` and the log): each
  host is a plain process of the agent's user, on ``unix://<run_dir>/instances/<name>.sock``; it
  downloads and unpacks its archive into the node's cache itself (``host._fetch_code``).  Single-
  tenant: nothing but its ``RLIMIT_AS`` stands between it and the platform.

Invariants (besides those of ``host_pool``; destroying a host kills its process group):

- Every host runs in its own session (``start_new_session``); stopping it signals the whole process
  group, so processes the user's code started go with it.
- Hosts start with a minimal environment (``PATH``, locale, temp dir, proxies): the node agent's
  settings and credentials never reach user code.  The function's environment comes with specialise.
- The exit callback fires only for specialised instances that exit on their own (a crash, or a host
  retiring itself after a sync timeout or ``MemoryError``), never for ``stop`` or ``close``.  A pool
  member that dies is replaced without a callback.

Code: the node's cache, ``<cache_dir>/<sha256>/``, is written through a staging dir and an atomic
rename; hosts of one archive share it (unsandboxed hosts run in it).  The cache is swept every ``code_cache_sweep_s``: a ``<sha256>/`` dir no running or
launching instance of this backend uses, and unused for ``code_cache_ttl_s``, is evicted (see
``code_cache``); the next launch of that archive downloads it again.

Restarts (see ``host_pool``): a host runs in its own session, so it outlives a node agent killed
with SIGKILL.  On ``start`` the backend looks for every host process of its folders (by command
line, in ``/proc``: a ``host.py`` whose socket is in ``instances/``, a bubblewrap that binds folders
of ``sb/``): the ones its journal names as instances, of the isolation it runs now, that are still
the same process (pid and start time) and answer their health check, are adopted (watched through a
pidfd, since they are no longer its children); every other one is killed with its whole process
group (and a sandbox's cgroup with it), the files of what was not adopted are removed, and so
are the cgroups of hosts not adopted, with whatever still runs in them.  The agent's listening socket is
not inheritable, so a host never keeps the agent's port open.

Caveats: the per-host log file (``<host name>.log`` beside the socket folder: host diagnostics and anything
the user's code prints outside an invocation) is deleted when the backend stops the host and kept when
the host exits on its own, for the post-mortem.  Nothing rotates the kept ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from faas.core.errors import Unavailable
from faas.core.procs import pid_alive, proc_stat, processes_matching
from faas.runtime.backend import InstanceExit, InstanceSpec
from faas.runtime.code_cache import DEFAULT_SWEEP_INTERVAL_S, DEFAULT_TTL_S, CodeCache
from faas.runtime.code_views import CodeFetcher, link_tree
from faas.runtime.host_pool import POOL_MEMORY_MB, PooledBackend, check_socket_path, host_client
from faas.runtime.sandbox import CODE_DIR_IN_SANDBOX, Sandbox, is_sandbox, probe, same_pid_namespace, uid_for

logger = logging.getLogger(__name__)

HOST_SCRIPT = Path(__file__).with_name("host.py")
HOST_READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 2.0
LOG_TAIL_BYTES = 2000
# What a host inherits from the node agent's environment; everything else is withheld.
# glibc gives each thread its own malloc arena, reserving 64 MiB of address space apiece; under the
# host's RLIMIT_AS cap a concurrency-16 instance then fails with "can't start new thread".
HOST_ENV = {"MALLOC_ARENA_MAX": "2"}
# A sandboxed host's whole environment (its paths are the sandbox's).
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", **HOST_ENV}
SOCKET_NAME = "host.sock"
Isolation = Literal["auto", "sandbox", "none"]

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
    uid: int | None = None  # sandboxed hosts only: its user, and its socket folder ``sb/<name>/``
    sandbox_dir: Path | None = None

    @property
    def code_dir(self) -> Path | None:
        """A sandboxed host's code view, ``sb/<name>.code/`` (its ``/code``)."""
        return None if self.sandbox_dir is None else self.sandbox_dir.with_name(f"{self.name}.code")

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
        isolation: Isolation = "auto",
    ) -> None:
        super().__init__(
            pool_size=pool_size,
            code_cache=CodeCache(
                Path(cache_dir), ttl_s=code_cache_ttl_s, sweep_interval_s=code_cache_sweep_s, max_bytes=code_cache_max_bytes
            ),
            journal_dir=Path(run_dir) / "journal",
        )
        self._socket_dir = Path(run_dir) / "instances"
        self._sandboxes_dir = Path(run_dir) / "sb"  # short: unix socket paths are limited to 107 bytes
        self._cache_dir = Path(cache_dir)
        self._python = python
        self._host_env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
        self._host_env.update(HOST_ENV)
        self._hosts: set[_Host] = set()  # every started process not yet reaped
        self._isolation_wanted = isolation
        self._sandbox: Sandbox | None = None
        # One parent cgroup per backend folder: two agents on one machine never touch each other's.
        digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
        self._cgroup_parent = f"faas-{digest}"
        self._code = CodeFetcher(self._cache_dir, self._tasks)
        self.isolation = "none: single-tenant (not started)"

    @property
    def sandboxed(self) -> bool:
        return self._sandbox is not None

    # -- RuntimeBackend -----------------------------------------------------------------------------

    async def start(self) -> None:
        if not HOST_SCRIPT.is_file():
            raise Unavailable(f"function host script missing: {HOST_SCRIPT}")
        self._choose_isolation()
        if self._sandbox is not None:
            probe_path = self._sandboxes_dir / self._new_host_name() / SOCKET_NAME
            check_socket_path(probe_path, self._sandboxes_dir)
        else:
            check_socket_path(self._socket_dir / f"{self._new_host_name()}.sock", self._socket_dir)
        try:
            for directory in (self._socket_dir, self._sandboxes_dir):
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            self.journal.prepare()
        except OSError as exc:
            raise Unavailable(f"cannot create the runtime directories: {exc}") from exc
        await self._adopt_leftovers()
        count = await self._fill_pool()
        self._sweep_code_cache_forever()
        logger.info("process backend started with %d warm hosts (isolation %s)", count, self.isolation)

    def _choose_isolation(self) -> None:
        """Sandbox the hosts when asked to or, with ``auto``, when this machine can; say which."""
        if self._isolation_wanted == "none":
            self.isolation = "none: single-tenant (isolation turned off)"
            return
        found = probe(self._cgroup_parent)
        if isinstance(found, str):
            if self._isolation_wanted == "sandbox":
                raise Unavailable(f"cannot sandbox function hosts: {found}")
            logger.warning("function hosts run unsandboxed (single-tenant): %s", found)
            self.isolation = f"none: single-tenant ({found})"
            return
        self._sandbox = Sandbox(found, HOST_SCRIPT, self._python)
        seccomp = "seccomp" if self._sandbox.seccomp is not None else "no seccomp filter on this CPU"
        self.isolation = f"sandbox: namespaces, a user per instance, {seccomp}, cgroup {found.version}"

    async def check(self) -> None:
        """Local processes need no daemon: nothing can be down here that start() did not check."""

    async def close(self) -> None:
        await super().close()
        if self._sandbox is not None:
            self._sandbox.cgroups.remove_parents()

    # -- PooledBackend hooks ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the process backend is closed")

    async def _acquire(self, spec: InstanceSpec, deadline: float) -> _Host:
        if self._sandbox is None:  # the host downloads its code itself
            host = self._take_pooled()
            self._refill_pool()
            if host is None:
                remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                host = await asyncio.wait_for(self._spawn(), remaining)
            return host
        # Sandboxed: the host has no network; the agent fetches the code and links it into its view.
        # Fetch first, take a warm host after: a failed download then wastes no pool member.
        async with asyncio.timeout_at(deadline):
            code = await self._code.fetch(spec)
            host = self._take_pooled()
            self._refill_pool()
            if host is None:
                host = await self._spawn(spec.memory_mb)
        async with self._handing_over(host, "the code and the memory limit"):
            if spec.memory_mb != POOL_MEMORY_MB:
                await asyncio.to_thread(self._sandbox.cgroups.set_memory, host.name, spec.memory_mb)
            assert host.code_dir is not None
            await asyncio.to_thread(link_tree, code, host.code_dir / spec.sha256)
        return host

    def _specialize_body(self, spec: InstanceSpec) -> dict[str, object]:
        body = spec.specialize_body()
        if self._sandbox is not None:
            body["code_url"] = f"file://{CODE_DIR_IN_SANDBOX}/{spec.sha256}"
        return body

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

    def _usage_pids(self, host: _Host) -> list[int]:
        # A sandboxed host's processes are in its cgroup (the one started is its wrapper's shell).
        if self._sandbox is not None and host.uid is not None:
            return self._sandbox.cgroups.pids(host.name)
        return [host.process.pid]

    def _journal_handle(self, host: _Host) -> dict[str, Any]:
        stat = proc_stat(host.process.pid)
        return {"pid": host.process.pid, "start_ticks": stat[1] if stat else None, "uid": host.uid}

    # -- restarts -----------------------------------------------------------------------------------

    def _leftover_hosts(self) -> list[tuple[int, str, bool]]:
        """(pid, host name, sandboxed) of every host process this backend's folders name.

        An unsandboxed host is its ``host.py`` process with a socket in ``instances/``; a sandboxed one
        is its bubblewrap process, which binds folders of ``sb/``."""
        plain = f"{self._socket_dir}/"
        boxed = f"{self._sandboxes_dir}/"

        def socket_arg(argv: list[str]) -> str | None:
            if str(HOST_SCRIPT) in argv and "--socket" in argv and argv.index("--socket") + 1 < len(argv):
                arg = argv[argv.index("--socket") + 1]
                return arg if arg.startswith(plain) else None
            return None

        def sandbox_arg(argv: list[str]) -> str | None:
            if not is_sandbox(argv):
                return None
            return next((arg for arg in argv if arg.startswith(boxed)), None)

        found = []
        for pid, argv in processes_matching(lambda argv: bool(socket_arg(argv) or sandbox_arg(argv))):
            if pid == os.getpid():
                continue
            arg = socket_arg(argv)
            if arg is not None:
                found.append((pid, Path(arg).stem, False))
                continue
            arg = sandbox_arg(argv)
            if arg is not None and same_pid_namespace(pid):
                found.append((pid, _host_name_of(Path(arg).relative_to(self._sandboxes_dir).parts[0]), True))
        return found

    async def _adopt_leftovers(self) -> None:
        entries = self.journal.read_all()
        kept: set[str] = set()
        killed = 0
        for pid, name, sandboxed in self._leftover_hosts():
            entry = entries.get(name)
            if (
                entry is not None
                and sandboxed == self.sandboxed
                and await self._adopt_process(pid, name, entry)
            ):
                kept.add(name)
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # a host leads its own session: its group goes too
            killed += 1
        for name in set(entries) - kept:
            self.journal.remove(name)
        # The files of every host that was not adopted: sockets, logs of pool members, sandboxes.
        for path in list(self._socket_dir.iterdir()) if self._socket_dir.is_dir() else []:
            if path.stem not in kept and path.suffix in (".sock", ".log"):
                with contextlib.suppress(OSError):
                    path.unlink()
        for path in list(self._sandboxes_dir.iterdir()) if self._sandboxes_dir.is_dir() else []:
            if _host_name_of(path.name) not in kept:
                if path.is_dir():
                    await asyncio.to_thread(shutil.rmtree, path, True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
        if self._sandbox is not None:
            cgroups = self._sandbox.cgroups
            for name in cgroups.names():
                if name not in kept:  # whatever is still in it: a sandbox whose bubblewrap was killed
                    await asyncio.to_thread(cgroups.kill_and_remove, name)
        if killed:
            logger.warning("killed %d function hosts a previous agent left (not adoptable)", killed)

    async def _adopt_process(self, pid: int, name: str, entry: Any) -> bool:
        if entry.handle.get("pid") != pid or not pid_alive(pid, entry.handle.get("start_ticks")):
            return False
        uid = entry.handle.get("uid") if self.sandboxed else None
        if self.sandboxed and not isinstance(uid, int):
            return False
        try:
            process = AdoptedProcess(pid)
        except OSError:
            return False
        host = self._host_record(name, process, uid)
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

    def _paths(self, name: str, sandboxed: bool) -> tuple[Path, Path, Path | None]:
        """Host ``name``'s socket, log and (sandboxed) folder."""
        if not sandboxed:
            return self._socket_dir / f"{name}.sock", self._socket_dir / f"{name}.log", None
        sandbox_dir = self._sandboxes_dir / name
        return sandbox_dir / SOCKET_NAME, self._sandboxes_dir / f"{name}.log", sandbox_dir

    def _host_record(self, name: str, process: HostProcess, uid: int | None) -> _Host:
        socket_path, log_path, sandbox_dir = self._paths(name, uid is not None)
        return _Host(
            name=name,
            socket_path=socket_path,
            log_path=log_path,
            process=process,
            client=host_client(socket_path),
            uid=uid,
            sandbox_dir=sandbox_dir,
        )

    def _argv(self, name: str, uid: int | None, sandbox_dir: Path | None, seccomp_fd: int | None) -> list[str]:
        if self._sandbox is None or uid is None or sandbox_dir is None:
            socket_path = self._socket_dir / f"{name}.sock"
            return [
                self._python, "-S", "-E", str(HOST_SCRIPT),
                "--socket", str(socket_path), "--cache-dir", str(self._cache_dir), "--instance-id", name,
            ]  # fmt: skip
        return self._sandbox.argv(
            name=name,
            uid=uid,
            socket_dir=sandbox_dir,
            code_dir=sandbox_dir.with_name(f"{name}.code"),
            seccomp_fd=seccomp_fd,
        )

    def _prepare_sandbox(self, name: str, uid: int, memory_mb: int) -> Path:
        """The sandbox's folders (the socket folder its user's, the code view the agent's) and cgroups."""
        assert self._sandbox is not None
        sandbox_dir = self._sandboxes_dir / name
        sandbox_dir.mkdir(mode=0o700)
        os.chown(sandbox_dir, uid, uid)
        (self._sandboxes_dir / f"{name}.code").mkdir(mode=0o755)
        self._sandbox.cgroups.create(name, memory_mb)
        return sandbox_dir

    async def _spawn(self, memory_mb: int = POOL_MEMORY_MB) -> _Host:
        """Start a generic host and wait until it answers ``GET /_/health``."""
        self._check_open()
        name = self._new_host_name()
        uid: int | None = None
        sandbox_dir: Path | None = None
        if self._sandbox is not None:
            uid = uid_for(name, (h.uid for h in self._hosts if h.uid is not None))
            try:
                sandbox_dir = await asyncio.to_thread(self._prepare_sandbox, name, uid, memory_mb)
            except OSError as exc:
                await asyncio.to_thread(self._remove_sandbox, name)
                raise Unavailable(f"cannot prepare a sandbox for a function host: {exc}") from exc
        _, log_path, _ = self._paths(name, uid is not None)
        env = dict(SANDBOX_ENV) if sandbox_dir is not None else self._host_env
        seccomp_fd = self._sandbox.seccomp_fd() if sandbox_dir is not None and self._sandbox is not None else None
        try:
            with log_path.open("ab") as log:
                process = await asyncio.create_subprocess_exec(
                    *self._argv(name, uid, sandbox_dir, seccomp_fd),
                    pass_fds=() if seccomp_fd is None else (seccomp_fd,),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    env=env,
                    cwd=self._cache_dir,
                )
        except OSError as exc:
            if sandbox_dir is not None:
                await asyncio.to_thread(self._remove_sandbox, name)
            raise Unavailable(f"cannot start a function host with {self._python}: {exc}") from exc
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)  # bubblewrap has its copy
        host = self._host_record(name, process, uid)
        self._hosts.add(host)
        self._tasks.spawn(self._watch(host), name=f"watch-{name}")
        async with self._destroy_on_failure(host):
            await self._wait_ready(host, HOST_READY_TIMEOUT_S)
        return host

    def _signal(self, host: _Host, signum: int) -> None:
        """Signal every process of the host: its process group, and its sandbox's cgroup."""
        _signal_group(host, signum)
        if host.uid is not None and self._sandbox is not None:
            self._sandbox.cgroups.signal(host.name, signum)

    def _remove_sandbox(self, name: str, *, keep_log: bool = False) -> None:
        """Kill what is left in the sandbox's cgroups, remove them and its folder (blocking)."""
        if self._sandbox is not None:
            self._sandbox.cgroups.kill_and_remove(name)
        for folder in (name, f"{name}.code"):
            shutil.rmtree(self._sandboxes_dir / folder, ignore_errors=True)
        if not keep_log:
            with contextlib.suppress(OSError):
                (self._sandboxes_dir / f"{name}.log").unlink()

    async def _watch(self, host: _Host) -> None:
        returncode = await host.process.wait()
        self._hosts.discard(host)
        if host.stopping:
            return
        self.journal.remove(host.name)
        oom_killed = False
        if host.uid is not None and self._sandbox is not None:
            oom_killed = self._sandbox.cgroups.oom_killed(host.name)
        self._signal(host, signal.SIGKILL)  # whatever the user's code left behind
        if host.sandbox_dir is not None:
            await asyncio.to_thread(self._remove_sandbox, host.name, keep_log=True)
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
                "instance %s (host %s) exited on its own with code %s%s; log kept at %s",
                iid,
                host.name,
                returncode,
                " (OOM-killed: over its memory limit)" if oom_killed else "",
                host.log_path,
            )
            if self._exit_callback is not None:
                # Memory over RLIMIT_AS shows in-band (MemoryError: a 507); a sandbox over its cgroup's
                # limit is OOM-killed and said so; another SIGKILL may be anyone's.
                await self._exit_callback(
                    InstanceExit(
                        instance_id=iid,
                        exit_code=returncode,
                        oom_killed=oom_killed,
                        detail=f"function host exited with code {returncode}" + (" (OOM-killed)" if oom_killed else ""),
                    )
                )
        elif host in self._pool:
            self._pool.remove(host)
            logger.warning("warm host %s exited with code %s; replacing it", host.name, returncode)
            self._refill_pool()

    async def _destroy(self, host: _Host) -> None:
        """SIGTERM the host's processes, SIGKILL after ``STOP_GRACE_S``; remove its files (and sandbox)."""
        host.stopping = True
        if host.process.returncode is None:
            self._signal(host, signal.SIGTERM)
            try:
                await asyncio.wait_for(host.process.wait(), STOP_GRACE_S)
            except TimeoutError:
                self._signal(host, signal.SIGKILL)
                await host.process.wait()
        self._signal(host, signal.SIGKILL)
        self._hosts.discard(host)
        self.journal.remove(host.name)
        await host.client.aclose()
        if host.sandbox_dir is not None:
            await asyncio.to_thread(self._remove_sandbox, host.name)
        for path in (host.socket_path, host.log_path):
            with contextlib.suppress(OSError):
                path.unlink()


def _host_name_of(entry: str) -> str:
    """The host a file of ``sb/`` belongs to: ``<name>/``, ``<name>.code/``, ``<name>.log``."""
    return entry.split(".", 1)[0]


def _signal_group(host: _Host, signum: int) -> None:
    # The host (or its bubblewrap) is its session's leader, so its pid is the group id.  The group
    # outlives the leader while the user's code has processes in it, and its id is not reused before
    # the group is gone.  A sandbox's processes are in sessions of their own: ``_signal`` finds them.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(host.process.pid, signum)
