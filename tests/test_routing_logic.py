"""Unit tests of the pure routing logic: dispatcher pools, scheduler start coalescing, rendezvous."""

from __future__ import annotations

import asyncio

import pytest

from faas.core.models import InstanceRecord, NodeRecord
from faas.core.rendezvous import rank
from faas.dispatcher.pool import FunctionPool, WarmInstance
from faas.scheduler.placement import StartBook, pick_node


def _inst(iid: str, concurrency: int = 1, node: str = "n1") -> WarmInstance:
    rec = InstanceRecord(
        instance_id=iid, namespace="default", function="f", version=1, node_id=node,
        address=f"unix:///tmp/{iid}.sock", concurrency=concurrency,
    )
    return WarmInstance(record=rec, client=None)


def test_pick_prefers_least_loaded_and_respects_concurrency() -> None:
    pool = FunctionPool()
    a, b = _inst("a", 2), _inst("b", 2)
    pool.add(a)
    pool.add(b)
    first = pool.pick(lambda _: (0.0, 0.0))
    second = pool.pick(lambda _: (0.0, 0.0))
    assert {first.instance_id, second.instance_id} == {"a", "b"}  # spread, not stacked
    pool.pick(lambda _: (0.0, 0.0))
    pool.pick(lambda _: (0.0, 0.0))
    assert pool.pick(lambda _: (0.0, 0.0)) is None  # 2 x 2 slots taken
    assert a.inflight == 2 and b.inflight == 2


def test_node_load_breaks_ties() -> None:
    pool = FunctionPool()
    pool.add(_inst("busy-node", node="n1"))
    pool.add(_inst("calm-node", node="n2"))
    picked = pool.pick(lambda inst: (0.0, 0.9 if inst.record.node_id == "n1" else 0.1))
    assert picked.instance_id == "calm-node"


def test_an_instance_measured_busy_gets_calls_only_once_the_others_are_fuller() -> None:
    pool = FunctionPool()
    burning, calm = _inst("burning", 8), _inst("calm", 8)
    pool.add(burning)
    pool.add(calm)
    measured = {"burning": 1.0, "calm": 0.05}
    picks = [pool.pick(lambda inst: (measured[inst.instance_id], 0.0)) for _ in range(12)]
    assert [p.instance_id for p in picks if p is not None][:8] == ["calm"] * 8  # all of calm's slots first
    assert picks[8] is not None and picks[8].instance_id == "burning"


async def test_release_hands_slot_to_oldest_waiter() -> None:
    pool = FunctionPool()
    inst = _inst("a")
    pool.add(inst)
    assert pool.pick(lambda _: (0.0, 0.0)) is inst
    loop = asyncio.get_running_loop()
    w1, w2 = loop.create_future(), loop.create_future()
    pool.waiters.extend([w1, w2])
    pool.release(inst)
    assert w1.done() and w1.result() is inst and not w2.done()
    assert inst.inflight == 1


async def test_wants_start_coalesces_and_caps_at_max() -> None:
    pool = FunctionPool()
    loop = asyncio.get_running_loop()
    pool.waiters.extend(loop.create_future() for _ in range(20))
    starts = 0
    while pool.wants_start(concurrency=1, max_instances=4):
        pool.pending_starts += 1
        starts += 1
    assert starts == 4
    pool2 = FunctionPool()
    pool2.waiters.extend(loop.create_future() for _ in range(20))
    starts = 0
    while pool2.wants_start(concurrency=10, max_instances=10):
        pool2.pending_starts += 1
        starts += 1
    assert starts == 2  # 20 waiters, 10 slots per instance


async def test_new_instance_serves_waiters_up_to_concurrency() -> None:
    pool = FunctionPool()
    loop = asyncio.get_running_loop()
    waiters = [loop.create_future() for _ in range(3)]
    pool.waiters.extend(waiters)
    pool.add(_inst("a", concurrency=2))
    assert [w.done() for w in waiters] == [True, True, False]


async def test_abandoned_waiters_leave_the_queue_and_are_not_counted() -> None:
    pool = FunctionPool()
    loop = asyncio.get_running_loop()
    gone, staying = loop.create_future(), loop.create_future()
    pool.waiters.extend([gone, staying])
    pool.abandon(gone)  # its deadline passed
    assert gone.cancelled() and list(pool.waiters) == [staying]
    pool.pending_starts = 1
    assert not pool.wants_start(concurrency=1, max_instances=4)  # one live waiter, one start under way
    pool.abandon(staying)
    pool.pending_starts = 0
    assert pool.idle  # nothing left that keeps the pool


async def test_a_slot_handed_to_a_waiter_that_gave_up_goes_to_the_next() -> None:
    pool = FunctionPool()
    inst = _inst("a")
    pool.add(inst)
    assert pool.pick(lambda _: (0.0, 0.0)) is inst
    loop = asyncio.get_running_loop()
    late, next_one = loop.create_future(), loop.create_future()
    pool.waiters.extend([late, next_one])
    pool.release(inst)  # the slot goes to ``late`` in the same instant its deadline passes
    assert late.result() is inst
    pool.abandon(late)
    assert next_one.done() and next_one.result() is inst
    assert inst.inflight == 1 and not pool.waiters


def test_at_max_counts_running_instances_and_starts_under_way() -> None:
    pool = FunctionPool()
    assert not pool.at_max(2)
    pool.pending_starts = 1
    assert not pool.at_max(2)
    pool.add(_inst("a"))
    assert pool.at_max(2)
    pool.remove("a")
    assert not pool.at_max(2)


def test_call_duration_estimate_starts_at_the_first_call_then_moves_towards_new_ones() -> None:
    pool = FunctionPool()
    assert pool.call_s == 0.0
    pool.observe(2.0)
    assert pool.call_s == 2.0
    pool.observe(1.0)
    assert 1.0 < pool.call_s < 2.0
    for _ in range(40):
        pool.observe(0.5)
    assert pool.call_s == pytest.approx(0.5, abs=0.01)


async def _queue(pool: FunctionPool, n: int) -> None:
    loop = asyncio.get_running_loop()
    pool.waiters.extend(loop.create_future() for _ in range(n))


async def test_cold_pool_admits_up_to_the_hard_cap() -> None:
    pool = FunctionPool()
    await _queue(pool, 19)
    assert pool.admit(capacity=2, max_waiters=20, remaining_s=37.0, timeout_s=5.0) == 0
    await _queue(pool, 1)
    retry_after = pool.admit(capacity=2, max_waiters=20, remaining_s=37.0, timeout_s=5.0)
    # No call has completed: the timeout stands in for the call's duration, capped by the deadline.
    assert retry_after == 37


async def test_known_duration_admits_only_what_fits_in_the_deadline() -> None:
    pool = FunctionPool()
    pool.observe(2.0)
    # 2 slots of 2 s: the caller behind 15 waits 8 rounds (16 s) then runs 2 s; 18 s fits in 20 s.
    await _queue(pool, 15)
    assert pool.admit(capacity=2, max_waiters=1000, remaining_s=20.0, timeout_s=5.0) == 0
    await _queue(pool, 2)  # behind 17: 9 rounds (18 s) of waiting + 2 s of call > 19.5 s
    retry_after = pool.admit(capacity=2, max_waiters=1000, remaining_s=19.5, timeout_s=5.0)
    assert retry_after == 18  # the 17 waiting and the calls running now drain in 9 rounds of 2 s
    assert pool.admit(capacity=2, max_waiters=1000, remaining_s=60.0, timeout_s=5.0) == 0
    assert pool.admit(capacity=2, max_waiters=17, remaining_s=60.0, timeout_s=5.0) == 18  # the hard cap


async def test_retry_after_is_at_least_a_second() -> None:
    pool = FunctionPool()
    pool.observe(0.01)
    await _queue(pool, 4)
    assert pool.admit(capacity=100, max_waiters=4, remaining_s=30.0, timeout_s=5.0) == 1
    pool2 = FunctionPool()
    pool2.observe(3.0)
    assert pool2.admit(capacity=1, max_waiters=10, remaining_s=0.2, timeout_s=5.0) == 1  # deadline all but gone


async def test_start_book_shares_a_start_up_to_capacity() -> None:
    book = StartBook()
    key = ("default", "f", 1, "0123456789abcdef")
    ticket = book.open(key, capacity=2)
    assert book.join(key) is ticket
    assert book.join(key) is ticket
    assert book.join(key) is None
    assert book.count(key) == 1
    book.close(key, ticket)
    assert book.count(key) == 0


def test_pick_node_by_free_memory() -> None:
    nodes = [
        NodeRecord(node_id="a", address="x", lease_id=1, runtime="process", memory_total_mb=1000, memory_free_mb=200),
        NodeRecord(node_id="b", address="y", lease_id=2, runtime="process", memory_total_mb=1000, memory_free_mb=800),
    ]
    assert pick_node(nodes, 256).node_id == "b"
    assert pick_node(nodes, 900) is None


def test_rendezvous_is_stable_and_moves_little() -> None:
    members = [f"d{i}" for i in range(4)]
    owners = {f"fn{i}": rank(members, f"fn{i}")[0] for i in range(200)}
    assert owners == {f"fn{i}": rank(list(reversed(members)), f"fn{i}")[0] for i in range(200)}
    survivors = [m for m in members if m != "d0"]
    moved = [k for k, owner in owners.items() if owner != "d0" and rank(survivors, k)[0] != owner]
    assert moved == []  # only d0's functions move
    assert len(set(owners.values())) == 4


@pytest.mark.parametrize("name", ["Hello", "1abc", "a_b", "", "a" * 64, "ab-"])
def test_invalid_names(name: str) -> None:
    from faas.core.models import name_problem

    assert name_problem(name) is not None


def test_valid_name() -> None:
    from faas.core.models import name_problem

    assert name_problem("hello-world2") is None


def test_outcome_records_stay_under_the_async_payload_limit() -> None:
    import json

    from faas.core.queue import AsyncEnvelope
    from faas.dispatcher.consumer import outcome_record

    env = AsyncEnvelope(id="i", namespace="default", function="f", version=1, payload=json.dumps({"x": "a" * 600}))
    small = json.loads(outcome_record(env, "Success", result='"ok"', error=None, max_bytes=1000))
    assert small["requestPayload"] == {"x": "a" * 600} and small["responsePayload"] == "ok"
    big = json.loads(outcome_record(env, "Success", result=json.dumps("b" * 600), error=None, max_bytes=1000))
    assert big["responsePayload"] == {"truncated": True, "bytes": 602}
    assert big["requestPayload"] == {"x": "a" * 600}
    both = json.loads(outcome_record(env, "Success", result=json.dumps("b" * 600), error=None, max_bytes=400))
    assert both["requestPayload"]["truncated"] and both["responsePayload"]["truncated"]
    assert both["requestContext"]["requestId"] == "i"
