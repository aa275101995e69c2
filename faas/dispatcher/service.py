"""The dispatcher: routes each invocation to a warm instance, or gets one from the scheduler.

Guarantees:
- the table of warm instances is a watched copy of ``/faas/instances/`` plus what the scheduler just
  returned; an instance deleted in etcd stops receiving work at once;
- pools are keyed by version *and function uid*: an instance of a deleted function never serves the
  function created again under its name.  A call names the uid it was resolved to
  (``X-Faas-Function-Uid``); when this dispatcher's catalog holds another uid for that version it
  re-reads etcd, and a call for a function that no longer exists gets 404 ``not_found``;
- an invocation never waits past its deadline (header ``X-Faas-Deadline-Ms``): waiting for a slot, for
  a start, and the call to the instance all share it;
- overload gets a fast answer: while a version is short of ``max_instances``, a call with no free slot
  waits for the start it asks for; once at ``max_instances``, it joins the version's bounded queue only
  if the pool expects to serve it within its deadline (``FunctionPool.admit``, at most
  ``max_waiters_per_slot`` per slot), else ``invoke`` raises ``TooManyRequests`` at once, with
  ``retry_after_s`` (the HTTP face sends 429 ``too_many_requests`` with ``Retry-After``, without
  ``X-Faas-Saturated``: the limit is the function's, another dispatcher would not do better);
- a request the instance never received (connection refused, socket gone, instance busy) is retried on
  another instance within the deadline; a request the instance received is never retried (a sync
  invocation runs at most once per call);
- an instance that timed out, ran out of memory, crashed or announced ``X-Faas-Retire`` is dropped
  and reported to the scheduler; a crash is the function's fault (``"fault": "function"`` on the
  error) when the node agent reports that the host exited, else the platform's;
- each invocation's captured output is appended to the function's log list in Redis, off the
  response path, bounded to ``logs_per_function`` entries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterable, Callable
from typing import Any, NoReturn

import redis.asyncio as aioredis

from faas.core import keys, redis_keys, wire
from faas.core.clients import NodeClient, ReadOnce, SchedulerClient
from faas.core.election import LeaderWatch
from faas.core.errors import (
    DeadlineExceeded,
    FaasError,
    FunctionTimeout,
    InstanceStartError,
    InvalidRequest,
    NotFound,
    TooManyRequests,
)
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.http import ConnectionBroken, HopResponse, HopTimeout, NotDelivered, for_address
from faas.core.models import InstanceRecord, NodeRecord, VersionKey, VersionSpec
from faas.core.registry import Catalog
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.dispatcher.pool import FunctionPool, WarmInstance

log = logging.getLogger("faas.dispatcher")

# Grace on top of the function timeout for the host to answer a timed-out call itself.
TIMEOUT_GRACE_S = 1.5
_LOG_LINGER_S = 0.05
_POOL_SWEEP_S = 30.0
# Routing: how much an instance's memory (its share of its limit) counts against it, next to its CPU
# in cores and its in-flight share of its concurrency (README, "Load-aware routing").
MEMORY_WEIGHT = 0.25


class InvocationResult:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers


class LogSink:
    """Batches invocation log records into Redis lists, one per function."""

    def __init__(self, redis: aioredis.Redis, keep: int) -> None:
        self.redis = redis
        self.keep = keep
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=10000)

    def add(self, ns: str, name: str, record: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait((redis_keys.function_logs(ns, name), json.dumps(record).encode()))
        except asyncio.QueueFull:
            log.warning("log queue full; dropping a log record of %s", name)

    async def run_forever(self) -> NoReturn:
        while True:
            batch = [await self.queue.get()]
            # Linger briefly: Valkey fsyncs every write, so one pipeline per record would cost an fsync
            # per invocation.
            await asyncio.sleep(_LOG_LINGER_S)
            while not self.queue.empty() and len(batch) < 500:
                batch.append(self.queue.get_nowait())
            try:
                by_key: dict[str, list[bytes]] = {}
                for key, value in batch:
                    by_key.setdefault(key, []).append(value)
                async with self.redis.pipeline(transaction=False) as pipe:
                    # One LPUSH per function, not per record: the same list as one LPUSH each, in
                    # order, for a fraction of the commands (redis-py's cost is per command).
                    for key, values in by_key.items():
                        pipe.lpush(key, *values)
                        pipe.ltrim(key, 0, self.keep - 1)
                    await pipe.execute()
            except Exception as exc:  # Redis down: logs are best effort, invocations go on
                log.warning("could not write %d log records: %s", len(batch), exc)


class Dispatcher:
    def __init__(self, *, settings: Settings, etcd: Etcd, catalog: Catalog, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.etcd = etcd
        self.catalog = catalog
        self.pools: dict[VersionKey, FunctionPool] = {}
        # The pool each instance record's key went to: a deletion in etcd carries no value to read it from.
        self._placed: dict[bytes, VersionKey] = {}
        self.instances = PrefixMirror(etcd, keys.instances_prefix(), on_change=self._on_instance_change)
        self.nodes = PrefixMirror(etcd, keys.nodes_prefix())
        self.scheduler_leader = LeaderWatch(etcd, "scheduler")
        self.scheduler = SchedulerClient(self.scheduler_leader, internal_token=settings.internal_token)
        self.node_agents = NodeClient(timeout_s=settings.cold_start_timeout_s, internal_token=settings.internal_token)
        self.logs = LogSink(redis, settings.logs_per_function)
        self.tasks = TaskSet("dispatcher")
        self._calls: dict[str, asyncio.Future[InvocationResult]] = {}  # in flight, by request id
        self._node_records: dict[str, tuple[bytes, NodeRecord]] = {}

    async def start(self) -> None:
        self.catalog.start()
        self.instances.start()
        self.nodes.start()
        self.scheduler_leader.start()
        self.scheduler.start()
        self.tasks.spawn(self.logs.run_forever(), name="logs", long_lived=True)
        self.tasks.spawn(self._sweep_pools_forever(), name="sweep-pools", long_lived=True)
        await self.instances.wait_ready(timeout_s=None)

    async def close(self) -> None:
        await self.tasks.cancel_all()
        await self.instances.stop()
        await self.nodes.stop()
        await self.scheduler.close()
        await self.scheduler_leader.stop()
        await self.catalog.stop()
        for pool in self.pools.values():
            for inst in pool.instances.values():
                await inst.client.close()
        await self.node_agents.close()

    # -- instance table ----------------------------------------------------------------------

    def _pool(self, key: VersionKey) -> FunctionPool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = FunctionPool()
        return pool

    def _on_instance_change(self, kind: str, key: bytes, value: bytes | None) -> None:
        if value is not None:
            record = InstanceRecord.model_validate_json(value)
            self._placed[key] = record.key
            self._add_instance(self._pool(record.key), record)
            return
        version_key = self._placed.pop(key, None)
        if version_key is None:
            return
        pool = self.pools.get(version_key)
        inst = pool.remove(key.decode().rsplit("/", 1)[-1]) if pool is not None else None
        if inst is not None:
            self.tasks.spawn(self._close_when_drained(inst), name=f"close:{inst.instance_id}")
        self._forget_if_idle(version_key)

    def _forget_if_idle(self, key: VersionKey) -> None:
        """Drop the pool of a version with no instance, no waiter and no start under way.

        Invocations look their pool up again on every attempt, so one that still holds a dropped
        pool object only releases into it; the next attempt uses the pool the table has."""
        pool = self.pools.get(key)
        if pool is not None and pool.idle:
            del self.pools[key]

    async def _sweep_pools_forever(self) -> NoReturn:
        """Versions that never got an instance (a failed cold start) leave idle pools too."""
        while True:
            await asyncio.sleep(_POOL_SWEEP_S)
            for key in list(self.pools):
                self._forget_if_idle(key)

    def _add_instance(self, pool: FunctionPool, record: InstanceRecord) -> None:
        if record.instance_id in pool.instances:
            return
        client, base_url = for_address(record.address, max_connections=max(record.concurrency, 1) + 2)
        pool.add(WarmInstance(record=record, client=client, base_url=base_url))

    async def _close_when_drained(self, inst: WarmInstance) -> None:
        while inst.inflight > 0:  # noqa: ASYNC110 - runs only when an instance leaves; a poll is enough
            await asyncio.sleep(0.1)
        await inst.client.close()

    def _node(self, node_id: str) -> NodeRecord | None:
        """The record a node last wrote, parsed once per record (routing asks per pick)."""
        raw = self.nodes.items.get(keys.node(node_id))
        if raw is None:
            return None
        cached = self._node_records.get(node_id)
        if cached is not None and cached[0] is raw:
            return cached[1]
        record = NodeRecord.model_validate_json(raw)
        self._node_records[node_id] = (raw, record)
        return record

    def instance_load(self, inst: WarmInstance) -> tuple[float, float]:
        """(The load measured for ``inst``: its CPU in cores over its node's last report interval plus
        ``MEMORY_WEIGHT`` times its resident memory's share of its limit; its node's CPU load)."""
        node = self._node(inst.record.node_id)
        if node is None:
            return 0.0, 0.0
        cpu = node.instance_cpu.get(inst.instance_id, 0.0)
        limit = inst.record.memory_mb
        memory = node.instance_rss_mb.get(inst.instance_id, 0.0) / limit if limit else 0.0
        return cpu + MEMORY_WEIGHT * min(memory, 1.0), node.cpu_load

    # -- invocation --------------------------------------------------------------------------

    async def invoke(
        self, ns: str, name: str, version: int, body: bytes, *, request_id: str, deadline: float,
        uid: str | None = None,
    ) -> InvocationResult:
        """Run one invocation of ``version`` of the function with ``uid`` (None: whichever function
        has the name now); a second call with the request id of one in flight here joins it.

        The gateway re-sends a call whose trigger died or froze to the next primary, which forwards
        it to the same dispatcher (rendezvous hashing): joining the call still running here answers
        it without running the function a second time.  (The server does not cancel a handler whose
        client went away, so the first call runs to its end even when its trigger died.)"""
        joined = self._calls.get(request_id)
        if joined is not None:
            log.info("request %s is already running here; joining it", request_id)
            return await asyncio.shield(joined)
        outcome: asyncio.Future[InvocationResult] = asyncio.get_running_loop().create_future()
        self._calls[request_id] = outcome
        try:
            result = await self._invoke(ns, name, version, body, request_id=request_id, deadline=deadline, uid=uid)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                outcome.cancel()
            else:
                outcome.set_exception(exc)
                outcome.exception()  # retrieved: nobody may have joined
            raise
        else:
            outcome.set_result(result)
            return result
        finally:
            del self._calls[request_id]

    async def _invoke(
        self, ns: str, name: str, version: int, body: bytes, *, request_id: str, deadline: float,
        uid: str | None,
    ) -> InvocationResult:
        spec = await self.catalog.version(ns, name, version, uid=uid)
        if spec.kind == "app":  # its hosts answer /_/app requests only (an event queued for it, a destination)
            raise InvalidRequest(f"{name!r} is a web app: it takes HTTP requests at /app/{name}/, not events")
        key = spec.key
        started = time.perf_counter()
        while True:
            pool = self._pool(key)
            inst, cold = await self._acquire(pool, key, spec, deadline)
            called = time.perf_counter()
            try:
                outcome = await self._call(inst, spec, body, request_id=request_id, deadline=deadline)
            finally:
                pool.release(inst)
            if outcome is None:  # never delivered: try another instance
                continue
            ended = time.perf_counter()
            pool.observe(ended - called)
            if outcome.retire:
                self._drop(pool, inst, reason="instance retired itself")
            return self._finish(spec, inst, outcome, request_id=request_id, cold=cold, total_ms=(ended - started) * 1000)

    async def app_request(
        self, ns: str, name: str, version: int, *, method: str, path: str, query: bytes,
        headers: list[tuple[str, str]], body: bytes | AsyncIterable[bytes], deadline: float, uid: str | None,
    ) -> tuple[HopResponse, Callable[[], None]]:  # fmt: skip
        """Send one request of a web app to one of its instances, its body and answer streamed.

        Returns the instance's response (its body still to be read) and the function that gives the
        instance's slot back, to be called once that body is relayed or given up.  A request no
        instance received, with none of its body read yet, goes to another instance; any other
        failure is answered, never retried (the app may have acted on it)."""
        spec = await self.catalog.version(ns, name, version, uid=uid)
        if spec.kind != "app":
            raise NotFound(f"{name!r} is a function, not an app: call it at /v1/functions/{name}/invoke")
        key = spec.key
        stream = body if isinstance(body, bytes) else ReadOnce(body)
        while True:
            pool = self._pool(key)
            inst, _ = await self._acquire(pool, key, spec, deadline)
            inst.invocations += 1
            try:
                resp = await inst.client.request(
                    method, inst.base_url + wire.host_app_request(path, query), body=stream,
                    headers=[*headers, (wire.DEADLINE_MS, wire.deadline_header(deadline))],
                    timeout_s=max(deadline - time.time(), 0.001), stream=True,
                )  # fmt: skip
            except NotDelivered as exc:
                pool.release(inst)
                self._drop(pool, inst, reason=f"unreachable ({exc})")
                if isinstance(stream, ReadOnce) and stream.started:
                    raise InstanceStartError(f"the instance went away while the request was sent: {exc}") from exc
                continue
            except HopTimeout as exc:
                pool.release(inst)
                raise FunctionTimeout(f"the app did not answer within its timeout of {spec.timeout_s:g} s") from exc
            except ConnectionBroken as exc:
                pool.release(inst)
                self._drop(pool, inst, reason=f"connection broke during a request ({exc})")
                raise InstanceStartError(
                    f"the app's instance stopped answering during the request: {exc}", error_type="InstanceCrashed"
                ) from exc
            except BaseException:  # cancelled (the caller went away): the slot is given back all the same
                pool.release(inst)
                raise
            released = False

            def release(pool: FunctionPool = pool, inst: WarmInstance = inst) -> None:
                nonlocal released
                if not released:
                    released = True
                    pool.release(inst)

            return resp, release

    async def _acquire(
        self, pool: FunctionPool, key: VersionKey, spec: VersionSpec, deadline: float
    ) -> tuple[WarmInstance, bool]:
        inst = pool.pick(self.instance_load)
        if inst is not None:
            return inst, inst.invocations == 0
        if pool.at_max(spec.max_instances):
            capacity = spec.max_instances * spec.concurrency
            retry_after = pool.admit(
                capacity=capacity,
                max_waiters=capacity * self.settings.max_waiters_per_slot,
                remaining_s=deadline - time.time(),
                timeout_s=spec.timeout_s,
            )
            if retry_after:
                raise TooManyRequests(
                    f"function {spec.function!r} is at its max_instances ({spec.max_instances}) and "
                    f"{len(pool.waiters)} calls already wait for a slot; retry in {retry_after} s",
                    retry_after_s=retry_after,
                )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WarmInstance] = loop.create_future()
        pool.waiters.append(waiter)
        if pool.wants_start(spec.concurrency, spec.max_instances):
            pool.pending_starts += 1
            self.tasks.spawn(self._request_instance(pool, key, spec, deadline), name=f"acquire:{spec.function}")
        remaining = deadline - time.time()
        taken = False
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                inst = await waiter
            taken = True
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"no instance of {spec.function!r} became available before the deadline"
            ) from exc
        finally:
            if not taken:  # timed out, cancelled, or failed: leave the queue, give back a slot handed over
                pool.abandon(waiter)
        return inst, inst.invocations == 0

    async def _request_instance(self, pool: FunctionPool, key: VersionKey, spec: VersionSpec, deadline: float) -> None:
        try:
            record = await self.scheduler.acquire(key, deadline)
        except TooManyRequests as exc:
            # At max instances (of the version, or of its namespace): waiters get slots as calls
            # finish; with no instance here and no other start under way that could serve them, they
            # get the 429 now instead of at their deadline.  (``pending_starts`` still counts this one.)
            if not pool.instances and pool.pending_starts <= 1:
                pool.fail_waiters(exc)
            return
        except FaasError as exc:
            if not pool.instances:
                pool.fail_waiters(exc)
            return
        finally:
            pool.pending_starts -= 1
        self._add_instance(pool, record)
        # Waiters that remain beyond what is being started may need one more instance.
        if pool.wants_start(spec.concurrency, spec.max_instances):
            pool.pending_starts += 1
            self.tasks.spawn(self._request_instance(pool, key, spec, deadline), name=f"acquire:{spec.function}")

    async def _call(
        self, inst: WarmInstance, spec: VersionSpec, body: bytes, *, request_id: str, deadline: float
    ) -> _Outcome | None:
        """Send one invocation; None means it was not delivered (safe to retry elsewhere)."""
        timeout = min(spec.timeout_s + TIMEOUT_GRACE_S, max(deadline - time.time(), 0.001))
        pool = self._pool(spec.key)
        inst.invocations += 1
        try:
            resp = await inst.client.post(
                inst.base_url + "/_/invoke",
                body=body,
                headers={wire.REQUEST_ID: request_id, wire.DEADLINE_MS: wire.deadline_header(deadline)},
                timeout_s=timeout,
            )
        except NotDelivered as exc:
            self._drop(pool, inst, reason=f"unreachable ({exc})")
            return None
        except HopTimeout:
            self._drop(pool, inst, reason="did not answer within its timeout")
            err = FunctionTimeout(f"function exceeded its timeout of {spec.timeout_s:g} s")
            return _Outcome.of_error(504, err.to_body())
        except ConnectionBroken as exc:
            self._drop(pool, inst, reason=f"connection broke during an invocation ({exc})")
            return await self._crash_outcome(inst, spec)
        if resp.status in (429, 409):  # busy, retiring or not ready: it never ran the request
            if resp.status == 409:
                self._drop(pool, inst, reason="instance is not specialised")
            elif resp.headers.get("x-faas-retire") == "1":
                self._drop(pool, inst, reason="instance is retiring")
            await asyncio.sleep(0.005)
            return None
        return _Outcome.of_host(resp)

    async def _crash_outcome(self, inst: WarmInstance, spec: VersionSpec) -> _Outcome:
        """The error for a call whose instance died under it: ask its node agent why it ended."""
        exit_info: dict[str, Any] = {}
        raw = self.nodes.items.get(keys.node(inst.record.node_id))
        if raw is not None:
            node = NodeRecord.model_validate_json(raw)
            try:
                exit_info = await self.node_agents.instance_exit(node, inst.instance_id, wait_s=2.0)
            except FaasError as exc:
                log.warning("could not ask node %s why %s ended: %s", node.node_id, inst.instance_id, exc)
        if exit_info.get("oom_killed"):
            error = {
                "kind": "out_of_memory",
                "type": "MemoryError",
                "message": f"function ran out of memory (limit {spec.memory_mb} MB); its instance was replaced",
            }
            return _Outcome.of_error(500, {"error": error})
        if exit_info:
            # The node agent saw the host exit on its own during the call: the function's doing
            # (os._exit, a crash in a native extension), so it counts against its async retries.
            detail = exit_info.get("detail") or f"exit code {exit_info.get('exit_code')}"
            crash = InstanceStartError(
                f"the instance crashed during the invocation: {detail}", error_type="InstanceCrashed", fault="function"
            )
        else:
            # Nobody could say why the connection broke (no node agent answered, or the host did not
            # exit): the platform's.
            crash = InstanceStartError(
                "the instance stopped answering during the invocation", error_type="InstanceCrashed", fault="platform"
            )
        return _Outcome.of_error(502, crash.to_body())

    def _drop(self, pool: FunctionPool, inst: WarmInstance, *, reason: str) -> None:
        if pool.remove(inst.instance_id) is None:
            return
        log.warning("dropping instance %s: %s", inst.instance_id, reason)
        self.tasks.spawn(self._report_broken(inst), name=f"retire:{inst.instance_id}")

    async def _report_broken(self, inst: WarmInstance) -> None:
        await self._close_when_drained(inst)
        await self.scheduler.retire(inst.instance_id)

    def _finish(
        self, spec: VersionSpec, inst: WarmInstance, outcome: _Outcome, *, request_id: str, cold: bool,
        total_ms: float,
    ) -> InvocationResult:
        headers = {
            wire.REQUEST_ID: request_id,
            wire.VERSION: str(spec.version),
            wire.INSTANCE: inst.instance_id,
            wire.COLD: "1" if cold else "0",
            wire.DURATION_MS: outcome.duration_ms,
        }
        status = outcome.status
        kind = outcome.error_kind or "ok"
        if status != 200:
            if kind in ("function_error", "out_of_memory", "function_timeout"):
                headers[wire.FUNCTION_ERROR] = "Unhandled"
            if status == 507:
                status = 500
        self.logs.add(
            spec.namespace,
            spec.function,
            {
                "ts": time.time(),
                "request_id": request_id,
                "version": spec.version,
                "instance_id": inst.instance_id,
                "status": kind,
                "duration_ms": round(total_ms, 3),
                "output": outcome.logs,
            },
        )
        return InvocationResult(status, outcome.body, headers)


class _Outcome:
    """What an instance answered to one invocation: the caller's body untouched (the result's JSON,
    or ``{"error": ...}``), and beside it the captured output, the duration and the error's kind."""

    __slots__ = ("status", "body", "logs", "duration_ms", "error_kind", "retire")

    def __init__(
        self, status: int, body: bytes, *, logs: str = "", duration_ms: str = "0.000",
        error_kind: str | None = None, retire: bool = False,
    ) -> None:  # fmt: skip
        self.status = status
        self.body = body
        self.logs = logs
        self.duration_ms = duration_ms
        self.error_kind = error_kind
        self.retire = retire

    @classmethod
    def of_host(cls, resp: HopResponse) -> _Outcome:
        """The host's answer: ``X-Faas-Logs-Bytes`` of output, then the body (docs/contracts.md)."""
        headers = resp.headers
        body = resp.body
        try:
            logs_bytes = int(headers.get("x-faas-logs-bytes", "0"))
        except ValueError:
            logs_bytes = -1
        if not 0 <= logs_bytes <= len(body):
            error = {"kind": "platform_error", "type": "BadResponse", "message": "the instance sent a malformed answer"}
            return cls.of_error(502, {"error": error})
        logs = body[:logs_bytes].decode("utf-8", "replace") if logs_bytes else ""
        return cls(
            resp.status, body[logs_bytes:] if logs_bytes else body, logs=logs,
            duration_ms=headers.get("x-faas-duration-ms", "0.000"),
            error_kind=headers.get("x-faas-error-kind", "error") if resp.status != 200 else None,
            retire=headers.get("x-faas-retire") == "1",
        )  # fmt: skip

    @classmethod
    def of_error(cls, status: int, error_body: dict[str, Any]) -> _Outcome:
        """An error of the platform's own making (the instance timed out, or died)."""
        return cls(status, json.dumps(error_body).encode(), error_kind=str(error_body["error"]["kind"]))
