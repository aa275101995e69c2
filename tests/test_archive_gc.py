"""Code archives no version refers to are deleted from S3 by the scheduler leader, after a grace period.

A platform of its own (module fixture) with a short collection interval and grace period.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from faas.core.codestore import CodeStore
from tests.conftest import Platform, running_platform
from tests.helpers import deploy, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    async with running_platform(
        tmp_path_factory, "faas-archive-gc", archive_gc_interval_s=1.0, archive_gc_grace_s=3.0
    ) as p:
        yield p


async def _archives(platform: Platform) -> set[str]:
    return {key for key, _ in await CodeStore(platform.settings).list_archives()}


async def test_archives_of_deleted_functions_are_collected_and_live_ones_kept(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    doomed = await deploy(gw, "gc-doomed", "def handler(event, context):\n    return 'doomed'\n")
    kept = await deploy(gw, "gc-kept", "def handler(event, context):\n    return 'kept'\n")
    doomed_key, kept_key = doomed["config"]["code"]["key"], kept["config"]["code"]["key"]
    assert {doomed_key, kept_key} <= await _archives(platform)

    assert (await gw.delete("/v1/functions/gc-doomed")).status_code == 204

    async def collected() -> bool:
        return doomed_key not in await _archives(platform)

    await wait_until(collected, timeout_s=30, what="the deleted function's archive to be collected")
    await asyncio.sleep(4.0)  # past the grace period, several passes later
    assert kept_key in await _archives(platform)
    resp = await gw.post("/v1/functions/gc-kept/invoke", json={})
    assert resp.status_code == 200 and resp.json() == "kept"

    # The name can be deployed again, with a fresh archive.
    await deploy(gw, "gc-doomed", "def handler(event, context):\n    return 'doomed'\n")
    resp = await gw.post("/v1/functions/gc-doomed/invoke", json={})
    assert resp.status_code == 200 and resp.json() == "doomed"


async def test_storing_an_archive_again_protects_it_from_collection(platform: Platform) -> None:
    store = CodeStore(platform.settings)
    data = b"PK\x05\x06" + b"\x00" * 18  # an empty zip: content-addressed, the same key each time
    ref = await store.put_archive(data)
    first = dict(await store.list_archives())[ref.key]
    await asyncio.sleep(1.1)
    await store.put_archive(data)  # e.g. a deploy of code a deleted function had
    second = dict(await store.list_archives())[ref.key]
    assert second > first
    assert not await store.delete_if_older(ref.key, first)  # written after the cutoff: kept
    assert ref.key in await _archives(platform)
