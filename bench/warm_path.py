"""Warm calls under wrk: the platform, the function host alone and a naive proxy chain, in one run.

Run from the repository root (``bench/README.md`` explains every figure)::

    .venv/bin/python bench/warm_path.py            # full run, about 2 minutes (or: make bench-warm)
    .venv/bin/python bench/warm_path.py --quick    # smoke run, about 1 minute
    .venv/bin/python bench/warm_path.py --json /tmp/warm.json

The load generator is wrk (compiled, closed loop; ``bench/wrk.py``), so the figures are not limited by
a Python client.  Three targets are measured in the same run, each at concurrency 1 (``-t1 -c1``) and
16 (``-t2 -c16``), always with the body ``{}``:

- **platform**: a private embedded platform in a temp dir (the launcher ``faas up`` uses, as
  ``invoke_latency.py`` starts it), ``POST /v1/functions/{name}/invoke`` on the gateway, to a no-op
  function with concurrency 1 (c=1) and one with concurrency 16 and max_instances 1 (c=16: one
  instance, 16 slots);
- **instance alone**: a standalone function host (``host.py --tcp-port``, loopback) specialised with
  the same version and archive (the body ``InstanceSpec.specialize_body()`` builds, the code fetched
  through a presigned URL of the platform's own code store, as the scheduler hands it out), then
  ``POST /_/invoke`` with the headers a dispatcher sends;
- **naive chain**: three aiohttp proxies in front of a raw ASGI endpoint under uvicorn
  (``bench/naive_chain.py``): the three hops built the obvious way.

and, from ``/proc``, the CPU each process spent per call (utime + stime over the measured runs,
divided by the answers wrk counted).  After a warm-up per target, the targets are measured in rounds
(one wrk run per target each, the order rotating), so that all three meet about the same noise.

Caveats:
- wrk, the platform, the host and the chain share the machine's cores: at c=16 the cores are
  saturated, so req/s measures the CPU per call of everything, the load generator included;
- the instance alone gets a static request id and a deadline an hour ahead (wrk sends the same
  headers every time); the host does not use the id for anything but the handler's context;
- CPU per call counts whatever a process did during the run, background work (heartbeats, lease
  keepalives) included; over a run of thousands of calls that is a few microseconds per call;
- the CPU of a process that exits during a run (none should) is not counted.

Everything this script starts is stopped in ``finally``, by pid; it never signals anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# bench/ is sys.path[0] when this file is run as a script; make sure of it when imported otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import invoke_latency as il  # noqa: E402  (platform start-up, deploy and /proc CPU helpers)
import wrk  # noqa: E402

from faas.core import keys, wire  # noqa: E402
from faas.core.codestore import CodeStore  # noqa: E402
from faas.core.etcd import Etcd  # noqa: E402
from faas.core.models import FunctionRecord, VersionSpec  # noqa: E402
from faas.core.service import etcd_from_settings  # noqa: E402
from faas.core.settings import Settings  # noqa: E402
from faas.launcher.embedded import EmbeddedCluster, find_free_port, settings_for_test  # noqa: E402
from faas.runtime.backend import InstanceSpec  # noqa: E402
from faas.runtime.process_backend import HOST_ENV, HOST_SCRIPT, INHERITED_ENV  # noqa: E402

NAMESPACE = il.NAMESPACE
C1_FUNCTION = "noop-c1"  # concurrency 1, max_instances 1
C16_FUNCTION = "noop-c16"  # concurrency 16, max_instances 1: c=16 hits one instance with 16 slots
CONCURRENCY = 16
EVENT = "{}"
PROXY_HOPS = 3
NAIVE_SCRIPT = Path(__file__).resolve().with_name("naive_chain.py")
READY_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
TARGETS = ("platform", "instance", "naive")
COLUMNS = {"platform": "platform", "instance": "instance alone", "naive": "naive chain"}
ROLES = ("gateway", "trigger", "dispatcher", "host")

# The targets (issue 9, "The fast path").
TARGET_C1_P50_MS = 1.0
TARGET_C1_VS_INSTANCE = 2.0
TARGET_C16_RPS = 4000.0
TARGET_C16_VS_NAIVE = 1.5
TARGET_CPU_MS = 0.15
NOISY_CORES = 0.25  # other processes' average load during a target's rounds that makes a run "noisy"

BenchError = il.BenchError
log = il.log
_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int  # measured wrk runs per target and concurrency, interleaved with the other targets'
    duration_s: int  # wrk -d of each measured run
    warmup_s: int  # an unmeasured wrk run per target and concurrency before the rounds

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        return cls(
            rounds=args.rounds or (2 if args.quick else 3),
            duration_s=args.duration or (2 if args.quick else 4),
            warmup_s=1 if args.quick else 2,
        )


# --------------------------------------------------------------------------------------------------
# Processes this script starts (the standalone hosts and the naive chain)


@dataclass(slots=True)
class Children:
    """Every process started here, stopped in reverse order by pid (SIGTERM, then SIGKILL)."""

    started: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log_path: Path, **popen: Any) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **popen)
        self.started.append((name, proc, log_path))
        return proc

    def check_alive(self) -> None:
        for name, proc, log_path in self.started:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-800:]
                raise BenchError(f"{name} (pid {proc.pid}) exited with {proc.returncode}: {tail}")

    def stop_all(self) -> None:
        for _name, proc, _ in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc, _ in reversed(self.started):
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started.clear()


async def wait_until(what: str, children: Children, probe: Callable[[], Any]) -> Any:
    """Call ``probe`` (a coroutine function) until it returns something other than None."""
    give_up_at = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < give_up_at:
        children.check_alive()
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(0.05)
    raise BenchError(f"{what} was not ready within {READY_TIMEOUT_S:g} s")


# --------------------------------------------------------------------------------------------------
# The instance alone: a standalone host on loopback TCP, specialised as the platform would


async def instance_spec(etcd: Etcd, settings: Settings, name: str) -> InstanceSpec:
    """The spec the scheduler would send a node for ``name``'s latest version (with a fresh presigned URL)."""
    kv = await etcd.get(keys.function(NAMESPACE, name))
    if kv is None:
        raise BenchError(f"function {name} not in etcd")
    record = FunctionRecord.model_validate_json(kv.value)
    kv = await etcd.get(keys.version(NAMESPACE, name, record.latest_version))
    if kv is None:
        raise BenchError(f"version {record.latest_version} of {name} not in etcd")
    version = VersionSpec.model_validate_json(kv.value)
    code_url = await asyncio.to_thread(CodeStore(settings).presign_get, version.code.key)
    return InstanceSpec(
        instance_id=f"bench-{name}",
        namespace=version.namespace,
        function=version.function,
        version=version.version,
        handler=version.handler,
        code_url=code_url,
        sha256=version.code.sha256,
        size=version.code.size,
        memory_mb=version.memory_mb,
        timeout_s=version.timeout_s,
        concurrency=version.concurrency,
        environment=version.environment,
        function_uid=version.function_uid,
    )


async def start_instance(
    children: Children, client: httpx.AsyncClient, home: Path, spec: InstanceSpec
) -> tuple[int, str]:
    """Start a host on 127.0.0.1 (a free port it picks), specialise it; (pid, invoke URL)."""
    cache_dir = home / "bench-cache"  # its own: the host downloads the archive, as a first cold start does
    cache_dir.mkdir(exist_ok=True)
    log_path = home / f"{spec.instance_id}.log"
    env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ} | HOST_ENV
    argv = [
        sys.executable, "-S", "-E", str(HOST_SCRIPT), "--tcp-port", "0",
        "--cache-dir", str(cache_dir), "--instance-id", spec.instance_id,
    ]  # fmt: skip
    proc = children.start(spec.instance_id, argv, log_path, env=env, cwd=cache_dir, start_new_session=True)

    async def port() -> int | None:
        match = _LISTENING.search(await asyncio.to_thread(log_path.read_bytes))
        return int(match[1]) if match else None

    base = f"http://127.0.0.1:{await wait_until(f'host {spec.instance_id}', children, port)}"
    resp = await client.post(f"{base}/_/specialize", json=spec.specialize_body(), timeout=60)
    if resp.status_code != 200:
        raise BenchError(f"specialising {spec.instance_id} answered {resp.status_code}: {resp.text}")
    return proc.pid, f"{base}/_/invoke"


# --------------------------------------------------------------------------------------------------
# The naive chain: a raw ASGI endpoint and three aiohttp proxies, one process each


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = find_free_port()
        if port not in ports:
            ports.append(port)
    return ports


async def start_naive_chain(
    children: Children, client: httpx.AsyncClient, home: Path
) -> tuple[list[int], str]:
    """(pids, front URL) of the endpoint and the proxies chained in front of it."""
    ports = free_ports(PROXY_HOPS + 1)
    pids = []
    python = [sys.executable, str(NAIVE_SCRIPT)]
    proc = children.start(
        "naive endpoint", [*python, "endpoint", "--port", str(ports[0])], home / "naive-0.log"
    )
    pids.append(proc.pid)
    for hop in range(1, PROXY_HOPS + 1):
        upstream = f"http://127.0.0.1:{ports[hop - 1]}"
        argv = [*python, "proxy", "--port", str(ports[hop]), "--upstream", upstream]
        pids.append(children.start(f"naive proxy {hop}", argv, home / f"naive-{hop}.log").pid)
    front = f"http://127.0.0.1:{ports[-1]}/invoke"

    async def answers() -> bool | None:
        with contextlib.suppress(httpx.TransportError):
            resp = await client.post(front, content=EVENT, headers=il.JSON_HEADERS, timeout=5)
            if resp.status_code == 200 and resp.content == b"{}":
                return True
        return None

    await wait_until("the naive chain", children, answers)
    return pids, front


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One target at one concurrency: where wrk sends, and whose CPU the call costs."""

    target: str  # platform | instance | naive
    url: str
    script: Path
    roots: frozenset[int]  # these processes and their descendants serve the target
    roles: dict[str, int] = field(default_factory=dict)  # role -> pid, for the per-role CPU split


@dataclass(frozen=True, slots=True)
class Round:
    """One measured wrk run and the CPU every process used meanwhile."""

    result: wrk.WrkResult
    usage: il.CpuUsage
    wrk_cpu_s: float  # wrk's own user + system time (it is waited for, so RUSAGE_CHILDREN has it)


@dataclass(slots=True)
class Run:
    """One target at one concurrency: its rounds, interleaved with the other targets' rounds."""

    endpoint: Endpoint
    connections: int
    rounds: list[Round] = field(default_factory=list)
    served_by: set[int] = field(default_factory=set)  # the roots and their descendants seen after a round

    @property
    def answers(self) -> int:
        return sum(r.result.requests for r in self.rounds)

    @property
    def errors(self) -> int:
        return sum(r.result.errors for r in self.rounds)

    @property
    def duration_s(self) -> float:
        return sum(r.result.duration_s for r in self.rounds)

    @property
    def ok_rps(self) -> float:
        ok = sum(r.result.ok_requests for r in self.rounds)
        return ok / self.duration_s if self.duration_s > 0 else math.nan

    def percentile_ms(self, q: float) -> float:
        """The median over the rounds of each round's percentile (wrk prints no histogram to merge)."""
        values = [r.result.percentile_ms(q) for r in self.rounds]
        return statistics.median(values) if values else math.nan

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50.0)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99.0)

    def cpu_s(self, pid: int) -> float:
        return sum(r.usage.per_pid.get(pid, 0.0) for r in self.rounds)

    def ms_per_call(self, cpu_s: float) -> float:
        return 1000 * cpu_s / self.answers if self.answers else math.nan

    @property
    def target_cpu_ms(self) -> float:
        """CPU per call of every process serving the target (not wrk's)."""
        return self.ms_per_call(sum(self.cpu_s(pid) for pid in self.served_by))

    def role_cpu_ms(self, role: str) -> float:
        pid = self.endpoint.roles.get(role)
        return math.nan if pid is None else self.ms_per_call(self.cpu_s(pid))

    @property
    def wrk_cpu_ms(self) -> float:
        return self.ms_per_call(sum(r.wrk_cpu_s for r in self.rounds))

    @property
    def other_cores(self) -> float:
        """Cores busy with processes outside this run, on average over the rounds: the noise."""
        elapsed = sum(r.usage.elapsed_s for r in self.rounds)
        # wrk has exited when the round's second snapshot is taken: its CPU is not in ours_s.
        other = sum(max(0.0, r.usage.machine_s - r.usage.ours_s - r.wrk_cpu_s) for r in self.rounds)
        return other / elapsed if elapsed > 0 else math.nan


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def measure(
    wrk_path: str, endpoints: dict[str, Endpoint], connections: int, plan: Plan
) -> dict[str, Run]:
    """Warm each target up, then ``plan.rounds`` rounds of one wrk run per target, the order rotating,
    so that every target meets about the same noise from the rest of the machine."""
    threads = 1 if connections == 1 else 2

    async def load(endpoint: Endpoint, duration_s: int) -> wrk.WrkResult:
        return await wrk.run(
            wrk_path, endpoint.url, script=endpoint.script, threads=threads, connections=connections,
            duration_s=duration_s,
        )  # fmt: skip

    runs = {target: Run(endpoint, connections) for target, endpoint in endpoints.items()}
    for target, endpoint in endpoints.items():
        warm = await load(endpoint, plan.warmup_s)
        if warm.ok_requests == 0:
            raise BenchError(f"{COLUMNS[target]} c={connections}: no successful answer while warming up")
    log(
        f"c={connections}: {plan.rounds} rounds of wrk -t{threads} -c{connections} -d{plan.duration_s}s per target"
    )
    order = list(endpoints)
    for number in range(plan.rounds):
        for target in order[number % len(order) :] + order[: number % len(order)]:
            run = runs[target]
            before, wrk_before = il.CpuSnapshot.take(), _children_cpu_s()
            result = await load(run.endpoint, plan.duration_s)
            after, wrk_after = il.CpuSnapshot.take(), _children_cpu_s()
            run.rounds.append(Round(result, il.CpuUsage.between(before, after), wrk_after - wrk_before))
            for root in run.endpoint.roots:
                run.served_by |= il.descendants(after.procs, root)
            log(
                f"  {COLUMNS[target]} c={connections} round {number + 1}: {result.ok_rps:,.0f} req/s, "
                f"p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms"
                + (f", {result.errors} errors" if result.errors else "")
            )
    return runs


# --------------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    values: dict[str, float]  # target -> value
    digits: int
    target: str = ""
    met: str = ""


def ratio(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) or b == 0 else a / b


def verdict(*checks: bool) -> str:
    return "yes" if all(checks) else "no"


def rows(c1: dict[str, Run], c16: dict[str, Run]) -> list[Row]:
    def each(pick: Callable[[Run], float], runs: dict[str, Run]) -> dict[str, float]:
        return {target: pick(run) for target, run in runs.items()}

    p50 = each(lambda r: r.p50_ms, c1)
    rps16 = each(lambda r: r.ok_rps, c16)
    out = [
        Row(
            "warm c=1 p50, ms", p50, 3, f"<= {TARGET_C1_P50_MS:g} and <= {TARGET_C1_VS_INSTANCE:g}x instance",
            verdict(
                p50["platform"] <= TARGET_C1_P50_MS,
                ratio(p50["platform"], p50["instance"]) <= TARGET_C1_VS_INSTANCE,
            ),
        ),
        Row("warm c=1 p99, ms", each(lambda r: r.p99_ms, c1), 3),
        Row("warm c=1 req/s", each(lambda r: r.ok_rps, c1), 0),
        Row(
            f"c={CONCURRENCY} req/s (one instance, concurrency {CONCURRENCY})", rps16, 0,
            f">= {TARGET_C16_RPS:,.0f} and >= {TARGET_C16_VS_NAIVE:g}x naive",
            verdict(
                rps16["platform"] >= TARGET_C16_RPS,
                ratio(rps16["platform"], rps16["naive"]) >= TARGET_C16_VS_NAIVE,
            ),
        ),
        Row(f"c={CONCURRENCY} p50, ms", each(lambda r: r.p50_ms, c16), 2),
        Row(f"c={CONCURRENCY} p99, ms", each(lambda r: r.p99_ms, c16), 2),
        Row(f"c={CONCURRENCY} cpu ms per call, all its processes", each(lambda r: r.target_cpu_ms, c16), 3),
    ]  # fmt: skip
    for role in ROLES:
        values = {"platform": c16["platform"].role_cpu_ms(role)}
        if role == "host":
            values["instance"] = c16["instance"].role_cpu_ms(role)
            out.append(Row(f"c={CONCURRENCY} cpu ms per call, {role}", values, 3))
            continue
        value = values["platform"]
        met = verdict(value <= TARGET_CPU_MS)
        out.append(Row(f"c={CONCURRENCY} cpu ms per call, {role}", values, 3, f"<= {TARGET_CPU_MS:g}", met))
    return out


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def table(all_rows: list[Row]) -> list[str]:
    head = ["figure", *COLUMNS.values(), "platform/instance", "platform/naive", "target", "met"]
    body = []
    for row in all_rows:
        plat = row.values.get("platform", math.nan)
        body.append(
            [
                row.figure,
                *(fmt(row.values.get(t), row.digits) for t in TARGETS),
                fmt_ratio(ratio(plat, row.values.get("instance", math.nan))),
                fmt_ratio(ratio(plat, row.values.get("naive", math.nan))),
                row.target,
                row.met,
            ]
        )
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        numbers = [f"{cell:>{widths[i + 1]}}" for i, cell in enumerate(cells[1:6])]
        rest = [f"{cell:<{widths[i + 6]}}" for i, cell in enumerate(cells[6:])]
        return "  ".join([first, *numbers, *rest]).rstrip()

    return [line(head), line(["-" * w for w in widths]), *(line(cells) for cells in body)]


def run_notes(runs: Iterable[Run]) -> list[str]:
    notes = []
    for run in runs:
        errors = [
            f"round {k + 1}: {r.result.non_2xx} non-2xx, socket errors {dict(r.result.socket_errors)}"
            for k, r in enumerate(run.rounds)
            if r.result.errors
        ]
        rounds = " / ".join(f"{r.result.ok_rps:,.0f}" for r in run.rounds)
        notes.append(
            f"  {COLUMNS[run.endpoint.target]} c={run.connections}: {run.answers} answers in {run.duration_s:.1f} s "
            f"(req/s by round {rounds}), {'; '.join(errors) if errors else 'no errors'}; wrk's cpu "
            f"{run.wrk_cpu_ms:.3f} ms per call; other processes busy {run.other_cores:.2f} cores on average"
        )
    return notes


def report(
    plan: Plan, c1: dict[str, Run], c16: dict[str, Run], argv: Sequence[str], code: str
) -> tuple[str, list[Row]]:
    all_rows = rows(c1, c16)
    c1_roles = ", ".join(f"{role} {c1['platform'].role_cpu_ms(role):.3f}" for role in ROLES)
    naive = c16["naive"]
    hops = ", ".join(f"{role} {naive.role_cpu_ms(role):.3f}" for role in naive.endpoint.roles)
    runs = [*c1.values(), *c16.values()]
    noise = max(run.other_cores for run in runs)
    warning = (
        [
            f"NOISY: other processes kept up to {noise:.2f} of {os.cpu_count()} cores busy during a target's "
            "rounds; the absolute figures are not clean, the ratios (same rounds, interleaved) less affected.",
            "",
        ]
        if noise >= NOISY_CORES
        else []
    )
    notes = [
        "",
        "platform = POST /v1/functions/{name}/invoke on the gateway (gateway -> trigger -> dispatcher -> host), "
        f"{C1_FUNCTION} (concurrency 1) at c=1, {C16_FUNCTION} (concurrency 16, max_instances 1) at c={CONCURRENCY}.",
        "instance alone = POST /_/invoke on a standalone host (host.py --tcp-port) specialised with the same "
        "version, and the dispatcher's headers.",
        f"naive chain = {PROXY_HOPS} aiohttp proxies (one ClientSession each, keep-alive) in front of a raw ASGI "
        "endpoint under uvicorn (uvloop, httptools); bench/naive_chain.py.",
        f"wrk -t1 -c1 (c=1) and -t2 -c{CONCURRENCY}: after a {plan.warmup_s} s warm-up per target, {plan.rounds} "
        f"rounds of -d{plan.duration_s}s per target, the targets interleaved; body {{}}. req/s counts 2xx answers "
        "of all rounds; p50/p99 are the median over the rounds of wrk's --latency percentiles.",
        "platform/instance, platform/naive: for latencies and cpu, how many times the platform's; for req/s, the "
        "fraction of the other's throughput the platform delivers.",
        "cpu ms per call = utime + stime from /proc over the measured rounds / answers wrk counted. 'all its "
        "processes': platform = every platform process (etcd, Valkey, SeaweedFS, services, hosts); "
        "instance = the host; naive = the endpoint and the proxies.",
        f"  at c=1, cpu ms per call: platform {c1_roles}; instance alone host "
        f"{c1['instance'].role_cpu_ms('host'):.3f}; naive chain all its processes {c1['naive'].target_cpu_ms:.3f}",
        f"  naive chain at c={CONCURRENCY}, cpu ms per call: {hops}",
        "runs:",
        *run_notes(runs),
    ]
    text = [*machine_lines(argv, code), "", *warning, *table(all_rows), *notes]
    return "\n".join(text), all_rows


def machine_lines(argv: Sequence[str], code: str) -> list[str]:
    """Where and what was measured: invoke_latency's lines, with wrk named as the load generator."""
    lines = [line for line in il.machine_lines(argv, code) if not line.startswith("python:")]
    return [*lines, f"load generator: {wrk.version(wrk.find_wrk())}; python {sys.version.split()[0]}"]


def as_json(
    plan: Plan, c1: dict[str, Run], c16: dict[str, Run], all_rows: list[Row], code: str
) -> dict[str, Any]:
    def figures(run: Run) -> dict[str, Any]:
        return {
            "p50_ms": run.p50_ms,
            "p99_ms": run.p99_ms,
            "req_per_s": run.ok_rps,
            "answers": run.answers,
            "errors": run.errors,
            "duration_s": run.duration_s,
            "cpu_ms_per_call": run.target_cpu_ms,
            "cpu_ms_per_call_by_process": {role: run.role_cpu_ms(role) for role in run.endpoint.roles},
            "wrk_cpu_ms_per_call": run.wrk_cpu_ms,
            "other_processes_cores": run.other_cores,
            "rounds": [
                {
                    "req_per_s": r.result.ok_rps,
                    "percentiles_ms": {f"{q:g}": v for q, v in r.result.percentiles_ms.items()},
                    "answers": r.result.requests,
                    "non_2xx": r.result.non_2xx,
                    "socket_errors": dict(r.result.socket_errors),
                }
                for r in run.rounds
            ],
        }

    def clean(value: Any) -> Any:  # NaN is not JSON
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(
        {
            "code": code,
            "nproc": len(os.sched_getaffinity(0)),
            "plan": {
                "rounds": plan.rounds,
                "duration_s": plan.duration_s,
                "warmup_s": plan.warmup_s,
                "concurrency": CONCURRENCY,
            },
            "c1": {target: figures(run) for target, run in c1.items()},
            f"c{CONCURRENCY}": {target: figures(run) for target, run in c16.items()},
            "table": [
                {
                    "figure": row.figure,
                    **{target: row.values.get(target, math.nan) for target in TARGETS},
                    "platform_vs_instance": ratio(
                        row.values["platform"], row.values.get("instance", math.nan)
                    ),
                    "platform_vs_naive": ratio(row.values["platform"], row.values.get("naive", math.nan)),
                    "target": row.target,
                    "met": row.met,
                }
                for row in all_rows
            ],
        }
    )


# --------------------------------------------------------------------------------------------------
# Main


def write_scripts(home: Path) -> dict[str, Path]:
    """One wrk Lua script per target: POST ``{}`` as JSON; the host also gets the dispatcher's headers."""
    deadline = wire.deadline_header(time.time() + 3600)  # static: wrk sends the same headers every time
    headers = {
        "platform": {**il.JSON_HEADERS, **il.admin_headers(home)},
        "instance": {**il.JSON_HEADERS, wire.REQUEST_ID: "wrk", wire.DEADLINE_MS: deadline},
        "naive": il.JSON_HEADERS,
    }
    scripts = {}
    for target, sent in headers.items():
        scripts[target] = home / f"{target}.lua"
        scripts[target].write_text(wrk.post_script(EVENT, sent))
    return scripts


async def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    plan = Plan.from_args(args)
    wrk_path = wrk.find_wrk()
    code = il.code_version()  # before the services start: what they run
    home = Path(tempfile.mkdtemp(prefix="faas-warm-", dir="/tmp"))  # short: unix socket paths <= 107 bytes
    cluster = EmbeddedCluster(settings_for_test(home), progress=il._progress)
    settings = cluster.settings
    etcd = etcd_from_settings(settings)
    gw = il.new_gateway_client(home)
    children = Children()
    try:
        async with asyncio.timeout(args.max_seconds):
            log(f"starting the platform in {home}")
            await cluster.start()
            await etcd.connect()
            archive = il.make_archive()
            await il.deploy(gw, settings, C1_FUNCTION, archive, concurrency=1, max_instances=1)
            await il.deploy(gw, settings, C16_FUNCTION, archive, concurrency=CONCURRENCY, max_instances=1)
            for name in (C1_FUNCTION, C16_FUNCTION):  # the cold starts, before any measurement
                url = f"{settings.gateway_url}/v1/functions/{name}/invoke"
                resp = await gw.post(url, content=EVENT, headers=il.JSON_HEADERS)
                if resp.status_code != 200:
                    raise BenchError(f"first call of {name} answered {resp.status_code}: {resp.text}")

            scripts = write_scripts(home)
            log("starting the standalone hosts and the naive chain")
            hosts: dict[str, tuple[int, str]] = {}
            for name in (C1_FUNCTION, C16_FUNCTION):
                hosts[name] = await start_instance(
                    children, gw, home, await instance_spec(etcd, settings, name)
                )
            naive_pids, naive_url = await start_naive_chain(children, gw, home)
            naive_roles = {
                "endpoint": naive_pids[0],
                **{f"proxy {k}": naive_pids[k] for k in range(1, PROXY_HOPS + 1)},
            }
            platform_roots = frozenset(rec.pid for rec in cluster.records)

            def endpoints(name: str, roles: dict[str, tuple[str, int]]) -> dict[str, Endpoint]:
                host_pid, host_url = hosts[name]
                return {
                    "platform": Endpoint(
                        "platform",
                        f"{settings.gateway_url}/v1/functions/{name}/invoke",
                        scripts["platform"],
                        platform_roots,
                        {role: pid for role, (_, pid) in roles.items()},
                    ),
                    "instance": Endpoint(
                        "instance", host_url, scripts["instance"], frozenset([host_pid]), {"host": host_pid}
                    ),
                    "naive": Endpoint(
                        "naive", naive_url, scripts["naive"], frozenset(naive_pids), naive_roles
                    ),
                }

            c1 = await measure(
                wrk_path, endpoints(C1_FUNCTION, await il.warm_path(cluster, etcd, C1_FUNCTION)), 1, plan
            )
            c16 = await measure(
                wrk_path,
                endpoints(C16_FUNCTION, await il.warm_path(cluster, etcd, C16_FUNCTION)),
                CONCURRENCY,
                plan,
            )
            if len(await il.instances_of(etcd, C16_FUNCTION)) != 1:
                raise BenchError(f"{C16_FUNCTION} does not run on exactly one instance")

            text, all_rows = report(plan, c1, c16, argv, code)
            print(text, flush=True)
            if args.json:
                figures = json.dumps(as_json(plan, c1, c16, all_rows, code), indent=2) + "\n"
                await asyncio.to_thread(Path(args.json).write_text, figures)
                log(f"figures written to {args.json}")
    finally:
        try:
            children.stop_all()
        finally:
            await gw.aclose()
            await etcd.close()
            log("stopping the platform")
            await cluster.stop()
        if args.keep_home:
            log(f"platform home (logs) kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Warm calls under wrk: the platform against the function host alone and a naive proxy chain."
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (a smoke run)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="measured runs per target and concurrency (default 3, --quick 2)",
    )
    parser.add_argument(
        "--duration", type=int, default=0, help="seconds of each measured wrk run (default 4, --quick 2)"
    )
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="abort the whole run after this long"
    )
    parser.add_argument("--keep-home", action="store_true", help="keep the temp dir (every log) afterwards")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        asyncio.run(run(args, [sys.argv[0], *argv]))
    except (BenchError, wrk.WrkError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"bench failed: the run took longer than --max-seconds {args.max_seconds:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
