"""Event sources the primary trigger runs: queue-subscription pollers and timers.

Only the elected primary runs them; a standby starts them when it takes over, and a primary that
loses its lease stops them.  Each event they produce is queued as an async invocation of the
version (and function uid) the subscription's qualifier resolves to when it is queued.

Guarantees:
- queue subscriptions: the user's stream is read with one consumer group per subscription; a
  message is acknowledged at the source only in the transaction that records the outcome of the
  invocation that carried it (faas/dispatcher/consumer.py).  Messages handed to the queue are noted
  as in flight in the same transaction as the enqueue; a new primary re-delivers the pending
  messages that were read but never handed over (a trigger that died between the two steps);
- timers: each tick is queued at most once, even across a failover: the enqueue is keyed by the
  tick (an atomic SET NX + XADD in Redis), and the last fired tick is kept in etcd under the
  election fence, so a deposed primary cannot move it.  After a gap (failover, restart) the missed
  ticks of the last ``CATCH_UP_S`` are fired, at most ``MAX_CATCH_UP``; older ones are skipped.

Caveat: a deposed primary that has not yet noticed it lost its lease may hand over a batch it had
already read while the new primary re-delivers the same pending messages: at-least-once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from faas.core import keys, redis_keys
from faas.core.election import Election
from faas.core.errors import FaasError, NotLeader
from faas.core.etcd import Etcd
from faas.core.models import VersionSpec
from faas.core.queue import AsyncEnvelope, InvocationQueue
from faas.core.registry import Catalog
from faas.core.schedule import parse_schedule
from faas.core.subscriptions import Subscription, SubscriptionIndex, ensure_queue_group
from faas.core.tasks import TaskSet

log = logging.getLogger("faas.trigger.sources")

CATCH_UP_S = 900
MAX_CATCH_UP = 10
TICK_DEDUP_S = 86_400
_CONSUMER = "faas-trigger"  # one name for every trigger: a new primary owns its predecessor's pending reads
_RECONCILE_S = 0.5
MAX_BATCH_BYTES = 1024 * 1024  # an async event's payload limit; a bigger batch is cut in several
_BLOCK_MS = 1000
_ERROR_PAUSE_S = 1.0


class EventSources:
    """Starts and stops one task per queue or timer subscription, while this trigger is primary."""

    def __init__(
        self, *, etcd: Etcd, election: Election, redis: aioredis.Redis, queue: InvocationQueue,
        catalog: Catalog, index: SubscriptionIndex,
    ) -> None:  # fmt: skip
        self.etcd = etcd
        self.election = election
        self.redis = redis
        self.queue = queue
        self.catalog = catalog
        self.index = index
        self.tasks = TaskSet("sources")
        self._running: dict[str, tuple[str, asyncio.Task[Any]]] = {}

    async def run_forever(self) -> NoReturn:
        while True:
            await self.election.became_leader.wait()
            if not self.election.is_leader:
                # Elected, but the lease is not confirmed right now (a process resumed after a freeze,
                # before its election task noticed): wait for that task, never spin on the event.
                await asyncio.sleep(_RECONCILE_S)
                continue
            log.info("primary: starting event sources")
            try:
                while self.election.is_leader:
                    await self._reconcile()
                    await asyncio.sleep(_RECONCILE_S)
            finally:
                await self._stop_all()
            log.info("no longer primary: event sources stopped")

    async def close(self) -> None:
        await self._stop_all()

    async def _reconcile(self) -> None:
        wanted = {s.ref: s for s in self.index.active("queue") + self.index.active("timer")}
        for ref, (signature, task) in list(self._running.items()):
            sub = wanted.get(ref)
            if sub is None or sub.model_dump_json() != signature or task.done():
                del self._running[ref]
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for ref, sub in wanted.items():
            if ref not in self._running:
                runner = self._poll_queue(sub) if sub.queue is not None else self._run_timer(sub)
                task = self.tasks.spawn(runner, name=f"{sub.kind}:{ref}")
                self._running[ref] = (sub.model_dump_json(), task)

    async def _stop_all(self) -> None:
        self._running.clear()
        await self.tasks.cancel_all()

    # -- queue subscriptions ----------------------------------------------------------------

    async def _poll_queue(self, sub: Subscription) -> None:
        assert sub.queue is not None
        poller = QueuePoller(
            sub, redis=self.redis, queue=self.queue, catalog=self.catalog, election=self.election
        )
        while True:
            try:
                await poller.run()
            except GroupGone:
                return
            except (FaasError, RedisError) as exc:
                if isinstance(exc, NotLeader):
                    return
                log.warning("queue subscription %s: %s", sub.ref, exc)
                await asyncio.sleep(_ERROR_PAUSE_S)

    # -- timers -----------------------------------------------------------------------------

    async def _run_timer(self, sub: Subscription) -> None:
        timer = TimerRunner(
            sub, etcd=self.etcd, queue=self.queue, catalog=self.catalog, election=self.election
        )
        while True:
            try:
                await timer.run()
            except FaasError as exc:
                if isinstance(exc, NotLeader):
                    return
                log.warning("timer %s: %s", sub.ref, exc)
                await asyncio.sleep(_ERROR_PAUSE_S)


class GroupGone(Exception):
    """The subscription's consumer group no longer exists on its stream."""


class QueuePoller:
    """Reads one user stream in batches and queues each batch as one invocation."""

    def __init__(
        self,
        sub: Subscription,
        *,
        redis: aioredis.Redis,
        queue: InvocationQueue,
        catalog: Catalog,
        election: Election,
    ) -> None:
        assert sub.queue is not None
        self.sub = sub
        self.source = sub.queue
        self.redis = redis
        self.queue = queue
        self.catalog = catalog
        self.election = election
        self.group = redis_keys.queue_subscription_group(sub.namespace, sub.function, sub.name)
        self.inflight = redis_keys.queue_subscription_inflight(sub.namespace, sub.function, sub.name)

    async def run(self) -> None:
        await self._ensure_group()
        await self._redeliver_orphans()
        while True:
            target = await self._target()
            batch = await self._read_batch()
            if batch:
                await self._hand_over(batch, target)

    async def _ensure_group(self) -> None:
        await ensure_queue_group(self.redis, self.sub)

    async def _target(self) -> VersionSpec:
        return await self.catalog.resolve(self.sub.namespace, self.sub.function, self.sub.qualifier)

    async def _redeliver_orphans(self) -> None:
        """Hand over messages a previous primary read but never queued (pending, not in flight)."""
        cursor = "0"
        while True:
            entries = _entries(
                await self.redis.xreadgroup(
                    self.group, _CONSUMER, {self.source.stream: cursor}, count=self.source.batch_size
                )
            )
            if not entries:
                return
            cursor = _text(entries[-1][0])
            gone = [_text(e[0]) for e in entries if not e[1]]
            if gone:  # deleted from the stream by its owner while pending: nothing to deliver
                await self.redis.xack(self.source.stream, self.group, *gone)
            present = [e for e in entries if e[1]]
            if not present:
                continue
            held = await self.redis.hmget(self.inflight, [_text(e[0]) for e in present])
            candidates = [e for e, invocation in zip(present, held, strict=True) if invocation is None]
            if not candidates:
                continue
            # Still pending *after* the in-flight check: a batch settled in between (XACK and HDEL in
            # one transaction) is neither, and must not be delivered again.
            still = await self.redis.xpending_range(
                self.source.stream, self.group, min=_text(candidates[0][0]), max=_text(candidates[-1][0]),
                count=len(present), consumername=_CONSUMER,
            )  # fmt: skip
            pending_now = {_text(p["message_id"]) for p in still}
            orphans = [e for e in candidates if _text(e[0]) in pending_now]
            if orphans:
                log.info("queue subscription %s: re-delivering %d unhanded messages", self.sub.ref, len(orphans))
                await self._hand_over(orphans, await self._target())

    async def _read_batch(self) -> list[Any]:
        """Up to ``batch_size`` new messages, waiting at most ``batch_window_s`` for the batch to fill."""
        stream, size = self.source.stream, self.source.batch_size
        try:
            batch = _entries(
                await self.redis.xreadgroup(self.group, _CONSUMER, {stream: ">"}, count=size, block=1000)
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                # The group was removed (the subscription deleted) or the stream deleted: stop; the
                # reconciler starts this poller again, creating the group, if it is still wanted.
                raise GroupGone(str(exc)) from exc
            raise
        window_ends = time.monotonic() + self.source.batch_window_s
        while batch and len(batch) < size:
            remaining_ms = int((window_ends - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            more = await self.redis.xreadgroup(  # blocks stay under the client's socket timeout
                self.group, _CONSUMER, {stream: ">"}, count=size - len(batch), block=min(remaining_ms, _BLOCK_MS)
            )
            batch.extend(_entries(more))
        return batch

    async def _hand_over(self, entries: list[Any], target: VersionSpec) -> None:
        """Queue the messages as one invocation per at most ``MAX_BATCH_BYTES`` of records."""
        self.election.require_leader()
        records = [
            {
                "messageId": _text(entry_id),
                "eventSource": "faas:queue",
                "stream": self.source.stream,
                "subscription": self.sub.name,
                "body": {_text(k): _text(v) for k, v in (fields or {}).items()},
            }
            for entry_id, fields in entries
        ]
        batch: list[dict[str, Any]] = []
        size = 0
        for record in records:
            record_size = len(json.dumps(record))
            if batch and size + record_size > MAX_BATCH_BYTES:
                await self._queue_batch(batch, target)
                batch, size = [], 0
            batch.append(record)
            size += record_size
        if batch:
            await self._queue_batch(batch, target)

    async def _queue_batch(self, records: list[dict[str, Any]], target: VersionSpec) -> None:
        ids = [r["messageId"] for r in records]
        env = AsyncEnvelope(
            id=uuid.uuid4().hex, namespace=self.sub.namespace, function=self.sub.function,
            version=target.version, function_uid=target.function_uid, payload=json.dumps({"Records": records}),
            source={"kind": "queue", "subscription": self.sub.name, "stream": self.source.stream,
                    "group": self.group, "ids": ids},
        )  # fmt: skip
        inflight = self.inflight
        await self.queue.enqueue(
            env, also=lambda pipe: pipe.hset(inflight, mapping=dict.fromkeys(ids, env.id))
        )


class TimerRunner:
    """Fires one timer subscription's ticks."""

    def __init__(
        self, sub: Subscription, *, etcd: Etcd, queue: InvocationQueue, catalog: Catalog, election: Election
    ) -> None:
        assert sub.timer is not None
        self.sub = sub
        self.schedule = parse_schedule(sub.timer.schedule)
        self.etcd = etcd
        self.queue = queue
        self.catalog = catalog
        self.election = election
        self.key = keys.timer_tick(sub.namespace, sub.function, sub.name)

    async def run(self) -> None:
        kv = await self.etcd.get(self.key)
        last = float(kv.value) if kv is not None else time.time()
        while True:
            now = time.time()
            floor = max(last, now - CATCH_UP_S)
            due = self.schedule.ticks_between(floor, now, CATCH_UP_S + 1)  # ticks are whole seconds
            if len(due) > MAX_CATCH_UP:
                log.warning("timer %s: skipping missed ticks older than %d", self.sub.ref, due[-MAX_CATCH_UP])
                due = due[-MAX_CATCH_UP:]
            for tick in due:
                await self.fire(tick)
                last = tick
            await asyncio.sleep(max(0.0, self.schedule.next_after(max(last, now)) - time.time()))

    async def fire(self, tick: int) -> None:
        self.election.require_leader()
        assert self.sub.timer is not None
        spec = await self.catalog.resolve(self.sub.namespace, self.sub.function, self.sub.qualifier)
        env = AsyncEnvelope(
            id=uuid.uuid4().hex, namespace=self.sub.namespace, function=self.sub.function, version=spec.version,
            function_uid=spec.function_uid, payload="",
            source={"kind": "timer", "subscription": self.sub.name, "tick": tick},
        )  # fmt: skip
        event = {
            "version": "0",
            "id": env.id,
            "detail-type": "Scheduled Event",
            "source": "faas.timer",
            "time": datetime.fromtimestamp(tick, UTC).isoformat().replace("+00:00", "Z"),
            "resources": [self.sub.ref],
            "schedule": self.sub.timer.schedule,
            "tick": tick,
            "detail": self.sub.timer.payload if self.sub.timer.payload is not None else {},
        }
        env = env.model_copy(update={"payload": json.dumps(event)})
        scope = redis_keys.timer_tick_scope(
            self.sub.namespace, self.sub.function, self.sub.name, tick, spec.function_uid
        )
        holder = await self.queue.enqueue_once(env, scope, TICK_DEDUP_S)
        if holder is not None:
            log.info("timer %s: tick %d was already fired (invocation %s)", self.sub.ref, tick, holder)
        ok, _ = await self.etcd.txn([self.election.fence()], [self.etcd.op_put(self.key, str(tick).encode())])
        if not ok:
            raise NotLeader(f"lost the trigger election while firing timer {self.sub.ref}")


def _entries(resp: Any) -> list[Any]:
    """The entries of a one-stream XREADGROUP reply (RESP2: [[stream, [(id, fields), ...]]])."""
    return list(resp[0][1]) if resp else []


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
