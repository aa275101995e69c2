"""Event subscriptions: which event source feeds which function, stored in etcd.

A subscription belongs to one function (``/faas/subscriptions/{ns}/{function}/{name}``) and names
exactly one source:

- ``object_store``: objects created/removed in a bucket of the platform's S3 server (prefix/suffix);
- ``queue``: a Redis stream the user writes to, read in batches by the primary trigger;
- ``timer``: a ``cron(...)`` (with seconds) or ``rate(...)`` schedule, fired by the primary trigger;
- ``cloudevents``: CloudEvents posted to ``/v1/events``, filtered on ``type`` and ``source``.

Guarantees:
- a subscription is validated whole (names, bucket, stream, schedule) before anything is written,
  and written only while its function exists (one etcd transaction compares the function record);
- deleting a function deletes its subscriptions and timer ticks in the same transaction
  (``FunctionRegistry.delete_function``);
- ``replace_declared`` swaps the set a manifest declares (origin ``manifest``) in one transaction,
  leaving subscriptions added by hand (origin ``api``) alone.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.exceptions import RedisError, ResponseError

from faas.core import keys, redis_keys
from faas.core.errors import Conflict, InvalidRequest, NotFound, Unavailable
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.models import name_problem, stream_problem
from faas.core.schedule import ScheduleError, parse_schedule

SOURCE_KINDS = ("object_store", "queue", "timer", "cloudevents")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
OBJECT_EVENT_RE = re.compile(r"^(s3:)?Object(Created|Removed)(:[A-Za-z*]+)?$")
_MAX_CAS_ATTEMPTS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectStoreSource(_Strict):
    bucket: str
    prefix: str = Field(default="", max_length=1024)
    suffix: str = Field(default="", max_length=1024)
    events: list[str] = Field(default_factory=lambda: ["ObjectCreated:*"], min_length=1)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not BUCKET_RE.fullmatch(value) or ".." in value:
            raise ValueError(f"invalid bucket name {value!r}: 3-63 lowercase letters, digits, '.' and '-'")
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not OBJECT_EVENT_RE.fullmatch(pattern):
                raise ValueError(
                    f"unknown object event {pattern!r}: use ObjectCreated:*, ObjectCreated:Put, ObjectRemoved:* ..."
                )
        return value


class QueueSource(_Strict):
    stream: str
    batch_size: int = Field(default=10, ge=1, le=1000)
    batch_window_s: float = Field(default=1.0, ge=0, le=300)
    start: Literal["latest", "earliest"] = "latest"

    @field_validator("stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        problem = stream_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class TimerSource(_Strict):
    schedule: str
    payload: Any = None  # passed to the handler as the event's ``detail``

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            parse_schedule(value)
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        return value


class CloudEventsSource(_Strict):
    type: str | None = Field(default=None, min_length=1, max_length=512)
    source: str | None = Field(default=None, min_length=1, max_length=2048)


class SubscriptionSpec(_Strict):
    """What a user sets: exactly one source, and which version the events go to."""

    object_store: ObjectStoreSource | None = None
    queue: QueueSource | None = None
    timer: TimerSource | None = None
    cloudevents: CloudEventsSource | None = None
    qualifier: str | None = Field(default=None, description="version number or alias (default: latest)")
    enabled: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> SubscriptionSpec:
        present = [kind for kind in SOURCE_KINDS if getattr(self, kind) is not None]
        if len(present) != 1:
            raise ValueError(
                f"a subscription needs exactly one source of {', '.join(SOURCE_KINDS)}; got {present or 'none'}"
            )
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in SOURCE_KINDS if getattr(self, kind) is not None)


class NamedSubscriptionSpec(SubscriptionSpec):
    name: str


class Subscription(SubscriptionSpec):
    """A stored subscription."""

    model_config = ConfigDict(extra="ignore")

    namespace: str
    function: str
    name: str
    origin: Literal["api", "manifest"] = "api"
    created_at: float = Field(default_factory=time.time)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.function}/{self.name}"


def check_subscription_name(name: str) -> str:
    problem = name_problem(name, "subscription name")
    if problem:
        raise InvalidRequest(problem)
    return name


class SubscriptionStore:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def list_subscriptions(self, ns: str, function_name: str | None = None) -> list[Subscription]:
        kvs, _ = await self.etcd.get_prefix(keys.subscriptions_prefix(ns, function_name))
        return [Subscription.model_validate_json(kv.value) for kv in kvs]

    async def get(self, ns: str, function_name: str, name: str) -> Subscription:
        kv = await self.etcd.get(keys.subscription(ns, function_name, name))
        if kv is None:
            raise NotFound(f"subscription {name!r} of function {function_name!r} not found")
        return Subscription.model_validate_json(kv.value)

    async def put(self, sub: Subscription) -> bool:
        """Create or replace ``sub``; True when it is new.  404 if its function does not exist."""
        key = keys.subscription(sub.namespace, sub.function, sub.name)
        fkey = keys.function(sub.namespace, sub.function)
        for _ in range(_MAX_CAS_ATTEMPTS):
            existing = await self.etcd.get(key)
            if existing is not None:
                sub = sub.model_copy(
                    update={"created_at": Subscription.model_validate_json(existing.value).created_at}
                )
                guard = self.etcd.mod_revision(key) == existing.mod_revision
            else:
                guard = self.etcd.create_revision(key) == 0
            ok, _ = await self.etcd.txn(
                [self.etcd.create_revision(fkey) > 0, guard],
                [self.etcd.op_put(key, sub.model_dump_json().encode())],
            )
            if ok:
                return existing is None
            if await self.etcd.get(fkey) is None:
                raise NotFound(f"function {sub.function!r} not found in namespace {sub.namespace!r}")
        raise Conflict(f"subscription {sub.name!r} is being changed concurrently; try again")

    async def replace_declared(
        self, ns: str, function_name: str, declared: list[Subscription]
    ) -> list[Subscription]:
        """Make the manifest-declared subscriptions of a function exactly ``declared`` (one transaction)."""
        names = [s.name for s in declared]
        if len(set(names)) != len(names):
            raise InvalidRequest(f"subscription names must be unique; got {names}")
        fkey = keys.function(ns, function_name)
        for _ in range(_MAX_CAS_ATTEMPTS):
            kvs, _ = await self.etcd.get_prefix(keys.subscriptions_prefix(ns, function_name))
            current = {kv.key: (kv, Subscription.model_validate_json(kv.value)) for kv in kvs}
            compare = [self.etcd.create_revision(fkey) > 0]
            ops = []
            wanted = {keys.subscription(ns, function_name, s.name): s for s in declared}
            for key, (kv, sub) in current.items():
                compare.append(self.etcd.mod_revision(key) == kv.mod_revision)
                if key in wanted and sub.origin == "api":
                    raise Conflict(
                        f"subscription {sub.name!r} was added with the API or CLI; remove it or rename the declared one"
                    )
                if key not in wanted and sub.origin == "manifest":
                    ops.append(self.etcd.op_delete(key))
            out = []
            for key, sub in wanted.items():
                if key in current:
                    sub = sub.model_copy(update={"created_at": current[key][1].created_at})
                else:
                    compare.append(self.etcd.create_revision(key) == 0)
                ops.append(self.etcd.op_put(key, sub.model_dump_json().encode()))
                out.append(sub)
            ok, _ = await self.etcd.txn(compare, ops)
            if ok:
                return out
            if await self.etcd.get(fkey) is None:
                raise NotFound(f"function {function_name!r} not found in namespace {ns!r}")
        raise Conflict(f"subscriptions of {function_name!r} are being changed concurrently; try again")

    async def delete(self, ns: str, function_name: str, name: str) -> None:
        ok, _ = await self.etcd.txn(
            [self.etcd.create_revision(keys.subscription(ns, function_name, name)) > 0],
            [
                self.etcd.op_delete(keys.subscription(ns, function_name, name)),
                self.etcd.op_delete(keys.timer_tick(ns, function_name, name)),
            ],
        )
        if not ok:
            raise NotFound(f"subscription {name!r} of function {function_name!r} not found")


def subscription_from_request(
    ns: str, function_name: str, name: str, spec: SubscriptionSpec, *, origin: Literal["api", "manifest"]
) -> Subscription:
    check_subscription_name(name)
    return Subscription(**spec.model_dump(), namespace=ns, function=function_name, name=name, origin=origin)


async def ensure_queue_group(redis: Any, sub: Subscription) -> None:
    """Create the consumer group a queue subscription reads its stream with (idempotent).

    ``latest`` starts it at the stream's end as of this call, ``earliest`` at its beginning.  A key
    that is not a stream is the user's mistake (400); Redis unreachable is 503."""
    assert sub.queue is not None
    group = redis_keys.queue_subscription_group(sub.namespace, sub.function, sub.name)
    start = "$" if sub.queue.start == "latest" else "0"
    try:
        await redis.xgroup_create(sub.queue.stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise InvalidRequest(f"cannot read stream {sub.queue.stream!r}: {exc}") from exc
    except RedisError as exc:
        raise Unavailable(f"Redis unreachable while preparing stream {sub.queue.stream!r}: {exc}") from exc


class SubscriptionIndex:
    """A watched copy of every subscription, parsed once per stored value (gateway and trigger)."""

    def __init__(self, etcd: Etcd, *, on_change: Any = None) -> None:
        self._mirror = PrefixMirror(etcd, keys.subscriptions_prefix(), on_change=on_change)
        self._parsed: dict[bytes, tuple[bytes, Subscription | None]] = {}

    def start(self) -> None:
        self._mirror.start()

    async def wait_ready(self, timeout_s: float | None = 10.0) -> None:
        await self._mirror.wait_ready(timeout_s)

    async def stop(self) -> None:
        await self._mirror.stop()

    async def refresh(self) -> None:
        await self._mirror.refresh()

    @property
    def changed(self) -> Any:
        return self._mirror.changed

    def active(self, kind: str) -> list[Subscription]:
        """Enabled subscriptions of one source kind."""
        out = []
        for key, raw in list(self._mirror.items.items()):
            cached = self._parsed.get(key)
            if cached is None or cached[0] is not raw:
                try:
                    parsed: Subscription | None = Subscription.model_validate_json(raw)
                except ValueError:
                    parsed = None  # written by a newer version with a source this one does not know
                cached = (raw, parsed)
                self._parsed[key] = cached
            sub = cached[1]
            if sub is not None and sub.enabled and sub.kind == kind:
                out.append(sub)
        return out
