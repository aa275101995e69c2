"""The report: one row per fault over its repetitions, as a Markdown table and as JSON.

Percentiles are nearest-rank over the repetitions, so with fewer than 100 repetitions p99 is the
largest value.  A repetition in which no sync call sent after the fault succeeded has no recovery
time: it shows as ``never`` (and counts as infinitely long in the percentiles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.chaos.count import Recovery, Summary
from bench.chaos.faults import Injection


@dataclass(slots=True)
class Repetition:
    fault: str
    index: int
    function: str
    injection: Injection
    summary: Summary
    recovery: Recovery
    load: dict[str, Any]  # the load generator's closing counts
    victim_restarts: int | None = None  # the supervisor's restart count of the victim, after recovery

    def to_json(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "index": self.index,
            "function": self.function,
            "injection": self.injection.to_json(),
            "summary": self.summary.to_json(),
            "recovery": self.recovery.to_json(),
            "load": self.load,
            "victim_restarts": self.victim_restarts,
        }


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class FaultRow:
    fault: str
    repetitions: int
    recovery_p50_s: float
    recovery_p99_s: float
    served_again_p50_s: float
    served_again_p99_s: float
    sync_failed: int
    sync_sent: int
    error_window_p50_s: float
    error_window_p99_s: float
    async_acknowledged: int
    async_completed: int
    async_lost: int
    async_duplicated: int
    async_dead_lettered_platform: int
    async_dead_lettered: int
    async_unanswered: int
    slowest_sync_ok_s: float
    recovered_without_human: bool

    @classmethod
    def of(cls, fault: str, reps: Sequence[Repetition]) -> FaultRow:
        recovery = [r.summary.recovery_s if r.summary.recovery_s is not None else math.inf for r in reps]
        served = [
            r.summary.served_again_s if r.summary.served_again_s is not None else math.inf for r in reps
        ]
        windows = [r.summary.error_window_s for r in reps]

        def total(attr: str) -> int:
            return sum(int(getattr(r.summary, attr)) for r in reps)

        return cls(
            fault=fault,
            repetitions=len(reps),
            recovery_p50_s=percentile(recovery, 50),
            recovery_p99_s=percentile(recovery, 99),
            served_again_p50_s=percentile(served, 50),
            served_again_p99_s=percentile(served, 99),
            sync_failed=total("sync_failed"),
            sync_sent=total("sync_sent"),
            error_window_p50_s=percentile(windows, 50),
            error_window_p99_s=percentile(windows, 99),
            async_acknowledged=total("async_acknowledged"),
            async_completed=total("async_completed"),
            async_lost=total("async_lost"),
            async_duplicated=total("async_duplicated"),
            async_dead_lettered_platform=total("async_dead_lettered_platform"),
            async_dead_lettered=total("async_dead_lettered"),
            async_unanswered=total("async_unanswered"),
            slowest_sync_ok_s=max((r.summary.slowest_ok_s or 0.0 for r in reps), default=math.nan),
            recovered_without_human=bool(reps) and all(r.recovery.recovered for r in reps),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }


HEADER = [
    "fault", "reps", "recovery p50 / p99, s", "served again p50 / p99, s", "sync failed / sent", "error window p50 / p99, s",
    "async acked", "completed", "lost", "duplicated", "dead-lettered by platform", "slowest sync 200, s",
    "recovered, no human action",
]  # fmt: skip


def _s(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "never"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def markdown(rows: Sequence[FaultRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    for r in rows:
        cells = [
            r.fault,
            str(r.repetitions),
            f"{_s(r.recovery_p50_s)} / {_s(r.recovery_p99_s)}",
            f"{_s(r.served_again_p50_s)} / {_s(r.served_again_p99_s)}",
            f"{r.sync_failed} / {r.sync_sent}",
            f"{_s(r.error_window_p50_s)} / {_s(r.error_window_p99_s)}",
            str(r.async_acknowledged),
            str(r.async_completed),
            f"**{r.async_lost}**" if r.async_lost else "0",
            str(r.async_duplicated),
            f"{r.async_dead_lettered_platform}"
            + (
                f" (of {r.async_dead_lettered})"
                if r.async_dead_lettered != r.async_dead_lettered_platform
                else ""
            ),
            _s(r.slowest_sync_ok_s),
            "yes" if r.recovered_without_human else "**no**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(reps: Sequence[Repetition]) -> list[str]:
    """One line per repetition: what was hit, and the failures by kind (what the table sums up)."""
    out = []
    for r in reps:
        s, inj = r.summary, r.injection
        stop = f", SIGCONT after {inj.resumed_at - inj.at:.1f} s" if inj.resumed_at is not None else ""
        window = (
            f"{s.first_failure_after_fault:+.2f}..{s.last_failure_after_fault:+.2f} s"
            if s.first_failure_after_fault is not None and s.last_failure_after_fault is not None
            else "none"
        )
        recovery = f"{s.recovery_s:.2f} s" if s.recovery_s is not None else "never"
        if s.served_again_s is not None:
            recovery += f" (answered {s.served_again_s:.2f} s after the fault)"
        line = (
            f"- {r.fault} #{r.index + 1}: {inj.action} {inj.victim} (pid {inj.pid}, {inj.why}){stop}; "
            f"recovery {recovery}; sync failed {s.sync_failed}/{s.sync_sent}"
            + (f" {s.sync_failures}" if s.sync_failures else "")
            + f", window {window}; async {s.async_acknowledged} acked, {s.async_completed} completed, "
            f"{s.async_lost} lost, {s.async_duplicated} duplicated, {s.async_retried} retried, "
            f"{s.async_dead_lettered} dead-lettered"
            + (f" {s.dead_letter_errors}" if s.dead_letter_errors else "")
            + f", not acked: {s.async_errors or 'none'}; "
            f"recovered: {'yes' if r.recovery.recovered else 'NO'} ({r.recovery.detail}, "
            f"{r.recovery.after_s:.1f} s after the load)"
        )
        if r.victim_restarts is not None:
            line += f"; the supervisor restarted {inj.victim} {r.victim_restarts} time(s) so far"
        if s.lost_ids:
            line += f"; lost e.g. {', '.join(s.lost_ids[:3])}"
        if s.not_sent:
            line += f"; {s.not_sent} calls not sent (too many in flight)"
        out.append(line)
    return out
