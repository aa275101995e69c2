"""Group commit (faas/core/group_commit.py), with a fake commit function: who shares a transaction,
who learns of its failure, and what a stopped writer answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from faas.core.errors import FaasError, Unavailable
from faas.core.group_commit import GroupCommit


class FakeStore:
    """Commits batches of strings; ``hold`` keeps a commit in flight until released; a batch holding
    ``"poison"`` fails as a whole, and none of it is stored."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.stored: list[str] = []
        self.hold: asyncio.Event | None = None
        self.in_flight = asyncio.Event()

    async def commit(self, items: Sequence[str]) -> list[str]:
        self.batches.append(list(items))
        self.in_flight.set()
        if self.hold is not None:
            await self.hold.wait()
        self.in_flight.clear()
        if "poison" in items:
            raise Unavailable("the transaction failed")
        self.stored += items
        return [f"ok:{item}" for item in items]


@pytest.fixture
async def store() -> AsyncIterator[tuple[FakeStore, GroupCommit[str, str]]]:
    fake = FakeStore()
    group: GroupCommit[str, str] = GroupCommit(fake.commit, max_batch=4, name="test")
    writer = asyncio.ensure_future(group.run_forever())
    yield fake, group
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


async def test_concurrent_callers_share_one_commit_and_get_their_own_results(
    store: tuple[FakeStore, GroupCommit[str, str]],
) -> None:
    fake, group = store
    results = await asyncio.gather(*(group.submit(f"e{i}") for i in range(3)))
    assert results == ["ok:e0", "ok:e1", "ok:e2"]
    assert fake.batches == [["e0", "e1", "e2"]]


async def test_callers_that_arrive_during_a_commit_form_the_next_batch_capped_at_max_batch(
    store: tuple[FakeStore, GroupCommit[str, str]],
) -> None:
    fake, group = store
    fake.hold = asyncio.Event()
    first = asyncio.ensure_future(group.submit("a"))
    await fake.in_flight.wait()
    later = [asyncio.ensure_future(group.submit(f"b{i}")) for i in range(6)]
    await asyncio.sleep(0.01)
    assert not first.done() and fake.batches == [["a"]]  # no answer before its commit returned
    fake.hold.set()
    assert await first == "ok:a"
    assert await asyncio.gather(*later) == [f"ok:b{i}" for i in range(6)]
    assert fake.batches == [["a"], ["b0", "b1", "b2", "b3"], ["b4", "b5"]]


async def test_a_failed_commit_fails_every_caller_in_it_and_only_them(
    store: tuple[FakeStore, GroupCommit[str, str]],
) -> None:
    fake, group = store
    fake.hold = asyncio.Event()
    before = asyncio.ensure_future(group.submit("before"))
    await fake.in_flight.wait()
    doomed = [asyncio.ensure_future(group.submit(item)) for item in ("x", "poison", "y")]
    await asyncio.sleep(0.01)
    fake.hold.set()
    assert await before == "ok:before"
    outcomes = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert await group.submit("after") == "ok:after"
    assert fake.stored == ["before", "after"]


async def test_a_caller_cancelled_before_its_batch_was_taken_is_left_out(
    store: tuple[FakeStore, GroupCommit[str, str]],
) -> None:
    fake, group = store
    fake.hold = asyncio.Event()
    first = asyncio.ensure_future(group.submit("first"))
    await fake.in_flight.wait()
    gone = asyncio.ensure_future(group.submit("gone"))
    kept = asyncio.ensure_future(group.submit("kept"))
    await asyncio.sleep(0)
    gone.cancel()
    fake.hold.set()
    assert (await first, await kept) == ("ok:first", "ok:kept")
    assert fake.batches == [["first"], ["kept"]]


async def test_a_stopped_writer_fails_the_callers_waiting_and_every_later_one() -> None:
    fake = FakeStore()
    fake.hold = asyncio.Event()
    group: GroupCommit[str, str] = GroupCommit(fake.commit, max_batch=4, name="test")
    writer = asyncio.ensure_future(group.run_forever())
    in_flight = asyncio.ensure_future(group.submit("in flight"))
    await fake.in_flight.wait()
    waiting = asyncio.ensure_future(group.submit("waiting"))
    await asyncio.sleep(0)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    for caller in (in_flight, waiting):
        with pytest.raises(Unavailable, match="writer stopped"):
            await caller
    with pytest.raises(Unavailable, match="writer has stopped"):
        await group.submit("late")


async def test_a_commit_that_breaks_its_contract_fails_its_callers_and_the_writer_goes_on() -> None:
    calls = 0

    async def commit(items: Sequence[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug")
        if calls == 2:
            return []  # one result short
        return list(items)

    group: GroupCommit[str, str] = GroupCommit(commit, max_batch=4, name="test")
    writer = asyncio.ensure_future(group.run_forever())
    try:
        for _ in range(2):
            with pytest.raises(FaasError, match="test:"):
                await group.submit("x")
        assert await group.submit("y") == "y"
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
