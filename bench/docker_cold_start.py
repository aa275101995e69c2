"""Cold starts and warm invocations with instances as Docker containers, against their floors.

Run from the repository root as root, with a Docker daemon answering (``bench/README.md`` explains
every figure)::

    .venv/bin/python bench/docker_cold_start.py            # full run, 3-4 minutes
    .venv/bin/python bench/docker_cold_start.py --quick    # smoke run, about 1.5 minutes

One run, on this machine, against the real dockerd:

1. the floor: ``docker run --rm --network none <runtime image> <python> -S -c pass`` with the image,
   interpreter and read-only binds the Docker backend uses (the local image holds no Python: the
   node's is bind-mounted), timed through the docker CLI and, without the CLI, as aiodocker
   create + start + wait + remove;
2. cold starts through an embedded platform whose node agent runs the Docker backend with a warm pool
   of 2 generic containers: a fresh function per sample (same archive), one timed invoke through the
   gateway.  Samples alternate between 256 MB (the pool members' memory: nothing to update) and 128 MB
   (one ``POST /containers/{id}/update`` before specialising);
3. the same with the pool disabled (``pool_size=0``): a second platform, started after the first one
   stopped;
4. warm invocations, Docker backend vs process backend vs a direct call to the same instance's unix
   socket: p50/p99 of sequential calls (concurrency 1) and req/s of a closed loop of 16 callers on one
   instance of a concurrency-16 function.  The Docker figures come from the first platform, the
   process figures from a third one (process backend, pool 2), which also gives pooled cold starts of
   the process backend for reference.

Before each cold sample the previous sample's function is deleted and the script waits until its
instance is gone (container removed, or host process exited) and the pool is full again, then pauses
``--pause`` seconds after the deploy, so a pooled sample takes a warm member and no removal competes
with it.  The warm functions are deployed after the cold phase.

Every platform gets its own temp home under ``/tmp`` and a node id of its own (``bench<pid>``), so the
backend's orphan sweep never touches containers of another platform on this machine.  Every platform
is stopped (``finally``), and containers labelled with this run's node id that are still there
afterwards are removed; only processes and containers this script started are touched.

Caveats:
- dockerd, containerd, the shims and the containers' processes are not descendants of this script:
  their CPU shows up as "other processes" in the CPU lines (a Docker phase always has some);
- with fewer than 100 samples the nearest-rank p99 is the maximum;
- the first cold start of each platform downloads the archive from S3 into the node's code cache and
  is reported on its own, outside the statistics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import httpx

# bench/ is sys.path[0] when this file is run as a script; make sure of it when imported otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import invoke_latency as il  # noqa: E402  (the measurement helpers of the other benchmark)

from faas.core.errors import Unavailable  # noqa: E402
from faas.core.etcd import Etcd  # noqa: E402
from faas.core.models import InstanceRecord  # noqa: E402
from faas.core.service import etcd_from_settings  # noqa: E402
from faas.core.settings import Settings  # noqa: E402
from faas.launcher.embedded import EmbeddedCluster, settings_for_test  # noqa: E402
from faas.runtime.image import DEFAULT_TAG, RuntimeLayout, ensure_runtime_image, runtime_layout  # noqa: E402

log = il.log
BenchError = il.BenchError
Latencies = il.Latencies

POOL_SIZE = 2
POOL_MEMORY_MB = 256  # faas.runtime.docker_backend.POOL_MEMORY_MB: a pool member's memory until specialised
SMALL_MEMORY_MB = 128  # needs one update call on a pooled container
WARM_FUNCTION = "noop-warm"  # concurrency 1, max_instances 1
WIDE_FUNCTION = "noop-c16"  # concurrency 16, max_instances 1
FLOOR_LABEL = "faas.bench.floor"
GONE_WAIT_S = 30.0
POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Plan:
    floor_runs: int
    pooled_256: int
    pooled_128: int
    unpooled: int
    process_cold: int
    pause_s: float
    warm_calls: int
    warmup_calls: int
    load_s: float
    load_warmup_s: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            floor_runs=args.floor or (6 if quick else 20),
            pooled_256=args.cold or (5 if quick else 16),
            pooled_128=max(1, (args.cold or (5 if quick else 16)) // 2),
            unpooled=args.cold_unpooled or (4 if quick else 12),
            process_cold=3 if quick else 8,
            pause_s=args.pause,
            warm_calls=args.warm or (300 if quick else 1000),
            warmup_calls=50 if quick else 100,
            load_s=args.duration or (3.0 if quick else 8.0),
            load_warmup_s=1.0 if quick else 2.0,
        )


# --------------------------------------------------------------------------------------------------
# 1. The floor: a trivial container of the runtime image


@dataclass(slots=True)
class Floor:
    cli: Latencies
    api: Latencies
    command: list[str]
    cli_cpu: il.CpuUsage
    api_cpu: il.CpuUsage


def floor_command(layout: RuntimeLayout, run_label: str) -> list[str]:
    binds = [arg for bind in layout.binds for arg in ("-v", bind)]
    return [
        "docker", "run", "--rm", "--network", "none", "--label", run_label, *binds,
        layout.image, layout.python, "-S", "-c", "pass",
    ]  # fmt: skip


def docker_run_once(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(command[:6])} ... exited {done.returncode}: {done.stderr.strip()[-500:]}"
        )
    return elapsed


async def api_run_once(docker: aiodocker.Docker, layout: RuntimeLayout, run_label: str) -> float:
    key, _, value = run_label.partition("=")
    config: dict[str, Any] = {
        "Image": layout.image,
        "Cmd": [layout.python, "-S", "-c", "pass"],
        "Labels": {key: value},
        "NetworkDisabled": True,
        "HostConfig": {"Binds": list(layout.binds), "NetworkMode": "none"},
    }
    started = time.perf_counter()
    container = await docker.containers.create(config)
    try:
        await container.start()
        result = await container.wait()
    finally:
        await container.delete(force=True)
    elapsed = time.perf_counter() - started
    if result.get("StatusCode") != 0:
        raise BenchError(f"the floor container exited {result.get('StatusCode')}")
    return elapsed


async def measure_floor(docker: aiodocker.Docker, layout: RuntimeLayout, plan: Plan, run_label: str) -> Floor:
    command = floor_command(layout, run_label)
    for _ in range(1 if plan.floor_runs < 10 else 2):  # warm-up: page cache, the CLI's first start
        await asyncio.to_thread(docker_run_once, command)
        await api_run_once(docker, layout, run_label)
    log(f"floor: {plan.floor_runs} x docker run (CLI), {plan.floor_runs} x create+start+wait+remove (API)")

    async def cli_runs() -> Latencies:
        out = Latencies()
        for _ in range(plan.floor_runs):
            out.seconds.append(await asyncio.to_thread(docker_run_once, command))
        return out

    async def api_runs() -> Latencies:
        out = Latencies()
        for _ in range(plan.floor_runs):
            out.seconds.append(await api_run_once(docker, layout, run_label))
        return out

    cli, cli_cpu = await il.with_cpu(cli_runs())
    api, api_cpu = await il.with_cpu(api_runs())
    return Floor(cli, api, command, cli_cpu, api_cpu)


# --------------------------------------------------------------------------------------------------
# Platforms


@dataclass(slots=True)
class Running:
    label: str
    settings: Settings
    cluster: EmbeddedCluster
    etcd: Etcd
    gw: httpx.AsyncClient
    docker: aiodocker.Docker | None  # set for the Docker backend
    start_s: float


# The first error answers (4xx, 5xx) each target gave, status and body, for the report.
ERROR_SAMPLES: dict[str, list[str]] = {}
MAX_ERROR_SAMPLES = 3


def record_errors(client: httpx.AsyncClient, label: str) -> None:
    """Keep the first few error answers ``client`` receives under ``label``."""

    async def hook(response: httpx.Response) -> None:
        if response.status_code >= 400:
            samples = ERROR_SAMPLES.setdefault(label, [])
            if len(samples) < MAX_ERROR_SAMPLES:
                body = (await response.aread()).decode(errors="replace").strip()
                samples.append(f"{response.status_code} {body[:300]}")

    client.event_hooks = {"response": [hook]}


def node_id() -> str:
    return f"bench{os.getpid()}"


async def node_containers(
    docker: aiodocker.Docker, *, running_only: bool = False
) -> list[aiodocker.containers.DockerContainer]:
    filters: dict[str, list[str]] = {"label": [f"faas.node={node_id()}"]}
    if running_only:
        filters["status"] = ["running"]
    return await docker.containers.list(all=not running_only, filters=json.dumps(filters))


@contextlib.asynccontextmanager
async def platform(
    label: str, docker: aiodocker.Docker | None, keep_home: bool, **overrides: object
) -> AsyncIterator[Running]:
    home = Path(tempfile.mkdtemp(prefix="faas-dcs-", dir="/tmp"))  # short: unix socket paths <= 107 bytes
    settings = settings_for_test(home, keepalive_s=900.0, reap_interval_s=0.5, node_id=node_id(), **overrides)
    cluster = EmbeddedCluster(settings, progress=_progress)
    settings = cluster.settings
    etcd = etcd_from_settings(settings)
    gw = il.new_gateway_client(home)
    record_errors(gw, f"{label} gateway")
    try:
        log(f"starting platform '{label}' in {home}")
        started = time.monotonic()
        try:
            await cluster.start()
        except Unavailable as exc:
            raise BenchError(f"platform '{label}' did not start: {exc}") from exc
        start_s = time.monotonic() - started
        await etcd.connect()
        yield Running(label, settings, cluster, etcd, gw, docker, start_s)
    finally:
        await gw.aclose()
        await etcd.close()
        log(f"stopping platform '{label}'")
        await cluster.stop()
        if docker is not None:
            # The node agent removes its containers on a clean stop; sweep whatever a killed one left.
            with contextlib.suppress(aiodocker.DockerError):
                leftovers = await node_containers(docker)
                if leftovers:
                    log(f"removing {len(leftovers)} container(s) platform '{label}' left behind")
                for container in leftovers:
                    with contextlib.suppress(aiodocker.DockerError):
                        await container.delete(force=True)
        if keep_home:
            log(f"platform home (logs) kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def _progress(label: str, seconds: float | None) -> None:
    if seconds is not None:
        log(f"ready: {label} ({seconds:.1f} s)")


async def deploy(p: Running, name: str, archive: bytes, **config: object) -> None:
    await il.deploy(p.gw, p.settings, name, archive, **config)


async def invoke(p: Running, name: str) -> httpx.Response:
    return await p.gw.post(
        f"{p.settings.gateway_url}/v1/functions/{name}/invoke", content=il.EVENT, headers=il.JSON_HEADERS
    )


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + GONE_WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"gave up after {GONE_WAIT_S:g} s waiting until {what}")
        await asyncio.sleep(POLL_S)


# --------------------------------------------------------------------------------------------------
# 2, 3. Cold starts


@dataclass(slots=True)
class ColdPhase:
    label: str
    first_s: float  # the platform's first cold start: includes the code download from S3
    samples: dict[int, Latencies]  # memory_mb -> samples
    not_cold: int
    cpu: il.CpuUsage | None = None


def schedule(counts: dict[int, int]) -> list[int]:
    """Memory sizes interleaved evenly: {256: 4, 128: 2} -> [256, 128, 256, 256, 128, 256]."""
    slots = [((i + 0.5) / n, mem) for mem, n in counts.items() for i in range(n)]
    return [mem for _, mem in sorted(slots, key=lambda s: s[0])]


async def wait_instance_gone(p: Running, name: str, address: str, pool_size: int) -> None:
    """Until the instance of ``name`` is gone from etcd and the node (and a Docker pool is full again)."""

    async def unrecorded() -> bool:
        return not await il.instances_of(p.etcd, name)

    await wait_until(unrecorded, f"{name} has no instance record")
    if p.docker is not None:
        docker = p.docker
        # The socket folder is c-<token>; the container is faas-<node id>-<token>.
        folder = Path(address.removeprefix("unix://")).parent.name
        container_name = f"faas-{node_id()}-{folder.removeprefix('c-')}"

        async def removed_and_refilled() -> bool:
            names = {n.lstrip("/") for c in await node_containers(docker) for n in c["Names"] or ()}
            running = await node_containers(docker, running_only=True)
            return container_name not in names and len(names) == pool_size and len(running) == pool_size

        await wait_until(removed_and_refilled, f"container {container_name} is removed and the pool is full")


async def measure_cold(
    p: Running, archive: bytes, counts: dict[int, int], pause_s: float, pool_size: int
) -> ColdPhase:
    prefix = "cold"
    order = [POOL_MEMORY_MB, *schedule(counts)]
    names = [f"{prefix}-first"] + [f"{prefix}-{i}" for i in range(len(order) - 1)]
    phase = ColdPhase(p.label, math.nan, {mem: Latencies() for mem in counts}, 0)
    for index, (name, memory_mb) in enumerate(zip(names, order, strict=True)):
        await deploy(p, name, archive, concurrency=1, max_instances=1, memory_mb=memory_mb)
        await asyncio.sleep(pause_s)
        pid = None
        started = time.perf_counter()
        resp = await invoke(p, name)
        elapsed = time.perf_counter() - started
        if resp.status_code != 200:
            raise BenchError(f"cold invocation of {name} answered {resp.status_code}: {resp.text}")
        phase.not_cold += resp.headers.get("x-faas-cold") != "1"
        if index == 0:
            phase.first_s = elapsed
        else:
            phase.samples[memory_mb].seconds.append(elapsed)
        log(f"{p.label}: cold start {name} ({memory_mb} MB): {elapsed * 1000:.1f} ms")
        records = await il.instances_of(p.etcd, name)
        if len(records) != 1:
            raise BenchError(f"expected one instance of {name}, found {len(records)}")
        if p.docker is None:
            pid = await il.host_pid(records[0])
        await il.delete(p.gw, p.settings, name)  # the reaper stops its instance ("function deleted")
        await wait_instance_gone(p, name, records[0].address, pool_size)
        if pid is not None:

            async def exited(pid: int = pid) -> bool:
                return not await asyncio.to_thread(os.path.exists, f"/proc/{pid}")

            await wait_until(exited, f"the host of {name} (pid {pid}) exited")
    return phase


# --------------------------------------------------------------------------------------------------
# 4. Warm invocations


@dataclass(slots=True)
class Warm:
    label: str
    c1_platform: Latencies
    c1_direct: Latencies
    c1_raw: Latencies
    c1_platform_cpu: il.CpuUsage
    c1_direct_cpu: il.CpuUsage
    load_platform: il.LoadResult
    load_direct: il.LoadResult
    load_platform_cpu: il.CpuUsage
    load_direct_cpu: il.CpuUsage
    host: dict[str, HostUse | None]  # phase -> what the function host itself used


async def single_instance(p: Running, name: str) -> InstanceRecord:
    records = await il.instances_of(p.etcd, name)
    if len(records) != 1:
        raise BenchError(f"{p.label}: expected one instance of {name}, found {len(records)}")
    return records[0]


@dataclass(frozen=True, slots=True)
class HostCpu:
    """A function host's CPU seconds so far, and (in a container) its CFS throttling so far."""

    cpu_s: float
    throttled_periods: int | None = None
    periods: int | None = None
    throttled_s: float | None = None


@dataclass(frozen=True, slots=True)
class HostUse:
    """What the host used over one measured phase, and how many calls it served meanwhile."""

    calls: int
    cpu_s: float
    throttled_periods: int | None
    periods: int | None
    throttled_s: float | None

    @classmethod
    def between(cls, before: HostCpu | None, after: HostCpu | None, calls: int) -> HostUse | None:
        if before is None or after is None:
            return None

        def delta(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        periods = delta(before.periods, after.periods)
        throttled = delta(before.throttled_periods, after.throttled_periods)
        return cls(
            calls,
            after.cpu_s - before.cpu_s,
            None if throttled is None else int(throttled),
            None if periods is None else int(periods),
            delta(before.throttled_s, after.throttled_s),
        )

    def summary(self) -> str:
        text = f"{1000 * self.cpu_s / self.calls:.2f}" if self.calls else "-"
        if self.throttled_periods is not None:
            text += f" (throttled in {self.throttled_periods}/{self.periods} CFS periods, {self.throttled_s or 0:.2f} s)"
        return text


def _read_kv(path: str) -> dict[str, int]:
    with open(path) as fh:
        return {k: int(v) for k, v in (line.split() for line in fh if line.strip())}


def container_cpu(container_id: str) -> HostCpu | None:
    """CPU and CFS throttling of a container's cgroup (cgroup v1 with cgroupfs or v2), None if not found."""
    v1_acct = f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage"
    v1_cpu = f"/sys/fs/cgroup/cpu/docker/{container_id}/cpu.stat"
    try:
        with open(v1_acct) as fh:
            usage_ns = int(fh.read())
        stat = _read_kv(v1_cpu)
        return HostCpu(usage_ns / 1e9, stat["nr_throttled"], stat["nr_periods"], stat["throttled_time"] / 1e9)
    except (OSError, KeyError, ValueError):
        pass
    for v2 in (
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat",
        f"/sys/fs/cgroup/docker/{container_id}/cpu.stat",
    ):
        try:
            stat = _read_kv(v2)
            return HostCpu(
                stat["usage_usec"] / 1e6,
                stat["nr_throttled"],
                stat["nr_periods"],
                stat["throttled_usec"] / 1e6,
            )
        except (OSError, KeyError, ValueError):
            continue
    return None


def process_cpu(pid: int) -> HostCpu | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return HostCpu((int(fields[11]) + int(fields[12])) / il.CLK_TCK)


async def host_meter(p: Running, record: InstanceRecord) -> Callable[[], HostCpu | None]:
    """A reader of the CPU used so far by the host of ``record`` (its container's cgroup, or its process)."""
    if p.docker is None:
        pid = await il.host_pid(record)
        return lambda: process_cpu(pid)
    folder = Path(record.address.removeprefix("unix://")).parent.name
    try:
        info = await p.docker.containers.container(f"faas-{node_id()}-{folder.removeprefix('c-')}").show()
    except aiodocker.DockerError:
        return lambda: None
    container_id = str(info["Id"])
    return lambda: container_cpu(container_id)


async def measure_warm(p: Running, archive: bytes, plan: Plan) -> Warm:
    await deploy(p, WARM_FUNCTION, archive, concurrency=1, max_instances=1, memory_mb=POOL_MEMORY_MB)
    await deploy(
        p, WIDE_FUNCTION, archive, concurrency=il.CONCURRENCY, max_instances=1, memory_mb=POOL_MEMORY_MB
    )
    host: dict[str, HostUse | None] = {}

    # Concurrency 1: sequential calls through the gateway, then straight at the same instance.
    target = il.gateway_target(p.gw, p.settings, WARM_FUNCTION, 1)
    await il.sequential(target, plan.warmup_calls)
    record = await single_instance(p, WARM_FUNCTION)
    meter = await host_meter(p, record)
    log(f"{p.label}: warm c=1 through the gateway, {plan.warm_calls} calls")
    before = meter()
    c1_platform, c1_platform_cpu = await il.with_cpu(il.sequential(target, plan.warm_calls))
    host["c=1 platform"] = HostUse.between(before, meter(), plan.warm_calls)
    client, slots = il.direct_client([record])
    record_errors(client, f"{p.label} direct")
    async with client:
        direct = il.Target(f"direct {WARM_FUNCTION}", client, slots, direct=True)
        await il.sequential(direct, plan.warmup_calls)
        log(f"{p.label}: warm c=1 direct to {record.address}, {plan.warm_calls} calls")
        before = meter()
        c1_direct, c1_direct_cpu = await il.with_cpu(il.sequential(direct, plan.warm_calls))
        host["c=1 direct"] = HostUse.between(before, meter(), plan.warm_calls)
    c1_raw = await asyncio.to_thread(
        il.raw_socket_calls, record.address.removeprefix("unix://"), plan.warm_calls
    )

    # Concurrency 16 on one instance of a concurrency-16 function.
    target = il.gateway_target(p.gw, p.settings, WIDE_FUNCTION, il.CONCURRENCY)
    await il.closed_loop(target, il.CONCURRENCY, plan.load_warmup_s)
    record = await single_instance(p, WIDE_FUNCTION)
    meter = await host_meter(p, record)
    log(f"{p.label}: c={il.CONCURRENCY} through the gateway, {plan.load_s:g} s")
    before = meter()
    load_platform, load_platform_cpu = await il.with_cpu(il.closed_loop(target, il.CONCURRENCY, plan.load_s))
    host["c=16 platform"] = HostUse.between(before, meter(), load_platform.completed)
    client, slots = il.direct_client([record])
    record_errors(client, f"{p.label} direct")
    async with client:
        direct = il.Target(f"direct {WIDE_FUNCTION}", client, slots, direct=True)
        await il.closed_loop(direct, il.CONCURRENCY, plan.load_warmup_s)
        log(f"{p.label}: c={il.CONCURRENCY} direct to {record.address}, {plan.load_s:g} s")
        before = meter()
        load_direct, load_direct_cpu = await il.with_cpu(il.closed_loop(direct, il.CONCURRENCY, plan.load_s))
        host["c=16 direct"] = HostUse.between(before, meter(), load_direct.completed)
    return Warm(
        p.label, c1_platform, c1_direct, c1_raw, c1_platform_cpu, c1_direct_cpu,
        load_platform, load_direct, load_platform_cpu, load_direct_cpu, host,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Report


@dataclass(slots=True)
class Results:
    floor: Floor
    pooled: ColdPhase
    unpooled: ColdPhase
    process_cold: ColdPhase
    docker_warm: Warm
    process_warm: Warm
    start_s: dict[str, float] = field(default_factory=dict)


def ms(value: float, digits: int = 1) -> str:
    return il.fmt(value * 1000, digits)


def p50(lat: Latencies) -> float:
    return il.percentile(lat.seconds, 50)


def p99(lat: Latencies) -> float:
    return il.percentile(lat.seconds, 99)


def n_label(lat: Latencies) -> str:
    n = len(lat.seconds)
    return f"{n}" + ("" if n >= 100 else "*")


def docker_lines(info: Mapping[str, Any]) -> list[str]:
    return [
        f"docker:  server {info.get('ServerVersion')}, storage driver {info.get('Driver')}, "
        f"cgroup {info.get('CgroupDriver')} v{info.get('CgroupVersion')}, kernel {info.get('KernelVersion')}",
    ]


def report(r: Results, plan: Plan, header: list[str]) -> str:
    f = r.floor
    cold_rows: list[tuple[str, Latencies]] = [
        ("floor: docker run --rm --network none (CLI)", f.cli),
        ("floor: API create+start+wait+remove", f.api),
        (f"cold, docker backend, pool {POOL_SIZE}, {POOL_MEMORY_MB} MB", r.pooled.samples[POOL_MEMORY_MB]),
        (f"cold, docker backend, pool {POOL_SIZE}, {SMALL_MEMORY_MB} MB (+update)", r.pooled.samples[SMALL_MEMORY_MB]),
        (f"cold, docker backend, pool 0, {POOL_MEMORY_MB} MB", r.unpooled.samples[POOL_MEMORY_MB]),
        (f"cold, process backend, pool {POOL_SIZE}, {POOL_MEMORY_MB} MB", r.process_cold.samples[POOL_MEMORY_MB]),
    ]  # fmt: skip
    width = max(len(label) for label, _ in cold_rows)
    lines = [
        *header,
        "",
        f"{'start of a container / cold start':<{width}}  {'n':>4}  {'p50 ms':>8}  {'p99 ms':>8}",
        f"{'-' * width}  {'-' * 4}  {'-' * 8}  {'-' * 8}",
    ]
    for label, lat in cold_rows:
        lines.append(f"{label:<{width}}  {n_label(lat):>4}  {ms(p50(lat)):>8}  {ms(p99(lat)):>8}")
    lines.append(
        "first cold start of each platform (+S3 download, not in the rows above): "
        + ", ".join(f"{c.label} {ms(c.first_s)} ms" for c in (r.pooled, r.unpooled, r.process_cold))
    )
    not_cold = r.pooled.not_cold + r.unpooled.not_cold + r.process_cold.not_cold
    lines.append(
        f"cold samples not marked X-Faas-Cold: 1: {not_cold}; * = fewer than 100 samples: p99 is the maximum"
    )

    d, p = r.docker_warm, r.process_warm
    warm_rows: list[tuple[str, Callable[[Warm], tuple[float, float]], int]] = [
        (f"warm c=1 p50 ms (n={len(d.c1_platform.seconds)})", lambda w: (p50(w.c1_platform) * 1e3, p50(w.c1_direct) * 1e3), 3),
        (f"warm c=1 p99 ms (n={len(d.c1_platform.seconds)})", lambda w: (p99(w.c1_platform) * 1e3, p99(w.c1_direct) * 1e3), 3),
        ("warm c=1 p50 ms, raw socket (host alone)", lambda w: (math.nan, p50(w.c1_raw) * 1e3), 3),
        (f"c={il.CONCURRENCY} one instance: req/s", lambda w: (w.load_platform.rps, w.load_direct.rps), 0),
        (f"c={il.CONCURRENCY} one instance: p50 ms", lambda w: (w.load_platform.latencies.p50_ms, w.load_direct.latencies.p50_ms), 2),
        (f"c={il.CONCURRENCY} one instance: p99 ms", lambda w: (w.load_platform.latencies.p99_ms, w.load_direct.latencies.p99_ms), 2),
    ]  # fmt: skip
    width = max(len(label) for label, _, _ in warm_rows)
    cols = ("docker", "direct", "process", "direct", "dock/proc")
    lines += [
        "",
        f"{'warm invocations':<{width}}  " + "  ".join(f"{c:>10}" for c in cols),
        f"{'':<{width}}  {'(platform)':>10}  {'(docker)':>10}  {'(platform)':>10}  {'(process)':>10}  {'(platform)':>10}",
        f"{'-' * width}  " + "  ".join("-" * 10 for _ in cols),
    ]
    for label, get, digits in warm_rows:
        dp, dd = get(d)
        pp, pd = get(p)
        lines.append(
            f"{label:<{width}}  {il.fmt(dp, digits):>10}  {il.fmt(dd, digits):>10}  {il.fmt(pp, digits):>10}  "
            f"{il.fmt(pd, digits):>10}  {il.ratio(dp, pp):>10}"
        )
    errors = [
        f"{w.label} {side} {dict(res.errors)}"
        for w in (d, p)
        for side, res in (("platform", w.load_platform), ("direct", w.load_direct))
        if res.errors
    ]
    lines.append("c=16 errors: " + ("; ".join(errors) if errors else "none"))
    for label, samples in ERROR_SAMPLES.items():
        lines += [f"  first error answers from {label}:", *(f"    {sample}" for sample in samples)]

    pooled = r.pooled.samples[POOL_MEMORY_MB]
    small = r.pooled.samples[SMALL_MEMORY_MB]
    unpooled = r.unpooled.samples[POOL_MEMORY_MB]

    def both(a: Latencies, b: Latencies) -> str:
        return f"p50 {il.ratio(p50(a), p50(b)):>6}   p99 {il.ratio(p99(a), p99(b)):>6}"

    def warm_ratio(a: Warm, b: Warm) -> str:
        return (
            f"c=1 p50 {il.ratio(p50(a.c1_platform), p50(b.c1_platform))}, "
            f"c=1 p99 {il.ratio(p99(a.c1_platform), p99(b.c1_platform))}, "
            f"c=16 req/s {il.ratio(a.load_platform.rps, b.load_platform.rps)}"
        )

    def plat_direct(w: Warm) -> str:
        return (
            f"c=1 p50 {il.ratio(p50(w.c1_platform), p50(w.c1_direct))}, "
            f"c=1 p99 {il.ratio(p99(w.c1_platform), p99(w.c1_direct))}, "
            f"c=16 req/s {il.ratio(w.load_platform.rps, w.load_direct.rps)}"
        )

    lines += [
        "",
        "ratios",
        f"  pooled cold ({POOL_MEMORY_MB} MB) / docker run floor (CLI):   {both(pooled, f.cli)}",
        f"  pooled cold ({POOL_MEMORY_MB} MB) / API floor:                {both(pooled, f.api)}",
        f"  pooled cold ({SMALL_MEMORY_MB} MB) / docker run floor (CLI):   {both(small, f.cli)}",
        f"  unpooled / pooled cold ({POOL_MEMORY_MB} MB):                 {both(unpooled, pooled)}",
        f"  unpooled cold / docker run floor (CLI):         {both(unpooled, f.cli)}",
        f"  docker pooled cold / process pooled cold:       {both(pooled, r.process_cold.samples[POOL_MEMORY_MB])}",
        f"  docker warm / process warm (platform):          {warm_ratio(d, p)}",
        f"  docker direct / process direct:                 "
        f"c=1 p50 {il.ratio(p50(d.c1_direct), p50(p.c1_direct))}, c=16 req/s {il.ratio(d.load_direct.rps, p.load_direct.rps)}",
        f"  platform / direct, docker backend:              {plat_direct(d)}",
        f"  platform / direct, process backend:             {plat_direct(p)}",
        "  (latency ratios: how many times slower; req/s ratios: the fraction delivered)",
        "",
        "floor command: " + " ".join(f.command),
        f"cold: a fresh function per sample (same archive, already in the node's code cache), concurrency 1; "
        f"before each, the previous instance gone and the pool full, then {plan.pause_s:g} s after the deploy; "
        f"{POOL_MEMORY_MB} and {SMALL_MEMORY_MB} MB samples interleaved.",
        f"warm: {WARM_FUNCTION} (concurrency 1, one instance): {plan.warmup_calls} warm-up calls, then "
        f"{plan.warm_calls} sequential calls per side; {WIDE_FUNCTION} (concurrency {il.CONCURRENCY}, one instance): "
        f"{plan.load_warmup_s:g} s warm-up, then {plan.load_s:g} s closed loop of {il.CONCURRENCY} callers per side. "
        "platform = POST /v1/functions/{name}/invoke on the gateway; direct = POST /_/invoke on the same "
        "instance's unix socket (same client and body); raw socket = blocking socket, no HTTP library.",
        "platform start (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r.start_s.items()),
        "cpu (dockerd, containerd, shims and containers count as 'other processes'):",
        f"  floor CLI:            {f.cli_cpu.summary()}",
        f"  floor API:            {f.api_cpu.summary()}",
    ]
    for phase in (r.pooled, r.unpooled, r.process_cold):
        lines.append(f"  cold {phase.label + ':':<16} {phase.cpu.summary() if phase.cpu else '-'}")
    for w in (d, p):
        lines.append(f"  warm c=1 {w.label}, platform: {w.c1_platform_cpu.summary()}")
        lines.append(f"  warm c=1 {w.label}, direct:   {w.c1_direct_cpu.summary()}")
        lines.append(f"  c=16 {w.label}, platform:     {w.load_platform_cpu.summary()}")
        lines.append(f"  c=16 {w.label}, direct:       {w.load_direct_cpu.summary()}")
    lines.append(
        "function host's own cpu ms per call (docker: the container's cgroup; process: the host process):"
    )
    for w in (d, p):
        lines.append(
            f"  {w.label}: "
            + "; ".join(f"{phase} {use.summary() if use else '-'}" for phase, use in w.host.items())
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main


async def timed_cold(
    p: Running, archive: bytes, counts: dict[int, int], plan: Plan, pool_size: int
) -> ColdPhase:
    phase, cpu = await il.with_cpu(measure_cold(p, archive, counts, plan.pause_s, pool_size))
    phase.cpu = cpu
    return phase


async def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    plan = Plan.from_args(args)
    code = il.code_version()
    archive = il.make_archive()
    run_label = f"{FLOOR_LABEL}={os.getpid()}"
    try:
        docker = aiodocker.Docker()
    except (AssertionError, ValueError) as exc:
        raise BenchError(f"no Docker socket found: {exc}") from exc
    try:
        async with asyncio.timeout(args.max_seconds):
            try:
                info = await docker.system.info()
                layout = await runtime_layout(docker, await ensure_runtime_image(docker, tag=DEFAULT_TAG))
            except (aiodocker.DockerError, OSError, Unavailable) as exc:
                raise BenchError(f"Docker daemon unusable: {exc}") from exc
            header = [*il.machine_lines(argv, code), *docker_lines(info)]
            floor = await measure_floor(docker, layout, plan, run_label)
            starts: dict[str, float] = {}

            async with platform(
                "docker pool 2", docker, args.keep_home, runtime="docker", pool_size=POOL_SIZE
            ) as p:
                starts[p.label] = p.start_s
                pooled = await timed_cold(
                    p,
                    archive,
                    {POOL_MEMORY_MB: plan.pooled_256, SMALL_MEMORY_MB: plan.pooled_128},
                    plan,
                    POOL_SIZE,
                )
                docker_warm = await measure_warm(p, archive, plan)
                docker_warm.label = "docker"

            async with platform("docker pool 0", docker, args.keep_home, runtime="docker", pool_size=0) as p:
                starts[p.label] = p.start_s
                unpooled = await timed_cold(p, archive, {POOL_MEMORY_MB: plan.unpooled}, plan, 0)

            async with platform(
                "process pool 2", None, args.keep_home, runtime="process", pool_size=POOL_SIZE
            ) as p:
                starts[p.label] = p.start_s
                process_cold = await timed_cold(
                    p, archive, {POOL_MEMORY_MB: plan.process_cold}, plan, POOL_SIZE
                )
                process_warm = await measure_warm(p, archive, plan)
                process_warm.label = "process"

            results = Results(floor, pooled, unpooled, process_cold, docker_warm, process_warm, starts)
            print(report(results, plan, header), flush=True)
    finally:
        with contextlib.suppress(aiodocker.DockerError, OSError):
            strays = await docker.containers.list(all=True, filters=json.dumps({"label": [run_label]}))
            for container in strays:
                with contextlib.suppress(aiodocker.DockerError):
                    await container.delete(force=True)
        await docker.close()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Docker cold starts (pooled, unpooled) against docker run, and warm calls against the process backend."
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter loads (a smoke run)")
    parser.add_argument(
        "--floor", type=int, default=0, help="docker run samples per way (default 20, --quick 6)"
    )
    parser.add_argument(
        "--cold",
        type=int,
        default=0,
        help="pooled 256 MB cold samples; half as many at 128 MB (default 16, --quick 5)",
    )
    parser.add_argument(
        "--cold-unpooled", type=int, default=0, help="unpooled cold samples (default 12, --quick 4)"
    )
    parser.add_argument(
        "--pause", type=float, default=1.0, help="seconds between a deploy and its cold invoke (default 1)"
    )
    parser.add_argument(
        "--warm", type=int, default=0, help="sequential warm calls per side (default 1000, --quick 300)"
    )
    parser.add_argument(
        "--duration", type=float, default=0.0, help="seconds per c=16 load (default 8, --quick 3)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=900.0, help="abort the whole run after this long"
    )
    parser.add_argument(
        "--keep-home", action="store_true", help="keep the temp platform homes (logs) afterwards"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop  # what the services run on; the load generator uses it too when installed

        loop_factory = uvloop.new_event_loop
    try:
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
