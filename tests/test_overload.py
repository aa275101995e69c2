"""Overload gets a fast answer: a burst far beyond what a function's max_instances can serve is
answered 429 with Retry-After at once, instead of 504 after the whole deadline.

On a platform of its own (module fixture, process backend): the burst keeps a dispatcher's pool at
max_instances for half a minute, which would slow the shared platform's other tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import Platform, running_platform
from tests.helpers import deploy, internal_headers, members_of

pytestmark = pytest.mark.integration

BURST = 200
CALL_S = 2.0
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    async with running_platform(tmp_path_factory, "faas-overload", runtime="process") as p:
        yield p


async def _waiters_on_dispatchers(platform: Platform) -> int:
    total = 0
    async with httpx.AsyncClient(timeout=10, headers=internal_headers(platform.settings)) as client:
        for member in await members_of(platform.settings, "dispatcher"):
            pools = (await client.get(f"{member.address}/v1/pools")).json()["pools"]
            total += sum(p["waiters"] for p in pools)
    return total


@pytest.mark.timeout(180)
async def test_a_burst_beyond_max_instances_gets_429_at_once_never_504(platform: Platform) -> None:
    deadline_s = platform.settings.cold_start_timeout_s + TIMEOUT_S + 2.0  # what the gateway gives a call
    limits = httpx.Limits(max_connections=BURST + 10, max_keepalive_connections=BURST + 10)
    async with httpx.AsyncClient(
        base_url=platform.url, timeout=deadline_s + 30, limits=limits, headers=platform.admin_headers
    ) as gw:
        await deploy(
            gw,
            "sleeper",
            f"""
            import time

            def handler(event, context):
                time.sleep({CALL_S})
                return event["i"]
            """,
            concurrency=1,
            max_instances=2,
            timeout_s=TIMEOUT_S,
        )

        async def call(i: int) -> tuple[int, httpx.Response, float]:
            sent = time.monotonic()
            resp = await gw.post("/v1/functions/sleeper/invoke", json={"i": i})
            return i, resp, time.monotonic() - sent

        started = time.monotonic()
        async with asyncio.timeout(60):
            answers = await asyncio.gather(*(call(i) for i in range(BURST)))
        elapsed = time.monotonic() - started

        statuses = sorted({resp.status_code for _, resp, _ in answers})
        assert set(statuses) <= {200, 429}, [resp.text for _, resp, _ in answers if resp.status_code not in (200, 429)]
        ok = [(i, resp, took) for i, resp, took in answers if resp.status_code == 200]
        refused = [(i, resp, took) for i, resp, took in answers if resp.status_code == 429]
        assert all(resp.json() == i for i, resp, _ in ok)  # the admitted calls ran and succeeded
        # Two instances of a 2 s function serve at most 2 calls per 2 s of the burst.
        assert 2 <= len(ok) <= 2 * (int(elapsed / CALL_S) + 1), (len(ok), elapsed)
        assert refused, "a burst of 200 on 2 slots must be refused in part"
        for _, resp, took in refused:
            assert resp.json()["error"]["kind"] == "too_many_requests"
            assert "x-faas-saturated" not in resp.headers
            assert 1 <= int(resp.headers["retry-after"]) <= deadline_s
            # Well before the deadline (the machine may be loaded: 200 calls cross three hops first).
            assert took < deadline_s / 2, f"a refusal took {took:.1f} s of a {deadline_s:.0f} s deadline"
        slowest = max(took for _, _, took in answers)
        assert slowest < deadline_s - 5.0, f"the slowest call took {slowest:.1f} s of a {deadline_s:.0f} s deadline"
        print(
            f"\nburst of {BURST}: {len(ok)} x 200, {len(refused)} x 429 in {elapsed:.1f} s; slowest 429 "
            f"{max(t for _, _, t in refused):.2f} s, slowest 200 {max(t for _, _, t in ok):.1f} s; "
            f"Retry-After {sorted({int(r.headers['retry-after']) for _, r, _ in refused})}"
        )

        # The platform is still healthy, and no waiter is left counted in any pool.
        after = await gw.post("/v1/functions/sleeper/invoke", json={"i": -1})
        assert after.status_code == 200, after.text
        assert after.json() == -1
        assert await _waiters_on_dispatchers(platform) == 0
