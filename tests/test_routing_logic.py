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
    first = pool.pick(lambda _: 0.0)
    second = pool.pick(lambda _: 0.0)
    assert {first.instance_id, second.instance_id} == {"a", "b"}  # spread, not stacked
    pool.pick(lambda _: 0.0)
    pool.pick(lambda _: 0.0)
    assert pool.pick(lambda _: 0.0) is None  # 2 x 2 slots taken
    assert a.inflight == 2 and b.inflight == 2


def test_node_load_breaks_ties() -> None:
    pool = FunctionPool()
    pool.add(_inst("busy-node", node="n1"))
    pool.add(_inst("calm-node", node="n2"))
    picked = pool.pick(lambda node: 0.9 if node == "n1" else 0.1)
    assert picked.instance_id == "calm-node"


async def test_release_hands_slot_to_oldest_waiter() -> None:
    pool = FunctionPool()
    inst = _inst("a")
    pool.add(inst)
    assert pool.pick(lambda _: 0.0) is inst
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
