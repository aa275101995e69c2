"""A function that tries to escape, on both backends: Docker containers, and the process backend's
sandboxes (bubblewrap namespaces, a user and a cgroup per host: ``faas/runtime/sandbox.py``).

One probe function, deployed beside a "victim" function with a secret in its environment and in its
code, tries each escape issue 10 lists and reports what happened; the test asserts each attempt
failed and says which mechanism stopped it:

- read the environment of the platform's processes and of other functions (``/proc/*/environ``):
  the PID namespace shows none of them;
- read the platform's data (etcd's, Valkey's, the keys) and the victim's unpacked code: the mount
  namespace holds only its own code view (``/code``), read-only;
- connect to etcd, Valkey, S3, the gateway and the node agent on loopback: the network namespace has
  nothing listening (Docker: network ``none``);
- connect to the victim's instance socket: its path is not in the probe's file system;
- use a file descriptor inherited from the platform (a listening socket): none is inherited;
- fork past the pids limit: the cgroup's ``pids.max`` stops it;
- children that together exceed the memory limit: the memory cgroup kills them (the whole instance);
- write to the system files, or hold a capability: read-only binds, every capability dropped, and
  (process backend) a user of its own, not root;
- make a user or network namespace, mount, or use the kernel keyrings: the seccomp filter refuses them.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from faas.runtime.host_pool import PIDS_LIMIT
from tests.conftest import Platform, missing_service
from tests.helpers import deploy

pytestmark = [pytest.mark.integration]

VICTIM = """
SECRET_IN_CODE = "victim-code-secret-7f3a"

def handler(event, context):
    return {"ok": True}
"""

PROBE = r"""
import os, socket, subprocess, sys, time

def _attempt(fn):
    try:
        return {"ok": True, "got": fn()}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

def _environs():
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    found.append(f.read().decode(errors="replace"))
            except OSError:
                pass
    return found

def _read(path):
    with open(path, "rb") as f:
        return f.read(64).decode(errors="replace")

def _connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"

def _connect_unix(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(path)
        return "connected"

def _fds():
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        family = None
        if target.startswith("socket:"):
            try:
                with socket.socket(fileno=os.dup(int(fd))) as s:
                    family = s.family.name
            except OSError:
                family = "unknown"
        found[fd] = {"target": target, "family": family}
    return found

def _forks(limit):
    children, error = [], None
    for _ in range(limit):
        try:
            pid = os.fork()
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(children), "error": error}

def _memory_children(mib_each, count):
    script = f"b = bytearray({mib_each} * 1024 * 1024); import time; time.sleep(3)"
    procs = [subprocess.Popen([sys.executable, "-S", "-c", script]) for _ in range(count)]
    return [p.wait() for p in procs]

def _write_image():
    with open("/usr/lib/escape-probe", "w") as f:
        f.write("x")
    return "written"

def _capabilities():
    with open("/proc/self/status") as f:
        return [line.split()[1] for line in f if line.startswith("CapEff")][0]

def handler(event, context):
    action = event["action"]
    if action == "environ":
        return {"environs": _environs(), "pids": sorted(p for p in os.listdir("/proc") if p.isdigit())}
    if action == "read":
        return {path: _attempt(lambda path=path: _read(path)) for path in event["paths"]}
    if action == "listdir":
        return {path: _attempt(lambda path=path: sorted(os.listdir(path))) for path in event["paths"]}
    if action == "connect":
        return {str(port): _attempt(lambda port=port: _connect(port)) for port in event["ports"]}
    if action == "connect_unix":
        return {path: _attempt(lambda path=path: _connect_unix(path)) for path in event["paths"]}
    if action == "fds":
        return _fds()
    if action == "syscalls":
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        def outcome(result):
            return "ok" if result == 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
        return {
            "unshare(CLONE_NEWUSER)": outcome(libc.unshare(0x10000000)),
            "unshare(CLONE_NEWNET)": outcome(libc.unshare(0x40000000)),
            "keyctl": outcome(libc.syscall(250, 0, 0, 0, 0)),
            "mount": outcome(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
        }
    if action == "uid":
        return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
    if action == "fork":
        return _forks(event["limit"])
    if action == "memory":
        return {"exits": _memory_children(event["mib_each"], event["count"])}
    if action == "write":
        return _attempt(_write_image)
    if action == "caps":
        return {"CapEff": _capabilities()}
    return {"unknown": action}
"""


async def probe(gw: httpx.AsyncClient, event: dict[str, object]) -> dict[str, object]:
    resp = await gw.post("/v1/functions/escape-probe/invoke", json=event)
    assert resp.status_code == 200, resp.text
    result: dict[str, object] = resp.json()
    return result


def require_isolation(platform: Platform) -> None:
    """Skip (fail in CI) where the process backend cannot sandbox: it then runs single-tenant."""
    if platform.settings.runtime == "process" and (os.geteuid() != 0 or shutil.which("bwrap") is None):
        missing_service("the process backend sandboxes hosts only as root with bubblewrap (make test installs it)")


def host_sockets(platform: Platform) -> list[str]:
    """Every instance socket of the platform's nodes, as paths on this machine."""
    home = platform.settings.home
    patterns = ("nodes/*/run/sb/*/host.sock", "nodes/*/run/instances/*.sock", "nodes/*/run/containers/*/host.sock")
    return sorted(str(path) for pattern in patterns for path in home.glob(pattern))


async def test_a_function_cannot_reach_the_platform_or_other_functions(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    s = platform.settings
    require_isolation(platform)
    victim = await deploy(gw, "escape-victim", VICTIM, environment={"VICTIM_TOKEN": "victim-env-secret-91c2"})
    assert (await gw.post("/v1/functions/escape-victim/invoke", json={})).status_code == 200
    # 512 MB: room for a fork bomb's children to reach the pids limit before the memory limit.
    await deploy(gw, "escape-probe", PROBE, memory_mb=512, timeout_s=60)

    # The environment of every process it can see: its own host only (PID namespace).
    seen = await probe(gw, {"action": "environ"})
    environs = "\n".join(seen["environs"])  # type: ignore[arg-type]
    for secret in ("FAAS_", "victim-env-secret-91c2", s.webhook_secret, "redis://"):
        assert secret not in environs, (
            f"{secret!r} is readable through /proc (the PID namespace should hide it)"
        )

    # The platform's data and keys, and the victim's code: not in its filesystem.
    sha = victim["config"]["code"]["sha256"]
    paths = [
        str(s.home / "admin.key"), str(s.home / "valkey.secret"), str(s.home / "s3.secret"),
        str(s.home / "etcd-tls" / "client.key"),
        str(s.home / "valkey" / "valkey.conf"), str(s.home / "etcd"), f"/code/{sha}/handler.py",
        "/proc/1/root/etc/shadow",
    ]  # fmt: skip
    reads = await probe(gw, {"action": "read", "paths": paths})
    for path, outcome in reads.items():
        assert not outcome["ok"], f"{path} was readable: {outcome}"  # type: ignore[index]
    listed = await probe(gw, {"action": "listdir", "paths": ["/code", str(s.home)]})
    assert listed["/code"]["ok"] and sha not in listed["/code"]["got"], listed  # type: ignore[index]
    assert not listed[str(s.home)]["ok"], listed  # type: ignore[index]

    # The platform's servers on loopback: the instance's network namespace has nothing listening.
    ports = [s.etcd_host_port[1], s.redis_port, s.s3_port, s.gateway_port]
    connected = await probe(gw, {"action": "connect", "ports": ports})
    for port, outcome in connected.items():
        assert not outcome["ok"], f"port {port} answered from inside the instance: {outcome}"  # type: ignore[index]

    # The other instances' sockets (the victim's among them): not in its file system.
    sockets = host_sockets(platform)
    if s.runtime == "process":  # every host is sandboxed (CI has root, bwrap and cgroups)
        assert sockets and all("/run/sb/" in path for path in sockets), sockets
    assert len(sockets) >= 2, sockets
    for path, outcome in (await probe(gw, {"action": "connect_unix", "paths": sockets})).items():
        assert not outcome["ok"], f"instance socket {path} answered from inside the probe: {outcome}"  # type: ignore[index]

    # No file descriptor of the platform's: no network socket at all, nothing of the platform's home.
    for fd, info in (await probe(gw, {"action": "fds"})).items():
        assert info["family"] in (None, "AF_UNIX"), f"fd {fd} is an inherited network socket: {info}"  # type: ignore[index]
        assert str(s.home) not in info["target"] or info["target"].endswith(".log"), (  # type: ignore[index]
            f"fd {fd} opens the platform's files: {info}"
        )

    # No new namespaces (a user namespace would give it capabilities in one), no mounts, no kernel
    # keyrings: the seccomp filter (Docker's default profile; the sandbox's own) refuses them.
    for call, result in (await probe(gw, {"action": "syscalls"})).items():
        assert result == "EPERM", f"{call} answered {result} inside the instance"

    # A user of its own: not root, no supplementary groups.
    ids = await probe(gw, {"action": "uid"})
    assert ids["uid"] != 0 and ids["gid"] != 0 and ids["groups"] in ([], [ids["gid"]]), ids

    # Forking past the pids limit: the cgroup's pids.max stops it.
    forks = await probe(gw, {"action": "fork", "limit": PIDS_LIMIT + 50})
    assert forks["error"] and forks["forked"] < PIDS_LIMIT, forks  # type: ignore[operator]

    # The system files are read-only, and no capability is left.
    assert not (await probe(gw, {"action": "write"}))["ok"]
    assert (await probe(gw, {"action": "caps"}))["CapEff"] == "0000000000000000"


async def test_children_that_together_exceed_the_memory_limit_are_killed(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    require_isolation(platform)
    await deploy(gw, "escape-probe", PROBE, memory_mb=128, timeout_s=60)
    # Four children of 100 MiB each: 400 MiB against the instance's cgroup (128 MiB in a container;
    # 128 MiB + the host's own 32 MiB in a sandbox).
    resp = await gw.post(
        "/v1/functions/escape-probe/invoke", json={"action": "memory", "mib_each": 100, "count": 4}
    )
    if resp.status_code == 200:
        exits = resp.json()["exits"]
        assert any(code != 0 for code in exits), f"every child kept its 100 MiB: {exits}"
    else:  # the OOM killer took the host itself: the instance ends, the call fails, nothing leaks out
        assert resp.status_code in (500, 502, 507), resp.text
