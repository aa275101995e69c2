"""Choosing the lease TTL: what each TTL costs in spurious elections and buys in takeover time.

``python -m bench.chaos.ttl --ttl 2 3 5 --steady 120 --stops 3`` starts, for each TTL, a platform
with ``faas up`` (``FAAS_LEASE_TTL_S``), then:

- **steady**: the chaos load (sync and async calls, as ``bench.chaos`` sends them) for ``--steady``
  seconds with no fault, while a watcher polls the trigger and scheduler election keys every 100 ms:
  every change of a key's create revision is an election nobody asked for (a leader that could not
  refresh its lease in time, on a loaded machine);
- **frozen**: ``--stops`` times, the primary trigger is stopped (SIGSTOP) and the time until another
  member holds the key is measured (a killed leader is replaced by the standby's probe in about half
  a second whatever the TTL; a frozen one only when its lease lapses), then it is continued.

Prints a Markdown table (progress on stderr).  Loopback only, bounded, stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos.count import check_recovery
from bench.chaos.load import start_load
from bench.chaos.platform import ChaosPlatform
from bench.chaos.report import percentile
from bench.chaos.runner import NOOP_CONFIG, NOOP_FUNCTION
from faas.core import keys
from faas.core.errors import Unavailable
from faas.core.procs import pid_alive
from faas.core.service import etcd_from_settings

ROLES = ("trigger", "scheduler")


def log(message: str) -> None:
    print(f"[ttl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class TtlResult:
    ttl_s: int
    steady_s: float = 0.0
    spurious: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    takeovers_s: list[float] = field(default_factory=list)
    failed_sync: int = 0
    sent_sync: int = 0


async def _election_revisions(platform: ChaosPlatform) -> dict[str, int]:
    etcd = etcd_from_settings(platform.settings, timeout_s=2.0)
    try:
        out = {}
        for role in ROLES:
            kv = await etcd.get(keys.election(role))
            out[role] = kv.create_revision if kv is not None else 0
        return out
    finally:
        await etcd.close()


async def steady(platform: ChaosPlatform, result: TtlResult, seconds: float) -> None:
    out = platform.home / "chaos" / f"steady-ttl{result.ttl_s}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    load = await start_load(platform.url, NOOP_FUNCTION, sync_rate=20, async_rate=20, duration_s=seconds, out=out)
    await load.wait_started()
    seen = await _election_revisions(platform)
    started = time.monotonic()
    try:
        while not load.done and time.monotonic() - started < seconds:
            await asyncio.sleep(0.1)
            try:
                now = await _election_revisions(platform)
            except Unavailable:
                continue
            for role in ROLES:
                if now[role] != seen[role]:
                    result.spurious[role] += 1
                    log(f"TTL {result.ttl_s}: {role} election changed hands under load (revision {seen[role]} -> {now[role]})")
            seen = now
        await load.wait()
    finally:
        await load.stop()
    result.steady_s = time.monotonic() - started
    counts = load.done or {}  # "sync 200": n, "sync 503": n, "async 202": n ...
    sync = {k: int(v) for k, v in counts.items() if k.startswith("sync ")}
    result.sent_sync = sum(sync.values())
    result.failed_sync = result.sent_sync - sync.get("sync 200", 0)


async def frozen_takeover(platform: ChaosPlatform, result: TtlResult) -> None:
    members, leaders = await platform.members()
    leader = str(leaders["trigger"]["member_id"])
    rec = platform.records()[leader]
    before = (await _election_revisions(platform))["trigger"]
    os.kill(rec.pid, signal.SIGSTOP)  # a component of this run's platform
    stopped = time.monotonic()
    try:
        while time.monotonic() - stopped < 4 * result.ttl_s + 10:
            await asyncio.sleep(0.05)
            with contextlib.suppress(Unavailable):
                if (await _election_revisions(platform))["trigger"] not in (before, 0):
                    break
        result.takeovers_s.append(time.monotonic() - stopped)
        await asyncio.sleep(1.0)
    finally:
        if pid_alive(rec.pid, rec.start_ticks):
            os.kill(rec.pid, signal.SIGCONT)
    log(f"TTL {result.ttl_s}: a frozen primary trigger was replaced after {result.takeovers_s[-1]:.2f} s")


async def measure(ttl_s: int, *, steady_s: float, stops: int) -> TtlResult:
    result = TtlResult(ttl_s)
    with tempfile.TemporaryDirectory(prefix=f"faas-ttl{ttl_s}-", dir="/tmp") as home:
        platform = ChaosPlatform(Path(home), lease_ttl_s=ttl_s)
        try:
            log(f"TTL {ttl_s}: starting a platform")
            await platform.up()
            await platform.deploy(NOOP_FUNCTION, **NOOP_CONFIG)
            await platform.warm(NOOP_FUNCTION, calls=8)
            await steady(platform, result, steady_s)
            for _ in range(stops):
                recovery = await check_recovery(platform.url, NOOP_FUNCTION, home=platform.home, within_s=90)
                if not recovery.recovered:
                    log(f"TTL {ttl_s}: not healthy before a stop: {recovery.detail}")
                    break
                await frozen_takeover(platform, result)
        finally:
            log(await platform.down())
    return result


def markdown(results: list[TtlResult]) -> str:
    lines = [
        "| lease TTL, s | spurious elections under load (trigger / scheduler) | load, s | sync calls failed / sent | frozen primary trigger replaced after, s (p50 / max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        takeover = (
            f"{percentile(r.takeovers_s, 50):.2f} / {max(r.takeovers_s):.2f}" if r.takeovers_s else "-"
        )
        lines.append(
            f"| {r.ttl_s} | {r.spurious['trigger']} / {r.spurious['scheduler']} | {r.steady_s:.0f} | "
            f"{r.failed_sync} / {r.sent_sync} | {takeover} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos.ttl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttl", type=int, nargs="+", default=[2, 3, 5], help="lease TTLs to compare, seconds")
    parser.add_argument("--steady", type=float, default=120.0, help="seconds of load with no fault, per TTL")
    parser.add_argument("--stops", type=int, default=3, help="frozen-primary takeovers measured, per TTL")
    args = parser.parse_args(argv)
    results = [asyncio.run(measure(ttl, steady_s=args.steady, stops=args.stops)) for ttl in args.ttl]
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
