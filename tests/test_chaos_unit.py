"""The fault runner's own logic (bench/chaos), without a platform: what it sends and how it counts."""

from __future__ import annotations

import math

import pytest

from bench.chaos.count import Recovery, Summary, count_sync, platform_fault, tally_async
from bench.chaos.faults import Injection
from bench.chaos.load import LoadError, LoadPlan
from bench.chaos.records import CallRecord, payload_of
from bench.chaos.report import FaultRow, Repetition, markdown

FAULT_AT = 1000.0


def sync(sent: float, status: int | None, took: float = 0.01, **extra: object) -> CallRecord:
    return CallRecord("sync", f"s{sent}", sent, sent + took, status, **extra)  # type: ignore[arg-type]


def test_load_plan_refuses_a_platform_off_loopback() -> None:
    with pytest.raises(LoadError):
        LoadPlan("http://10.0.0.1:8080", "fn", 10, 10, 5)
    LoadPlan("http://127.0.0.1:8080", "fn", 10, 10, 5)


def test_load_plan_sends_each_kind_at_its_rate_for_the_duration() -> None:
    plan = LoadPlan("http://127.0.0.1:8080", "fn", sync_rate=4, async_rate=2, duration_s=2.5)
    calls = plan.schedule()
    assert sum(1 for _, kind, _ in calls if kind == "sync") == 10
    assert sum(1 for _, kind, _ in calls if kind == "async") == 5
    assert [offset for offset, _, _ in calls] == sorted(offset for offset, _, _ in calls)
    assert max(offset for offset, _, _ in calls) < 2.5
    # Enough connections for every call to hang for the whole call timeout.
    assert plan.inflight_limit >= 6 * plan.call_timeout_s


def test_sync_failures_give_the_error_window_and_the_recovery() -> None:
    summary = Summary(fault_at=FAULT_AT)
    records = [
        sync(FAULT_AT - 1, 200),
        sync(FAULT_AT + 0.5, None, took=30, client_error="timeout: no answer"),
        sync(FAULT_AT + 1.0, 200, took=4.0),  # held by the gateway through the failover
        sync(FAULT_AT + 2.0, 503, error_kind="unavailable"),
        sync(FAULT_AT + 3.0, 200),
    ]
    count_sync(summary, records)
    assert (summary.sync_sent, summary.sync_ok, summary.sync_failed) == (5, 3, 2)
    assert summary.sync_failures == {"timeout": 1, "503 unavailable": 1}
    assert summary.first_failure_after_fault == pytest.approx(0.5)
    assert summary.error_window_s == pytest.approx(1.5)
    assert summary.recovery_s == pytest.approx(1.0)
    assert summary.served_again_s == pytest.approx(3.01)  # the call sent at +3.0 was answered first
    assert summary.slowest_ok_s == pytest.approx(4.0)


def test_no_success_after_the_fault_has_no_recovery() -> None:
    summary = Summary(fault_at=FAULT_AT)
    count_sync(summary, [sync(FAULT_AT - 1, 200), sync(FAULT_AT + 1, 504, error_kind="deadline_exceeded")])
    assert summary.recovery_s is None and summary.served_again_s is None


@pytest.mark.parametrize(
    ("record", "blamed"),
    [
        ({"error": {"kind": "unavailable"}}, True),
        ({"error": {"kind": "too_many_requests"}}, True),
        ({"error": {"kind": "function_error"}}, False),
        ({"error": {"kind": "function_error"}, "fault": "platform"}, True),
        ({"error": {"kind": "error", "fault": "platform"}}, True),
        ({"error": {"kind": "error", "fault": "function"}}, False),
    ],
)
def test_dead_letters_blamed_on_the_platform(record: dict[str, object], blamed: bool) -> None:
    assert platform_fault(record) is blamed


def test_async_tally_tells_retries_from_duplicates_and_lost_from_dead_lettered() -> None:
    def acked(n: int) -> CallRecord:
        return CallRecord("async", f"c{n}", FAULT_AT, FAULT_AT, 202, invocation_id=f"i{n}")

    acknowledged = {f"i{n}": acked(n) for n in range(7)}
    final: dict[str, dict[str, object] | None] = {
        "i0": {"status": "succeeded", "attempts": 1, "runs": 1, "result": payload_of("c0")},
        "i1": {"status": "succeeded", "attempts": 2, "runs": 2, "result": payload_of("c1")},  # retried once
        "i2": {"status": "succeeded", "attempts": 1, "runs": 2, "result": payload_of("c2")},  # ran twice
        "i3": {"status": "running", "attempts": 1, "runs": 1},  # stuck: lost
        "i4": None,  # unknown: lost
        "i5": {"status": "dead-lettered", "attempts": 3, "runs": 3, "error": {"kind": "too_many_requests"}},
        # two platform retries then success: three starts, none of them a re-delivery
        "i6": {"status": "succeeded", "attempts": 1, "platform_retries": 2, "runs": 3, "result": payload_of("c6")},
    }
    summary = Summary(fault_at=FAULT_AT)
    tally_async(summary, acknowledged, final)  # type: ignore[arg-type]
    assert summary.async_completed == 4
    assert (summary.async_retried, summary.async_duplicated) == (3, 1)
    assert (summary.async_lost, summary.async_unknown) == (2, 1)
    assert (summary.async_dead_lettered, summary.async_dead_lettered_platform) == (1, 1)
    assert summary.async_wrong_result == 0


def test_report_row_sums_repetitions_and_shows_a_repetition_that_never_recovered() -> None:
    def rep(index: int, recovery: float | None, recovered: bool) -> Repetition:
        summary = Summary(fault_at=FAULT_AT, sync_sent=100, sync_failed=index, async_acknowledged=50,
                          async_completed=50, recovery_s=recovery)  # fmt: skip
        injection = Injection("trigger", "trigger-1", 1, "primary trigger", FAULT_AT, "kill")
        return Repetition("trigger", index, "fn", injection, summary, Recovery(recovered, 1.0, "x"), {})

    row = FaultRow.of("trigger", [rep(0, 0.5, True), rep(1, None, False)])
    assert (row.repetitions, row.sync_failed, row.sync_sent, row.async_acknowledged) == (2, 1, 200, 100)
    assert row.recovery_p50_s == 0.5 and math.isinf(row.recovery_p99_s)
    assert not row.recovered_without_human
    table = markdown([row])
    assert "| trigger | 2 | 0.50 / never |" in table and "**no**" in table
    assert row.to_json()["recovery_p99_s"] is None
