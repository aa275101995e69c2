"""The fault-injection runner: ``python -m bench.chaos --fault trigger --repeat 10`` (bench/README.md).

For each group of faults that needs the same platform (one etcd member, or three), it starts a whole
platform with ``faas up`` in a temp home on free loopback ports, deploys a no-op function
(``chaos-noop``: concurrency 4, max_instances 10, timeout 5 s) and, for the faults that hit cold
starts, a second one (``chaos-cold``: concurrency 1, redeployed before each such fault), warms them,
then for each repetition:

1. waits until the platform is healthy (``faas status`` ok and a sync call answers 200);
2. starts the load generator process (``bench.chaos.load``) against the function;
3. ``--fault-at`` seconds after its first call, injects one fault (``bench.chaos.faults``);
4. lets the load finish, checks "recovered with no human action" (``count.check_recovery``, bounded by
   ``--recover-seconds``) and counts (``count.summarise``, draining async ids for up to
   ``--drain-seconds``).

It restarts nothing itself.  ``faas down`` stops each platform at the end, also on an error, a timeout
(``--max-seconds``, and a bound per repetition) or Ctrl-C/SIGTERM; a stopped process is continued
first.  The platform's folder (logs, load records) is removed unless ``--keep-home``, or something was
lost, did not recover or went wrong there.  If a repetition ends with the platform not recovered, the platform's remaining repetitions
are skipped (what they would measure is no longer the fault's effect) and the run goes on with the
next platform.

Progress goes to stderr; the Markdown table and one line per repetition to stdout; ``--json`` writes
every figure.  Exit status: 0; 1 when an acknowledged async call was lost, a repetition did not
recover, or the run was cut short; 2 when the runner could not run (a platform did not start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.chaos.count import check_recovery, summarise
from bench.chaos.faults import FAULTS, Fault, inject, stop_seconds
from bench.chaos.load import STARTED_TIMEOUT_S, LoadError, start_load
from bench.chaos.platform import ChaosPlatform, PlatformError
from bench.chaos.report import FaultRow, Repetition, markdown, notes
from faas.core.errors import FaasError

NOOP_FUNCTION = "chaos-noop"
COLD_FUNCTION = "chaos-cold"
FUNCTION_TIMEOUT_S = 5.0
NOOP_CONFIG: dict[str, Any] = {"concurrency": 4, "max_instances": 10, "timeout_s": FUNCTION_TIMEOUT_S}
COLD_CONFIG: dict[str, Any] = {"concurrency": 1, "max_instances": 10, "timeout_s": FUNCTION_TIMEOUT_S}
CALL_MARGIN_S = 5.0
AFTER_STOP_S = 7.0  # load kept up after a SIGCONT, so what the resumed process does is measured


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Plan:
    faults: list[tuple[Fault, int]]
    sync_rate: float = 20.0
    async_rate: float = 20.0
    duration_s: float = 20.0
    fault_at_s: float = 5.0
    drain_s: float = 60.0
    recover_s: float = 90.0
    max_seconds: float = 1800.0
    keep_home: bool = False

    def call_timeout_s(self, platform: ChaosPlatform) -> float:
        """The gateway's deadline for the functions here (cold start + timeout + 2 s), plus a margin."""
        return platform.settings.cold_start_timeout_s + FUNCTION_TIMEOUT_S + 2.0 + CALL_MARGIN_S

    def duration_for(self, fault: Fault, platform: ChaosPlatform) -> float:
        if fault.action == "stop":
            return max(self.duration_s, self.fault_at_s + stop_seconds(platform) + AFTER_STOP_S)
        return self.duration_s

    def repetition_bound_s(self, fault: Fault, platform: ChaosPlatform) -> float:
        return (
            self.recover_s  # healthy before
            + STARTED_TIMEOUT_S
            + self.duration_for(fault, platform)
            + self.call_timeout_s(platform)
            + self.recover_s
            + self.drain_s
            + 60.0  # finding the victim, a deploy, process start-up
        )


@dataclass(slots=True)
class Outcome:
    repetitions: list[Repetition] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what cut the run short
    platforms: list[dict[str, Any]] = field(default_factory=list)


async def prepare(platform: ChaosPlatform, faults: Sequence[Fault]) -> None:
    await platform.deploy(NOOP_FUNCTION, **NOOP_CONFIG)
    await platform.warm(NOOP_FUNCTION, calls=8)
    if any(f.cold_starts for f in faults):
        await platform.deploy(COLD_FUNCTION, **COLD_CONFIG)
        await platform.warm(COLD_FUNCTION, calls=2)


async def repetition(platform: ChaosPlatform, fault: Fault, index: int, plan: Plan) -> Repetition:
    before = await check_recovery(platform.url, NOOP_FUNCTION, home=platform.home, within_s=plan.recover_s)
    if not before.recovered:
        raise PlatformError(f"the platform is not healthy before {fault.name} #{index + 1}: {before.detail}")
    function = COLD_FUNCTION if fault.cold_starts else NOOP_FUNCTION
    out = platform.home / "chaos" / f"{fault.name}-{index + 1}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    duration = plan.duration_for(fault, platform)
    load = await start_load(
        platform.url, function, sync_rate=plan.sync_rate, async_rate=plan.async_rate, duration_s=duration,
        out=out, call_timeout_s=plan.call_timeout_s(platform),
    )  # fmt: skip
    try:
        started = await load.wait_started()
        await asyncio.sleep(max(0.0, started + plan.fault_at_s - time.time()))

        async def redeploy() -> int:
            return await platform.deploy(
                COLD_FUNCTION, **COLD_CONFIG, description=f"{fault.name} #{index + 1}"
            )

        injection = await inject(fault, platform, function, before=redeploy if fault.cold_starts else None)
        what = f"{injection.action} {injection.victim} (pid {injection.pid}, {injection.why})"
        if injection.deployed_version is not None:
            what += f" right after deploying {COLD_FUNCTION} version {injection.deployed_version}"
        log(f"{fault.name} #{index + 1}: {what} at +{injection.at - started:.1f} s of the load")
        await load.wait()
    finally:
        await load.stop()
    recovery = await check_recovery(platform.url, NOOP_FUNCTION, home=platform.home, within_s=plan.recover_s)
    summary = await summarise(out, platform.url, injection.at, drain_timeout_s=plan.drain_s)
    victim = platform.records().get(injection.victim)
    restarts = victim.restarts if victim is not None else None
    return Repetition(fault.name, index, function, injection, summary, recovery, load.done, restarts)


async def run_platform(
    platform: ChaosPlatform, faults: list[tuple[Fault, int]], plan: Plan, outcome: Outcome
) -> None:
    log(f"starting a platform with faas up in {platform.home} (etcd members: {platform.etcd_members})")
    started = time.monotonic()
    await platform.up()
    log(f"platform ready at {platform.url} in {time.monotonic() - started:.1f} s; deploying and warming")
    outcome.platforms.append({"home": str(platform.home), "url": platform.url, "etcd_members": platform.etcd_members,
                              "ready_s": round(time.monotonic() - started, 1)})  # fmt: skip
    await prepare(platform, [f for f, _ in faults])
    for fault, repeat in faults:
        for index in range(repeat):
            bound = plan.repetition_bound_s(fault, platform)
            try:
                rep = await asyncio.wait_for(repetition(platform, fault, index, plan), bound)
            except TimeoutError:
                raise PlatformError(
                    f"{fault.name} #{index + 1} took longer than its bound of {bound:.0f} s"
                ) from None
            outcome.repetitions.append(rep)
            s = rep.summary
            log(
                f"{fault.name} #{index + 1}: sync {s.sync_failed}/{s.sync_sent} failed, recovery "
                f"{'never' if s.recovery_s is None else f'{s.recovery_s:.2f} s'}; async {s.async_acknowledged} "
                f"acked, {s.async_completed} completed, {s.async_lost} lost, {s.async_duplicated} duplicated; "
                f"recovered: {'yes' if rep.recovery.recovered else 'NO'} ({rep.recovery.detail})"
            )
            if not rep.recovery.recovered:
                raise PlatformError(
                    f"the platform did not recover within {plan.recover_s:g} s after {fault.name} #{index + 1}: "
                    f"{rep.recovery.detail}; its remaining repetitions are skipped"
                )


def groups(faults: list[tuple[Fault, int]]) -> list[tuple[int, list[tuple[Fault, int]]]]:
    """The faults by the platform they need (etcd members), in the order given."""
    out: dict[int, list[tuple[Fault, int]]] = {}
    for fault, repeat in faults:
        out.setdefault(fault.etcd_members, []).append((fault, repeat))
    return list(out.items())


async def run(plan: Plan, outcome: Outcome) -> None:
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    try:
        async with asyncio.timeout(plan.max_seconds):
            for members, faults in groups(plan.faults):
                home = Path(tempfile.mkdtemp(prefix="faas-chaos-", dir="/tmp"))  # short: unix socket paths
                platform = ChaosPlatform(home, etcd_members=members)
                first = len(outcome.repetitions)
                problems = len(outcome.problems)
                try:
                    await run_platform(platform, faults, plan, outcome)
                except (PlatformError, LoadError, FaasError, httpx.HTTPError) as exc:
                    outcome.problems.append(exc.message if isinstance(exc, FaasError) else str(exc))
                    log(f"error: {exc}")
                finally:
                    log("stopping the platform (faas down)")
                    log(await platform.down())
                    mine = outcome.repetitions[first:]
                    if (
                        plan.keep_home
                        or len(outcome.problems) > problems
                        or any(r.summary.async_lost or not r.recovery.recovered for r in mine)
                    ):
                        log(f"platform home (logs, load records) kept in {home}")
                    else:
                        shutil.rmtree(home, ignore_errors=True)
    except TimeoutError:
        outcome.problems.append(f"the run took longer than --max-seconds {plan.max_seconds:g}; cut short")
        log(outcome.problems[-1])


def render(outcome: Outcome, plan: Plan) -> str:
    names = list(dict.fromkeys(r.fault for r in outcome.repetitions))
    rows = [FaultRow.of(n, [r for r in outcome.repetitions if r.fault == n]) for n in names]
    lines = [markdown(rows), ""]
    lines += notes(outcome.repetitions)
    if outcome.problems:
        lines += [""] + [f"problem: {p}" for p in outcome.problems]
    return "\n".join(lines)


def to_json(outcome: Outcome, plan: Plan, argv: Sequence[str]) -> dict[str, Any]:
    names = list(dict.fromkeys(r.fault for r in outcome.repetitions))
    return {
        "argv": list(argv),
        "plan": {
            "faults": {f.name: n for f, n in plan.faults},
            "sync_rate": plan.sync_rate,
            "async_rate": plan.async_rate,
            "duration_s": plan.duration_s,
            "fault_at_s": plan.fault_at_s,
            "drain_s": plan.drain_s,
            "recover_s": plan.recover_s,
        },  # fmt: skip
        "platforms": outcome.platforms,
        "faults": [FaultRow.of(n, [r for r in outcome.repetitions if r.fault == n]).to_json() for n in names],
        "repetitions": [r.to_json() for r in outcome.repetitions],
        "problems": outcome.problems,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="Inject one fault at a time into a platform started with 'faas up', under load, and count.",
    )
    parser.add_argument("--fault", action="append", choices=[*FAULTS, "all"], required=True,
                        help="the fault to inject (repeatable); 'all' runs every one with its default repetitions")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=0,
                        help="repetitions of each fault (default: the fault's own: trigger 10, the others 3)")  # fmt: skip
    parser.add_argument("--sync-rate", type=float, default=20.0, help="sync calls per second (default 20)")
    parser.add_argument("--async-rate", type=float, default=20.0, help="async calls per second (default 20)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of load per repetition (default 20; SIGSTOP faults: at least "
                             "fault-at + TTL + 3 + 7)")  # fmt: skip
    parser.add_argument("--fault-at", type=float, default=5.0, help="seconds into the load (default 5)")
    parser.add_argument("--drain-seconds", type=float, default=60.0,
                        help="how long acknowledged async calls may take to become final (default 60)")  # fmt: skip
    parser.add_argument("--recover-seconds", type=float, default=90.0,
                        help="the bound of 'recovered with no human action' (default 90)")  # fmt: skip
    parser.add_argument(
        "--max-seconds", type=float, default=1800.0, help="the whole run's limit (default 1800)"
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep-home", action="store_true", help="keep the platform's home (logs, records)")
    args = parser.parse_args(argv)
    if args.repeat < 0 or args.fault_at <= 0 or args.fault_at >= args.duration:
        parser.error("--repeat must be >= 0 and --fault-at within --duration")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    names = list(FAULTS) if "all" in args.fault else list(dict.fromkeys(args.fault))
    faults = [(FAULTS[n], args.repeat or FAULTS[n].default_repeat) for n in names]
    return Plan(
        faults=faults,
        sync_rate=args.sync_rate,
        async_rate=args.async_rate,
        duration_s=args.duration,
        fault_at_s=args.fault_at,
        drain_s=args.drain_seconds,
        recover_s=args.recover_seconds,
        max_seconds=args.max_seconds,
        keep_home=args.keep_home,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = plan_of(args)
    outcome = Outcome()
    total = sum(n for _, n in plan.faults)
    log(f"{total} repetitions: " + ", ".join(f"{f.name} x{n}" for f, n in plan.faults))
    try:
        asyncio.run(run(plan, outcome))
    except KeyboardInterrupt:
        outcome.problems.append("interrupted")
    except asyncio.CancelledError:  # SIGTERM
        outcome.problems.append("stopped by SIGTERM")
    print(render(outcome, plan), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(to_json(outcome, plan, ["python -m bench.chaos", *argv]), indent=2) + "\n"
        )
        log(f"wrote {args.json}")
    if not outcome.repetitions and outcome.problems:
        return 2
    lost = sum(r.summary.async_lost for r in outcome.repetitions)
    unrecovered = sum(1 for r in outcome.repetitions if not r.recovery.recovered)
    return 1 if lost or unrecovered or outcome.problems else 0
