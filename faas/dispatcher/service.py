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
from typing import Any, NoReturn

import httpx
import redis.asyncio as aioredis

from faas.core import keys, redis_keys, wire
from faas.core.election import LeaderWatch
from faas.core.errors import (
    DeadlineExceeded,
    FaasError,
    FunctionTimeout,
    InstanceStartError,
    TooManyRequests,
    error_from_body,
)
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.http import ConnectionBroken, HopTimeout, NotDelivered, for_address
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
        self.scheduler = LeaderWatch(etcd, "scheduler")
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(settings.cold_start_timeout_s, connect=3.0))
        self.logs = LogSink(redis, settings.logs_per_function)
        self.tasks = TaskSet("dispatcher")
        self._calls: dict[str, asyncio.Future[InvocationResult]] = {}  # in flight, by request id
        self._node_load: dict[str, float] = {}

    async def start(self) -> None:
        self.catalog.start()
        self.instances.start()
        self.nodes.start()
        self.scheduler.start()
        self.tasks.spawn(self.logs.run_forever(), name="logs", long_lived=True)
        self.tasks.spawn(self._sweep_pools_forever(), name="sweep-pools", long_lived=True)
        await self.instances.wait_ready(timeout_s=None)

    async def close(self) -> None:
        await self.tasks.cancel_all()
        await self.instances.stop()
        await self.nodes.stop()
        await self.scheduler.stop()
        await self.catalog.stop()
        for pool in self.pools.values():
            for inst in pool.instances.values():
                await inst.client.close()
        await self.http.aclose()

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

    def node_load(self, node_id: str) -> float:
        raw = self.nodes.items.get(keys.node(node_id))
        if raw is None:
            return 0.0
        return NodeRecord.model_validate_json(raw).cpu_load

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
            status, payload, retire = outcome
            if retire:
                self._drop(pool, inst, reason="instance retired itself")
            return self._finish(
                spec, inst, status, payload, request_id=request_id, cold=cold, total_ms=(ended - started) * 1000
            )

    async def _acquire(
        self, pool: FunctionPool, key: VersionKey, spec: VersionSpec, deadline: float
    ) -> tuple[WarmInstance, bool]:
        inst = pool.pick(self.node_load)
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
            record = await self._ask_scheduler(key, deadline)
        except TooManyRequests:
            return  # at max instances: waiters get slots as calls finish
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

    async def _ask_scheduler(self, key: VersionKey, deadline: float) -> InstanceRecord:
        ns, name, version, uid = key
        tried_address: str | None = None
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"the scheduler did not start an instance of {name!r} before the deadline")
            leader = await self.scheduler.wait_for_leader(min(remaining, 10.0), not_address=tried_address)
            try:
                resp = await self._unless_leader_changes(
                    self.http.post(
                        leader.address + wire.scheduler_acquire(ns, name, version),
                        params={"uid": uid},
                        timeout=max(remaining, 0.01),
                    ),
                    leader.address,
                )
            except _LeaderChanged:
                # The leader we asked froze or died and another was elected: ask the new one.  A frozen
                # one that wakes up later cannot record its start (fenced) and stops that instance.
                log.warning("scheduler leader changed while starting %s; asking the new one", name)
                continue
            except httpx.TimeoutException as exc:
                raise DeadlineExceeded(f"starting an instance of {name!r} took longer than the deadline") from exc
            except httpx.HTTPError:
                tried_address = leader.address
                await asyncio.sleep(0.1)
                continue
            if resp.status_code == 200:
                return InstanceRecord.model_validate_json(resp.content)
            exc2 = error_from_body(_json(resp), resp.status_code)
            if resp.status_code == 503 and exc2.kind == "not_leader":
                await asyncio.sleep(0.1)  # a standby or a just-elected leader: ask again shortly
                continue
            raise exc2

    async def _unless_leader_changes(self, request: Any, address: str) -> httpx.Response:
        """Await ``request`` to the scheduler leader at ``address``; ``_LeaderChanged`` if another is elected first."""
        sent = asyncio.ensure_future(request)
        changed = asyncio.ensure_future(self.scheduler.wait_for_other_leader(address))
        try:
            await asyncio.wait({sent, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            if not sent.done():
                sent.cancel()
        if sent.cancelled() or not sent.done():
            raise _LeaderChanged()
        return sent.result()

    async def _call(
        self, inst: WarmInstance, spec: VersionSpec, body: bytes, *, request_id: str, deadline: float
    ) -> tuple[int, dict[str, Any], bool] | None:
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
            return 504, {**err.to_body(), "logs": ""}, False
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
        try:
            payload = json.loads(resp.body)
        except ValueError:
            payload = {"error": {"kind": "platform_error", "type": "BadResponse", "message": "instance sent invalid JSON"}}
        return resp.status, payload, resp.headers.get("x-faas-retire") == "1"

    async def _crash_outcome(self, inst: WarmInstance, spec: VersionSpec) -> tuple[int, dict[str, Any], bool]:
        """The error for a call whose instance died under it: ask its node agent why it ended."""
        exit_info: dict[str, Any] = {}
        raw = self.nodes.items.get(keys.node(inst.record.node_id))
        if raw is not None:
            node = NodeRecord.model_validate_json(raw)
            try:
                resp = await self.http.get(
                    node.address + wire.node_instance_exit(inst.instance_id), params={"wait_s": 2.0}, timeout=5.0
                )
                if resp.status_code == 200:
                    exit_info = resp.json()
            except httpx.HTTPError as exc:
                log.warning("could not ask node %s why %s ended: %r", node.node_id, inst.instance_id, exc)
        if exit_info.get("oom_killed"):
            error = {
                "kind": "out_of_memory",
                "type": "MemoryError",
                "message": f"function ran out of memory (limit {spec.memory_mb} MB); its instance was replaced",
            }
            return 500, {"error": error, "logs": ""}, False
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
        return 502, {**crash.to_body(), "logs": ""}, False

    def _drop(self, pool: FunctionPool, inst: WarmInstance, *, reason: str) -> None:
        if pool.remove(inst.instance_id) is None:
            return
        log.warning("dropping instance %s: %s", inst.instance_id, reason)
        self.tasks.spawn(self._report_broken(inst), name=f"retire:{inst.instance_id}")

    async def _report_broken(self, inst: WarmInstance) -> None:
        await self._close_when_drained(inst)
        leader = self.scheduler.current()
        if leader is None:
            return
        try:
            await self.http.post(leader.address + wire.scheduler_retire(inst.instance_id), timeout=10.0)
        except httpx.HTTPError as exc:
            log.warning("could not report %s to the scheduler: %r", inst.instance_id, exc)

    def _finish(
        self, spec: VersionSpec, inst: WarmInstance, status: int, payload: dict[str, Any], *,
        request_id: str, cold: bool, total_ms: float,
    ) -> InvocationResult:
        headers = {
            wire.REQUEST_ID: request_id,
            wire.VERSION: str(spec.version),
            wire.INSTANCE: inst.instance_id,
            wire.COLD: "1" if cold else "0",
            wire.DURATION_MS: f"{float(payload.get('duration_ms', 0.0)):.3f}",
        }
        if status == 200:
            body = json.dumps(payload.get("result")).encode()
            outcome = "ok"
        else:
            error = payload.get("error") or {}
            outcome = str(error.get("kind", "error"))
            if outcome in ("function_error", "out_of_memory", "function_timeout"):
                headers[wire.FUNCTION_ERROR] = "Unhandled"
            if status == 507:
                status = 500
            body = json.dumps({"error": error}).encode()
        self.logs.add(
            spec.namespace,
            spec.function,
            {
                "ts": time.time(),
                "request_id": request_id,
                "version": spec.version,
                "instance_id": inst.instance_id,
                "status": outcome,
                "duration_ms": round(total_ms, 3),
                "output": payload.get("logs", ""),
            },
        )
        return InvocationResult(status, body, headers)


class _LeaderChanged(Exception):
    """Another scheduler leader was elected while a request to the previous one was outstanding."""


def _json(resp: httpx.Response) -> object:
    try:
        return resp.json()
    except ValueError:
        return resp.text

