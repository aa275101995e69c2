"""The counting step: what the client saw, the async invocations drained to their end, and recovery.

    python -m bench.chaos.count --url URL --records records.jsonl --fault-at T [--home H --function F]

``summarise`` reads a load generator's records, polls ``GET /v1/invocations/{id}`` for every async id
acknowledged with 202 until each is final (``succeeded`` or ``dead-lettered``) or ``drain_timeout_s``
has passed, and counts:

- async: acknowledged (202 with an id) / completed (``succeeded``) / lost (acknowledged but not final
  when the drain ended, or unknown to the platform) / duplicated (the record's ``runs``, which
  ``InvocationQueue.mark_running`` counts at every start, exceeds its ``attempts``: the same attempt
  started again, e.g. taken over from a dead dispatcher or queued twice; a retry after a failed attempt
  is a start too, and is counted as retried, not duplicated) / dead-lettered, and among
  those the ones dead-lettered by a platform fault (the record's ``fault`` is ``platform``, or its
  error kind is one of ``PLATFORM_ERROR_KINDS``); also the calls answered with an error (rejected: the
  client knows they were not queued) and those that got no answer (unanswered: the client cannot know);
- sync: sent / failed (anything but 200) / the error window (the first and the last failed send,
  in seconds after the fault) / recovery: from the fault to the send time of the first call sent after
  it that succeeded / served again: from the fault to the first success answered to a call sent after
  it (a failover the gateway hides by holding calls costs latency, not errors: it shows here).

``check_recovery`` is "recovered with no human action": within a bound, ``faas status --home H -o
json`` reports ok and then a fresh sync call succeeds.  It only looks; it never starts anything.

A record the poll could not read (the gateway answered 503 while Valkey restarted) is polled again;
one the platform does not know (404) is polled until the drain ends, or until every other id is final
and the unknown ones stayed unknown for ``UNKNOWN_SETTLE_S``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.chaos.records import CallRecord, api_headers, payload_of, read_records

FINAL_STATUSES = ("succeeded", "dead-lettered")
# Error kinds that blame the platform, not the function (faas/core/errors.py, and the dispatcher's
# internal_error for an event it could not handle).
PLATFORM_ERROR_KINDS = frozenset(
    {
        "unavailable",
        "not_leader",
        "deadline_exceeded",
        "too_many_requests",
        "platform_error",
        "internal_error",
    }
)
DRAIN_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.5
POLL_CONCURRENCY = 16
UNKNOWN_SETTLE_S = 5.0
SAMPLE_IDS = 10  # ids of each problem kept in a summary, for a person to look up
STATUS_TIMEOUT_S = 30.0


@dataclass(slots=True)
class Summary:
    """One load run around one fault (times in seconds; ``*_after_fault`` relative to ``fault_at``)."""

    fault_at: float
    # sync
    sync_sent: int = 0
    sync_ok: int = 0
    sync_failed: int = 0
    sync_failures: dict[str, int] = field(default_factory=dict)  # by status / error kind / client error
    sync_not_echoed: int = 0  # answered 200 with a body other than the payload
    first_failure_after_fault: float | None = None
    last_failure_after_fault: float | None = None
    recovery_s: float | None = None  # fault -> first successful sync call sent after it; None: none did
    # fault -> the first success answered to a call sent after the fault: a failover the gateway hides
    # by holding calls shows here (and in slowest_ok_s), not in recovery_s
    served_again_s: float | None = None
    slowest_ok_s: float | None = None  # the longest successful sync call
    # async
    async_sent: int = 0
    async_acknowledged: int = 0
    async_rejected: int = 0  # answered, not 202
    async_unanswered: int = 0  # no answer (timeout, connection error): maybe queued, maybe not
    async_completed: int = 0
    async_lost: int = 0
    async_unknown: int = 0  # of the lost: the platform has no record of the id at all
    async_duplicated: int = 0  # started more often than attempted: the same attempt ran again
    async_retried: int = 0  # needed more than one attempt (a failed attempt was retried)
    async_dead_lettered: int = 0
    async_dead_lettered_platform: int = 0
    async_wrong_result: int = 0  # succeeded with a result other than the payload
    async_errors: dict[str, int] = field(default_factory=dict)  # rejected / unanswered, by kind
    dead_letter_errors: dict[str, int] = field(default_factory=dict)
    lost_ids: list[str] = field(default_factory=list)  # a sample
    duplicated_ids: list[str] = field(default_factory=list)  # a sample
    not_sent: int = 0  # skipped by the load generator: too many calls in flight
    drain_s: float = 0.0

    @property
    def error_window_s(self) -> float:
        """From the first failed send to the last one (0 when at most one failed)."""
        if self.first_failure_after_fault is None or self.last_failure_after_fault is None:
            return 0.0
        return self.last_failure_after_fault - self.first_failure_after_fault

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "error_window_s": self.error_window_s}


@dataclass(frozen=True, slots=True)
class Recovery:
    recovered: bool
    after_s: float  # how long the check took
    detail: str  # what failed last (or "status ok, sync call 200")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def platform_fault(record: dict[str, Any]) -> bool:
    """Whether a dead-lettered invocation record blames the platform rather than the function."""
    error = record.get("error")
    if record.get("fault") == "platform" or (isinstance(error, dict) and error.get("fault") == "platform"):
        return True
    return isinstance(error, dict) and error.get("kind") in PLATFORM_ERROR_KINDS


def _failure_label(rec: CallRecord) -> str:
    if rec.status is None:
        return (rec.client_error or "no answer").split(":")[0]
    return f"{rec.status} {rec.error_kind}" if rec.error_kind else str(rec.status)


def count_sync(summary: Summary, records: list[CallRecord]) -> None:
    failures: Counter[str] = Counter()
    failed_sends: list[float] = []
    ok_after: list[tuple[float, float]] = []  # (sent, finished)
    for rec in records:
        summary.sync_sent += 1
        if rec.status == 200:
            summary.sync_ok += 1
            if rec.echoed is False:
                summary.sync_not_echoed += 1
            took = rec.finished_at - rec.sent_at
            summary.slowest_ok_s = max(summary.slowest_ok_s or 0.0, took)
            if rec.sent_at >= summary.fault_at:
                ok_after.append((rec.sent_at, rec.finished_at))
        else:
            failures[_failure_label(rec)] += 1
            failed_sends.append(rec.sent_at)
    summary.sync_failed = sum(failures.values())
    summary.sync_failures = dict(failures.most_common())
    if failed_sends:
        summary.first_failure_after_fault = min(failed_sends) - summary.fault_at
        summary.last_failure_after_fault = max(failed_sends) - summary.fault_at
    if ok_after:
        summary.recovery_s = min(sent for sent, _ in ok_after) - summary.fault_at
        summary.served_again_s = min(finished for _, finished in ok_after) - summary.fault_at


async def _poll_once(client: httpx.AsyncClient, invocation_id: str) -> tuple[str, dict[str, Any] | None]:
    """("final"|"pending"|"unknown"|"unreadable", the record)."""
    try:
        resp = await client.get(f"/v1/invocations/{invocation_id}")
    except httpx.HTTPError:
        return "unreadable", None
    if resp.status_code == 404:
        return "unknown", None
    if resp.status_code != 200:
        return "unreadable", None
    try:
        record = resp.json()
    except ValueError:
        return "unreadable", None
    if not isinstance(record, dict):
        return "unreadable", None
    return ("final" if record.get("status") in FINAL_STATUSES else "pending"), record


async def drain(
    url: str, ids: list[str], *, timeout_s: float = DRAIN_TIMEOUT_S
) -> dict[str, dict[str, Any] | None]:
    """The last record read for each id (None: never read, or unknown), polled until final or timeout."""
    last: dict[str, dict[str, Any] | None] = dict.fromkeys(ids)
    open_ids = set(ids)
    unknown_since: dict[str, float] = {}
    limit = asyncio.Semaphore(POLL_CONCURRENCY)
    deadline = time.monotonic() + timeout_s

    async def poll(client: httpx.AsyncClient, invocation_id: str) -> None:
        async with limit:
            state, record = await _poll_once(client, invocation_id)
        if record is not None:
            last[invocation_id] = record
        if state == "final":
            open_ids.discard(invocation_id)
        if state == "unknown":
            unknown_since.setdefault(invocation_id, time.monotonic())
        else:
            unknown_since.pop(invocation_id, None)

    async with httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False, headers=api_headers()) as client:
        while open_ids and time.monotonic() < deadline:
            async with asyncio.TaskGroup() as group:
                for invocation_id in list(open_ids):
                    group.create_task(poll(client, invocation_id))
            if not open_ids:
                break
            now = time.monotonic()
            if set(unknown_since) == open_ids and all(
                now - t >= UNKNOWN_SETTLE_S for t in unknown_since.values()
            ):
                break  # only ids the platform does not know are left, and they stayed unknown
            await asyncio.sleep(POLL_INTERVAL_S)
    return last


async def count_async(
    summary: Summary, records: list[CallRecord], url: str, *, drain_timeout_s: float
) -> None:
    errors: Counter[str] = Counter()
    acknowledged: dict[str, CallRecord] = {}
    for rec in records:
        summary.async_sent += 1
        if rec.acknowledged:
            assert rec.invocation_id is not None
            acknowledged[rec.invocation_id] = rec
        elif rec.status is None:
            summary.async_unanswered += 1
            errors[_failure_label(rec)] += 1
        else:
            summary.async_rejected += 1
            errors[_failure_label(rec)] += 1
    summary.async_errors = dict(errors.most_common())
    summary.async_acknowledged = len(acknowledged)
    started = time.monotonic()
    final = await drain(url, list(acknowledged), timeout_s=drain_timeout_s)
    summary.drain_s = time.monotonic() - started
    tally_async(summary, acknowledged, final)


def tally_async(
    summary: Summary, acknowledged: dict[str, CallRecord], final: dict[str, dict[str, Any] | None]
) -> None:
    """Count the acknowledged calls by the last invocation record read for each (None: never read)."""
    dead_errors: Counter[str] = Counter()
    for invocation_id, rec in acknowledged.items():
        record = final.get(invocation_id)
        status = record.get("status") if record else None
        retries = _number(record, "platform_retries") if record is not None else 0
        if record is not None and (_number(record, "attempts") > 1 or retries > 0):
            summary.async_retried += 1
        # ``runs`` counts every start (mark_running), and each retry after a failed attempt, the
        # function's or the platform's, is a start too: only starts beyond the attempts and platform
        # retries are the same attempt run again (a re-delivery).
        if record is not None and _number(record, "runs") > max(_number(record, "attempts") + retries, 1):
            summary.async_duplicated += 1
            if len(summary.duplicated_ids) < SAMPLE_IDS:
                summary.duplicated_ids.append(invocation_id)
        if record is None or status not in FINAL_STATUSES:
            summary.async_lost += 1
            summary.async_unknown += record is None
            if len(summary.lost_ids) < SAMPLE_IDS:
                summary.lost_ids.append(f"{invocation_id} ({status or 'unknown'})")
        elif status == "succeeded":
            summary.async_completed += 1
            if record.get("result") != payload_of(rec.client_id):
                summary.async_wrong_result += 1
        else:
            summary.async_dead_lettered += 1
            error = record.get("error")
            dead_errors[str(error.get("kind")) if isinstance(error, dict) else "?"] += 1
            if platform_fault(record):
                summary.async_dead_lettered_platform += 1
    summary.dead_letter_errors = dict(dead_errors.most_common())


def _number(record: dict[str, Any], name: str) -> int:
    try:
        return int(record.get(name) or 0)
    except (TypeError, ValueError):
        return 0


async def summarise(
    records_path: Path, url: str, fault_at: float, *, drain_timeout_s: float = DRAIN_TIMEOUT_S
) -> Summary:
    """Count a load run's records around a fault at ``fault_at`` (``time.time()``), draining async ids."""
    records = list(read_records(Path(records_path)))
    summary = Summary(fault_at=fault_at)
    summary.not_sent = sum(1 for r in records if not r.sent)
    sent = [r for r in records if r.sent]
    count_sync(summary, [r for r in sent if r.kind == "sync"])
    await count_async(summary, [r for r in sent if r.kind == "async"], url, drain_timeout_s=drain_timeout_s)
    return summary


# --------------------------------------------------------------------------------------------------
# Recovery


def faas_command() -> list[str]:
    """The ``faas`` command of this environment."""
    return [sys.executable, "-m", "faas.cli.main"]


async def platform_status(home: Path) -> tuple[bool, str]:
    """(ok, the problems) from ``faas status --home H -o json``."""
    proc = await asyncio.create_subprocess_exec(
        *faas_command(), "status", "--home", str(home), "-o", "json",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), STATUS_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"faas status did not answer within {STATUS_TIMEOUT_S:g} s"
    try:
        status = json.loads(out)
    except ValueError:
        return False, f"faas status exited {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"
    if status.get("ok") is True and proc.returncode == 0:
        return True, "status ok"
    return False, "; ".join(
        str(p) for p in status.get("problems") or []
    ) or f"faas status exited {proc.returncode}"


async def sync_call(url: str, function: str, *, timeout_s: float = 70.0) -> tuple[bool, str]:
    client_id = f"recovery-{time.time_ns()}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, trust_env=False, headers=api_headers()) as client:
            resp = await client.post(f"/v1/functions/{function}/invoke", json=payload_of(client_id))
    except httpx.HTTPError as exc:
        return False, f"sync call: {type(exc).__name__}: {exc}"
    if resp.status_code == 200 and resp.json() == payload_of(client_id):
        return True, "sync call 200"
    return False, f"sync call answered {resp.status_code}: {resp.text[:200]}"


async def check_recovery(url: str, function: str, *, home: Path, within_s: float) -> Recovery:
    """Whether, within ``within_s``, ``faas status`` reports ok and then a fresh sync call succeeds."""
    started = time.monotonic()
    detail = "not checked"
    while True:
        ok, detail = await platform_status(home)
        if ok:
            ok, call = await sync_call(
                url, function, timeout_s=max(1.0, within_s - (time.monotonic() - started))
            )
            detail = f"{detail}, {call}"
            if ok:
                return Recovery(True, time.monotonic() - started, detail)
        if time.monotonic() - started >= within_s:
            return Recovery(False, time.monotonic() - started, detail)
        await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos.count", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the gateway")
    parser.add_argument("--records", type=Path, required=True, help="the load generator's records")
    parser.add_argument(
        "--fault-at", type=float, required=True, help="when the fault was injected (time.time())"
    )
    parser.add_argument("--drain-seconds", type=float, default=DRAIN_TIMEOUT_S)
    parser.add_argument("--home", type=Path, help="also check recovery: the platform's home")
    parser.add_argument("--function", help="also check recovery: the function to call")
    parser.add_argument("--recover-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)

    async def run() -> dict[str, Any]:
        summary = await summarise(args.records, args.url, args.fault_at, drain_timeout_s=args.drain_seconds)
        out = summary.to_json()
        if args.home and args.function:
            recovery = await check_recovery(
                args.url, args.function, home=args.home, within_s=args.recover_seconds
            )
            out["recovery"] = recovery.to_json()
        return out

    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
