"""Invocation latency and throughput of the platform, against its floor: the function host called directly.

Run from the repository root (``bench/README.md`` explains every figure)::

    .venv/bin/python bench/invoke_latency.py            # full run, 3-4 minutes
    .venv/bin/python bench/invoke_latency.py --quick    # smoke run, about 1 minute
    .venv/bin/python bench/invoke_latency.py --profile-dir /tmp/prof   # plus py-spy hotspots

One run starts a private embedded platform in a temp dir (process backend, real etcd, Valkey and
SeaweedFS, through the launcher ``faas up`` uses), deploys a no-op function and measures

- cold start: ``POST /v1/functions/{name}/invoke`` to a function with no instance.  Every sample
  deploys a fresh function name (same archive), so "no instance running" holds without waiting for
  the reaper; each sample is deleted afterwards and the reaper stops its instance;
- warm latency at concurrency 1 (p50/p99 over M sequential calls), through the gateway and directly
  at the same instance's unix socket (``POST /_/invoke``, same body, the headers a dispatcher sends);
- warm throughput at concurrency 16 for a fixed duration, in two shapes: a concurrency-1 function that
  scales out to ~16 instances, and a concurrency-16 function on one instance.  The direct side drives
  exactly the instances the platform used, never more calls in flight per instance than its
  concurrency;
- CPU seconds per phase from ``/proc``: the machine's, this run's process tree's, and (for the c=1
  gateway phase) each platform process's, per call.

Caveats:
- the load generator is one asyncio process (one ``httpx.AsyncClient`` with keep-alive per target) on
  the same cores as every platform process, so each figure includes the client's own CPU cost, and
  CPU used by other processes on the machine shows up as "other" in the CPU lines: a run with a large
  "other" share is not a clean measurement;
- every cold sample after the first reuses the archive the node already unpacked (the code cache is
  keyed by sha256), so the S3 download is in the "first cold start" line only;
- with fewer than 100 cold samples the nearest-rank p99 is the maximum;
- CPU of a process that exits during a phase lands in "other processes" (of this run, only cold-start
  instances exit; other workloads' short-lived processes are not named in the "largest" list).

The platform is always stopped (``finally``); only processes this script started are signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from faas.core import keys
from faas.core.etcd import Etcd
from faas.core.models import InstanceRecord, LeaderRecord
from faas.core.rendezvous import rank
from faas.core.service import etcd_from_settings
from faas.core.settings import Settings
from faas.launcher.embedded import ADMIN_KEY_FILE, EmbeddedCluster, settings_for_test

NAMESPACE = "default"
HANDLER_CODE = "def handler(event, context):\n    return event\n"
EVENT = b'{"bench": 1}'
JSON_HEADERS = {"content-type": "application/json"}
CONCURRENCY = 16
WARM_FUNCTION = "noop-warm"  # concurrency 1, max_instances 20: c=1 figures and the scale-out c=16 figures
WIDE_FUNCTION = "noop-c16"  # concurrency 16, max_instances 1: the one-instance c=16 figures
COLD_PREFIX = "noop-cold"
WARM_MAX_INSTANCES = 20
MEMORY_MB = 128
REQUEST_TIMEOUT_S = 60.0
REAP_WAIT_S = 30.0
SCALE_WARMUP_MAX_S = 15.0
PROFILE_RATE_HZ = 100
TOP_HOTSPOTS = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


class BenchError(Exception):
    """The benchmark could not measure what it meant to (a failed deploy, an error on a sequential call)."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Plan and statistics


@dataclass(frozen=True, slots=True)
class Plan:
    cold_samples: int
    warm_calls: int
    warmup_calls: int
    load_s: float
    load_warmup_s: float
    cold_pause_s: float
    profile_s: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            cold_samples=args.cold or (5 if quick else 20),
            warm_calls=args.warm or (300 if quick else 2000),
            warmup_calls=50 if quick else 200,
            load_s=args.duration or (3.0 if quick else 10.0),
            load_warmup_s=1.0 if quick else 2.0,
            # Lets the node agent refill its pool of generic hosts, so each sample takes a pooled one.
            cold_pause_s=1.0,
            profile_s=max(1, round(args.profile_seconds)),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: with fewer than 100 values, p99 is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


@dataclass(slots=True)
class Latencies:
    seconds: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return percentile(self.seconds, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.seconds, 99) * 1000


# --------------------------------------------------------------------------------------------------
# CPU accounting from /proc


@dataclass(frozen=True, slots=True)
class ProcCpu:
    name: str  # /proc/<pid>/comm
    ppid: int
    cpu_s: float  # utime + stime


def all_processes() -> dict[int, ProcCpu]:
    out: dict[int, ProcCpu] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()  # fields 3.. of proc(5)
        out[int(entry)] = ProcCpu(name, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def descendants(procs: dict[int, ProcCpu], root: int) -> frozenset[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for pid, proc in procs.items():
        children[proc.ppid].append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return frozenset(found)


def machine_busy_s() -> tuple[float, float]:
    """(busy, steal): CPU seconds of all cores since boot running anything, and taken by the hypervisor."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fh.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    at: float
    machine_s: float
    steal_s: float
    procs: dict[int, ProcCpu]
    ours: frozenset[int]  # this process and its descendants: platform services, servers, hosts, py-spy

    @classmethod
    def take(cls) -> CpuSnapshot:
        procs = all_processes()
        busy, steal = machine_busy_s()
        return cls(time.monotonic(), busy, steal, procs, descendants(procs, os.getpid()))


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU used between two snapshots: the machine's, this run's per pid, other processes' by name."""

    elapsed_s: float
    machine_s: float
    steal_s: float
    per_pid: dict[int, float]
    others: dict[str, float]  # CPU seconds of processes outside this run, by command name

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
        per_pid: dict[int, float] = {}
        others: dict[str, float] = defaultdict(float)
        for pid, proc in after.procs.items():
            earlier = before.procs.get(pid)
            used = proc.cpu_s - (earlier.cpu_s if earlier is not None else 0.0)
            if pid in after.ours:
                per_pid[pid] = used
            elif used > 0:
                others[proc.name] += used
        return cls(
            after.at - before.at,
            after.machine_s - before.machine_s,
            after.steal_s - before.steal_s,
            per_pid,
            others,
        )

    @property
    def ours_s(self) -> float:
        return sum(self.per_pid.values())

    def cores(self, seconds: float) -> float:
        return seconds / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def summary(self) -> str:
        other = max(0.0, self.machine_s - self.ours_s)
        top = ", ".join(
            f"{name} {self.cores(cpu):.2f}"
            for name, cpu in sorted(self.others.items(), key=lambda item: -item[1])[:3]
            if self.cores(cpu) >= 0.01
        )
        steal = self.cores(self.steal_s)
        return (
            f"machine busy {self.cores(self.machine_s):.2f} of {os.cpu_count()} cores: "
            f"this run {self.cores(self.ours_s):.2f}, other processes {self.cores(other):.2f}"
            + (f" (largest still running: {top})" if top else "")
            + (f"; stolen by the hypervisor {steal:.2f}" if steal >= 0.01 else "")
        )


async def with_cpu(coro: Awaitable[T]) -> tuple[T, CpuUsage]:
    """Await ``coro`` and return its result with the CPU used meanwhile."""
    before = CpuSnapshot.take()
    result = await coro
    return result, CpuUsage.between(before, CpuSnapshot.take())


# --------------------------------------------------------------------------------------------------
# Targets: the gateway, or instances' function hosts directly


@dataclass(slots=True)
class Target:
    """Where calls go: ``slots`` holds one URL per call allowed in flight at once (a URL may repeat)."""

    label: str
    client: httpx.AsyncClient
    slots: list[str]
    direct: bool

    def headers(self) -> dict[str, str]:
        if not self.direct:
            return JSON_HEADERS
        # What the dispatcher sends a host (``Dispatcher._call``): a request id and a deadline.
        deadline_ms = int((time.time() + REQUEST_TIMEOUT_S) * 1000)
        return {**JSON_HEADERS, "x-faas-request-id": uuid.uuid4().hex, "x-faas-deadline-ms": str(deadline_ms)}


def admin_headers(home: Path) -> dict[str, str]:
    """The admin API key the launcher made for the platform under ``home`` (once it has started)."""
    return {"Authorization": f"Bearer {(home / ADMIN_KEY_FILE).read_text().strip()}"}


class AdminKey(httpx.Auth):
    """Sends the platform's admin key, read when the first request goes out (after the start)."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers.update(admin_headers(self.home))
        yield request


def new_gateway_client(home: Path) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY * 2)
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False, auth=AdminKey(home))


def gateway_target(client: httpx.AsyncClient, settings: Settings, name: str, width: int) -> Target:
    url = f"{settings.gateway_url}/v1/functions/{name}/invoke"
    return Target(f"gateway {name}", client, [url] * width, direct=False)


def direct_client(records: Sequence[InstanceRecord]) -> tuple[httpx.AsyncClient, list[str]]:
    """One client routing ``http://i<k>/`` to instance k's socket, and one slot per unit of concurrency."""
    mounts: dict[str, httpx.AsyncBaseTransport] = {}
    slots: list[str] = []
    for k, rec in enumerate(records):
        limits = httpx.Limits(max_connections=rec.concurrency, max_keepalive_connections=rec.concurrency)
        if rec.address.startswith("unix://"):
            base = f"http://i{k}"
            uds = rec.address[len("unix://") :]
            mounts[base] = httpx.AsyncHTTPTransport(uds=uds, limits=limits, verify=False)
        else:
            base = rec.address.rstrip("/")
            mounts[base] = httpx.AsyncHTTPTransport(limits=limits, verify=False)
        slots += [f"{base}/_/invoke"] * rec.concurrency
    return httpx.AsyncClient(mounts=mounts, timeout=REQUEST_TIMEOUT_S, trust_env=False), slots


@dataclass(slots=True)
class LoadResult:
    completed: int
    errors: Counter[int]
    elapsed_s: float
    latencies: Latencies

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else math.nan


async def call_once(target: Target, url: str) -> tuple[int, float]:
    started = time.perf_counter()
    resp = await target.client.post(url, content=EVENT, headers=target.headers())
    return resp.status_code, time.perf_counter() - started


async def sequential(target: Target, count: int) -> Latencies:
    """``count`` calls one after another on the first slot; a non-200 answer aborts the run."""
    out = Latencies()
    url = target.slots[0]
    for _ in range(count):
        status, elapsed = await call_once(target, url)
        if status != 200:
            raise BenchError(f"{target.label}: a sequential call answered {status}")
        out.seconds.append(elapsed)
    return out


async def closed_loop(target: Target, workers: int, duration_s: float) -> LoadResult:
    """``workers`` callers, each taking a free slot, calling, giving the slot back, for ``duration_s``."""
    free: asyncio.Queue[str] = asyncio.Queue()
    for url in target.slots:
        free.put_nowait(url)
    latencies = Latencies()
    errors: Counter[int] = Counter()
    completed = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + duration_s

    async def worker() -> None:
        nonlocal completed
        while loop.time() < stop_at:
            url = await free.get()
            try:
                status, elapsed = await call_once(target, url)
            finally:
                free.put_nowait(url)
            if status == 200:
                completed += 1
                latencies.seconds.append(elapsed)
            else:
                errors[status] += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
    return LoadResult(completed, errors, loop.time() - started, latencies)


def raw_socket_calls(socket_path: str, count: int) -> Latencies:
    """``count`` sequential ``POST /_/invoke`` on one blocking unix socket, no HTTP library: the host alone."""
    request = (
        b"POST /_/invoke HTTP/1.1\r\nHost: instance\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(EVENT), EVENT)
    )
    out = Latencies()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT_S)
        sock.connect(socket_path)
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(request)
            buf = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError("the function host closed the connection")
                buf += chunk
                head, sep, body = buf.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(body) >= length:
                    break
            out.seconds.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                status_line = head.split(b"\r\n", 1)[0]
                raise BenchError(f"raw socket call answered {status_line!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Platform helpers


def make_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", HANDLER_CODE)
    return buf.getvalue()


async def deploy(
    client: httpx.AsyncClient, settings: Settings, name: str, archive: bytes, **config: object
) -> None:
    resp = await client.put(
        f"{settings.gateway_url}/v1/functions/{name}",
        data={"config": json.dumps({"handler": "handler.handler", "memory_mb": MEMORY_MB, **config})},
        files={"code": ("code.zip", archive, "application/zip")},
    )
    if resp.status_code != 201:
        raise BenchError(f"deploy of {name} answered {resp.status_code}: {resp.text}")


async def delete(client: httpx.AsyncClient, settings: Settings, name: str) -> None:
    resp = await client.delete(f"{settings.gateway_url}/v1/functions/{name}")
    if resp.status_code != 204:
        raise BenchError(f"delete of {name} answered {resp.status_code}: {resp.text}")


async def instances_of(etcd: Etcd, name: str) -> list[InstanceRecord]:
    kvs, _ = await etcd.get_prefix(keys.instances_prefix(NAMESPACE, name))
    return [InstanceRecord.model_validate_json(kv.value) for kv in kvs]


async def count_instances_with_prefix(etcd: Etcd, prefix: str) -> int:
    kvs, _ = await etcd.get_prefix(keys.instances_prefix(NAMESPACE) + prefix.encode())
    return len(kvs)


async def host_pid(record: InstanceRecord) -> int:
    client, slots = direct_client([record])
    async with client:
        resp = await client.get(slots[0].removesuffix("/_/invoke") + "/_/health")
    return int(resp.json()["pid"])


async def warm_path(
    cluster: EmbeddedCluster, etcd: Etcd, function: str = WARM_FUNCTION
) -> dict[str, tuple[str, int]]:
    """role -> (name, pid) of each process a warm call of ``function`` goes through (its first instance)."""
    pids = {rec.name: rec.pid for rec in cluster.records}
    leader = await etcd.get(keys.election("trigger"))
    if leader is None:
        raise BenchError("no trigger leader")
    trigger = LeaderRecord.model_validate_json(leader.value).member_id
    kvs, _ = await etcd.get_prefix(keys.members_prefix("dispatcher"))
    members = [kv.key.decode().rsplit("/", 1)[-1] for kv in kvs]
    dispatcher = rank(members, f"{NAMESPACE}/{function}")[0]  # the trigger's choice (rendezvous)
    out = {
        "gateway": ("gateway-1", pids["gateway-1"]),
        "trigger": (trigger, pids[trigger]),
        "dispatcher": (dispatcher, pids[dispatcher]),
    }
    records = await instances_of(etcd, function)
    if records:
        out["host"] = (records[0].instance_id, await host_pid(records[0]))
    return out


# --------------------------------------------------------------------------------------------------
# Phases


@dataclass(slots=True)
class ColdResult:
    first_s: float  # the first cold start of the run: includes the code download from S3
    samples: Latencies
    not_cold: int  # samples the platform did not mark X-Faas-Cold: 1 (should be 0)
    cpu: CpuUsage | None = None  # over the whole phase (deploys, pauses and reaping included)


async def measure_cold(
    client: httpx.AsyncClient, settings: Settings, etcd: Etcd, archive: bytes, plan: Plan
) -> ColdResult:
    names = [f"{COLD_PREFIX}-first"] + [f"{COLD_PREFIX}-{i}" for i in range(plan.cold_samples)]
    url = settings.gateway_url + "/v1/functions/{}/invoke"
    timings: list[float] = []
    not_cold = 0
    for name in names:
        await deploy(client, settings, name, archive, concurrency=1, max_instances=1)
        await asyncio.sleep(plan.cold_pause_s)
        started = time.perf_counter()
        resp = await client.post(url.format(name), content=EVENT, headers=JSON_HEADERS)
        elapsed = time.perf_counter() - started
        if resp.status_code != 200:
            raise BenchError(f"cold invocation of {name} answered {resp.status_code}: {resp.text}")
        not_cold += resp.headers.get("x-faas-cold") != "1"
        timings.append(elapsed)
        log(f"cold start {name}: {elapsed * 1000:.1f} ms")
        await delete(client, settings, name)  # the reaper stops its instance ("function deleted")
    # The warm phases must not share the machine with the reaper stopping these instances.
    deadline = time.monotonic() + REAP_WAIT_S
    while time.monotonic() < deadline:
        if not await count_instances_with_prefix(etcd, COLD_PREFIX):
            break
        await asyncio.sleep(0.5)
    return ColdResult(first_s=timings[0], samples=Latencies(timings[1:]), not_cold=not_cold)


@dataclass(slots=True)
class WarmC1:
    platform: Latencies
    platform_cpu: CpuUsage
    direct: Latencies
    direct_cpu: CpuUsage
    raw: Latencies | None  # the host through a blocking raw socket (unix-socket instances only)
    path: dict[str, tuple[str, int]]  # role -> (name, pid) on the warm path


async def measure_warm_c1(
    gw: httpx.AsyncClient, settings: Settings, etcd: Etcd, cluster: EmbeddedCluster, plan: Plan
) -> WarmC1:
    target = gateway_target(gw, settings, WARM_FUNCTION, 1)
    await sequential(target, plan.warmup_calls)
    path = await warm_path(cluster, etcd)
    log(f"warm c=1 through the gateway: {plan.warm_calls} calls")
    via_platform, platform_cpu = await with_cpu(sequential(target, plan.warm_calls))
    records = await instances_of(etcd, WARM_FUNCTION)
    if len(records) != 1:
        raise BenchError(
            f"expected one instance of {WARM_FUNCTION} after sequential calls, found {len(records)}"
        )
    client, slots = direct_client(records)
    async with client:
        direct = Target(f"direct {WARM_FUNCTION}", client, slots, direct=True)
        await sequential(direct, plan.warmup_calls)
        log(f"warm c=1 direct to {records[0].address}: {plan.warm_calls} calls")
        via_host, direct_cpu = await with_cpu(sequential(direct, plan.warm_calls))
    raw = None
    if records[0].address.startswith("unix://"):
        log(f"warm c=1 direct through a raw socket: {plan.warm_calls} calls")
        raw = await asyncio.to_thread(raw_socket_calls, records[0].address[len("unix://") :], plan.warm_calls)
    return WarmC1(via_platform, platform_cpu, via_host, direct_cpu, raw, path)


@dataclass(slots=True)
class LoadPair:
    shape: str
    instances: int
    platform: LoadResult
    platform_cpu: CpuUsage
    direct: LoadResult
    direct_cpu: CpuUsage


async def measure_load(
    gw: httpx.AsyncClient, settings: Settings, etcd: Etcd, plan: Plan, name: str, shape: str
) -> LoadPair:
    target = gateway_target(gw, settings, name, CONCURRENCY)
    # Warm up until the platform stops adding instances (the scale-out shape starts ~15 of them).
    warmed, count = 0.0, -1
    while warmed < SCALE_WARMUP_MAX_S:
        await closed_loop(target, CONCURRENCY, plan.load_warmup_s)
        warmed += plan.load_warmup_s
        now = len(await instances_of(etcd, name))
        if now == count:
            break
        count = now
    log(f"c={CONCURRENCY} {shape} through the gateway: {plan.load_s:g} s on {count} instance(s)")
    via_platform, platform_cpu = await with_cpu(closed_loop(target, CONCURRENCY, plan.load_s))
    records = await instances_of(etcd, name)
    client, slots = direct_client(records)
    async with client:
        direct = Target(f"direct {name}", client, slots, direct=True)
        await closed_loop(direct, CONCURRENCY, plan.load_warmup_s)
        log(
            f"c={CONCURRENCY} {shape} direct: {plan.load_s:g} s on {len(records)} instance(s), {len(slots)} slots"
        )
        via_host, direct_cpu = await with_cpu(closed_loop(direct, CONCURRENCY, plan.load_s))
    return LoadPair(shape, len(records), via_platform, platform_cpu, via_host, direct_cpu)


# --------------------------------------------------------------------------------------------------
# Profiling (optional): py-spy on the warm path while a c=1 load runs


@dataclass(slots=True)
class Profile:
    role: str
    name: str
    pid: int
    gil_samples: int  # samples where a thread of the process held the GIL
    cpu_s: float  # CPU seconds from /proc over the same window (py-spy's own cost is not in it)
    by_frame: Counter[str]
    by_package: Counter[str]


_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_ROOT = Path(__file__).resolve().parent.parent


def short_file(path: str) -> str:
    for marker in ("site-packages/", f"/lib/python{sys.version_info.major}.{sys.version_info.minor}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(_ROOT))
    return path


def package_of(path: str) -> str:
    short = short_file(path)
    top = short.split("/", 1)[0].removesuffix(".py")
    if "site-packages/" in path or short.startswith(("faas/", "gateway/")) or short.startswith("<"):
        return top
    return f"stdlib {top}"


def parse_raw_profile(text: str) -> tuple[int, Counter[str], Counter[str]]:
    """Samples, self time per frame (function and file) and per package, from py-spy ``-f raw``."""
    total = 0
    by_frame: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        match = _FRAME_RE.match(stack.rsplit(";", 1)[-1])
        if match is None:
            by_frame[stack.rsplit(";", 1)[-1]] += count
            by_package["?"] += count
            continue
        by_frame[f"{match['func']} ({short_file(match['file'])})"] += count
        by_package[package_of(match["file"])] += count
    return total, by_frame, by_package


def py_spy_path() -> Path:
    path = Path(sys.executable).with_name("py-spy")
    if not path.exists():
        raise BenchError(f"py-spy not found beside {sys.executable}")
    return path


async def profile_warm_path(
    gw: httpx.AsyncClient, settings: Settings, etcd: Etcd, cluster: EmbeddedCluster, plan: Plan, out_dir: Path
) -> tuple[list[Profile], LoadResult]:
    """py-spy (``--gil``: only where Python runs) on each warm-path process under a c=1 gateway load."""
    py_spy = py_spy_path()
    path = await warm_path(cluster, etcd)
    seconds = plan.profile_s
    procs: dict[str, asyncio.subprocess.Process] = {}
    before = CpuSnapshot.take()
    for role, (_name, pid) in path.items():
        procs[role] = await asyncio.create_subprocess_exec(
            str(py_spy), "record", "--gil", "--full-filenames", "-p", str(pid), "-d", str(seconds), "-r", str(PROFILE_RATE_HZ),
            "-f", "raw", "-o", str(out_dir / f"{role}.txt"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    log(f"py-spy on {', '.join(f'{r} {p}' for r, (_n, p) in path.items())} for {seconds} s under c=1 load")
    target = gateway_target(gw, settings, WARM_FUNCTION, 1)
    load = asyncio.create_task(closed_loop(target, 1, seconds))
    outputs: dict[str, bytes] = {}
    try:
        for role, proc in procs.items():
            try:
                _, outputs[role] = await asyncio.wait_for(proc.communicate(), seconds + 30)
            except TimeoutError:
                proc.kill()  # a py-spy this script started
                await proc.wait()
                raise BenchError(f"py-spy on the {role} did not finish") from None
    finally:
        result = await load
    usage = CpuUsage.between(before, CpuSnapshot.take())
    profiles = []
    for role, proc in procs.items():
        if proc.returncode != 0:
            raise BenchError(f"py-spy on the {role} failed: {outputs[role].decode(errors='replace')[-500:]}")
        total, by_frame, by_package = parse_raw_profile((out_dir / f"{role}.txt").read_text())
        name, pid = path[role]
        profiles.append(Profile(role, name, pid, total, usage.per_pid.get(pid, 0.0), by_frame, by_package))
    return profiles, result


# --------------------------------------------------------------------------------------------------
# Report


def machine_lines(argv: Sequence[str], code: str) -> list[str]:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"machine: nproc={len(os.sched_getaffinity(0))} ({cpu}), {platform.platform()}",
        f"code:    {code} (at the start of the run)",
        f"python:  {platform.python_implementation()} {platform.python_version()}, httpx {httpx.__version__}, "
        f"load generator event loop: {type(asyncio.get_running_loop()).__module__}",
        f"command: cd {Path.cwd()} && {shlex.join([sys.executable, *argv])}",
    ]


def code_version() -> str:
    """The commit the platform code was measured at, and whether the work tree differed from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git unavailable)"
    return f"git {head or 'unknown'}" + (" with uncommitted changes" if dirty else "")


def fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x"


def cpu_per_call(usage: CpuUsage, calls: int, path: dict[str, tuple[str, int]]) -> str:
    """CPU ms per call for each process on the warm path, the load generator and the rest of the run."""
    named = {pid: f"{role} {name}" if role != "host" else "host" for role, (name, pid) in path.items()}
    named[os.getpid()] = "load generator"
    parts = [f"{label} {1000 * usage.per_pid.get(pid, 0.0) / calls:.2f}" for pid, label in named.items()]
    rest = usage.ours_s - sum(usage.per_pid.get(pid, 0.0) for pid in named)
    parts.append(f"rest of the platform {1000 * rest / calls:.2f}")
    return ", ".join(parts)


def report(
    plan: Plan, cold: ColdResult, warm: WarmC1, loads: list[LoadPair], argv: Sequence[str], code: str
) -> str:
    rows: list[tuple[str, float, float, int]] = []  # (figure, platform, direct, decimals)
    n = len(cold.samples.seconds)
    rows.append(("cold start, first of the run (+S3 download), ms", cold.first_s * 1000, math.nan, 1))
    rows.append((f"cold start p50 (n={n}), ms", cold.samples.p50_ms, math.nan, 1))
    rows.append(
        (f"cold start p99 (n={n}{', = max' if n < 100 else ''}), ms", cold.samples.p99_ms, math.nan, 1)
    )
    m = len(warm.platform.seconds)
    rows.append((f"warm c=1 p50 (n={m}), ms", warm.platform.p50_ms, warm.direct.p50_ms, 3))
    rows.append((f"warm c=1 p99 (n={m}), ms", warm.platform.p99_ms, warm.direct.p99_ms, 3))
    if warm.raw is not None:
        rows.append(("warm c=1 p50, direct over a raw socket, ms", math.nan, warm.raw.p50_ms, 3))
        rows.append(("warm c=1 p99, direct over a raw socket, ms", math.nan, warm.raw.p99_ms, 3))
    for pair in loads:
        rows.append((f"c={CONCURRENCY} {pair.shape}: req/s", pair.platform.rps, pair.direct.rps, 0))
        rows.append(
            (
                f"c={CONCURRENCY} {pair.shape}: p50, ms",
                pair.platform.latencies.p50_ms,
                pair.direct.latencies.p50_ms,
                2,
            )
        )
        rows.append(
            (
                f"c={CONCURRENCY} {pair.shape}: p99, ms",
                pair.platform.latencies.p99_ms,
                pair.direct.latencies.p99_ms,
                2,
            )
        )
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{'figure':<{width}}  {'platform':>10}  {'direct':>10}  {'plat/direct':>11}",
        f"{'-' * width}  {'-' * 10}  {'-' * 10}  {'-' * 11}",
    ]
    for label, via_platform, via_host, digits in rows:
        lines.append(
            f"{label:<{width}}  {fmt(via_platform, digits):>10}  {fmt(via_host, digits):>10}  "
            f"{ratio(via_platform, via_host):>11}"
        )
    notes = [
        "",
        "platform = POST /v1/functions/{name}/invoke on the gateway (gateway -> trigger -> dispatcher -> host).",
        "direct   = POST /_/invoke on the same instances' unix sockets, same body and client: the floor.",
        f"cold: a fresh function per sample (same archive, already in the node's code cache), {plan.cold_pause_s:g} s "
        f"pause before each so the pool of generic hosts is full; {cold.not_cold} sample(s) not marked cold.",
        f"  cpu, whole cold phase: {cold.cpu.summary() if cold.cpu else '-'}",
        f"warm c=1: {WARM_FUNCTION} (concurrency 1, one instance); {plan.warmup_calls} warm-up calls, then {m} "
        "sequential calls per side; 'raw socket' = a blocking socket, no HTTP library (the host alone).",
        f"  cpu, platform side: {warm.platform_cpu.summary()}",
        f"  cpu ms per call, platform side: {cpu_per_call(warm.platform_cpu, m, warm.path)}",
        f"  cpu, direct side:   {warm.direct_cpu.summary()}",
        "  cpu ms per call, direct side: "
        + cpu_per_call(warm.direct_cpu, m, {k: v for k, v in warm.path.items() if k == "host"}),
    ]
    for pair in loads:
        errors = [
            f"{side} {dict(res.errors)}"
            for side, res in (("platform", pair.platform), ("direct", pair.direct))
            if res.errors
        ]
        notes.append(
            f"c={CONCURRENCY} {pair.shape}: {plan.load_s:g} s closed loop of {CONCURRENCY} callers per side on "
            f"{pair.instances} instance(s), after warm-up; the direct side never puts more calls on an instance "
            "than its concurrency (a caller waits client-side for a free slot, as the dispatcher's waiters do); "
            + ("errors: " + "; ".join(errors) if errors else "no errors")
            + "."
        )
        for side, usage, res in (
            ("platform side", pair.platform_cpu, pair.platform),
            ("direct side  ", pair.direct_cpu, pair.direct),
        ):
            per_call = 1000 * usage.ours_s / res.completed if res.completed else math.nan
            notes.append(f"  cpu, {side}: {usage.summary()}; this run's cpu per call {per_call:.2f} ms")
    notes.append(
        "The load generator shares the cores with every platform process, the servers and the hosts."
    )
    return "\n".join([*machine_lines(argv, code), "", *lines, *notes])


def profile_report(profiles: list[Profile], load: LoadResult, seconds: int, out_dir: Path) -> str:
    lines = [
        "",
        f"where the warm c=1 path spends CPU: py-spy --gil at {PROFILE_RATE_HZ} Hz for {seconds} s under a c=1 "
        f"gateway load ({load.rps:.0f} req/s with py-spy attached); raw stacks in {out_dir}.",
        "Self time = the innermost Python frame while the GIL is held; a self frame of 'Runner.run' is time in "
        "C code below it (uvloop's loop, when the services run on uvloop). GIL held more than on CPU means the process "
        "was preempted while holding it (typically right after a send() woke the next process): those "
        "samples land on the send frames.",
    ]
    for prof in profiles:
        share = 100.0 / prof.gil_samples if prof.gil_samples else math.nan
        lines.append(
            f"  {prof.role} {prof.name} (pid {prof.pid}): on CPU {prof.cpu_s / seconds * 100:.0f}% of the time "
            f"(/proc), GIL held {prof.gil_samples / (seconds * PROFILE_RATE_HZ) * 100:.0f}% "
            f"({prof.gil_samples} samples); top {TOP_HOTSPOTS} self time:"
        )
        for frame, count in prof.by_frame.most_common(TOP_HOTSPOTS):
            lines.append(f"    {count * share:5.1f}%  {frame}")
        packages = ", ".join(f"{pkg} {count * share:.0f}%" for pkg, count in prof.by_package.most_common(8))
        lines.append(f"    self time by package: {packages}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main


async def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    plan = Plan.from_args(args)
    code = code_version()  # before the services start: what they run
    home = Path(tempfile.mkdtemp(prefix="faas-bench-", dir="/tmp"))  # short: unix socket paths <= 107 bytes
    settings = settings_for_test(home)  # default keepalive (300 s): warm instances stay for the whole run
    cluster = EmbeddedCluster(settings, progress=_progress)
    settings = cluster.settings
    etcd = etcd_from_settings(settings)
    gw = new_gateway_client(home)
    try:
        async with asyncio.timeout(args.max_seconds):
            log(f"starting the platform in {home}")
            await cluster.start()
            await etcd.connect()
            archive = make_archive()
            await deploy(
                gw, settings, WARM_FUNCTION, archive, concurrency=1, max_instances=WARM_MAX_INSTANCES
            )
            await deploy(gw, settings, WIDE_FUNCTION, archive, concurrency=CONCURRENCY, max_instances=1)
            cold, cold_cpu = await with_cpu(measure_cold(gw, settings, etcd, archive, plan))
            cold.cpu = cold_cpu
            warm = await measure_warm_c1(gw, settings, etcd, cluster, plan)
            profiled = ""
            if args.profile_dir:  # now, while the c=1 function has exactly one instance
                out_dir = Path(args.profile_dir)
                profiles, load = await profile_warm_path(gw, settings, etcd, cluster, plan, out_dir)
                profiled = profile_report(profiles, load, plan.profile_s, out_dir)
            loads = [
                await measure_load(gw, settings, etcd, plan, WARM_FUNCTION, "scale-out (concurrency 1)"),
                await measure_load(gw, settings, etcd, plan, WIDE_FUNCTION, "one instance (concurrency 16)"),
            ]
            print(report(plan, cold, warm, loads, argv, code), flush=True)
            if profiled:
                print(profiled, flush=True)
    finally:
        await gw.aclose()
        await etcd.close()
        log("stopping the platform")
        await cluster.stop()
        if args.keep_home:
            log(f"platform home (logs) kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def _progress(label: str, seconds: float | None) -> None:
    if seconds is not None:
        log(f"ready: {label} ({seconds:.1f} s)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Invocation latency of the platform against the function host alone."
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter loads (a smoke run)")
    parser.add_argument("--cold", type=int, default=0, help="cold-start samples (default 20, --quick 5)")
    parser.add_argument(
        "--warm", type=int, default=0, help="sequential warm calls per side (default 2000, --quick 300)"
    )
    parser.add_argument(
        "--duration", type=float, default=0.0, help="seconds per c=16 load (default 10, --quick 3)"
    )
    parser.add_argument(
        "--profile-dir", default="", help="also run py-spy on the warm path; raw stacks go here"
    )
    parser.add_argument("--profile-seconds", type=float, default=5.0, help="py-spy duration (default 5)")
    parser.add_argument(
        "--max-seconds", type=float, default=900.0, help="abort the whole run after this long"
    )
    parser.add_argument(
        "--keep-home", action="store_true", help="keep the temp platform home (logs) afterwards"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.profile_dir:
            py_spy_path()
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        with contextlib.suppress(ImportError):
            import uvloop  # what the services run on; the load generator uses it too when installed

            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(args, [sys.argv[0], *argv]))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"bench failed: the run took longer than --max-seconds {args.max_seconds:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
