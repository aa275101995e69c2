"""The fault-injection suite's fast cases: one fault of each kind under a small load, counted from the
client's own records.

Each case is one repetition of ``bench/chaos`` (the long runs and repetitions live there): a platform
started by ``faas up``, a load generator in its own process sending sync and async calls to a no-op
function, one fault a few seconds in, then counting after draining.  Nothing here restarts anything:
the supervisor brings back what was killed.  Every case must lose no acknowledged async event,
dead-letter none because of the platform, and recover with no human action.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bench.chaos.faults import FAULTS
from bench.chaos.platform import ChaosPlatform, PlatformError
from bench.chaos.runner import Plan, prepare, repetition
from tests.conftest import missing_service

pytestmark = pytest.mark.integration

# Every component kind once, and a leader frozen past its lease.  Ordered so that the cheap ones run
# first; each case leaves the platform healthy for the next (the repetition checks it first).
KINDS = ["trigger", "dispatcher", "scheduler", "node", "valkey", "etcd", "sigstop-trigger", "sigstop-scheduler"]
PLAN = Plan(faults=[], sync_rate=10.0, async_rate=10.0, duration_s=12.0, fault_at_s=3.0, drain_s=60.0, recover_s=60.0)


@pytest.fixture(scope="module")
async def chaos(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ChaosPlatform]:
    platform = ChaosPlatform(tmp_path_factory.mktemp("faas-chaos"))
    try:
        await platform.up()
    except PlatformError as exc:
        if "not found" in str(exc) and "install" in str(exc):
            missing_service(str(exc))
        raise
    try:
        await prepare(platform, [FAULTS[name] for name in KINDS])
        yield platform
    finally:
        await platform.down()


@pytest.mark.parametrize("kind", KINDS)
async def test_one_fault_under_load_loses_nothing_and_heals_itself(chaos: ChaosPlatform, kind: str) -> None:
    fault = FAULTS[kind]
    rep = await repetition(chaos, fault, 0, PLAN)
    s = rep.summary
    print(
        f"\n{kind}: sync {s.sync_failed} failed of {s.sync_sent} (error window {s.error_window_s}), "
        f"async {s.async_acknowledged} acknowledged, {s.async_completed} completed, {s.async_lost} lost, "
        f"{s.async_duplicated} duplicated, {s.async_dead_lettered_platform} dead-lettered by the platform; "
        f"recovered after {rep.recovery.after_s} s"
    )
    assert s.async_acknowledged > 0 and s.sync_sent > 0, "the load did not run"
    assert s.async_lost == 0, f"lost acknowledged events: {s.lost_ids[:10]}"
    assert s.async_dead_lettered_platform == 0, "events dead-lettered by a platform fault"
    assert rep.recovery.recovered, rep.recovery.detail
    if fault.action == "kill":
        assert rep.victim_restarts is not None and rep.victim_restarts >= 1, "the supervisor did not restart it"
