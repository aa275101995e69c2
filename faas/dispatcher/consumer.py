"""The async side of a dispatcher: consumes the invocation queue with the shared consumer group.

Guarantees:
- an event is acknowledged only together with its recorded outcome (``InvocationQueue``), and that
  bookkeeping is shielded from cancellation, so a dispatcher stopping mid-way leaves the event pending
  for another dispatcher rather than lost;
- a failed attempt is the function's fault or the platform's (``faults.fault_of``; recorded as
  ``"fault"`` on the error).  After a function fault (its handler raised, timed out, ran out of
  memory, its import failed, it crashed its host) the event is retried after
  ``async_retry_base_s * 2**(attempt-1)`` seconds with +-50% jitter, up to the version's
  ``max_retries``.  After a platform fault (no node agent, no instance could start for a platform
  reason, the scheduler or an instance unreachable, no instance before the deadline, throttled at
  ``max_instances``) it is retried without using up ``max_retries`` (``platform_retries`` + 1), after
  a backoff doubling from ``async_retry_base_s`` up to ``async_platform_retry_cap_s``, never sooner
  than a throttle's ``retry_after_s``.  No retry is scheduled to come due after the event's
  ``max_event_age_s``; an event out of retries or age goes to the dead-letter stream with its last
  error (and its fault); an event whose function or version is gone is dead-lettered at once;
- events of a dispatcher whose membership lease lapsed (killed, crashed) are taken over at once (two
  scans ``_ORPHAN_SCAN_S`` apart see it gone); a dispatcher restarted under the same id first
  finishes the events its previous process held; anything else (a live dispatcher stuck on an
  event) is reclaimed once idle for ``async_visibility_s`` (looked for every ``_RECLAIM_S``);
- the on-success / on-failure destination record, and the acknowledgement of a queue batch at its
  source, are part of the same transaction as the outcome; a chain of function destinations stops
  after ``MAX_DESTINATION_HOPS``;
- an unexpected error while handling an event dead-letters it (``internal_error``) rather than leave
  it to be reclaimed and fail again forever;
- an event queued for a function that was deleted since (its ``function_uid`` is not the uid of the
  function now under that name) is dead-lettered as ``not_found``, never run by the new function;
- Redis restarts: when a queue command fails because the connection did (``connection_losses``
  moves), the consumer makes sure its group exists and re-reads its own pending events at once,
  skipping the ones it holds (in its backlog or running).  That recovers the events a lost
  XREADGROUP reply handed to it, and the events whose start or outcome could not be recorded (the
  transaction raised ``Unavailable``: the event stayed pending and is run again), without waiting
  for ``async_visibility_s``.  Every source of events skips the ones this consumer holds, so none
  runs twice at once here;
- events are read in batches (one XREADGROUP for as many as there are free slots) and at most
  ``_MAX_IN_FLIGHT`` run at once per dispatcher; an event beyond its function's free instance slots
  waits in the dispatcher's pool for one (and asks for an instance);
- starts and outcomes recorded at the same moment share one transaction (the queue is made with
  ``group_records``; this consumer runs its writer): each event's outcome and acknowledgement are in
  the same transaction, which may hold other events' records too.  A transaction that fails as a
  whole (Redis down, an error reply) records none of them: each of its events stays pending, as
  when its own transaction failed.

Caveats: "gone from the membership" means its lease lapsed, not that it died: a dispatcher cut off
from etcd for longer than its lease while still running has its in-flight events run a second time
elsewhere (at-least-once).  An event whose outcome transaction lost its reply to a Redis crash runs
again if the transaction was not applied (at-least-once; its record's ``runs`` counts both).  A
Redis error that is not a lost connection (an error reply) still leaves the event to be reclaimed
after ``async_visibility_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from faas.core import redis_keys, wire
from faas.core.errors import FaasError, NotFound, TooManyRequests
from faas.core.models import Destination, VersionSpec
from faas.core.queue import AsyncEnvelope, InvocationQueue, PipeStep
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.dispatcher.faults import Fault, GiveUp, Retry, fault_of, next_step, platform_backoff
from faas.dispatcher.service import Dispatcher

log = logging.getLogger("faas.consumer")

_MAX_IN_FLIGHT = 64
_READ_AT_LEAST = 8
RECORDS_PER_TRANSACTION = 2 * _MAX_IN_FLIGHT  # a start and an outcome per event at most
_READ_BLOCK_MS = 1000
_ORPHAN_SCAN_S = 2.0
_DUE_MOVE_S = 0.25  # how often retries that came due move back onto the stream
_RECLAIM_S = 5.0  # how often events idle past async_visibility_s are looked for
MAX_DESTINATION_HOPS = 16  # as AWS Lambda's recursive-loop detection


class AsyncConsumer:
    def __init__(
        self, *, settings: Settings, queue: InvocationQueue, dispatcher: Dispatcher, consumer_id: str,
        live_consumers: Callable[[], set[str]],
    ) -> None:  # fmt: skip
        self.settings = settings
        self.live_consumers = live_consumers
        self._suspects: set[str] = set()
        self.queue = queue
        self.dispatcher = dispatcher
        self.consumer_id = consumer_id
        self.tasks = TaskSet(f"consumer:{consumer_id}")
        self._running = 0  # events handed to a task and not finished
        self._slot_freed = asyncio.Event()
        # Message ids taken and not finished (in the backlog or running): a re-read skips them.
        self._held: set[str] = set()
        self._losses_seen = 0  # queue.connection_losses when this consumer last re-read its pending

    async def close(self) -> None:
        await self.tasks.cancel_all()

    async def run_forever(self) -> NoReturn:
        self.tasks.spawn(self.queue.write_records_forever(), name="records", long_lived=True)
        while True:
            try:
                await self.queue.ensure_group()
                break
            except FaasError as exc:
                log.warning("cannot prepare the queue: %s", exc)
                await asyncio.sleep(1.0)
        self._losses_seen = self.queue.connection_losses
        backlog = self._take(await self._own_pending())
        # The housekeeping reads run on their own clocks, not on every pass: under load a pass
        # takes a few events, and three extra round trips per pass cost more than the events.
        next_orphan_scan = next_due_move = next_reclaim = 0.0
        while True:
            try:
                free = await self._free_slots()
                if self.queue.connection_losses != self._losses_seen:
                    backlog += self._take(await self._resync())
                now = time.monotonic()
                if now >= next_due_move:
                    next_due_move = now + _DUE_MOVE_S
                    await self.queue.move_due()
                if not backlog and now >= next_orphan_scan:
                    next_orphan_scan = now + _ORPHAN_SCAN_S
                    backlog = self._take(await self._orphans())
                if not backlog and now >= next_reclaim:
                    found = await self.queue.reclaim(
                        self.consumer_id, min_idle_s=self.settings.async_visibility_s, count=free
                    )
                    next_reclaim = now + (0.0 if len(found) == free else _RECLAIM_S)  # more may be idle
                    backlog = self._take(found)
                if not backlog:
                    backlog = self._take(await self.queue.read(self.consumer_id, count=free, block_ms=_READ_BLOCK_MS))
                batch, backlog = backlog[:free], backlog[free:]
                for msg_id, env in batch:
                    self._running += 1
                    self.tasks.spawn(self._handle(msg_id, env), name=f"event:{msg_id}")
            except FaasError as exc:
                log.warning("queue consumer: %s", exc)
                await asyncio.sleep(1.0)

    async def _free_slots(self) -> int:
        """How many more events may run now; waits until ``_READ_AT_LEAST`` may (at full load, a read
        per finished event would cost more round trips than the events)."""
        while self._running > _MAX_IN_FLIGHT - _READ_AT_LEAST:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        return _MAX_IN_FLIGHT - self._running

    def _take(self, found: list[tuple[str, AsyncEnvelope | None]]) -> list[tuple[str, AsyncEnvelope | None]]:
        """The events of ``found`` this consumer does not hold yet, now held (until ``_handle`` ends)."""
        fresh = [(msg_id, env) for msg_id, env in found if msg_id not in self._held]
        self._held.update(msg_id for msg_id, _ in fresh)
        return fresh

    async def _own_pending(self) -> list[tuple[str, AsyncEnvelope | None]]:
        """Events a previous process with this member id took and never finished."""
        try:
            found = await self.queue.read_own_pending(self.consumer_id, count=10_000)
        except FaasError as exc:
            log.warning("cannot read this consumer's pending events: %s", exc)
            return []
        if found:
            log.info("resuming %d events this dispatcher held before it restarted", len(found))
        return found

    async def _resync(self) -> list[tuple[str, AsyncEnvelope | None]]:
        """After a lost connection to Redis: this consumer's pending events that it does not hold.

        A reply lost with the connection (XREADGROUP, XAUTOCLAIM, XCLAIM) may have made events pending
        for this consumer that it never received, and an event whose start or outcome could not be
        recorded stays pending; both are found here at once, not after ``async_visibility_s``.  The
        group is created again first in case Redis came back without its data."""
        losses = self.queue.connection_losses
        await self.queue.ensure_group()
        found = await self.queue.read_own_pending(self.consumer_id, count=10_000)
        self._losses_seen = losses  # a loss during the reads above is seen on the next pass
        fresh = [(msg_id, env) for msg_id, env in found if msg_id not in self._held]
        if fresh:
            log.warning(
                "the connection to Redis was lost: running %d pending events this dispatcher did not hold", len(fresh)
            )
        return fresh

    async def _orphans(self) -> list[tuple[str, AsyncEnvelope | None]]:
        """Events held by dispatchers that left the membership (lease expired: killed, crashed).

        A consumer must be missing from two scans in a row, so a dispatcher that registered a moment
        ago (and is not yet in this copy of the membership) keeps its events."""
        live = self.live_consumers()
        holders = await self.queue.pending_consumers()
        missing = {name for name in holders if name not in live and name != self.consumer_id}
        confirmed, self._suspects = missing & self._suspects, missing
        out: list[tuple[str, AsyncEnvelope | None]] = []
        for dead in sorted(confirmed):
            taken = await self.queue.take_over(dead, self.consumer_id, count=64)
            if taken:
                log.warning("took over %d events of dispatcher %s, which left", len(taken), dead)
            out += taken
        return out

    async def _handle(self, msg_id: str, env: AsyncEnvelope | None) -> None:
        try:
            if env is None:
                await asyncio.shield(self.queue.drop_unreadable(msg_id))
                return
            await self._run(msg_id, env)
        except FaasError as exc:
            # Redis down while recording: the event stays pending.  A lost connection made the queue
            # count it, so the loop re-reads it once Redis answers (see _resync); else it is
            # reclaimed after async_visibility_s.
            log.warning("event %s: %s", msg_id, exc)
        except Exception as exc:
            # A bug must not leave the event to cycle through reclaims forever: set it aside with the error.
            log.exception("event %s: unexpected failure; dead-lettering it", msg_id)
            if env is not None:
                internal = {"kind": "internal_error", "type": type(exc).__name__, "message": str(exc)[:500],
                            "fault": "platform"}  # fmt: skip
                try:
                    await asyncio.shield(self.queue.dead_letter(msg_id, env, internal))
                except FaasError as again:
                    log.warning("event %s: %s", msg_id, again)
        finally:
            self._held.discard(msg_id)
            self._running -= 1
            self._slot_freed.set()

    async def _run(self, msg_id: str, env: AsyncEnvelope) -> None:
        try:
            spec = await self.dispatcher.catalog.version(
                env.namespace, env.function, env.version, uid=env.function_uid
            )
        except NotFound as exc:  # deleted, or deleted and created again (another function uid)
            await self._gone(msg_id, env, exc)
            return
        except FaasError as exc:
            # etcd unreachable: the platform's fault.  The event's age is checked when it comes back
            # and its version can be read.
            unknown = {**exc.to_body()["error"], "fault": "platform"}
            delay = platform_backoff(
                env.platform_retries + 1,
                base_s=self.settings.async_retry_base_s,
                cap_s=self.settings.async_platform_retry_cap_s,
            )
            await asyncio.shield(self.queue.retry_later(msg_id, env, unknown, delay, platform=True))
            return
        age = time.time() - env.enqueued_at
        if age > spec.max_event_age_s:
            # It aged out waiting in the queue (a backlog, no dispatcher): retries are never scheduled
            # past the age limit, so this is not a failure of the function's.
            too_old = {"kind": "event_too_old", "type": "MaxEventAgeExceeded", "fault": "platform",
                       "message": f"event is {age:.0f} s old; the function's max_event_age_s is {spec.max_event_age_s:g}"}  # fmt: skip
            await self._give_up(msg_id, env, spec, too_old, "EventAgeExceeded", source_ids(env))
            return
        await self.queue.mark_running(env)
        deadline = wire.invocation_deadline(timeout_s=spec.timeout_s, cold_start_timeout_s=self.settings.cold_start_timeout_s)
        error: dict[str, Any]
        status: int | None = None
        retry_after_s: float | None = None
        try:
            result = await self.dispatcher.invoke(
                env.namespace,
                env.function,
                env.version,
                env.payload.encode(),
                request_id=env.id,
                deadline=deadline,
                uid=env.function_uid,
            )
        except NotFound as exc:  # deleted while the event waited for an instance
            await self._gone(msg_id, env, exc)
            return
        except FaasError as exc:
            error = exc.to_body()["error"]
            if isinstance(exc, TooManyRequests):
                retry_after_s = exc.retry_after_s
        else:
            if result.status == 200:
                await self._succeeded(msg_id, env, spec, result.body.decode())
                return
            status, error = result.status, error_of(result.status, result.body)
        await self._failed(msg_id, env, spec, error, status=status, retry_after_s=retry_after_s)

    async def _failed(
        self, msg_id: str, env: AsyncEnvelope, spec: VersionSpec, error: dict[str, Any], *,
        status: int | None, retry_after_s: float | None,
    ) -> None:  # fmt: skip
        """Retry the event (a function retry or a platform retry), or give it up."""
        fault = fault_of(error, status)
        error = {**error, "fault": fault}
        step = self._next_step(fault, env, spec, retry_after_s=retry_after_s)
        if isinstance(step, Retry):
            if step.platform:
                log.info("event %s: platform fault (%s: %s); retry %d in %.1f s", env.id, error.get("kind"),
                         str(error.get("message"))[:200], env.platform_retries + 1, step.delay_s)  # fmt: skip
            await asyncio.shield(self.queue.retry_later(msg_id, env, error, step.delay_s, platform=step.platform))
        else:
            await self._give_up(msg_id, env, spec, error, step.condition, source_ids(env))

    def _next_step(
        self, fault: Fault, env: AsyncEnvelope, spec: VersionSpec, *, retry_after_s: float | None = None
    ) -> Retry | GiveUp:
        """What to do after a failed attempt of ``env`` (``faults.next_step`` with this event's numbers)."""
        return next_step(
            fault,
            attempt=env.attempt,
            platform_retries=env.platform_retries,
            max_retries=spec.max_retries,
            age_s=time.time() - env.enqueued_at,
            max_event_age_s=spec.max_event_age_s,
            base_s=self.settings.async_retry_base_s,
            platform_cap_s=self.settings.async_platform_retry_cap_s,
            retry_after_s=retry_after_s,
        )

    async def _gone(self, msg_id: str, env: AsyncEnvelope, exc: NotFound) -> None:
        """The function or version is gone: dead-letter the event at once (no destination to tell)."""
        gone = exc.to_body()["error"]
        gone = {**gone, "fault": fault_of(gone)}
        await asyncio.shield(self.queue.dead_letter(msg_id, env, gone, also=settle_source(env, source_ids(env))))

    async def _succeeded(self, msg_id: str, env: AsyncEnvelope, spec: VersionSpec, result_json: str) -> None:
        ids = source_ids(env)
        failed = failed_items(env, result_json) if ids else []
        if not failed:
            dest = await self._destination(env, spec.on_success, "Success", result=result_json)
            await asyncio.shield(
                self.queue.succeed(msg_id, env, result_json, also=steps(dest, settle_source(env, ids)))
            )
            return
        # A partial batch failure: the items that succeeded are acknowledged at their source now; only
        # the failed ones are tried again (or dead-lettered once out of retries).
        done = [i for i in ids if i not in set(failed)]
        retry = only_items(env, failed)
        error = {"kind": "partial_batch_failure", "type": "BatchItemFailures", "fault": "function",
                 "message": f"{len(failed)} of {len(ids)} records failed", "failed": failed}  # fmt: skip
        step = self._next_step("function", env, spec)
        if isinstance(step, Retry):
            await asyncio.shield(
                self.queue.retry_later(
                    msg_id,
                    env,
                    error,
                    step.delay_s,
                    retry=retry,
                    also=settle_source(env, done),
                    result_json=result_json,
                )
            )
        else:
            await self._give_up(msg_id, retry, spec, error, step.condition, ids, original=env)

    async def _give_up(
        self,
        msg_id: str,
        env: AsyncEnvelope,
        spec: VersionSpec,
        error: dict[str, Any],
        condition: str,
        settle: list[str],
        *,
        original: AsyncEnvelope | None = None,
    ) -> None:
        """Dead-letter the event (kept for redrive), tell the on-failure destination, settle the source."""
        dest = await self._destination(env, spec.on_failure, condition, error=error)
        await asyncio.shield(
            self.queue.dead_letter(
                msg_id, env, error, also=steps(dest, settle_source(original or env, settle))
            )
        )

    async def _destination(
        self,
        env: AsyncEnvelope,
        dest: Destination | None,
        condition: str,
        *,
        result: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> PipeStep | None:
        """The transaction step that hands a record of the outcome to ``dest`` (None: nothing to do)."""
        if dest is None:
            return None
        record = outcome_record(
            env, condition, result=result, error=error, max_bytes=self.settings.max_async_payload_bytes
        )
        if dest.stream is not None:
            stream = dest.stream
            return lambda pipe: pipe.xadd(stream, {"record": record})
        try:
            target = await self.dispatcher.catalog.resolve(env.namespace, dest.function_name, dest.qualifier)
        except FaasError as exc:
            # The outcome itself is still recorded; only the hand-off is lost, and it is logged.
            log.warning("event %s: destination %s unavailable: %s", env.id, dest.function, exc)
            return None
        hops = int((env.source or {}).get("hops", 0)) + 1 if (env.source or {}).get("kind") == "destination" else 1
        if hops > MAX_DESTINATION_HOPS:
            # A chain of destinations that comes back on itself (A -> B -> A ...) stops here.
            log.warning("event %s: destination %s not invoked: %d hops in a row", env.id, dest.function, hops)
            return None
        follow_up = AsyncEnvelope(
            id=uuid.uuid4().hex, namespace=env.namespace, function=target.function, version=target.version,
            function_uid=target.function_uid, payload=record,
            source={"kind": "destination", "from": env.id, "condition": condition, "hops": hops},
        )  # fmt: skip
        return lambda pipe: self.queue.add_enqueue(pipe, follow_up)


def error_of(status: int, body: bytes) -> dict[str, Any]:
    """The ``error`` object of a failed invocation's response, whatever shape the body has."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return error
    return {"kind": "error", "type": f"HTTP {status}", "message": body.decode(errors="replace")[:500]}


def steps(*parts: PipeStep | None) -> PipeStep | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None

    def run(pipe: Any) -> None:
        for part in present:
            part(pipe)

    return run


def source_ids(env: AsyncEnvelope) -> list[str]:
    """The stream message ids a queue-subscription batch carries (empty for other events)."""
    if not env.source or env.source.get("kind") != "queue":
        return []
    return [str(i) for i in env.source.get("ids", [])]


def settle_source(env: AsyncEnvelope, ids: list[str]) -> PipeStep | None:
    """Acknowledge messages at their source stream and forget them as in flight (same transaction)."""
    if not ids or env.source is None:
        return None
    stream, group = env.source["stream"], env.source["group"]
    inflight = redis_keys.queue_subscription_inflight(env.namespace, env.function, env.source["subscription"])

    def run(pipe: Any) -> None:
        pipe.xack(stream, group, *ids)
        pipe.hdel(inflight, *ids)

    return run


def failed_items(env: AsyncEnvelope, result_json: str) -> list[str]:
    """The ids a batch handler reported in ``batchItemFailures``; all of them if the report is invalid."""
    ids = source_ids(env)
    try:
        result = json.loads(result_json)
    except (ValueError, RecursionError):
        return []
    if not isinstance(result, dict) or "batchItemFailures" not in result:
        return []
    reported = result["batchItemFailures"]
    if not isinstance(reported, list):
        return ids
    failed: list[str] = []
    for item in reported:
        ident = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not isinstance(ident, str) or ident not in ids:
            return ids  # as AWS does: an unusable report fails the whole batch
        failed.append(ident)
    return [i for i in ids if i in set(failed)]


def only_items(env: AsyncEnvelope, ids: list[str]) -> AsyncEnvelope:
    """The same batch event with only the records ``ids`` name."""
    keep = set(ids)
    event = json.loads(env.payload)
    event["Records"] = [r for r in event.get("Records", []) if r.get("messageId") in keep]
    source = {**(env.source or {}), "ids": [i for i in source_ids(env) if i in keep]}
    return env.model_copy(update={"payload": json.dumps(event), "source": source})


def outcome_record(
    env: AsyncEnvelope, condition: str, *, result: str | None, error: dict[str, Any] | None,
    max_bytes: int = 1024 * 1024,
) -> str:
    """The record a destination receives (the shape of AWS Lambda's destination records).

    At most ``max_bytes`` (an async event's limit, since a function destination receives it as
    one): the response payload, then the request payload, is replaced by ``{"truncated": true,
    "bytes": N}`` when the record would be larger."""
    try:
        request_payload = json.loads(env.payload)
    except (ValueError, RecursionError):
        request_payload = env.payload
    record: dict[str, Any] = {
        "version": "1.0",
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "requestContext": {
            "requestId": env.id,
            "function": f"{env.namespace}/{env.function}:{env.version}",
            "condition": condition,
            "approximateInvokeCount": env.attempt,
        },
        "requestPayload": request_payload,
    }
    if result is not None:
        try:
            record["responsePayload"] = json.loads(result)
        except (ValueError, RecursionError):
            record["responsePayload"] = result
        record["responseContext"] = {"statusCode": 200}
    if error is not None:
        record["responsePayload"] = {"error": error}
        record["responseContext"] = {"statusCode": 200 if error.get("kind") == "partial_batch_failure" else 500,
                                     "functionError": error.get("kind")}  # fmt: skip
    text = json.dumps(record)
    for field in ("responsePayload", "requestPayload"):
        if len(text) <= max_bytes or field not in record:
            break
        record[field] = {"truncated": True, "bytes": len(json.dumps(record[field]))}
        text = json.dumps(record)
    return text
