"""The process backend's isolation: each host in a bubblewrap sandbox, as its own user, in its own cgroup.

What a sandboxed host gets (``Sandbox.argv``; bubblewrap runs as root, only to build the sandbox):

- Namespaces: mount, PID, IPC, network (loopback only, nothing listening), UTS and cgroup.  The host
  sees its own processes only, and can reach no socket of the machine but the ones bound into it.
- A file system of its own: a tmpfs root holding ``/usr`` (and the ``/bin``, ``/lib*`` that point
  into it) read-only, the interpreter's prefix read-only, ``/faas/host.py`` (and ``app_host.py``) read-only, its code view
  on ``/code`` read-only (``code_views``: hard links of exactly the one archive it runs), its socket
  folder on ``/run/faas`` (the only writable bind), a fresh ``/proc`` and ``/dev``, and a private
  ``/tmp`` (tmpfs of ``TMP_BYTES``, charged to its memory cgroup).  Nothing of the platform's home,
  data or other functions' code is in it.
- An unprivileged user of its own (``uid_for``: one uid per host, never 0, no supplementary groups),
  no capabilities (bounding set empty), ``no_new_privs``: ``setpriv`` drops everything inside the
  sandbox before the interpreter starts.  A user code that escapes the namespaces is still that uid.
- A cgroup per host (``Cgroups``), joined by the wrapper shell before bubblewrap starts, so every
  process of the sandbox is in it from its first instruction: memory for the whole sandbox (children
  and ``/tmp`` included; swap capped), ``PIDS_LIMIT`` tasks, one CPU.  cgroup v2 where the machine
  mounts it unified; else the v1 ``memory``, ``pids`` and ``cpu`` hierarchies.
- A seccomp filter (``seccomp``, x86-64): no new namespaces, mounts, kernel modules, keyrings, ``bpf``
  and the like; every other system call as usual.
- Its file descriptors: stdin ``/dev/null``, stdout and stderr its log file; nothing else is inherited.
- It outlives the node agent (an agent killed with SIGKILL finds it again and adopts it), so nothing
  ties it to the agent's life: the backend kills a host by signalling every process of its cgroup
  (``Cgroups.signal``); killing the sandbox's PID 1 takes every process in its PID namespace.

Availability (``probe``): root (to set up namespaces and cgroups and switch users), ``bwrap`` and
``setpriv`` on the ``PATH``, and the three cgroup controllers writable.  Where any is missing the
process backend runs without isolation and says so (``faas status``: single-tenant).

Caveats: the seccomp filter is a deny list for x86-64 only (elsewhere there is none); the uid is derived from
the host's random name, so two node agents on one machine may, rarely, give two hosts the same uid
(their namespaces still keep them apart); the interpreter is the platform's own, so its standard
library is visible read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from faas.runtime.host_pool import PIDS_LIMIT
from faas.runtime.seccomp import filter_program

__all__ = ["Cgroups", "Sandbox", "is_sandbox", "probe", "same_pid_namespace", "uid_for"]

CPU_PERIOD_US = 100_000
CPU_QUOTA_US = 100_000  # one CPU
TMP_BYTES = 64 * 1024 * 1024
# The host's own interpreter and code, resident, on top of the function's memory.
HOST_RESIDENT_MIB = 32
UID_BASE = 1_000_000
UID_SPAN = 1 << 24
SOCKET_DIR_IN_SANDBOX = "/run/faas"
CODE_DIR_IN_SANDBOX = "/code"
HOST_IN_SANDBOX = "/faas/host.py"
APP_HOST_IN_SANDBOX = "/faas/app_host.py"  # beside it: the host loads it when it serves an app
CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu")
KILL_WAIT_S = 5.0


def is_sandbox(argv: list[str]) -> bool:
    """True if ``argv`` is a sandbox's bubblewrap (the one the backend started, or its copy inside)."""
    return bool(argv) and os.path.basename(argv[0]) == "bwrap" and "--unshare-pid" in argv


def same_pid_namespace(pid: int) -> bool:
    """True if ``pid`` runs in this process's PID namespace: a sandbox's own bubblewrap, not the copy
    of it that is PID 1 inside (both have the same command line)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def uid_for(name: str, taken: Iterable[int] = ()) -> int:
    """The unprivileged uid of host ``name``: derived from its name, the next free one if taken."""
    used = set(taken)
    uid = UID_BASE + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % UID_SPAN
    while uid in used:
        uid = UID_BASE + (uid - UID_BASE + 1) % UID_SPAN
    return uid


class Cgroups:
    """One cgroup per host under ``<root>/<parent>/``, in every hierarchy that has a controller we use."""

    def __init__(self, parent: str, *, v2: bool) -> None:
        self.parent = parent
        self.v2 = v2
        if v2:
            self._bases = [CGROUP_ROOT / parent]
        else:
            self._bases = [CGROUP_ROOT / controller / parent for controller in V1_CONTROLLERS]

    @property
    def version(self) -> str:
        return "v2" if self.v2 else "v1 (memory, pids, cpu)"

    @classmethod
    def detect(cls, parent: str) -> Cgroups | str:
        """The cgroups this machine lets us create, or why it does not."""
        if (CGROUP_ROOT / "cgroup.controllers").is_file():
            available = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
            missing = [c for c in V1_CONTROLLERS if c not in available]
            if missing:
                return f"cgroup v2 lacks the {', '.join(missing)} controller(s)"
            return cls(parent, v2=True)
        for controller in V1_CONTROLLERS:
            if not (CGROUP_ROOT / controller / "cgroup.procs").is_file():
                return f"no cgroup v1 {controller} hierarchy at {CGROUP_ROOT / controller}"
        return cls(parent, v2=False)

    def prepare(self) -> None:
        """Create the parent cgroups (and, on v2, delegate the controllers to them)."""
        if self.v2:
            _enable_controllers(CGROUP_ROOT)
            self._bases[0].mkdir(exist_ok=True)
            _enable_controllers(self._bases[0])
        else:
            for base in self._bases:
                base.mkdir(exist_ok=True)

    def dirs(self, name: str) -> list[Path]:
        return [base / name for base in self._bases]

    def create(self, name: str, memory_mb: int) -> None:
        """A cgroup for host ``name`` with its limits; ``OSError`` if the kernel refuses."""
        for path in self.dirs(name):
            path.mkdir(exist_ok=True)
        if self.v2:
            path = self.dirs(name)[0]
            _write(path / "pids.max", PIDS_LIMIT)
            _write(path / "cpu.max", f"{CPU_QUOTA_US} {CPU_PERIOD_US}")
            with contextlib.suppress(FileNotFoundError):  # no swap controller: nothing to cap
                _write(path / "memory.swap.max", 0)
        else:
            memory, pids, cpu = self.dirs(name)
            _write(pids / "pids.max", PIDS_LIMIT)
            _write(cpu / "cpu.cfs_period_us", CPU_PERIOD_US)
            _write(cpu / "cpu.cfs_quota_us", CPU_QUOTA_US)
        self.set_memory(name, memory_mb)

    def set_memory(self, name: str, memory_mb: int) -> None:
        """Limit the whole sandbox to ``memory_mb`` plus the host's own ``HOST_RESIDENT_MIB``, swap included."""
        limit = (memory_mb + HOST_RESIDENT_MIB) * 1024 * 1024
        if self.v2:
            _write(self.dirs(name)[0] / "memory.max", limit)
            return
        memory = self.dirs(name)[0]
        memsw = memory / "memory.memsw.limit_in_bytes"
        if not memsw.exists():  # the kernel accounts no swap: the memory limit alone
            _write(memory / "memory.limit_in_bytes", limit)
            return
        # v1 keeps limit <= memsw limit at every step: raise memsw first, lower it last.
        current = int((memory / "memory.limit_in_bytes").read_text())
        order = [memsw, memory / "memory.limit_in_bytes"] if limit > current else [memory / "memory.limit_in_bytes", memsw]
        for path in order:
            _write(path, limit)

    def join_script(self, name: str) -> str:
        """A shell fragment that moves the shell itself into host ``name``'s cgroups."""
        return " && ".join(f"echo $$ > {shlex.quote(str(path / 'cgroup.procs'))}" for path in self.dirs(name))

    def pids(self, name: str) -> list[int]:
        try:
            text = (self.dirs(name)[0] / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split()]

    def signal(self, name: str, signum: int) -> None:
        for pid in self.pids(name):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def kill_and_remove(self, name: str) -> None:
        """SIGKILL every process of host ``name``'s cgroups, then remove them (blocking, briefly)."""
        give_up_at = time.monotonic() + KILL_WAIT_S
        while self.pids(name) and time.monotonic() < give_up_at:
            self.signal(name, signal.SIGKILL)
            time.sleep(0.01)
        self.remove(name)

    def remove(self, name: str) -> None:
        for path in self.dirs(name):
            for _ in range(50):  # the last exiting task may still be leaving
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)

    def oom_killed(self, name: str) -> bool:
        """True if the kernel's OOM killer killed a process of host ``name`` for its memory limit."""
        path = self.dirs(name)[0] / ("memory.events" if self.v2 else "memory.oom_control")
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove_parents(self) -> None:
        """Remove the parent cgroups if no host cgroup is left in them."""
        for base in self._bases:
            with contextlib.suppress(OSError):
                base.rmdir()

    def names(self) -> list[str]:
        """The host cgroups that exist under the parent (a previous agent's included)."""
        base = self._bases[0]
        if not base.is_dir():
            return []
        return [path.name for path in base.iterdir() if path.is_dir()]


def _enable_controllers(path: Path) -> None:
    wanted = [c for c in V1_CONTROLLERS if c not in (path / "cgroup.subtree_control").read_text().split()]
    if wanted:
        _write(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))


def _write(path: Path, value: object) -> None:
    with open(path, "w") as fh:
        fh.write(f"{value}\n")


def probe(parent: str) -> Cgroups | str:
    """The cgroups to sandbox hosts with, or why hosts cannot be sandboxed on this machine."""
    if os.geteuid() != 0:
        return "the node agent is not root (sandboxes need it to switch users and create cgroups)"
    for tool, package in (("bwrap", "bubblewrap"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package {package})"
    cgroups = Cgroups.detect(parent)
    if isinstance(cgroups, str):
        return cgroups
    try:
        cgroups.prepare()
    except OSError as exc:
        return f"cannot create cgroups: {exc}"
    return cgroups


class Sandbox:
    """How to start a host inside its sandbox."""

    def __init__(self, cgroups: Cgroups, host_script: Path, python: str) -> None:
        self.cgroups = cgroups
        self.host_script = host_script
        self.python = os.path.realpath(python)
        self.prefix = os.path.realpath(sys.base_prefix)
        self.bwrap = shutil.which("bwrap") or "bwrap"
        self.setpriv = shutil.which("setpriv") or "setpriv"
        self.seccomp = filter_program()

    def seccomp_fd(self) -> int | None:
        """A file holding the seccomp filter, for one start (the caller passes it on and closes it)."""
        if self.seccomp is None:
            return None
        fd = os.memfd_create("faas-seccomp")
        os.write(fd, self.seccomp)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def argv(self, *, name: str, uid: int, socket_dir: Path, code_dir: Path, seccomp_fd: int | None) -> list[str]:
        """The command that starts host ``name`` in its sandbox, already in its cgroups."""
        sandbox = [
            self.bwrap,
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--new-session",
            # For setpriv only, inside: it drops them all before the interpreter starts.
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
            "--ro-bind", "/usr", "/usr",
            *_system_dirs(),
            *_ro_bind_with_parents(self.prefix),
            "--perms", "0755", "--dir", os.path.dirname(HOST_IN_SANDBOX),
            "--ro-bind", str(self.host_script), HOST_IN_SANDBOX,
            "--ro-bind", str(self.host_script.with_name("app_host.py")), APP_HOST_IN_SANDBOX,
            "--perms", "0755", "--dir", CODE_DIR_IN_SANDBOX,
            "--ro-bind", str(code_dir), CODE_DIR_IN_SANDBOX,
            "--perms", "0755", "--dir", "/run",
            "--bind", str(socket_dir), SOCKET_DIR_IN_SANDBOX,
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(TMP_BYTES), "--perms", "1777", "--tmpfs", "/tmp",
            "--chdir", "/tmp",
            *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
            self.setpriv,
            f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
            self.python, "-S", "-E", HOST_IN_SANDBOX,
            "--socket", f"{SOCKET_DIR_IN_SANDBOX}/host.sock",
            "--cache-dir", CODE_DIR_IN_SANDBOX,
            "--instance-id", name,
        ]  # fmt: skip
        # The shell joins the cgroups, then becomes bubblewrap: the pid the backend watches.
        return ["/bin/sh", "-c", f'{self.cgroups.join_script(name)} && exec "$@"', "sh", *sandbox]


def _system_dirs() -> list[str]:
    """``/bin``, ``/lib``... as on this machine: symlinks into ``/usr`` (merged /usr) or read-only binds."""
    args: list[str] = []
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _ro_bind_with_parents(path: str) -> list[str]:
    """A read-only bind of ``path`` at the same place, its parents made traversable (unless under /usr)."""
    if path == "/usr" or path.startswith("/usr/"):
        return []
    args: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(len(parts)):
        args += ["--perms", "0755", "--dir", "/" + "/".join(parts[: i + 1])]
    return args + ["--ro-bind", path, path]
