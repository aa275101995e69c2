"""Async invocations: how fast the durable queue accepts and runs events, and whether a crash loses any.

Run from the repository root (``bench/README.md`` explains every figure)::

    .venv/bin/python bench/async_queue.py            # full run, about 2 minutes
    .venv/bin/python bench/async_queue.py --quick    # smoke run, under 1 minute

One run starts a private embedded platform in a temp dir (process backend, real etcd, Valkey and
SeaweedFS, through the launcher ``faas up`` uses) with its default settings, deploys
a no-op function and a "ledger" function, and measures in order:

1. the floor: ``XADD`` of an envelope of a real event's size to a bench-only stream on the platform's
   own Valkey (appendonly yes, appendfsync always), from ``--concurrency`` connections, one command per
   round trip, for ``--duration`` seconds, through a minimal RESP client (redis-py would make it a
   floor of the client's CPU); then one transaction per event (``MULTI``, ``XADD``, ``HSET``,
   ``EXPIRE``, ``EXEC``) through the same client, and the trigger's write as the trigger sends it
   (``EnqueueBatcher``: concurrent callers share one ``enqueue_batch`` script, redis-py), to tell
   Valkey's cost from the client library's and the hops'.  The bench keys are deleted afterwards;
2. accepted/s: a closed loop of ``--concurrency`` callers on ``POST /v1/functions/{name}/invoke-async``
   for ``--duration`` seconds, counting 202 answers (the dispatchers consume meanwhile, as they would);
3. completions/s: ``--events`` events submitted as fast as the same callers can, timed from the first
   submission to the last ``finished_at`` recorded in the status hashes (read from Valkey once the
   stream is empty, so polling costs one ``XLEN`` + ``ZCARD`` every 0.2 s);
4. queue delay (``started_at - enqueued_at``) and end-to-end time (``finished_at - enqueued_at``)
   p50/p99 in an open loop at half the measured completion rate for ``--open-loop-seconds``;
5. reliability: ``--reliability-events`` events at a steady rate to the ledger function, whose handler
   appends ``context.request_id`` (the invocation id) to a file with ``O_APPEND``; partway through, the
   dispatcher holding the most pending events is killed with SIGKILL and, a few seconds later, started
   again with the same spec.  Lost = acknowledged with 202 but not ``succeeded`` within a bounded wait;
   duplicated = ids the ledger holds more than once.

Caveats:
- the load generator (one asyncio process; the platform's own hop client, faas.core.http for the async calls)
  shares the cores with every platform process and the servers; the CPU lines
  say how busy the machine was and who used it;
- during 2 and 3 the dispatchers consume while the gateway and trigger accept, so both compete for the
  same cores: the figures are the platform's as a whole, not one service's;
- ``enqueued_at``, ``started_at`` and ``finished_at`` are ``time.time()`` of different processes on the
  same machine (trigger, dispatcher);
- with fewer than 100 values the nearest-rank p99 is the maximum.

The platform and the replacement dispatcher are always stopped (``finally``); the only process this
script signals itself is the dispatcher it kills, identified by the pid and start time the launcher
recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import redis.asyncio as aioredis

# bench/ is sys.path[0] when this file is run as a script; make sure of it when imported otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import invoke_latency as il  # noqa: E402  (machine info, CPU accounting, percentiles, deploy)
import wrk  # noqa: E402  (the compiled load generator for the accepted/s rows)

from faas.core import redis_keys  # noqa: E402
from faas.core.errors import FaasError  # noqa: E402
from faas.core.http import HopClient, HopError  # noqa: E402
from faas.core.queue import AsyncEnvelope, EnqueueBatcher, InvocationQueue  # noqa: E402
from faas.core.service import etcd_from_settings  # noqa: E402
from faas.core.settings import Settings  # noqa: E402
from faas.launcher.embedded import (  # noqa: E402
    EmbeddedCluster,
    ProcessRecord,
    pid_alive,
    read_members,
    settings_for_test,
)

NAMESPACE = il.NAMESPACE
EVENT = il.EVENT
JSON_HEADERS = {"content-type": "application/json"}
NOOP_FUNCTION = "async-noop"
NOOP_CONFIG: dict[str, object] = {"concurrency": 16, "max_instances": 4}
LEDGER_FUNCTION = "async-ledger"
LEDGER_SLEEP_S = 0.2  # long enough that a killed dispatcher has several events in flight
LEDGER_CONFIG: dict[str, object] = {"concurrency": 8, "max_instances": 4, "timeout_s": 2}
LEDGER_CODE = """\
import os
import time


def handler(event, context):
    time.sleep(float(os.environ["BENCH_SLEEP_S"]))
    # One write() on an O_APPEND descriptor: whole lines, even from concurrent instances.
    fd = os.open(os.environ["BENCH_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (context.request_id + "\\n").encode())
    finally:
        os.close(fd)
    return None
"""
FINAL_STATUSES = ("succeeded", "dead-lettered")
STATUS_FIELDS = ("status", "enqueued_at", "started_at", "finished_at", "attempts", "runs")
STATUS_CHUNK = 1000  # status hashes read per pipeline
BACKLOG_POLL_S = 0.2
STATUS_POLL_S = 0.5
HTTP_TIMEOUT_S = 30.0
MEMBER_WAIT_S = 30.0
BENCH_KEY_PREFIX = f"bench:async-queue:{os.getpid()}"  # never a platform key (those start with faas:)
BENCH_DB = 15  # the group-commit floor's database on the platform's Valkey: no dispatcher reads it

log = il.log
BenchError = il.BenchError


# --------------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True, slots=True)
class Plan:
    concurrency: int
    load_s: float  # each floor, and the accepted/s window
    warmup_s: float
    burst_events: int
    open_loop_s: float
    reliability_events: int
    reliability_rate: float
    kill_at_fraction: float  # of the reliability submissions' duration
    restart_after_s: float
    drain_timeout_s: float
    settle_timeout_s: float  # reliability: how long after the last 202 an event may take to succeed

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            concurrency=args.concurrency,
            load_s=args.duration or (3.0 if quick else 8.0),
            warmup_s=1.0 if quick else 2.0,
            burst_events=args.events or (600 if quick else 3000),
            open_loop_s=args.open_loop_seconds or (5.0 if quick else 15.0),
            reliability_events=args.reliability_events or (150 if quick else 500),
            reliability_rate=args.reliability_rate or (30.0 if quick else 50.0),
            kill_at_fraction=0.3,
            restart_after_s=2.0 if quick else 3.0,
            drain_timeout_s=60.0 if quick else 120.0,
            # Taking over waits for the killed member's lease to lapse, plus a retry's backoff if one failed.
            settle_timeout_s=40.0 if quick else 60.0,
        )


# --------------------------------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class Rate:
    """Operations completed in a window, their latencies and their failures."""

    done: int
    elapsed_s: float
    latencies: il.Latencies
    errors: Counter[str]

    @property
    def per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else math.nan


@dataclass(slots=True)
class Submitted:
    """Async calls sent to the gateway: the ids acknowledged with 202, and what else came back."""

    ids: list[str] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)  # time.time() of each 202, as ``ids``
    latencies: il.Latencies = field(default_factory=il.Latencies)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)  # the first body (or message) per error
    error_at: list[float] = field(default_factory=list)  # time.time() of each error
    started_at: float = 0.0  # time.time() of the first send
    elapsed_s: float = 0.0

    def failed(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.error_samples.setdefault(kind, detail[:300])
        self.error_at.append(time.time())

    def error_report(self) -> str:
        """The errors, when they came (seconds after the first send) and the first answer of each kind."""
        if not self.errors:
            return "none"
        first, last = min(self.error_at) - self.started_at, max(self.error_at) - self.started_at
        samples = "; ".join(f"first {kind}: {body}" for kind, body in self.error_samples.items())
        return f"{errors_text(self.errors)} between +{first:.1f} s and +{last:.1f} s ({samples})"

    def rate(self) -> Rate:
        return Rate(len(self.ids), self.elapsed_s, self.latencies, self.errors)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One status hash (``faas:inv:<id>``) as the trigger and the dispatchers wrote it."""

    status: str
    enqueued_at: float
    started_at: float
    finished_at: float
    attempts: int
    runs: int

    @classmethod
    def parse(cls, row: Sequence[bytes | None]) -> Outcome:
        def number(raw: bytes | None) -> float:
            try:
                return float(raw) if raw is not None else math.nan
            except ValueError:
                return math.nan

        status = row[0].decode() if row[0] is not None else "missing"
        attempts, runs = number(row[4]), number(row[5])
        return cls(
            status,
            number(row[1]),
            number(row[2]),
            number(row[3]),
            0 if math.isnan(attempts) else int(attempts),
            0 if math.isnan(runs) else int(runs),
        )

    @property
    def queue_delay_s(self) -> float:
        return self.started_at - self.enqueued_at

    @property
    def end_to_end_s(self) -> float:
        return self.finished_at - self.enqueued_at


# --------------------------------------------------------------------------------------------------
# Reading the queue's state from Valkey


async def backlog(redis: aioredis.Redis) -> int:
    """Events not finished yet: on the stream (new or pending) or waiting for a retry."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(redis_keys.ASYNC_STREAM)
        pipe.zcard(redis_keys.ASYNC_DELAYED)
        on_stream, delayed = await pipe.execute()
    return int(on_stream) + int(delayed)


async def read_outcomes(redis: aioredis.Redis, ids: Sequence[str]) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    for start in range(0, len(ids), STATUS_CHUNK):
        chunk = ids[start : start + STATUS_CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for invocation_id in chunk:
                pipe.hmget(redis_keys.invocation(invocation_id), list(STATUS_FIELDS))
            rows = await pipe.execute()
        for invocation_id, row in zip(chunk, rows, strict=True):
            out[invocation_id] = Outcome.parse(row)
    return out


async def wait_final(redis: aioredis.Redis, ids: Sequence[str], timeout_s: float) -> dict[str, Outcome]:
    """Every id's outcome once all are final (succeeded or dead-lettered), or as they are at the timeout.

    While the stream or the retry set holds anything, only their sizes are polled; the status hashes
    are read when both are empty (and then every ``STATUS_POLL_S`` for the ids not final yet).
    """
    deadline = time.monotonic() + timeout_s
    remaining = set(ids)
    final: dict[str, Outcome] = {}
    while remaining:
        timed_out = time.monotonic() >= deadline
        if not timed_out and await backlog(redis) > 0:
            await asyncio.sleep(BACKLOG_POLL_S)
            continue
        for invocation_id, outcome in (await read_outcomes(redis, sorted(remaining))).items():
            if outcome.status in FINAL_STATUSES or timed_out:
                final[invocation_id] = outcome
                remaining.discard(invocation_id)
        if remaining:
            await asyncio.sleep(STATUS_POLL_S)
    return final


def succeeded(outcomes: dict[str, Outcome]) -> list[Outcome]:
    return [o for o in outcomes.values() if o.status == "succeeded"]


def status_counts(outcomes: dict[str, Outcome]) -> str:
    return ", ".join(
        f"{status} {n}" for status, n in Counter(o.status for o in outcomes.values()).most_common()
    )


# --------------------------------------------------------------------------------------------------
# 1. The floor: XADD on the same Valkey


def real_envelope() -> bytes:
    """What the trigger writes for one of this run's events (same fields, same payload, same id size)."""
    env = AsyncEnvelope(
        id=uuid.uuid4().hex, namespace=NAMESPACE, function=NOOP_FUNCTION, version=1, payload=EVENT.decode()
    )
    return env.model_dump_json().encode()


class RespError(Exception):
    """An error reply from Valkey, or a reply the minimal client cannot read."""


class RespConnection:
    """A minimal RESP2 client on one TCP socket: it writes a request and reads its replies, nothing else.

    It costs the load generator a fraction of what redis-py does per command, so the floor it measures
    is Valkey's (with its fsync), not the client library's.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, redis_url: str) -> RespConnection:
        parsed = urlparse(redis_url)
        reader, writer = await asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 6379)
        conn = cls(reader, writer)
        if parsed.password:
            await conn.request(resp_command(b"AUTH", unquote(parsed.password).encode()), 1)
        db = parsed.path.lstrip("/")
        if db and db != "0":
            await conn.request(resp_command(b"SELECT", db.encode()), 1)
        return conn

    async def request(self, data: bytes, replies: int) -> list[Any]:
        self.writer.write(data)
        return [await self.read_reply() for _ in range(replies)]

    async def read_reply(self) -> Any:
        line = await self.reader.readuntil(b"\r\n")
        kind, rest = line[:1], line[1:-2]
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self.reader.readexactly(size + 2))[:-2]
        if kind == b"*":
            return [await self.read_reply() for _ in range(max(int(rest), 0))]
        raise RespError(f"unreadable reply {line[:40]!r}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def resp_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


@dataclass(slots=True)
class BenchKeys:
    """The bench-only keys the floor writes (deleted afterwards)."""

    stream: str = f"{BENCH_KEY_PREFIX}:stream"
    hashes: int = 0

    def next_hash(self) -> str:
        self.hashes += 1
        return f"{BENCH_KEY_PREFIX}:inv:{self.hashes}"

    def all(self) -> list[str]:
        return [self.stream] + [f"{BENCH_KEY_PREFIX}:inv:{n}" for n in range(1, self.hashes + 1)]


def queued_fields(enqueued_at: float) -> dict[str, str]:
    """The ``queued`` status the trigger writes beside each event (``InvocationQueue.enqueue``)."""
    return {"status": "queued", "attempts": "0", "namespace": NAMESPACE, "function": NOOP_FUNCTION,
            "version": "1", "enqueued_at": json.dumps(enqueued_at)}  # fmt: skip


async def timed_workers(
    workers: int,
    duration_s: float,
    one: Callable[[int], Awaitable[None]],
    failures: tuple[type[BaseException], ...],
) -> Rate:
    """``workers`` loops calling ``one(worker index)`` back to back for ``duration_s``."""
    latencies = il.Latencies()
    errors: Counter[str] = Counter()
    done = 0
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def worker(index: int) -> None:
        nonlocal done
        while loop.time() < started + duration_s:
            began = time.perf_counter()
            try:
                await one(index)
            except failures as exc:
                errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # a failing server: do not spin
                continue
            latencies.seconds.append(time.perf_counter() - began)
            done += 1

    async with asyncio.TaskGroup() as group:
        for index in range(workers):
            group.create_task(worker(index))
    return Rate(done, loop.time() - started, latencies, errors)


async def raw_floor(
    redis_url: str, envelope: bytes, plan: Plan, keys: BenchKeys, *, transaction: bool
) -> Rate:
    """XADD (or the trigger's whole MULTI/EXEC) on ``plan.concurrency`` sockets, one request per round trip."""
    xadd = resp_command(b"XADD", keys.stream.encode(), b"*", b"e", envelope)
    conns = [await RespConnection.open(redis_url) for _ in range(plan.concurrency)]

    async def one(index: int) -> None:
        if not transaction:
            await conns[index].request(xadd, 1)
            return
        key = keys.next_hash().encode()
        fields = [part.encode() for item in queued_fields(time.time()).items() for part in item]
        request = b"".join(
            (
                resp_command(b"MULTI"),
                xadd,
                resp_command(b"HSET", key, *fields),
                resp_command(b"EXPIRE", key, b"3600"),
                resp_command(b"EXEC"),
            )
        )
        await conns[index].request(request, 5)

    try:
        return await timed_workers(
            plan.concurrency, plan.load_s, one, (RespError, OSError, asyncio.IncompleteReadError)
        )
    finally:
        for conn in conns:
            await conn.close()


async def group_commit_floor(redis_url: str, plan: Plan) -> Rate:
    """The trigger's write as the trigger sends it: ``plan.concurrency`` callers on one ``EnqueueBatcher``
    (group commit: one ``enqueue_batch`` script per batch, through redis-py), on a bench-only database
    of the platform's Valkey (same server, same fsync; no dispatcher reads it), emptied afterwards."""
    client = aioredis.Redis.from_url(
        urlparse(redis_url)._replace(path=f"/{BENCH_DB}").geturl(), socket_timeout=10, socket_connect_timeout=5
    )
    if await client.dbsize():
        await client.aclose()
        raise BenchError(f"database {BENCH_DB} of the platform's Valkey is not empty: not the bench's to use")
    batcher = EnqueueBatcher(InvocationQueue(client, status_ttl_s=3600))

    async def one(_: int) -> None:
        env = AsyncEnvelope(
            id=uuid.uuid4().hex, namespace=NAMESPACE, function=NOOP_FUNCTION, version=1, payload=EVENT.decode()
        )
        await batcher.enqueue_new(env)

    try:
        async with asyncio.TaskGroup() as group:
            writer = group.create_task(batcher.run_forever())
            try:
                return await timed_workers(plan.concurrency, plan.load_s, one, (FaasError,))
            finally:
                writer.cancel()
    finally:
        await client.flushdb()
        await client.aclose()


async def delete_bench_keys(redis: aioredis.Redis, keys: BenchKeys) -> None:
    names = keys.all()
    for start in range(0, len(names), STATUS_CHUNK):
        await redis.unlink(*names[start : start + STATUS_CHUNK])


# --------------------------------------------------------------------------------------------------
# Submitting async events through the gateway


def async_url(settings: Settings, name: str) -> str:
    return f"{settings.gateway_url}/v1/functions/{name}/invoke-async"


async def submit_one(client: HopClient, url: str, into: Submitted, since: float) -> None:
    """One async call; ``since`` is when it was due (perf_counter), so latencies include any lateness."""
    try:
        resp = await client.post(url, body=EVENT, headers=JSON_HEADERS, timeout_s=HTTP_TIMEOUT_S)
    except HopError as exc:
        into.failed(type(exc).__name__, str(exc))
        return
    if resp.status != 202:
        into.failed(f"HTTP {resp.status}", resp.body.decode(errors="replace"))
        return
    into.latencies.seconds.append(time.perf_counter() - since)
    into.acked_at.append(time.time())
    into.ids.append(json.loads(resp.body)["id"])


async def closed_loop(
    client: HopClient, url: str, workers: int, *, duration_s: float | None = None, count: int | None = None
) -> Submitted:
    """``workers`` callers back to back, for ``duration_s`` or until ``count`` calls were sent."""
    out = Submitted(started_at=time.time())
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop_at = started + duration_s if duration_s is not None else math.inf
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while loop.time() < stop_at and (count is None or sent < count):
            sent += 1
            await submit_one(client, url, out, time.perf_counter())

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
    out.elapsed_s = loop.time() - started
    return out


async def open_loop(client: HopClient, url: str, rate: float, count: int) -> Submitted:
    """``count`` calls, call k sent at start + k/rate whether or not earlier calls have answered."""
    out = Submitted(started_at=time.time())
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for k in range(count):
            due = started + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(submit_one(client, url, out, due))
    out.elapsed_s = time.perf_counter() - started
    return out


async def drain(redis: aioredis.Redis, ids: Sequence[str], timeout_s: float, what: str) -> dict[str, Outcome]:
    started = time.monotonic()
    outcomes = await wait_final(redis, ids, timeout_s)
    ok = len(succeeded(outcomes))
    log(
        f"{what}: {ok} of {len(ids)} succeeded after {time.monotonic() - started:.1f} s ({status_counts(outcomes)})"
    )
    return outcomes


# --------------------------------------------------------------------------------------------------
# 2-4. Throughput and delays


@dataclass(slots=True)
class Accepted:
    floor_xadd: Rate
    floor_xadd_cpu: il.CpuUsage
    floor_tx: Rate
    floor_tx_cpu: il.CpuUsage
    floor_group_commit: Rate
    floor_group_commit_cpu: il.CpuUsage
    envelope_bytes: int
    gateway_sent: Submitted
    gateway_cpu: il.CpuUsage
    backlog_succeeded: int
    backlog_total: int
    backlog_drain_s: float

    @property
    def gateway(self) -> Rate:
        return self.gateway_sent.rate()


@dataclass(slots=True)
class Burst:
    events: int
    submit_s: float  # first send to last 202
    completion_s: float  # first send to the last finished_at
    outcomes: dict[str, Outcome]
    sent: Submitted
    cpu: il.CpuUsage
    instances: int

    @property
    def completions_per_s(self) -> float:
        ok = len(succeeded(self.outcomes))
        return ok / self.completion_s if self.completion_s > 0 else math.nan


@dataclass(slots=True)
class Delays:
    target_rate: float
    submitted: Submitted
    outcomes: dict[str, Outcome]
    cpu: il.CpuUsage

    def values(self, what: Callable[[Outcome], float]) -> il.Latencies:
        return il.Latencies([what(o) for o in succeeded(self.outcomes)])


async def measure_accepted(
    client: HopClient, redis: aioredis.Redis, settings: Settings, plan: Plan
) -> Accepted:
    envelope = real_envelope()
    keys = BenchKeys()
    url = settings.redis_url
    floors: list[tuple[Rate, il.CpuUsage]] = []
    try:
        for label, floor in (
            ("XADD", lambda: raw_floor(url, envelope, plan, keys, transaction=False)),
            ("MULTI/XADD+HSET+EXPIRE/EXEC", lambda: raw_floor(url, envelope, plan, keys, transaction=True)),
            ("the trigger's group commit through redis-py", lambda: group_commit_floor(url, plan)),
        ):
            log(f"floor: {label} ({len(envelope)} byte envelope), c={plan.concurrency}, {plan.load_s:g} s")
            floors.append(await il.with_cpu(floor()))
    finally:
        await delete_bench_keys(redis, keys)
    url = async_url(settings, NOOP_FUNCTION)
    log(
        f"accepted/s through the gateway: c={plan.concurrency}, {plan.warmup_s:g} s warm-up + {plan.load_s:g} s"
    )
    warm = await closed_loop(client, url, plan.concurrency, duration_s=plan.warmup_s)
    measured, gateway_cpu = await il.with_cpu(
        closed_loop(client, url, plan.concurrency, duration_s=plan.load_s)
    )
    started = time.monotonic()
    ids = warm.ids + measured.ids
    outcomes = await drain(redis, ids, plan.drain_timeout_s, "backlog of the accepted/s phase")
    return Accepted(
        floors[0][0], floors[0][1], floors[1][0], floors[1][1], floors[2][0], floors[2][1],
        len(envelope), measured, gateway_cpu,
        len(succeeded(outcomes)), len(ids), time.monotonic() - started,
    )  # fmt: skip


@dataclass(slots=True)
class WrkAccepted:
    """Accepted/s under wrk (a compiled client: the load generator is not the limit), with the
    dispatchers consuming meanwhile and with them stopped (ingestion alone), and how fast the
    dispatchers, started again, drain the backlog that left (consumption alone)."""

    with_consumers: wrk.WrkResult
    with_consumers_cpu: il.CpuUsage
    ingest_only: wrk.WrkResult
    ingest_only_cpu: il.CpuUsage
    drained: int  # events of the backlog counted while it drained
    drain_s: float  # from the first event of the backlog gone to the last
    drain_cpu: il.CpuUsage
    restart_s: float  # from starting the dispatchers again to the backlog's first drop
    roles_before: dict[int, str]  # pid -> role of the processes of 2w and 2i (the dispatchers got new pids)

    @property
    def drain_per_s(self) -> float:
        return self.drained / self.drain_s if self.drain_s > 0 else math.nan


async def wait_backlog_empty(redis: aioredis.Redis, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := await backlog(redis)) > 0:
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: {left} events still queued after {timeout_s:g} s")
        await asyncio.sleep(BACKLOG_POLL_S)


async def stop_dispatchers(cluster: EmbeddedCluster) -> list[str]:
    """SIGTERM every dispatcher (a graceful stop: each finishes what it runs and leaves the membership);
    returns their names once all have exited."""
    stopped = [rec for rec in cluster.records if rec.role == "dispatcher"]
    for rec in stopped:
        if not pid_alive(rec.pid, rec.start_ticks):
            raise BenchError(f"{rec.name} (pid {rec.pid}) was not running when it was to be stopped")
        os.kill(rec.pid, signal.SIGTERM)  # a process this script's launcher started (pid and start time match)
    deadline = time.monotonic() + MEMBER_WAIT_S
    while any(pid_alive(rec.pid, rec.start_ticks) and not _zombie(rec.pid) for rec in stopped):
        if time.monotonic() > deadline:
            raise BenchError("the dispatchers did not stop within 30 s of SIGTERM")
        await asyncio.sleep(0.1)
    return [rec.name for rec in stopped]


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return True


async def measure_accepted_wrk(
    cluster: EmbeddedCluster, redis: aioredis.Redis, settings: Settings, plan: Plan, script_dir: Path
) -> WrkAccepted:
    wrk_path = wrk.find_wrk()
    script = script_dir / "invoke-async.lua"
    script.write_text(wrk.post_script(EVENT.decode(), JSON_HEADERS))
    url = async_url(settings, NOOP_FUNCTION)
    c = plan.concurrency

    async def load(label: str) -> tuple[wrk.WrkResult, il.CpuUsage]:
        log(f"accepted/s under wrk, {label}: c={c}, {plan.warmup_s:g} s warm-up + {plan.load_s:g} s")
        await wrk.run(wrk_path, url, script=script, threads=2, connections=c, duration_s=plan.warmup_s)
        result, usage = await il.with_cpu(
            wrk.run(wrk_path, url, script=script, threads=2, connections=c, duration_s=plan.load_s)
        )
        if result.errors:
            raise BenchError(f"wrk, {label}: {result.non_2xx} non-2xx answers, socket errors {dict(result.socket_errors)}")
        return result, usage

    with_consumers, with_consumers_cpu = await load("the dispatchers running the events meanwhile")
    await wait_backlog_empty(redis, plan.drain_timeout_s, "the backlog of the wrk phase")
    roles_before = {rec.pid: rec.role or rec.name for rec in cluster.records}
    names = await stop_dispatchers(cluster)
    log(f"stopped {', '.join(names)} (SIGTERM)")
    ingest_only, ingest_only_cpu = await load("the dispatchers stopped (ingestion alone)")
    queued = await backlog(redis)
    before = il.CpuSnapshot.take()
    restarted_at = time.monotonic()
    for name in names:
        cluster.restart(name)
    first_drop_at = math.nan
    at_first_drop = queued
    deadline = restarted_at + plan.drain_timeout_s
    while (left := await backlog(redis)) > 0:
        if math.isnan(first_drop_at) and left < queued:
            first_drop_at, at_first_drop = time.monotonic(), left
        if time.monotonic() > deadline:
            raise BenchError(f"the dispatchers started again left {left} of {queued} events after {plan.drain_timeout_s:g} s")
        await asyncio.sleep(0.05)
    done_at = time.monotonic()
    drain_cpu = il.CpuUsage.between(before, il.CpuSnapshot.take())
    if math.isnan(first_drop_at):
        first_drop_at = done_at
    log(f"the dispatchers, started again, drained {queued} events in {done_at - restarted_at:.1f} s")
    return WrkAccepted(
        with_consumers, with_consumers_cpu, ingest_only, ingest_only_cpu,
        at_first_drop, done_at - first_drop_at, drain_cpu, first_drop_at - restarted_at, roles_before,
    )  # fmt: skip


async def measure_burst(
    client: HopClient,
    redis: aioredis.Redis,
    settings: Settings,
    plan: Plan,
    instances: Callable[[], Awaitable[int]],
) -> Burst:
    url = async_url(settings, NOOP_FUNCTION)
    log(f"completions/s: {plan.burst_events} events as fast as c={plan.concurrency} can submit them")

    async def run() -> tuple[Submitted, dict[str, Outcome]]:
        sent = await closed_loop(client, url, plan.concurrency, count=plan.burst_events)
        return sent, await wait_final(redis, sent.ids, plan.drain_timeout_s)

    (sent, outcomes), cpu = await il.with_cpu(run())
    finished = [o.finished_at for o in succeeded(outcomes)]
    if not finished:
        raise BenchError(f"no event of the completions/s phase succeeded ({status_counts(outcomes)})")
    burst = Burst(
        plan.burst_events,
        sent.elapsed_s,
        max(finished) - sent.started_at,
        outcomes,
        sent,
        cpu,
        await instances(),
    )
    log(f"completions/s: {burst.completions_per_s:.0f} ({status_counts(outcomes)})")
    return burst


async def measure_delays(
    client: HopClient, redis: aioredis.Redis, settings: Settings, plan: Plan, rate: float
) -> Delays:
    count = max(1, round(rate * plan.open_loop_s))
    log(f"queue delay: open loop at {rate:.0f} events/s for {plan.open_loop_s:g} s ({count} events)")

    async def run() -> tuple[Submitted, dict[str, Outcome]]:
        sent = await open_loop(client, async_url(settings, NOOP_FUNCTION), rate, count)
        return sent, await wait_final(redis, sent.ids, plan.drain_timeout_s)

    (sent, outcomes), cpu = await il.with_cpu(run())
    return Delays(rate, sent, outcomes, cpu)


# --------------------------------------------------------------------------------------------------
# 5. Reliability: a dispatcher killed with SIGKILL and started again


@dataclass(slots=True)
class Chaos:
    victim: str = ""
    victim_pid: int = 0
    pending_at_kill: int = 0  # events the victim had read and not acknowledged
    killed_at: float = math.nan
    respawned_at: float = math.nan
    replacement_pid: int = 0
    registered_at: float = math.nan  # the replacement's member record in etcd carries its pid


@dataclass(slots=True)
class Reliability:
    submitted: Submitted
    outcomes: dict[str, Outcome]
    ledger: Counter[str]
    chaos: Chaos
    settle_timeout_s: float
    last_success_at: float

    @property
    def lost(self) -> list[str]:
        return [i for i in self.submitted.ids if self.outcomes[i].status != "succeeded"]

    @property
    def duplicated(self) -> dict[str, int]:
        return {i: n for i, n in self.ledger.items() if n > 1}

    @property
    def unacknowledged_runs(self) -> int:
        acked = set(self.submitted.ids)
        return sum(1 for i in self.ledger if i not in acked)

    def runs_of(self, ids: Sequence[str]) -> str:
        """The ``runs`` (handler starts) their status hashes record, e.g. "2 x7"."""
        counts = Counter(self.outcomes[i].runs for i in ids if i in self.outcomes)
        return ", ".join(f"{runs} x{n}" for runs, n in sorted(counts.items()))

    @property
    def never_ran(self) -> int:
        return sum(1 for i in self.submitted.ids if i not in self.ledger)


async def pending_by_consumer(redis: aioredis.Redis) -> dict[str, int]:
    info = await redis.xpending(redis_keys.ASYNC_STREAM, redis_keys.ASYNC_GROUP)
    out: dict[str, int] = {}
    for consumer in info.get("consumers") or []:
        name = consumer["name"]
        out[name.decode() if isinstance(name, bytes) else str(name)] = int(consumer["pending"])
    return out


async def kill_and_restart(
    cluster: EmbeddedCluster,
    replacements: list[EmbeddedCluster],
    redis: aioredis.Redis,
    kill_after_s: float,
    restart_after_s: float,
    chaos: Chaos,
) -> None:
    """SIGKILL the dispatcher with the most pending events; start one with its spec ``restart_after_s`` later."""
    await asyncio.sleep(kill_after_s)
    dispatchers = {rec.name: rec for rec in cluster.records if rec.role == "dispatcher"}
    pending = await pending_by_consumer(redis)
    victim: ProcessRecord = max(dispatchers.values(), key=lambda rec: (pending.get(rec.name, 0), rec.name))
    if not pid_alive(victim.pid, victim.start_ticks):
        raise BenchError(f"{victim.name} (pid {victim.pid}) was not running when it was to be killed")
    os.kill(victim.pid, signal.SIGKILL)  # a process this script's launcher started (pid and start time match)
    chaos.victim, chaos.victim_pid, chaos.killed_at = victim.name, victim.pid, time.time()
    chaos.pending_at_kill = pending.get(victim.name, 0)
    log(f"killed {victim.name} (pid {victim.pid}, {chaos.pending_at_kill} events pending) with SIGKILL")
    await asyncio.sleep(restart_after_s)
    spec = next(s for s in cluster.services if s.member_id == victim.name)
    # The launcher refuses a second cluster under a home whose processes run, so the replacement gets
    # a home of its own (its state file and log); it reaches the same etcd, Valkey and S3.
    home = cluster.settings.home / "replacement"
    replacement = EmbeddedCluster(
        cluster.settings.model_copy(update={"home": home}),
        services=[spec],
    )
    replacements.append(replacement)  # stopped by the caller's finally, whatever happens next
    chaos.respawned_at = time.time()
    await replacement.start_services()
    chaos.replacement_pid = replacement.records[-1].pid
    # Its readiness probe may have seen the dead one's member record (alive until its lease expires).
    deadline = time.monotonic() + MEMBER_WAIT_S
    while True:
        members, _ = await read_members(cluster.settings)
        if members.get(spec.member_id, {}).get("pid") == chaos.replacement_pid:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the replacement {spec.member_id} did not register within {MEMBER_WAIT_S:g} s")
        await asyncio.sleep(0.1)
    chaos.registered_at = time.time()
    log(
        f"started {spec.member_id} again (pid {chaos.replacement_pid}); registered {chaos.registered_at - chaos.respawned_at:.1f} s later"
    )


async def measure_reliability(
    client: HopClient,
    gw: httpx.AsyncClient,
    redis: aioredis.Redis,
    cluster: EmbeddedCluster,
    replacements: list[EmbeddedCluster],
    plan: Plan,
    ledger: Path,
) -> Reliability:
    settings = cluster.settings
    # Warm the ledger function (a cold start then cannot come near the 5 s visibility), then empty the
    # ledger: the host opens it with O_APPEND on every call, so truncating it is safe.
    for _ in range(2):
        resp = await gw.post(
            f"{settings.gateway_url}/v1/functions/{LEDGER_FUNCTION}/invoke",
            content=EVENT,
            headers=JSON_HEADERS,
        )
        if resp.status_code != 200:
            raise BenchError(f"warm-up call of {LEDGER_FUNCTION} answered {resp.status_code}: {resp.text}")
    os.truncate(ledger, 0)
    submit_s = plan.reliability_events / plan.reliability_rate
    chaos = Chaos()
    log(
        f"reliability: {plan.reliability_events} events at {plan.reliability_rate:g}/s; SIGKILL a dispatcher at "
        f"{submit_s * plan.kill_at_fraction:.1f} s, start it again {plan.restart_after_s:g} s later"
    )
    try:
        async with asyncio.TaskGroup() as group:
            sending = group.create_task(
                open_loop(
                    client,
                    async_url(settings, LEDGER_FUNCTION),
                    plan.reliability_rate,
                    plan.reliability_events,
                )
            )
            group.create_task(
                kill_and_restart(
                    cluster,
                    replacements,
                    redis,
                    submit_s * plan.kill_at_fraction,
                    plan.restart_after_s,
                    chaos,
                )
            )
    except ExceptionGroup as group_error:  # report the cause (a BenchError is reported as such by main)
        raise group_error.exceptions[0] from None
    sent = sending.result()
    outcomes = await drain(redis, sent.ids, plan.settle_timeout_s, "reliability events")
    finished = [o.finished_at for o in succeeded(outcomes)]
    seen: Counter[str] = Counter(
        line for line in (await asyncio.to_thread(ledger.read_text)).splitlines() if line
    )
    return Reliability(sent, outcomes, seen, chaos, plan.settle_timeout_s, max(finished, default=math.nan))


# --------------------------------------------------------------------------------------------------
# Platform helpers


def archive_of(code: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", code)
    return buf.getvalue()


async def warm_noop(
    gw: httpx.AsyncClient, client: HopClient, redis: aioredis.Redis, settings: Settings, plan: Plan
) -> None:
    """A cold start, then one batch through the queue so both dispatchers have their instances."""
    resp = await gw.post(
        f"{settings.gateway_url}/v1/functions/{NOOP_FUNCTION}/invoke", content=EVENT, headers=JSON_HEADERS
    )
    if resp.status_code != 200:
        raise BenchError(f"warm-up call of {NOOP_FUNCTION} answered {resp.status_code}: {resp.text}")
    sent = await closed_loop(
        client, async_url(settings, NOOP_FUNCTION), plan.concurrency, count=plan.concurrency * 10
    )
    if sent.errors:
        raise BenchError(f"async warm-up calls failed: {dict(sent.errors)}")
    outcomes = await drain(redis, sent.ids, plan.drain_timeout_s, "warm-up events")
    if len(succeeded(outcomes)) != len(sent.ids):
        raise BenchError(f"warm-up events did not all succeed: {status_counts(outcomes)}")


async def valkey_line(redis: aioredis.Redis, settings: Settings) -> str:
    info = await redis.info("server")
    version = info.get("valkey_version") or info.get("redis_version") or "?"
    config: dict[Any, Any] = {}
    for name in ("appendonly", "appendfsync"):
        config.update(await redis.config_get(name))
    decoded = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in config.items()
    }
    if decoded.get("appendfsync") != "always":
        raise BenchError(
            f"the platform's Valkey runs with appendfsync {decoded.get('appendfsync')!r}, not 'always'"
        )
    return (
        f"valkey {version}, appendonly {decoded.get('appendonly')}, appendfsync {decoded.get('appendfsync')}, "
        f"data on {filesystem_of(settings.home / 'valkey')}"
    )


def filesystem_of(path: Path) -> str:
    """``<fstype> <device>`` of the mount holding ``path`` (fsync costs differ widely between them)."""
    best = ("", "unknown", "?")
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[0]):
                best = (mount, fstype, device)
    return f"{best[1]} ({best[2]} at {best[0] or '?'})"


async def count_instances(cluster: EmbeddedCluster, name: str) -> int:
    etcd = etcd_from_settings(cluster.settings)
    try:
        await etcd.connect()
        return len(await il.instances_of(etcd, name))
    finally:
        await etcd.close()


# --------------------------------------------------------------------------------------------------
# Report


def cpu_per_event(
    usage: il.CpuUsage, events: int, clusters: Sequence[EmbeddedCluster], roles_then: dict[int, str] | None = None
) -> str:
    """CPU ms per event of each kind of process: the load generator, each role, the servers, the hosts
    (``roles_then``: the roles of processes that have been replaced since)."""
    roles = {**(roles_then or {}), **{rec.pid: rec.role or rec.name for cluster in clusters for rec in cluster.records}}
    roles[os.getpid()] = "load generator"
    totals: dict[str, float] = defaultdict(float)
    for pid, cpu in usage.per_pid.items():
        totals[roles.get(pid, "function hosts")] += cpu
    if not events:
        return "-"
    return f"total {1000 * usage.ours_s / events:.2f}: " + ", ".join(
        f"{role} {1000 * cpu / events:.2f}"
        for role, cpu in sorted(totals.items(), key=lambda kv: -kv[1])
        if 1000 * cpu / events >= 0.005
    )


def pct(values: il.Latencies, q: float) -> float:
    return il.percentile(values.seconds, q) * 1000


def errors_text(errors: Counter[str]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in errors.most_common()) if errors else "none"


def report(
    plan: Plan,
    acc: Accepted,
    accw: WrkAccepted,
    burst: Burst,
    delays: Delays,
    rel: Reliability,
    *,
    argv: Sequence[str],
    code: str,
    valkey: str,
    clusters: Sequence[EmbeddedCluster],
) -> str:
    c = plan.concurrency
    settings = clusters[0].settings
    rows: list[tuple[str, str, str]] = []  # (figure, value, ratio)

    def row(label: str, value: float, digits: int, ratio: str = "") -> None:
        rows.append((label, il.fmt(value, digits), ratio))

    def times(a: float, b: float, of: str) -> str:
        return f"{ratio_text(a, b)} {of}"

    floor = acc.floor_xadd.per_s
    queue_delay = delays.values(lambda o: o.queue_delay_s)
    end_to_end = delays.values(lambda o: o.end_to_end_s)
    row(f"1 floor: XADD, c={c}, one per round trip, /s", floor, 0)
    row("    XADD latency p50, ms", pct(acc.floor_xadd.latencies, 50), 2)
    row("    XADD latency p99, ms", pct(acc.floor_xadd.latencies, 99), 2)
    row(
        "  one transaction per event (MULTI/XADD+HSET+EXPIRE/EXEC), /s",
        acc.floor_tx.per_s,
        0,
        times(acc.floor_tx.per_s, floor, "of XADD"),
    )
    row(
        "  the trigger's group commit through redis-py, /s",
        acc.floor_group_commit.per_s,
        0,
        times(acc.floor_group_commit.per_s, floor, "of XADD"),
    )
    row(
        f"2 accepted through the gateway, c={c}, 202/s",
        acc.gateway.per_s,
        0,
        times(acc.gateway.per_s, floor, "of XADD"),
    )
    row("    202 latency p50, ms", pct(acc.gateway.latencies, 50), 1)
    row("    202 latency p99, ms", pct(acc.gateway.latencies, 99), 1)
    row(
        f"2w accepted under wrk, c={c}, dispatchers running the events, 202/s",
        accw.with_consumers.ok_rps,
        0,
        times(accw.with_consumers.ok_rps, floor, "of XADD"),
    )
    row(
        f"2i accepted under wrk, c={c}, dispatchers stopped (ingestion alone), 202/s",
        accw.ingest_only.ok_rps,
        0,
        times(accw.ingest_only.ok_rps, floor, "of XADD"),
    )
    row("    202 latency p50 / p99, ms", accw.ingest_only.p50_ms, 1, f"{il.fmt(accw.ingest_only.p99_ms, 1)} (p99)")
    row(
        "2d completions: that backlog drained by the dispatchers started again, /s",
        accw.drain_per_s,
        0,
        times(accw.drain_per_s, accw.ingest_only.ok_rps, "of 2i"),
    )
    row(
        f"3 completions, {burst.events} events at once, /s",
        burst.completions_per_s,
        0,
        times(burst.completions_per_s, acc.gateway.per_s, "of accepted"),
    )
    row(f"4 queue delay p50 at {delays.target_rate:.0f}/s (0.5x completions), ms", pct(queue_delay, 50), 1)
    row("    queue delay p99, ms", pct(queue_delay, 99), 1)
    row("    end-to-end p50 (finished - enqueued), ms", pct(end_to_end, 50), 1)
    row("    end-to-end p99, ms", pct(end_to_end, 99), 1)
    row("    202 latency p50 (from the scheduled send), ms", pct(delays.submitted.latencies, 50), 1)
    row("    202 latency p99, ms", pct(delays.submitted.latencies, 99), 1)
    n_rel = len(rel.submitted.ids)
    dup = rel.duplicated
    rows.append(
        (f"5 lost (202, not succeeded within {rel.settle_timeout_s:g} s)", f"{len(rel.lost)}", f"of {n_rel}")
    )
    rows.append(("    duplicated (ids the handler ran more than once)", f"{len(dup)}", f"of {n_rel}"))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{'figure':<{width}}  {'value':>9}  ratio",
        f"{'-' * width}  {'-' * 9}  {'-' * 16}",
        *(f"{label:<{width}}  {value:>9}  {ratio}" for label, value, ratio in rows),
    ]  # fmt: skip

    n_delay = len(succeeded(delays.outcomes))
    rel_e2e = il.Latencies([o.end_to_end_s for o in succeeded(rel.outcomes)])
    ch = rel.chaos
    t0 = rel.submitted.started_at
    down = sum(1 for t in rel.submitted.acked_at if ch.killed_at <= t < ch.registered_at)
    floor_errors = {
        "XADD": acc.floor_xadd.errors,
        "transaction": acc.floor_tx.errors,
        "group commit": acc.floor_group_commit.errors,
    }
    notes = [
        "",
        f"platform: {valkey}; process backend; async_visibility_s={settings.async_visibility_s:g} (the default): "
        f"a killed dispatcher's events are taken over when its membership lease ({settings.lease_ttl_s} s) lapses.",
        f"functions: {NOOP_FUNCTION} returns its event ({fmt_config(NOOP_CONFIG)}); {LEDGER_FUNCTION} sleeps "
        f"{LEDGER_SLEEP_S * 1000:g} ms, then appends context.request_id to a file with O_APPEND "
        f"({fmt_config(LEDGER_CONFIG)}); 128 MB each. Every event is {EVENT.decode()}; its envelope is "
        f"{acc.envelope_bytes} bytes.",
        f"1 floor: {plan.load_s:g} s per row, {c} connections to the platform's Valkey, one request per round trip, "
        "bench-only keys deleted afterwards. XADD and the transaction row use a minimal RESP client (Valkey's "
        f"floor); the group-commit row sends the trigger's write the way the trigger does (concurrent callers share "
        f"one enqueue_batch script per batch, redis-py), to database {BENCH_DB} of the same Valkey. Errors: "
        + "; ".join(f"{k} {errors_text(v)}" for k, v in floor_errors.items())
        + ".",
        f"  cpu, XADD:         {acc.floor_xadd_cpu.summary()}",
        f"    ms per XADD:     {cpu_per_event(acc.floor_xadd_cpu, acc.floor_xadd.done, clusters)}",
        f"  cpu, transaction:  {acc.floor_tx_cpu.summary()}",
        f"    ms per write:    {cpu_per_event(acc.floor_tx_cpu, acc.floor_tx.done, clusters)}",
        f"  cpu, group commit: {acc.floor_group_commit_cpu.summary()}",
        f"    ms per write:    {cpu_per_event(acc.floor_group_commit_cpu, acc.floor_group_commit.done, clusters)}",
        f"2 accepted: {c} callers back to back on POST /v1/functions/{NOOP_FUNCTION}/invoke-async for "
        f"{plan.load_s:g} s after {plan.warmup_s:g} s of warm-up: {acc.gateway.done} events, non-202: "
        f"{acc.gateway_sent.error_report()}. The dispatchers ran the events meanwhile; the backlog "
        f"({acc.backlog_total} events with the warm-up) drained {acc.backlog_drain_s:.1f} s after the last 202, "
        f"{acc.backlog_succeeded} succeeded. Against the group-commit row: {times(acc.gateway.per_s, acc.floor_group_commit.per_s, 'of it')}.",
        f"  cpu: {acc.gateway_cpu.summary()}",
        f"    ms per event (accepting and running it): {cpu_per_event(acc.gateway_cpu, acc.gateway.done, clusters)}",
        f"2w/2i/2d: wrk -t2 -c{c} on the same route, {plan.warmup_s:g} s of warm-up then {plan.load_s:g} s measured "
        "(wrk's own CPU is not in the lines below). 2w: the dispatchers ran the events meanwhile, as in 2. 2i: "
        "both dispatchers stopped first (SIGTERM, waited for), so the gateway, the trigger and Valkey had the "
        "cores to themselves; the events stayed queued. 2d: both started again; from the backlog's first "
        f"event gone ({accw.restart_s:.1f} s after the start) to the last, {accw.drained} events in "
        f"{accw.drain_s:.1f} s with nothing arriving.",
        f"  cpu, 2w: {accw.with_consumers_cpu.summary()}",
        f"    ms per event: {cpu_per_event(accw.with_consumers_cpu, accw.with_consumers.ok_requests, clusters, accw.roles_before)}",
        f"  cpu, 2i: {accw.ingest_only_cpu.summary()}",
        f"    ms per event: {cpu_per_event(accw.ingest_only_cpu, accw.ingest_only.ok_requests, clusters, accw.roles_before)}",
        f"  cpu, 2d: {accw.drain_cpu.summary()}",
        f"    ms per event: {cpu_per_event(accw.drain_cpu, accw.drained, clusters)}",
        f"3 completions: {burst.events} events by {c} callers back to back, all answered in {burst.submit_s:.1f} s "
        f"({burst.events / burst.submit_s:.0f}/s); the last finished {burst.completion_s:.1f} s after the first "
        f"send ({status_counts(burst.outcomes)}; non-202: {burst.sent.error_report()}); {NOOP_FUNCTION} had "
        f"{burst.instances} instance(s) at the end.",
        f"  cpu: {burst.cpu.summary()}",
        f"    ms per event: {cpu_per_event(burst.cpu, len(succeeded(burst.outcomes)), clusters)}",
        f"4 delays: open loop, {len(delays.submitted.ids)} events due at {delays.target_rate:.1f}/s for "
        f"{plan.open_loop_s:g} s ({status_counts(delays.outcomes)}; non-202: {delays.submitted.error_report()}); "
        f"percentiles over the {n_delay} that succeeded"
        + (" (p99 = max: under 100 values)" if n_delay < 100 else "")
        + f"; events with more than one attempt: {sum(1 for o in succeeded(delays.outcomes) if o.attempts > 1)}.",
        f"  cpu: {delays.cpu.summary()}",
        f"5 reliability: {plan.reliability_events} events to {LEDGER_FUNCTION} due at {plan.reliability_rate:g}/s; "
        f"{ch.victim} (pid {ch.victim_pid}, {ch.pending_at_kill} events pending) killed with SIGKILL at "
        f"+{ch.killed_at - t0:.1f} s, started again at +{ch.respawned_at - t0:.1f} s (pid {ch.replacement_pid}), "
        f"registered at +{ch.registered_at - t0:.1f} s; {down} events were acknowledged while it was down.",
        f"  acknowledged {n_rel} (non-202: {rel.submitted.error_report()}): {status_counts(rel.outcomes)}; "
        f"never ran: {rel.never_ran}; ran without a 202: {rel.unacknowledged_runs}; "
        f"extra runs: {sum(n - 1 for n in dup.values())}"
        + (f" ({', '.join(list(dup)[:3])})" if dup else "")
        + (f"; their status records runs {rel.runs_of(list(dup))}" if dup else "")
        + ".",
        f"  end-to-end p50 {pct(rel_e2e, 50):.0f} ms, p99 {pct(rel_e2e, 99):.0f} ms, max "
        f"{max(rel_e2e.seconds, default=math.nan) * 1000:.0f} ms; "
        f"{sum(1 for s in rel_e2e.seconds if s >= settings.lease_ttl_s)} finished {settings.lease_ttl_s} s or more "
        "after they were enqueued (delayed by the crash); the last succeeded at "
        f"+{rel.last_success_at - t0:.1f} s.",
        "The load generator shares the cores with every platform process and the servers.",
    ]
    return "\n".join([*il.machine_lines(argv, code), "", *lines, *notes])


def ratio_text(a: float, b: float) -> str:
    """``a / b`` as "0.42x"; below 0.1 with two significant digits and as a fraction ("0.0035x = 1/286")."""
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 or r == 0 else f"{r:.2g}x = 1/{1 / r:.0f}"


def fmt_config(config: dict[str, object]) -> str:
    return ", ".join(f"{k} {v}" for k, v in config.items())


# --------------------------------------------------------------------------------------------------
# Main


async def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Measure and print; returns how many acknowledged events were lost (must be 0)."""
    plan = Plan.from_args(args)
    code = il.code_version()  # before the services start: what they run
    home = Path(tempfile.mkdtemp(prefix="faas-bench-async-", dir="/tmp"))  # short: unix socket paths
    # Unsandboxed hosts: the ledger function appends to one file of the bench's from every instance,
    # which a sandboxed host cannot see (the sandbox costs nothing measurable: README, "Process isolation").
    settings = settings_for_test(home, process_isolation="none")
    cluster = EmbeddedCluster(settings, progress=il._progress)
    settings = cluster.settings
    replacements: list[EmbeddedCluster] = []
    gw = httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, trust_env=False, auth=il.AdminKey(home))
    client = HopClient(max_connections=plan.concurrency * 4)
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    ledger = home / "ledger" / "ids.txt"
    try:
        async with asyncio.timeout(args.max_seconds):
            log(f"starting the platform in {home}")
            await cluster.start()
            JSON_HEADERS.update(il.admin_headers(home))  # every gateway call of this bench sends the admin key
            valkey = await valkey_line(redis, settings)
            ledger.parent.mkdir()
            ledger.touch()
            await il.deploy(gw, settings, NOOP_FUNCTION, il.make_archive(), **NOOP_CONFIG)
            ledger_env = {"BENCH_LEDGER": str(ledger), "BENCH_SLEEP_S": str(LEDGER_SLEEP_S)}
            await il.deploy(
                gw,
                settings,
                LEDGER_FUNCTION,
                archive_of(LEDGER_CODE),
                environment=ledger_env,
                **LEDGER_CONFIG,
            )
            await warm_noop(gw, client, redis, settings, plan)
            accepted = await measure_accepted(client, redis, settings, plan)
            accepted_wrk = await measure_accepted_wrk(cluster, redis, settings, plan, home)
            burst = await measure_burst(
                client, redis, settings, plan, lambda: count_instances(cluster, NOOP_FUNCTION)
            )
            delays = await measure_delays(client, redis, settings, plan, 0.5 * burst.completions_per_s)
            reliability = await measure_reliability(client, gw, redis, cluster, replacements, plan, ledger)
            print(
                report(
                    plan, accepted, accepted_wrk, burst, delays, reliability, argv=argv, code=code, valkey=valkey,
                    clusters=[cluster, *replacements],
                ),
                flush=True,
            )  # fmt: skip
            return len(reliability.lost)
    finally:
        await client.close()
        await gw.aclose()
        await redis.aclose()
        log("stopping the platform")
        for replacement in replacements:
            await replacement.stop()
        await cluster.stop()
        if args.keep_home:
            log(f"platform home (logs, ledger) kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Async invocations: accepted/s and completions/s against a raw XADD floor, delays, crash safety."
    )
    parser.add_argument("--quick", action="store_true", help="shorter phases, fewer events (a smoke run)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="callers / connections in phases 1-3 (default 32)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="seconds per floor row and accepted/s window (default 8, --quick 3)",
    )
    parser.add_argument(
        "--events", type=int, default=0, help="events of the completions/s burst (default 3000, --quick 600)"
    )
    parser.add_argument(
        "--open-loop-seconds",
        type=float,
        default=0.0,
        help="queue-delay phase duration (default 15, --quick 5)",
    )
    parser.add_argument(
        "--reliability-events", type=int, default=0, help="events of the kill test (default 500, --quick 150)"
    )
    parser.add_argument(
        "--reliability-rate", type=float, default=0.0, help="their rate, events/s (default 50, --quick 30)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="abort the whole run after this long"
    )
    parser.add_argument("--keep-home", action="store_true", help="keep the temp platform home (logs, ledger)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        with contextlib.suppress(ImportError):
            import uvloop  # what the services run on; the load generator uses it too when installed

            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            lost = runner.run(run(args, [sys.argv[0], *argv]))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except FaasError as exc:  # the platform did not start, or one of its servers failed
        print(f"bench failed: {exc.message}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"bench failed: the run took longer than --max-seconds {args.max_seconds:g}", file=sys.stderr)
        return 1
    if lost:
        print(f"bench failed: {lost} acknowledged event(s) never succeeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
