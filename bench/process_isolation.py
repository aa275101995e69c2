"""What the process backend's sandbox costs: cold starts and warm calls, sandboxed and not, same run.

Run from the repository root, as root, with bubblewrap installed (``bench/README.md``)::

    .venv/bin/python bench/process_isolation.py            # about 3 minutes
    .venv/bin/python bench/process_isolation.py --quick    # about 1.5 minutes

Two embedded platforms run side by side, identical but for ``FAAS_PROCESS_ISOLATION``: ``none``
(hosts are plain processes of the agent's user) and ``sandbox`` (bubblewrap namespaces, a user and a
cgroup per host: ``faas/runtime/sandbox.py``).  Both keep a warm pool of 2 generic hosts.

- Cold starts: samples alternate between the platforms.  Each deploys a fresh function (the same
  archive: its code is in the node's cache after the first, which is reported apart), times one
  invocation through the gateway (it must answer ``X-Faas-Cold: 1``), deletes the function, waits
  until its instance record is gone, and pauses so the pool is full again.
- Warm calls: ``wrk`` through each gateway at concurrency 1 (a concurrency-1 function) and 16 (one
  instance of a concurrency-16 function), in rounds that alternate between the platforms; each
  figure is the median of its rounds.

Every figure is printed with its ratio sandbox / none.  Only processes this script started are
stopped (the platforms, with ``cluster.stop``), and both temp homes are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import invoke_latency as il  # noqa: E402
import wrk  # noqa: E402

from faas.core.errors import Unavailable  # noqa: E402
from faas.core.etcd import Etcd  # noqa: E402
from faas.core.service import etcd_from_settings  # noqa: E402
from faas.core.settings import Settings  # noqa: E402
from faas.launcher.embedded import EmbeddedCluster, settings_for_test  # noqa: E402

log = il.log
BenchError = il.BenchError
MODES = ("none", "sandbox")
C1_FUNCTION = "iso-c1"
C16_FUNCTION = "iso-c16"
POOL_SIZE = 2
GONE_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class Plan:
    cold: int
    rounds: int
    round_s: float
    pause_s: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        return cls(
            cold=args.cold or (6 if args.quick else 16),
            rounds=args.rounds or (2 if args.quick else 4),
            round_s=args.duration or (4.0 if args.quick else 8.0),
            pause_s=args.pause,
        )


@dataclass(slots=True)
class Platform:
    mode: str
    home: Path
    settings: Settings
    cluster: EmbeddedCluster
    etcd: Etcd
    gw: httpx.AsyncClient
    script: Path
    first_cold_s: float = float("nan")
    cold_s: list[float] = field(default_factory=list)
    c1: list[wrk.WrkResult] = field(default_factory=list)
    c16: list[wrk.WrkResult] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.settings.gateway_url}/v1/functions/{name}/invoke"


@contextlib.asynccontextmanager
async def platform(mode: str) -> AsyncIterator[Platform]:
    home = Path(tempfile.mkdtemp(prefix=f"faas-iso-{mode}-", dir="/tmp"))
    cluster = EmbeddedCluster(
        settings_for_test(home, keepalive_s=900.0, reap_interval_s=0.5, pool_size=POOL_SIZE, process_isolation=mode)
    )
    settings = cluster.settings
    etcd = etcd_from_settings(settings)
    gw = il.new_gateway_client(home)
    try:
        log(f"starting platform '{mode}' in {home}")
        try:
            await cluster.start()
        except Unavailable as exc:
            raise BenchError(f"platform '{mode}' did not start: {exc}") from exc
        await etcd.connect()
        script = home / "post.lua"
        script.write_text(wrk.post_script(il.EVENT.decode(), {**il.JSON_HEADERS, **il.admin_headers(home)}))
        yield Platform(mode, home, settings, cluster, etcd, gw, script)
    finally:
        await gw.aclose()
        await etcd.close()
        log(f"stopping platform '{mode}'")
        await cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


async def cold_sample(p: Platform, name: str, archive: bytes, pause_s: float) -> float:
    await il.deploy(p.gw, p.settings, name, archive, concurrency=1, max_instances=1)
    await asyncio.sleep(pause_s)
    started = time.perf_counter()
    resp = await p.gw.post(p.url(name), content=il.EVENT, headers=il.JSON_HEADERS)
    elapsed = time.perf_counter() - started
    if resp.status_code != 200 or resp.headers.get("x-faas-cold") != "1":
        raise BenchError(f"{p.mode}: cold call of {name} answered {resp.status_code} (cold: {resp.headers.get('x-faas-cold')})")
    await il.delete(p.gw, p.settings, name)
    give_up_at = time.monotonic() + GONE_WAIT_S
    while await il.instances_of(p.etcd, name):
        if time.monotonic() > give_up_at:
            raise BenchError(f"{p.mode}: the instance of {name} is still recorded after {GONE_WAIT_S:g} s")
        await asyncio.sleep(0.05)
    log(f"{p.mode}: cold start {name}: {elapsed * 1000:.1f} ms")
    return elapsed


async def run(plan: Plan) -> list[Platform]:
    wrk_path = wrk.find_wrk()
    archive = il.make_archive()
    async with platform("none") as plain, platform("sandbox") as boxed:
        both = [plain, boxed]
        for p in both:
            p.first_cold_s = await cold_sample(p, "iso-first", archive, plan.pause_s)
        for i in range(plan.cold):
            for p in both if i % 2 == 0 else reversed(both):
                p.cold_s.append(await cold_sample(p, f"iso-cold-{i}", archive, plan.pause_s))
        for p in both:
            await il.deploy(p.gw, p.settings, C1_FUNCTION, archive, concurrency=1, max_instances=1)
            await il.deploy(p.gw, p.settings, C16_FUNCTION, archive, concurrency=16, max_instances=1)
            for name in (C1_FUNCTION, C16_FUNCTION):
                resp = await p.gw.post(p.url(name), content=il.EVENT, headers=il.JSON_HEADERS)
                if resp.status_code != 200:
                    raise BenchError(f"{p.mode}: first call of {name} answered {resp.status_code}")
        for r in range(plan.rounds):
            for p in both if r % 2 == 0 else reversed(both):
                for name, connections, results in ((C1_FUNCTION, 1, p.c1), (C16_FUNCTION, 16, p.c16)):
                    result = await wrk.run(
                        wrk_path, p.url(name), script=p.script, threads=1, connections=connections, duration_s=plan.round_s
                    )
                    if result.errors:
                        raise BenchError(f"{p.mode}: {result.errors} failed calls of {name}")
                    results.append(result)
                    log(f"{p.mode}: round {r + 1} {name}: p50 {result.p50_ms:.2f} ms, {result.ok_rps:,.0f} req/s")
        return both


def report(plain: Platform, boxed: Platform, plan: Plan) -> str:
    def p50(values: list[float]) -> float:
        return statistics.median(values) * 1000

    def p99(values: list[float]) -> float:
        return il.percentile(values, 99.0) * 1000

    rows = [
        ("cold start through the platform, pool of 2, p50, ms", p50(plain.cold_s), p50(boxed.cold_s), 1),
        (f"cold start, p99 (n={plan.cold}: the maximum), ms", p99(plain.cold_s), p99(boxed.cold_s), 1),
        ("first cold start (code downloaded from S3), ms", plain.first_cold_s * 1000, boxed.first_cold_s * 1000, 1),
        ("warm c=1 p50 (wrk, median of rounds), ms", statistics.median(r.p50_ms for r in plain.c1),
         statistics.median(r.p50_ms for r in boxed.c1), 2),
        ("warm c=1, req/s", statistics.median(r.ok_rps for r in plain.c1), statistics.median(r.ok_rps for r in boxed.c1), 0),
        ("warm c=16 (one instance of concurrency 16), req/s", statistics.median(r.ok_rps for r in plain.c16),
         statistics.median(r.ok_rps for r in boxed.c16), 0),
        ("warm c=16 p50, ms", statistics.median(r.p50_ms for r in plain.c16),
         statistics.median(r.p50_ms for r in boxed.c16), 2),
    ]  # fmt: skip
    lines = [
        f"process backend isolation, {plan.cold} cold samples and {plan.rounds} wrk rounds of {plan.round_s:g} s each",
        "",
        "| figure | none | sandbox | sandbox / none |",
        "| --- | --- | --- | --- |",
    ]
    for label, a, b, digits in rows:
        lines.append(f"| {label} | {a:,.{digits}f} | {b:,.{digits}f} | {b / a:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter rounds")
    parser.add_argument("--cold", type=int, default=0, help="cold samples per platform")
    parser.add_argument("--rounds", type=int, default=0, help="wrk rounds per platform and concurrency")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds per wrk round")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between a deploy and its cold call")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    plan = Plan.from_args(parse_args(sys.argv[1:] if argv is None else argv))
    try:
        plain, boxed = asyncio.run(asyncio.wait_for(run(plan), 900))
    except (BenchError, wrk.WrkError) as exc:
        log(f"failed: {exc}")
        return 1
    print(report(plain, boxed, plan), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
