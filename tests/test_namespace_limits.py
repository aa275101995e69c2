"""Per-namespace limits against the real platform (process backend): functions, running instances
and invocations a second each give 429 at the limit, and the namespace recovers once under it (or
once an admin raises it).  Each test uses a namespace of its own, through a developer key of it.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from faas.core.errors import TooManyRequests
from faas.core.namespaces import RateLimiter
from tests.conftest import Platform
from tests.helpers import deploy, make_zip, wait_until

NOOP = "def handler(event, context):\n    return {'ok': True}\n"
process_only = pytest.mark.parametrize("platform", ["process"], indirect=True)


async def developer_of(platform: Platform, gw: httpx.AsyncClient, ns: str, **limits: object) -> httpx.AsyncClient:
    put = await gw.put(f"/v1/namespaces/{ns}/limits", json=limits)
    assert put.status_code == 200, put.text
    created = await gw.post("/v1/keys", json={"namespace": ns, "role": "developer"})
    assert created.status_code == 201, created.text
    headers = {"Authorization": f"Bearer {created.json()['key']}"}
    return httpx.AsyncClient(base_url=platform.url, timeout=60, headers=headers)


async def limits_seen(gw: httpx.AsyncClient, ns: str, **expected: object) -> None:
    async def seen() -> bool:
        effective = (await gw.get(f"/v1/namespaces/{ns}/limits")).json()["effective"]
        return all(effective[k] == v for k, v in expected.items())

    await wait_until(seen, timeout_s=5, what=f"the gateway to see the limits of {ns}")


@pytest.mark.integration
@process_only
async def test_the_function_limit_gives_429_and_recovers(platform: Platform, gw: httpx.AsyncClient) -> None:
    async with await developer_of(platform, gw, "lim-fns", max_functions=2) as dev:
        await limits_seen(gw, "lim-fns", max_functions=2)
        await deploy(dev, "one", NOOP)
        await deploy(dev, "two", NOOP)
        await deploy(dev, "two", NOOP)  # a new version of an existing function is not a new function
        third = await dev.put(
            "/v1/functions/three", data={"config": '{"handler": "handler.handler"}'},
            files={"code": ("code.zip", _zip(), "application/zip")},
        )  # fmt: skip
        assert third.status_code == 429, third.text
        assert "its limit" in third.json()["error"]["message"]
        assert (await dev.get("/v1/functions/three")).status_code == 404
        assert (await dev.delete("/v1/functions/one")).status_code == 204
        await deploy(dev, "three", NOOP)


@pytest.mark.integration
@process_only
async def test_the_invocation_rate_limit_gives_429_with_retry_after_and_recovers(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    async with await developer_of(platform, gw, "lim-rate", max_invocations_per_s=5) as dev:
        await limits_seen(gw, "lim-rate", max_invocations_per_s=5)
        await deploy(dev, "quick", NOOP)
        answers = await asyncio.gather(*(dev.post("/v1/functions/quick/invoke", json={}) for _ in range(30)))
        statuses = [a.status_code for a in answers]
        assert statuses.count(200) <= 6 and statuses.count(429) >= 24, statuses
        throttled = next(a for a in answers if a.status_code == 429)
        assert int(throttled.headers["retry-after"]) >= 1
        assert throttled.json()["error"]["kind"] == "too_many_requests"
        # Other namespaces are not throttled by this one's calls.
        assert (await gw.get("/v1/functions")).status_code == 200
        await asyncio.sleep(1.2)
        assert (await dev.post("/v1/functions/quick/invoke", json={})).status_code == 200


@pytest.mark.integration
@process_only
async def test_the_instance_limit_gives_429_at_once_and_an_admin_can_raise_it(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    async with await developer_of(platform, gw, "lim-inst", max_instances=1) as dev:
        await limits_seen(gw, "lim-inst", max_instances=1)
        await deploy(dev, "first", NOOP)
        await deploy(dev, "second", NOOP)
        assert (await dev.post("/v1/functions/first/invoke", json={})).status_code == 200
        started = time.monotonic()
        refused = await dev.post("/v1/functions/second/invoke", json={})
        assert refused.status_code == 429, refused.text
        assert "limit of 1 instances" in refused.json()["error"]["message"]
        assert time.monotonic() - started < 5, "the 429 waited for the deadline"
        put = await gw.put("/v1/namespaces/lim-inst/limits", json={"max_instances": 2})
        assert put.status_code == 200

        async def second_answers() -> bool:
            return (await dev.post("/v1/functions/second/invoke", json={})).status_code == 200

        await wait_until(second_answers, timeout_s=15, what="a call once the limit is raised")


@pytest.mark.integration
@process_only
async def test_limits_are_the_admins(platform: Platform, gw: httpx.AsyncClient) -> None:
    async with await developer_of(platform, gw, "lim-admin") as dev:
        assert (await dev.put("/v1/namespaces/lim-admin/limits", json={"max_functions": 100})).status_code == 403
        assert (await dev.get("/v1/namespaces/lim-admin/limits")).status_code == 403
    bad = await gw.put("/v1/namespaces/lim-admin/limits", json={"max_functions": -1})
    assert bad.status_code == 400


def test_the_token_bucket_allows_a_seconds_burst_then_the_rate() -> None:
    limiter = RateLimiter()
    for _ in range(5):
        limiter.take("ns", 5.0, now=100.0)
    with pytest.raises(TooManyRequests) as refused:
        limiter.take("ns", 5.0, now=100.0)
    assert refused.value.retry_after_s == 1
    limiter.take("ns", 5.0, now=100.2)  # one token back after 1/5 s
    with pytest.raises(TooManyRequests):
        limiter.take("ns", 5.0, now=100.2)
    limiter.take("other", 5.0, now=100.2)  # namespaces have buckets of their own
    limiter.take("ns", 0, now=100.2)  # 0: no limit
    slow = RateLimiter()
    slow.take("ns", 0.5, now=0.0)  # below one a second: one call, then one every two seconds
    with pytest.raises(TooManyRequests):
        slow.take("ns", 0.5, now=1.0)
    slow.take("ns", 0.5, now=2.0)


def _zip() -> bytes:
    return make_zip({"handler.py": NOOP})
