"""The scheduler: owns placement and the life of instances.

Guarantees:
- only the elected leader starts, records or reaps instances; a standby answers 503 ``not_leader``;
  every instance record is written in a transaction fenced by the leader's election revision, so a
  deposed leader cannot record anything (the instance it just started is stopped again);
- an acquire names the function's uid as well as its version; the instance is started from that
  function's version, or the call fails with 404 when the function was deleted (the catalog is
  re-read from etcd before saying so);
- concurrent acquire calls for one version share a start in flight up to the instance's concurrency
  (``StartBook``); running + starting never exceeds ``max_instances`` (429 beyond it); both count
  only instances of the same function uid; running + starting instances of a namespace never exceed
  its ``max_instances`` limit (``faas.core.namespaces``; 429 beyond it, ``min_instances`` waits);
- a start has a deadline (``cold_start_timeout_s``); a failed start surfaces the host's error; a
  node agent that refuses the connection (restarting) is skipped, and with none answering the start
  waits up to ``node_wait_s`` for one; concurrent starts count each other's memory when they place;
- the reaper (leader only, every ``reap_interval_s``) drops records of dead instances, stops instances
  idle longer than ``keepalive_s`` (keeping ``min_instances`` of each function's latest version),
  stops instances of deleted functions (an instance whose ``function_uid`` is not the uid the
  function's record has in etcd now: a function deleted and created again loses the old instances)
  and orphans no record points at, and starts instances until each latest version has
  ``min_instances``;
- the leader deletes code archives no version refers to, once older than ``archive_gc_grace_s``
  (checked every ``archive_gc_interval_s``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from faas.core import keys
from faas.core.clients import NodeClient, NodeUnreachable
from faas.core.codestore import CodeStore
from faas.core.election import Election
from faas.core.errors import (
    FaasError,
    InstanceStartError,
    NotFound,
    NotLeader,
    TooManyRequests,
    Unavailable,
)
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.models import (
    FunctionRecord,
    InstanceRecord,
    InstanceStatus,
    NodeRecord,
    VersionKey,
    VersionSpec,
)
from faas.core.namespaces import LimitsIndex
from faas.core.registry import Catalog
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.scheduler.placement import StartBook, StartTicket, pick_node

log = logging.getLogger("faas.scheduler")


class Scheduler:
    def __init__(
        self, *, settings: Settings, etcd: Etcd, election: Election, catalog: Catalog, code_store: CodeStore
    ) -> None:
        self.settings = settings
        self.etcd = etcd
        self.election = election
        self.catalog = catalog
        self.code_store = code_store
        self.instances = PrefixMirror(etcd, keys.instances_prefix())
        self.nodes = PrefixMirror(etcd, keys.nodes_prefix())
        self.limits = LimitsIndex(etcd, settings)
        self.book = StartBook()
        self.node_agents = NodeClient(timeout_s=settings.cold_start_timeout_s, internal_token=settings.internal_token)
        self.tasks = TaskSet("scheduler")
        self._orphan_suspects: set[str] = set()
        self._starting_mb: dict[str, int] = defaultdict(int)  # memory of starts under way, per node

    async def start(self) -> None:
        self.instances.start()
        self.nodes.start()
        self.limits.start()
        self.catalog.start()
        self.tasks.spawn(self.election.campaign_forever(), name="election", long_lived=True)
        self.tasks.spawn(self._reap_forever(), name="reaper", long_lived=True)
        self.tasks.spawn(self._collect_archives_forever(), name="archive-gc", long_lived=True)

    async def close(self) -> None:
        await self.tasks.cancel_all()
        await self.election.resign()
        await self.instances.stop()
        await self.nodes.stop()
        await self.limits.stop()
        await self.catalog.stop()
        await self.node_agents.close()

    # -- views -------------------------------------------------------------------------------

    def instance_records(self) -> list[InstanceRecord]:
        return [InstanceRecord.model_validate_json(v) for v in list(self.instances.items.values())]

    def node_records(self) -> list[NodeRecord]:
        return [NodeRecord.model_validate_json(v) for v in list(self.nodes.items.values())]

    def running(self, key: VersionKey) -> int:
        ns, name, version, uid = key
        prefix = keys.instance(ns, name, version, "")
        return sum(
            1
            for k, v in list(self.instances.items.items())
            if k.startswith(prefix) and InstanceRecord.model_validate_json(v).function_uid == uid
        )

    def namespace_at_limit(self, ns: str) -> int | None:
        """The namespace's instance limit when its running plus starting instances have reached it."""
        limit = self.limits.of(ns).max_instances
        if not limit:
            return None
        prefix = keys.instances_prefix(ns)
        running = sum(1 for k in list(self.instances.items) if k.startswith(prefix))
        starting = sum(len(tickets) for key, tickets in self.book.starting.items() if key[0] == ns)
        return limit if running + starting >= limit else None

    # -- acquire -----------------------------------------------------------------------------

    async def acquire(self, ns: str, name: str, version: int, uid: str) -> InstanceRecord:
        """Start (or share a start of) an instance of one version of the function with ``uid`` and
        return it once it serves."""
        self.election.require_leader()
        spec = await self.catalog.version(ns, name, version, uid=uid)
        key = spec.key
        ticket = self.book.join(key)
        if ticket is None:
            if self.running(key) + self.book.count(key) >= spec.max_instances:
                raise TooManyRequests(
                    f"function {name!r} version {version} is at its max_instances ({spec.max_instances})"
                )
            limit = self.namespace_at_limit(ns)
            if limit is not None:
                raise TooManyRequests(f"namespace {ns!r} runs its limit of {limit} instances")
            ticket = self.book.open(key, capacity=spec.concurrency - 1)
            self.tasks.spawn(self._fulfil(key, spec, ticket), name=f"start:{name}:{version}")
        return await asyncio.shield(ticket.future)

    async def _fulfil(self, key: VersionKey, spec: VersionSpec, ticket: StartTicket) -> None:
        try:
            record = await asyncio.wait_for(self._start_instance(spec), self.settings.cold_start_timeout_s)
        except TimeoutError:
            ticket.future.set_exception(
                InstanceStartError(
                    f"instance of {spec.function!r} did not start within {self.settings.cold_start_timeout_s:.0f} s"
                )
            )
        except FaasError as exc:
            ticket.future.set_exception(exc)
        except Exception as exc:  # never leave waiters hanging
            log.exception("start of %s failed", spec.function)
            ticket.future.set_exception(InstanceStartError(f"instance start failed: {exc}"))
        else:
            ticket.future.set_result(record)
        finally:
            self.book.close(key, ticket)
            # Mark retrieved so an exception nobody awaited is not reported as "never retrieved".
            if ticket.future.done() and not ticket.future.cancelled():
                ticket.future.exception()

    async def _start_instance(self, spec: VersionSpec) -> InstanceRecord:
        """Place and start one instance; waits up to ``node_wait_s`` for a node agent that answers.

        A node agent that refuses the connection (restarting) is skipped for this start and tried
        again after the others; with none reachable the start waits, so a node agent restart delays
        cold starts instead of failing them."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.node_wait_s
        unreachable: dict[str, str] = {}
        while True:
            nodes = [n for n in self.node_records() if n.node_id not in unreachable]
            chosen = self._place(nodes, spec) if nodes else None
            if chosen is not None:
                try:
                    return await self._start_on(chosen, spec)
                except NodeUnreachable as exc:
                    unreachable[chosen.node_id] = str(exc)
                    continue
            if loop.time() >= give_up_at:
                if unreachable:
                    raise Unavailable("no node agent answers: " + "; ".join(unreachable.values()))
                if not self.node_records():
                    raise Unavailable("no node agent is registered")
                raise Unavailable(f"no node has {spec.memory_mb} MB of free memory")
            # A restarting agent re-registers (or answers again) shortly: look again then.
            unreachable.clear()
            async with self.nodes.changed:
                try:
                    await asyncio.wait_for(self.nodes.changed.wait(), 0.25)
                except TimeoutError:
                    pass

    def _place(self, nodes: list[NodeRecord], spec: VersionSpec) -> NodeRecord | None:
        reserved: dict[str, int] = defaultdict(int)
        for rec in self.instance_records():
            reserved[rec.node_id] += rec.memory_mb
        for node_id, memory_mb in self._starting_mb.items():
            reserved[node_id] += memory_mb  # concurrent starts must not all pick the same node
        for candidate in nodes:
            candidate.memory_free_mb = min(candidate.memory_free_mb, candidate.memory_total_mb - reserved[candidate.node_id])
        return pick_node(nodes, spec.memory_mb)

    async def _start_on(self, node: NodeRecord, spec: VersionSpec) -> InstanceRecord:
        instance_id = f"{spec.function}-v{spec.version}-{secrets.token_hex(4)}"
        body = {
            "instance_id": instance_id,
            "namespace": spec.namespace,
            "function": spec.function,
            "version": spec.version,
            "handler": spec.handler,
            "code_url": self.code_store.presign_get(spec.code.key),
            "sha256": spec.code.sha256,
            "size": spec.code.size,
            "memory_mb": spec.memory_mb,
            "timeout_s": spec.timeout_s,
            "concurrency": spec.concurrency,
            "environment": spec.environment,
            "function_uid": spec.function_uid,
            "kind": spec.kind,
            "readiness_path": spec.readiness_path,
        }
        self._starting_mb[node.node_id] += spec.memory_mb
        try:
            return await self._launch_and_record(node, spec, instance_id, body)
        finally:
            self._starting_mb[node.node_id] -= spec.memory_mb

    async def _launch_and_record(
        self, node: NodeRecord, spec: VersionSpec, instance_id: str, body: dict[str, object]
    ) -> InstanceRecord:
        address = await self.node_agents.start_instance(node, body)
        record = InstanceRecord(
            instance_id=instance_id,
            namespace=spec.namespace,
            function=spec.function,
            version=spec.version,
            node_id=node.node_id,
            address=address,
            concurrency=spec.concurrency,
            memory_mb=spec.memory_mb,
            function_uid=spec.function_uid,
        )
        try:
            ok, _ = await self.etcd.txn(
                [self.election.fence()],
                [
                    self.etcd.op_put(
                        keys.instance(spec.namespace, spec.function, spec.version, instance_id),
                        record.model_dump_json().encode(),
                        lease=node.lease_id,
                    )
                ],
            )
        except FaasError:
            ok = False
        if not ok:
            await self._stop_on_node(node, instance_id)
            raise NotLeader("lost scheduler leadership while starting an instance")
        log.info("started %s on %s at %s", instance_id, node.node_id, address)
        return record

    async def _stop_on_node(self, node: NodeRecord, instance_id: str) -> None:
        try:
            await self.node_agents.stop_instance(node, instance_id)
        except FaasError as exc:
            log.warning("could not stop %s on %s: %s", instance_id, node.node_id, exc)

    async def retire(self, instance_id: str) -> None:
        """Remove an instance a dispatcher found broken (record first, then the process)."""
        self.election.require_leader()
        for rec in self.instance_records():
            if rec.instance_id == instance_id:
                await self._reap(rec, reason="reported broken")
                return
        raise NotFound(f"instance {instance_id!r} not found")

    # -- reaper ------------------------------------------------------------------------------

    async def _reap_forever(self) -> NoReturn:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            if not self.election.is_leader:
                continue
            try:
                await self.reap_once()
            except FaasError as exc:
                log.warning("reaper pass failed: %s", exc)
            except Exception:
                log.exception("reaper pass crashed")

    # -- code archives -----------------------------------------------------------------------

    async def _collect_archives_forever(self) -> NoReturn:
        while True:
            await asyncio.sleep(self.settings.archive_gc_interval_s)
            if not self.election.is_leader:
                continue
            try:
                deleted = await self.collect_archives_once()
            except FaasError as exc:
                log.warning("archive collection failed: %s", exc)
            except Exception:
                log.exception("archive collection crashed")
            else:
                if deleted:
                    log.info("deleted %d code archives no version refers to", deleted)

    async def collect_archives_once(self) -> int:
        """Delete the archives no version refers to, once older than ``archive_gc_grace_s``.

        References are read from etcd itself (not the watched copy), after the listing: an archive
        a version created meanwhile refers to is kept, and one stored again by a deploy in progress
        is newer than the cutoff (``CodeStore.delete_if_older`` checks just before deleting)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.archive_gc_grace_s)
        candidates = [key for key, modified in await self.code_store.list_archives() if modified < cutoff]
        if not candidates:
            return 0
        kvs, _ = await self.etcd.get_prefix(keys.all_versions_prefix())
        referenced = {VersionSpec.model_validate_json(kv.value).code.key for kv in kvs}
        deleted = 0
        for key in candidates:
            if key not in referenced and self.election.is_leader:
                deleted += await self.code_store.delete_if_older(key, cutoff)
        return deleted

    async def _reap(self, rec: InstanceRecord, *, reason: str) -> None:
        key = keys.instance(rec.namespace, rec.function, rec.version, rec.instance_id)
        ok, _ = await self.etcd.txn([self.election.fence()], [self.etcd.op_delete(key)])
        if not ok:
            raise NotLeader("lost scheduler leadership while reaping")
        log.info("reaping %s (%s)", rec.instance_id, reason)
        node = next((n for n in self.node_records() if n.node_id == rec.node_id), None)
        if node is not None:
            # Give dispatchers a moment to see the deletion before the process goes away.
            await asyncio.sleep(0.2)
            await self._stop_on_node(node, rec.instance_id)

    async def reap_once(self) -> None:
        records = self.instance_records()
        nodes = {n.node_id: n for n in self.node_records()}
        statuses: dict[str, InstanceStatus] = {}
        located: dict[str, NodeRecord] = {}
        reachable_nodes: set[str] = set()
        for node in nodes.values():
            try:
                listed = await self.node_agents.instances(node)
            except FaasError as exc:
                log.warning("node %s unreachable for the reaper: %s", node.node_id, exc)
                continue
            reachable_nodes.add(node.node_id)
            for status in listed:
                statuses[status.instance_id] = status
                located[status.instance_id] = node
        recorded = {r.instance_id for r in records}
        # Orphans: running on a node but recorded nowhere, two passes in a row (a start in flight
        # is recorded within one pass).
        suspects = {iid for iid in statuses if iid not in recorded}
        for iid in suspects & self._orphan_suspects:
            log.info("stopping orphan instance %s", iid)
            await self._stop_on_node(located[iid], iid)
        self._orphan_suspects = suspects

        by_version: dict[VersionKey, list[InstanceRecord]] = defaultdict(list)
        for rec in records:
            by_version[rec.key].append(rec)
        functions = {(f.namespace, f.name): f for f in self.catalog.functions()}
        for key, recs in by_version.items():
            ns, name, version, uid = key
            alive: list[tuple[InstanceRecord, InstanceStatus | None]] = []
            for rec in recs:
                found = statuses.get(rec.instance_id)
                if rec.node_id in reachable_nodes and (found is None or not found.alive):
                    if found is None and time.time() - rec.started_at < 5.0:
                        continue  # just recorded; the node may not list it yet
                    await self._reap(rec, reason="instance died")
                    continue
                alive.append((rec, found))
            if not alive:
                continue
            function = functions.get((ns, name))
            if function is None or function.uid != uid:
                # The watched copy may lag a deploy a moment ago: only etcd says a function is gone.
                function = await self._function_now(ns, name)
            if function is None or function.uid != uid:
                for rec, _ in alive:
                    await self._reap(rec, reason="function deleted")
                continue
            keep = 0
            if function.aliases.get("latest", function.latest_version) == version:
                try:
                    keep = (await self.catalog.version(ns, name, version, uid=uid)).min_instances
                except NotFound:
                    keep = 0
            idle = [
                (rec, st)
                for rec, st in alive
                if st is not None and st.idle_s >= self.settings.keepalive_s and st.inflight == 0
            ]
            idle.sort(key=lambda item: -(item[1].idle_s if item[1] else 0.0))
            removable = max(0, len(alive) - keep)
            for rec, _ in idle[:removable]:
                await self._reap(rec, reason=f"idle for more than {self.settings.keepalive_s:.0f} s")
        await self._ensure_min_instances()

    async def _function_now(self, ns: str, name: str) -> FunctionRecord | None:
        try:
            return await self.catalog.registry.get_function(ns, name)
        except NotFound:
            return None

    async def _ensure_min_instances(self) -> None:
        for record in self.catalog.functions():
            version = record.aliases.get("latest", record.latest_version)
            try:
                spec = await self.catalog.version(record.namespace, record.name, version, uid=record.uid)
            except NotFound:
                continue
            key = spec.key
            deficit = spec.min_instances - self.running(key) - self.book.count(key)
            for _ in range(max(0, deficit)):
                if self.namespace_at_limit(record.namespace) is not None:
                    break  # min_instances waits for room in its namespace
                ticket = self.book.open(key, capacity=0)
                self.tasks.spawn(self._fulfil(key, spec, ticket), name=f"min:{record.name}:{version}")
