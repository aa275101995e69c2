"""The durable queue of async invocations, on Redis Streams (Valkey with appendfsync always).

Guarantees:
- ``enqueue`` writes the event and its ``queued`` status in one MULTI/EXEC: when it returns, both are
  durable; the trigger answers 202 only after that;
- ``enqueue_batch`` queues many events in one atomic script (one fsync: a group commit, see
  ``EnqueueBatcher``), each once per invocation id or once per scope (an idempotency key, a timer
  tick), duplicates within the batch included.  It checks every key before its first write, so when
  it fails (an error reply, Redis down) none of its events is queued;
- an event leaves the stream only in the same transaction that records its outcome (succeeded,
  rescheduled for a retry, or dead-lettered) and acknowledges it; nothing trims the stream, so a
  pending event is never dropped;
- an event a consumer took but did not finish stays pending and is handed to another consumer once
  idle for ``visibility_s`` (``reclaim``);
- retries wait in a sorted set until due; ``move_due`` puts them back on the stream atomically (Lua);
- a retry is either a function retry (``attempt`` + 1: the function's own failure, counted against
  ``max_retries``) or a platform retry (``platform_retries`` + 1, ``attempt`` unchanged): the
  invocation record's ``attempts`` counts function attempts, ``platform_retries`` the others, and
  its ``error`` (the last one) carries ``fault`` (``function`` or ``platform``), as the dead letter's
  does;
- starts and outcomes (``mark_running``, ``succeed``, ``retry_later``, ``dead_letter``) of a queue made
  with ``group_records`` share transactions with those of other events recorded at the same moment
  (``GroupCommit``): each event's outcome and acknowledgement are still in one transaction, which
  now holds several events' records (all applied, or none when it fails as a whole);
- every command that fails because the connection did (Redis restarted, unreachable, too slow)
  raises ``Unavailable`` and adds one to ``connection_losses``; a consumer that sees the count move
  re-reads its own pending events, since a reply lost with the connection may have handed it events
  it never received (``read_own_pending``).

Caveats: a transaction whose reply is lost with the connection may or may not have been applied; the
caller cannot tell, and treats the event as still pending (an outcome recorded twice at worst, never
an event lost); an enqueue that failed so may have queued its event, which a re-send with the same id
or scope does not queue again.  A command that fails on its own inside a transaction or script (a
key of the wrong type, written by someone else) does not undo the rest of it (Redis does not roll
back): ``_finish`` logs a failed step of its caller's, and raises ``Unavailable`` when a command of
the outcome itself failed (the rest of the outcome, the acknowledgement included, may be applied).

Envelopes are versioned (``v``); a consumer refuses versions it does not know.  Fields added since
version 1 have defaults, so envelopes written before them stay readable.  An envelope names the
function's uid (``function_uid``) when it was queued for a known incarnation of the function;
events queued before uids existed have None and run on whichever function has the name.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.commands.core import DataAccessCommands
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from faas.core import redis_keys
from faas.core.errors import NotFound, Unavailable
from faas.core.group_commit import GroupCommit

log = logging.getLogger("faas.queue")

ENVELOPE_VERSION = 1
_TAKE_OVER_MIN_IDLE_MS = 1000
_STREAM_ID = re.compile(r"^\d+-\d+$")

_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, item in ipairs(due) do
  redis.call('ZREM', KEYS[1], item)
  redis.call('XADD', KEYS[2], '*', 'e', item)
end
return #due
"""

# Queue a batch of events (one group commit), all or none.  KEYS[1] is the stream; then, event by
# event, its status key, followed by its once key when it has a scope.  ARGV[1] is the status TTL (s),
# ARGV[2] the events as JSON: [envelope, invocation id, scope window (s; "0": no scope), field, value,
# ...].  Returns, per event, "" when queued, else the id of the invocation that holds it: the holder of
# its scope, or (no scope) its own id when an event with that id was queued already, earlier in the
# batch included.  Every check runs before the first write: an error leaves nothing written.
_ENQUEUE_BATCH = """
local ttl = ARGV[1]
local events = cjson.decode(ARGV[2])
local function check_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= want and t ~= 'none' then
    error('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. want)
  end
end
check_type(KEYS[1], 'stream')
local holders, status_keys, once_keys, queued, claimed = {}, {}, {}, {}, {}
local k = 2
for i, ev in ipairs(events) do
  local status_key, holder = KEYS[k], ''
  k = k + 1
  if tonumber(ev[3]) > 0 then
    local once_key = KEYS[k]
    k = k + 1
    holder = claimed[once_key] or redis.call('GET', once_key) or ''
    if holder == '' then
      claimed[once_key] = ev[2]
      once_keys[i] = once_key
      check_type(status_key, 'hash')
    end
  elseif queued[status_key] or redis.call('EXISTS', status_key) == 1 then
    holder = ev[2]
  end
  if holder == '' then
    queued[status_key] = true
  end
  status_keys[i] = status_key
  holders[i] = holder
end
for i, ev in ipairs(events) do
  if holders[i] == '' then
    if once_keys[i] then
      redis.call('SET', once_keys[i], ev[2], 'EX', ev[3])
    end
    redis.call('XADD', KEYS[1], '*', 'e', ev[1])
    redis.call('HSET', status_keys[i], unpack(ev, 4))
    redis.call('EXPIRE', status_keys[i], ttl)
  end
end
return holders
"""

# Record the starts and outcomes of several events in one atomic script (one fsync).  ARGV[1] is JSON:
# the commands, each a list of strings.  Every command runs (pcall): one that fails does not stop the
# others, as inside EXEC.  Returns the failed ones, {index, error} each.  The keys are named in the
# commands, not in KEYS: the platform's Valkey is a single server, not a cluster.
_RECORD_BATCH = """
local failed = {}
for i, command in ipairs(cjson.decode(ARGV[1])) do
  local reply = redis.pcall(unpack(command))
  if type(reply) == 'table' and reply.err then
    failed[#failed + 1] = {i, reply.err}
  end
end
return failed
"""


class AsyncEnvelope(BaseModel):
    v: int = ENVELOPE_VERSION
    id: str
    namespace: str
    function: str
    version: int
    payload: str  # the event, as JSON text
    headers: dict[str, str] = Field(default_factory=dict)
    attempt: int = 1  # the function attempt this is (retries after a function fault add one)
    platform_retries: int = 0  # retries after platform faults so far (they leave ``attempt`` alone)
    enqueued_at: float = Field(default_factory=time.time)
    trace: str | None = None
    # Where the event came from when a subscription produced it (e.g. the stream message ids of a
    # queue batch, acknowledged at the source together with the outcome).  None for direct calls.
    source: dict[str, Any] | None = None
    # The uid of the function the event was queued for: a function deleted and created again under
    # the same name is another function, and does not run it.  None in events queued before uids.
    function_uid: str | None = None


PipeStep = Callable[[Any], None]
"""Extra commands a caller adds to the transaction that records an outcome (destinations, source acks)."""

StepError = tuple[int, ResponseError]
"""A command of a recorded transaction that failed on its own: the index of its step, its error."""


@dataclass(frozen=True, slots=True)
class EnqueueRequest:
    """One event of ``enqueue_batch``: queued once per invocation id, or once per ``scope`` (when
    given) within ``window_s``."""

    env: AsyncEnvelope
    scope: str | None = None
    window_s: int = 0


class InvocationQueue:
    """The queue's reads and writes.  ``group_records`` > 0: starts and outcomes are written in shared
    transactions of up to that many events, by a writer the owner runs (``write_records_forever``)."""

    def __init__(self, redis: aioredis.Redis, *, status_ttl_s: int, group_records: int = 0) -> None:
        self.redis = redis
        self.status_ttl_s = status_ttl_s
        self.connection_losses = 0
        self._move_due = redis.register_script(_MOVE_DUE)
        self._enqueue_batch = redis.register_script(_ENQUEUE_BATCH)
        self._record_batch = redis.register_script(_RECORD_BATCH)
        self._records: GroupCommit[Sequence[PipeStep], list[StepError] | Exception] | None = (
            GroupCommit(self.record_batch, max_batch=group_records, name="queue records") if group_records else None
        )

    async def write_records_forever(self) -> NoReturn:
        """The writer of the shared record transactions (a queue made with ``group_records``)."""
        if self._records is None:
            raise RuntimeError("this queue writes each record on its own: it has no record writer")
        await self._records.run_forever()

    async def _run(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except RedisError as exc:
            self._note(exc)
            raise Unavailable(f"queue (Redis) failed to {what}: {exc}") from exc

    def _note(self, exc: RedisError) -> None:
        # A timeout counts too: the command may have been applied, its reply not read.
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            self.connection_losses += 1

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(
                redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise Unavailable(f"queue (Redis) failed to create its consumer group: {exc}") from exc
        except RedisError as exc:
            self._note(exc)
            raise Unavailable(f"queue (Redis) unreachable: {exc}") from exc

    def _status(self, pipe: Any, env: AsyncEnvelope, **fields: Any) -> None:
        key = redis_keys.invocation(env.id)
        pipe.hset(key, mapping={k: _field(v) for k, v in fields.items()})
        pipe.expire(key, self.status_ttl_s)

    @staticmethod
    def _queued_fields(env: AsyncEnvelope) -> list[str]:
        """The status hash of a queued event: field, value, ... (values as ``_status`` writes them).

        Built by hand, not with ``json.dumps`` per value: on the enqueue path that cost more than the
        rest of the batch's encoding (``repr`` of a float is what ``json.dumps`` writes)."""
        fields = [
            "status", "queued", "attempts", "0", "platform_retries", "0", "namespace", env.namespace,
            "function", env.function, "version", str(env.version), "enqueued_at", repr(env.enqueued_at),
        ]  # fmt: skip
        if env.trace:
            fields += ["trace", env.trace]
        return fields

    def add_enqueue(self, pipe: Any, env: AsyncEnvelope) -> None:
        """Queue ``env`` as part of a caller's transaction (destinations, fan-out)."""
        pipe.xadd(redis_keys.ASYNC_STREAM, {"e": env.model_dump_json()})
        key = redis_keys.invocation(env.id)
        pipe.hset(key, items=self._queued_fields(env))
        pipe.expire(key, self.status_ttl_s)

    async def enqueue_new(self, env: AsyncEnvelope) -> bool:
        """Queue ``env`` unless an event with its id was queued before (within the status TTL).

        Returns False for a repeat: the invocation is queued, once."""
        return (await self.enqueue_batch([EnqueueRequest(env)]))[0] is None

    async def enqueue_batch(self, requests: Sequence[EnqueueRequest]) -> list[str | None]:
        """Queue the events of ``requests`` in one atomic script (one fsync), all or none.

        Returns, per request, None when its event was queued, else the id of the invocation that
        holds it: the holder of its scope, or its own id when its id was queued before (earlier in
        ``requests`` included)."""
        keys = [redis_keys.ASYNC_STREAM]
        events: list[list[str]] = []
        for req in requests:
            env = req.env
            keys.append(redis_keys.invocation(env.id))
            window = "0"
            if req.scope is not None:
                keys.append(redis_keys.once(req.scope))
                window = str(max(req.window_s, 1))
            events.append([env.model_dump_json(), env.id, window, *self._queued_fields(env)])
        # The events travel as one JSON argument: redis-py encodes each argument on its own, and
        # a dozen arguments per event cost the trigger more CPU than the rest of the enqueue.
        holders = await self._run(
            "enqueue events", self._enqueue_batch(keys=keys, args=[self.status_ttl_s, json.dumps(events)])
        )
        return [_text(h) or None for h in holders]

    async def enqueue(self, env: AsyncEnvelope, *, also: PipeStep | None = None) -> None:
        await self.enqueue_many([env], also=also)

    async def enqueue_many(self, envs: Sequence[AsyncEnvelope], *, also: PipeStep | None = None) -> None:
        """Queue every event (and run ``also``) in one transaction: all of them are durable, or none."""

        async def _do() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                for env in envs:
                    self.add_enqueue(pipe, env)
                if also is not None:
                    also(pipe)
                await pipe.execute()

        await self._run("enqueue an event", _do())

    async def enqueue_once(self, env: AsyncEnvelope, scope: str, window_s: int) -> str | None:
        """Queue ``env`` unless another event already did so under ``scope`` within ``window_s``.

        Atomic: either the scope is claimed and the event is queued, or neither.  Returns None when
        ``env`` was queued, else the id of the invocation that holds ``scope``.
        """
        return (await self.enqueue_batch([EnqueueRequest(env, scope, window_s)]))[0]

    @staticmethod
    def _parse(entries: list[Any]) -> list[tuple[str, AsyncEnvelope | None]]:
        out: list[tuple[str, AsyncEnvelope | None]] = []
        for msg_id, fields in entries:
            raw = fields.get(b"e") if fields else None
            try:
                env = AsyncEnvelope.model_validate_json(raw) if raw else None
            except ValueError:
                env = None
            if env is not None and env.v != ENVELOPE_VERSION:
                env = None
            out.append((msg_id.decode() if isinstance(msg_id, bytes) else msg_id, env))
        return out

    async def read(
        self, consumer: str, *, count: int, block_ms: int
    ) -> list[tuple[str, AsyncEnvelope | None]]:
        resp = await self._run(
            "read events",
            self.redis.xreadgroup(
                redis_keys.ASYNC_GROUP, consumer, {redis_keys.ASYNC_STREAM: ">"}, count=count, block=block_ms
            ),
        )
        return self._parse(resp[0][1]) if resp else []

    async def reclaim(
        self, consumer: str, *, min_idle_s: float, count: int
    ) -> list[tuple[str, AsyncEnvelope | None]]:
        resp = await self._run(
            "reclaim events",
            self.redis.xautoclaim(
                redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP, consumer, int(min_idle_s * 1000), count=count
            ),
        )
        return self._parse([e for e in resp[1] if e and e[1] is not None])

    async def read_own_pending(self, consumer: str, *, count: int) -> list[tuple[str, AsyncEnvelope | None]]:
        """Events pending for this consumer name (XREADGROUP from 0): those it took in a previous life (a
        restarted dispatcher finishes them), and those a reply lost with the connection handed to it."""
        resp = await self._run(
            "read pending events",
            self.redis.xreadgroup(redis_keys.ASYNC_GROUP, consumer, {redis_keys.ASYNC_STREAM: "0"}, count=count),
        )
        return self._parse([e for e in (resp[0][1] if resp else []) if e and e[1]])

    async def pending_consumers(self) -> dict[str, int]:
        """Consumers of the group that hold pending events, with how many."""
        summary = await self._run(
            "read pending events", self.redis.xpending(redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP)
        )
        return {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}

    async def take_over(self, dead: str, consumer: str, *, count: int) -> list[tuple[str, AsyncEnvelope | None]]:
        """Claim the pending events of consumer ``dead`` (gone from the membership) for ``consumer``.

        XCLAIM with a minimum idle time: if two dispatchers race for the same event, the first claim
        resets its idle time and the second one gets nothing."""
        stream, group = redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP
        pending = await self._run(
            "read pending events",
            self.redis.xpending_range(stream, group, min="-", max="+", count=count, consumername=dead),
        )
        ids = [p["message_id"] for p in pending]
        if not ids:
            # Nothing to take.  (The consumer is not deleted: it may be alive and about to read again.)
            return []
        claimed = await self._run(
            "claim events", self.redis.xclaim(stream, group, consumer, min_idle_time=_TAKE_OVER_MIN_IDLE_MS, message_ids=ids)
        )
        return self._parse([e for e in claimed if e and e[1] is not None])

    async def move_due(self) -> int:
        moved = await self._run(
            "move due retries",
            self._move_due(keys=[redis_keys.ASYNC_DELAYED, redis_keys.ASYNC_STREAM], args=[time.time()]),
        )
        return int(moved)

    async def record_batch(self, units: Sequence[Sequence[PipeStep]]) -> list[list[StepError] | Exception]:
        """Run the steps of several events' records in one atomic script (one fsync).

        The steps' commands are collected (``_Commands``) and sent as one argument of
        ``_RECORD_BATCH``: redis-py reads two replies per command of a MULTI, which cost a
        dispatcher more CPU than the rest of an event's bookkeeping.  Returns, per unit, the
        commands that failed on their own (the others are applied, as inside EXEC), each as the
        index of its step and the error; a unit whose steps raised is left out of the script, and is
        that exception."""
        commands: list[list[str]] = []
        spans: list[tuple[int, list[int]] | Exception] = []  # per unit: its first command, its steps' ends
        for steps in units:
            collected = _Commands()
            ends: list[int] = []
            try:
                for step in steps:
                    step(collected)
                    ends.append(len(collected.commands))
            except Exception as exc:  # a bug in one event's steps: the others are recorded
                spans.append(exc)
                continue
            spans.append((len(commands), ends))
            commands += collected.commands
        failed: list[Any] = []
        if commands:
            what = "record starts and outcomes" if len(units) > 1 else "record an outcome"
            failed = await self._run(
                what, self._record_batch(args=[json.dumps(commands, ensure_ascii=False, separators=(",", ":"))])
            )
        errors = {int(index) - 1: ResponseError(_text(message)) for index, message in failed}
        out: list[list[StepError] | Exception] = []
        for span in spans:
            if isinstance(span, Exception):
                out.append(span)
                continue
            first, ends = span
            count = ends[-1] if ends else 0
            out.append([
                (bisect.bisect_right(ends, i - first), errors[i]) for i in range(first, first + count) if i in errors
            ])  # fmt: skip
        return out

    async def _record(self, steps: Sequence[PipeStep]) -> list[StepError]:
        """Run ``steps`` in one transaction (a shared one when the queue groups its records); the
        commands that failed on their own."""
        if self._records is not None:
            errors = await self._records.submit(steps)
        else:
            errors = (await self.record_batch([steps]))[0]
        if isinstance(errors, Exception):
            raise errors
        return errors

    async def _record_all(self, what: str, steps: Sequence[PipeStep]) -> None:
        """``_record``, failing if any of the commands failed (the others are applied all the same)."""
        for _, error in await self._record(steps):
            raise Unavailable(f"queue (Redis) failed to {what}: {error}") from error

    async def mark_running(self, env: AsyncEnvelope) -> None:
        started = {"status": "running", "attempts": env.attempt, "platform_retries": env.platform_retries,
                   "started_at": time.time()}  # fmt: skip

        def start(pipe: Any) -> None:
            self._status(pipe, env, **started)
            # Every start counts, including a second run of an event reclaimed from a dead dispatcher.
            pipe.hincrby(redis_keys.invocation(env.id), "runs", 1)

        await self._record_all("record a start", [start])

    async def _finish(
        self, msg_id: str, env: AsyncEnvelope, steps: Sequence[PipeStep | None], **fields: Any
    ) -> None:
        outcome = {"attempts": env.attempt, "platform_retries": env.platform_retries, "finished_at": time.time(),
                   **fields}  # fmt: skip

        def settle(pipe: Any) -> None:
            self._status(pipe, env, **outcome)
            pipe.xack(redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP, msg_id)
            pipe.xdel(redis_keys.ASYNC_STREAM, msg_id)

        # A command of the caller's steps can fail on its own (a destination key of the wrong type, a
        # source stream deleted by its owner): the rest is applied all the same, so the outcome is
        # recorded; the failed step is logged, not raised.  The outcome's own commands must not fail.
        extra = [step for step in steps if step is not None]
        own_error: ResponseError | None = None
        for index, error in await self._record([*extra, settle]):
            if index < len(extra):
                log.warning("event %s: a step of its outcome failed: %s", env.id, error)
            else:
                own_error = own_error or error
        if own_error is not None:
            raise Unavailable(f"queue (Redis) failed to record an outcome: {own_error}") from own_error

    async def succeed(
        self, msg_id: str, env: AsyncEnvelope, result_json: str, *, also: PipeStep | None = None
    ) -> None:
        await self._finish(msg_id, env, [also], status="succeeded", result=result_json, error="null")

    async def retry_later(
        self,
        msg_id: str,
        env: AsyncEnvelope,
        error: dict[str, Any],
        delay_s: float,
        *,
        platform: bool = False,
        retry: AsyncEnvelope | None = None,
        also: PipeStep | None = None,
        result_json: str | None = None,
    ) -> None:
        """Schedule the next attempt (of ``retry`` when given, e.g. only a batch's failed items).

        ``platform``: the attempt failed because of the platform; the next one is the same function
        attempt (``attempt`` unchanged, ``platform_retries`` + 1)."""
        bump = {"platform_retries": env.platform_retries + 1} if platform else {"attempt": env.attempt + 1}
        again = (retry or env).model_copy(update=bump)

        def schedule(pipe: Any) -> None:
            pipe.zadd(redis_keys.ASYNC_DELAYED, {again.model_dump_json(): time.time() + delay_s})

        extra: dict[str, Any] = {"result": result_json} if result_json is not None else {}
        await self._finish(
            msg_id, env, [schedule, also], status="failed", error=error, retry_at=time.time() + delay_s,
            platform_retries=again.platform_retries, **extra,
        )  # fmt: skip

    async def dead_letter(
        self, msg_id: str, env: AsyncEnvelope, error: dict[str, Any], *, also: PipeStep | None = None
    ) -> None:
        def to_dlq(pipe: Any) -> None:
            pipe.xadd(redis_keys.DEAD_LETTERS, {"e": env.model_dump_json(), "error": json.dumps(error)})

        await self._finish(msg_id, env, [to_dlq, also], status="dead-lettered", error=error)

    async def drop_unreadable(self, msg_id: str) -> None:
        def set_aside(pipe: Any) -> None:
            pipe.xadd(
                redis_keys.DEAD_LETTERS,
                {"raw_id": msg_id, "error": json.dumps({"kind": "unreadable", "fault": "platform"})},
            )
            pipe.xack(redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP, msg_id)
            pipe.xdel(redis_keys.ASYNC_STREAM, msg_id)

        await self._record_all("set aside an unreadable event", [set_aside])

    async def status(self, invocation_id: str) -> dict[str, Any] | None:
        raw = await self._run("read a status", self.redis.hgetall(redis_keys.invocation(invocation_id)))
        if not raw:
            return None
        out: dict[str, Any] = {"id": invocation_id}
        for key, value in raw.items():
            k, v = key.decode(), value.decode()
            if k == "status":
                out[k] = v
                continue
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        return out

    async def dead_letters(
        self, *, limit: int, function: str | None = None, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """Dead-lettered events, oldest first (filtered by namespace and function name)."""
        entries = await self._run(
            "list dead letters", self.redis.xrange(redis_keys.DEAD_LETTERS, count=10_000)
        )
        out: list[dict[str, Any]] = []
        for entry_id, fields in entries:
            raw = fields.get(b"e")
            env = AsyncEnvelope.model_validate_json(raw) if raw else None
            if function and (env is None or env.function != function):
                continue
            if namespace is not None and (env is None or env.namespace != namespace):
                continue
            error = json.loads(fields.get(b"error", b"null"))
            out.append({
                "dead_letter_id": entry_id.decode(),
                "invocation_id": env.id if env else None,
                "namespace": env.namespace if env else None,
                "function": env.function if env else None,
                "version": env.version if env else None,
                "function_uid": env.function_uid if env else None,
                "attempts": env.attempt if env else None,
                "platform_retries": env.platform_retries if env else None,
                "enqueued_at": env.enqueued_at if env else None,
                "fault": error.get("fault") if isinstance(error, dict) else None,
                "error": error,
                "payload": env.payload if env else None,
            })  # fmt: skip
            if len(out) >= limit:
                break
        return out

    async def redrive(self, dead_letter_id: str, *, namespace: str | None = None) -> AsyncEnvelope:
        """Put a dead-lettered event back on the queue as a fresh first attempt (one transaction);
        with ``namespace``, only one of that namespace (another's is ``NotFound``)."""
        if not _STREAM_ID.fullmatch(dead_letter_id):
            raise NotFound(f"dead letter {dead_letter_id!r} not found (ids look like 1700000000000-0)")
        entries = await self._run(
            "read a dead letter",
            self.redis.xrange(redis_keys.DEAD_LETTERS, min=dead_letter_id, max=dead_letter_id),
        )
        if not entries or not entries[0][1].get(b"e"):
            raise NotFound(f"dead letter {dead_letter_id!r} not found")
        env = AsyncEnvelope.model_validate_json(entries[0][1][b"e"])
        if namespace is not None and env.namespace != namespace:
            raise NotFound(f"dead letter {dead_letter_id!r} not found")
        again = env.model_copy(update={"attempt": 1, "platform_retries": 0, "enqueued_at": time.time()})

        async def _do() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(redis_keys.ASYNC_STREAM, {"e": again.model_dump_json()})
                self._status(
                    pipe, again, status="queued", attempts=0, platform_retries=0, redriven_at=time.time()
                )
                pipe.xdel(redis_keys.DEAD_LETTERS, dead_letter_id)
                await pipe.execute()

        await self._run("redrive a dead letter", _do())
        return again


class EnqueueBatcher:
    """``enqueue_new`` and ``enqueue_once`` by group commit: concurrent callers share one
    ``enqueue_batch`` (one script, one fsync) instead of one each.

    Each caller returns once the batch holding its event returned (the event is durable: answer 202
    now), or raises what failed the batch (``Unavailable``: none of the batch's events is queued,
    see ``InvocationQueue``'s caveat for a reply lost with the connection).  The owner runs
    ``run_forever`` (the writer) under its task set."""

    def __init__(self, queue: InvocationQueue, *, max_batch: int = 512) -> None:
        self._commit: GroupCommit[EnqueueRequest, str | None] = GroupCommit(
            queue.enqueue_batch, max_batch=max_batch, name="async enqueue"
        )

    async def run_forever(self) -> NoReturn:
        await self._commit.run_forever()

    async def enqueue_new(self, env: AsyncEnvelope) -> bool:
        """As ``InvocationQueue.enqueue_new``: False for a repeat of an id queued before."""
        return await self._commit.submit(EnqueueRequest(env)) is None

    async def enqueue_once(self, env: AsyncEnvelope, scope: str, window_s: int) -> str | None:
        """As ``InvocationQueue.enqueue_once``: None when queued, else the id holding ``scope``."""
        return await self._commit.submit(EnqueueRequest(env, scope, window_s))


class _Commands(DataAccessCommands):
    """Collects the commands that ``PipeStep`` s issue, through redis-py's own command builders
    (``pipe.xadd(...)`` and the like), as lists of strings to run in a script."""

    _event_dispatcher: Any = None  # part of redis-py's client protocol; no command used here reads it

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append([_arg(arg) for arg in args])


def _arg(value: Any) -> str:
    """A command argument as redis-py would send it (numbers as ``repr``), as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    raise TypeError(f"a Redis command argument cannot be a {type(value).__name__}")


def _field(value: Any) -> str:
    """A status field's value as stored: strings as they are, the rest as JSON (numbers without
    ``json.dumps``, which costs a microsecond or two per call on the hot path)."""
    if isinstance(value, str):
        return value
    if type(value) is int:
        return str(value)
    if type(value) is float and math.isfinite(value):
        return repr(value)
    return json.dumps(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
