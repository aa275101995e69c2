"""The node agent: one per host, runs instances through a ``RuntimeBackend``.

Guarantees:
- the node is registered at ``/faas/nodes/{id}`` under the node's lease, refreshed with its free
  memory and CPU load every ``_REPORT_INTERVAL_S``; the scheduler writes instance records under the
  same lease, so when the agent stays dead longer than the lease TTL its instances disappear from
  the routing tables;
- a restarted agent (same node id) keeps the lease its predecessor held when etcd still has it, so
  a restart within the TTL loses no record and warm calls go on; its backend adopts the healthy
  instances the predecessor left and kills the rest (see ``host_pool``); the agent then makes the
  records match: adopted instances recorded (again, under the current lease), records of this node
  that name no live instance deleted;
- when etcd says the lease is gone (the agent was cut off longer than the TTL), the agent grants a
  new one and writes the node record and every live instance's record again under it; while etcd
  is unreachable it keeps retrying, and the instances keep serving;
- an instance that exits on its own has its record deleted at once, so dispatchers stop routing to it;
- the backend evicts cached code that no instance of this node runs or is being launched with, once
  unused for ``code_cache_ttl_s`` (checked every ``code_cache_sweep_s``; see ``code_cache``);
- ``POST /v1/instances`` either returns the address of a specialised instance or an error, never a
  half-started instance (the backend destroys hosts whose specialisation failed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

from fastapi import FastAPI

from faas.core import keys
from faas.core.errors import FaasError, NotFound, Unavailable
from faas.core.etcd import Etcd, Lease
from faas.core.models import InstanceRecord, NodeRecord
from faas.core.procs import proc_usage
from faas.core.service import Backoff, Membership, etcd_from_settings, install_error_handlers, member_record
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.runtime.backend import InstanceExit, InstanceSpec, InstanceStatus, RuntimeBackend

log = logging.getLogger("faas.agent")

_REPORT_INTERVAL_S = 2.0
_MIN_USAGE_WINDOW_S = 0.5  # an instance's CPU is measured over at least this long
_RECENT_EXITS_KEPT = 1000


def machine_memory_mb() -> tuple[int, int]:
    """(total, available) memory of this machine in MB, from /proc/meminfo."""
    total = avail = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) // 1024
                elif line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) // 1024
    except OSError:
        pass
    return total, avail


async def start_backend(settings: Settings, node_id: str) -> RuntimeBackend:
    """The node's backend, started: ``process``, ``docker``, or ``auto`` (Docker if a daemon answers).

    With ``docker`` and no daemon this raises ``Unavailable`` naming the daemon: the agent then exits
    with that message instead of running functions somewhere the operator did not ask for.
    """
    from faas.runtime.process_backend import ProcessBackend

    node_dir = settings.node_dir(node_id).absolute()
    run_dir, cache_dir = node_dir / "run", node_dir / "cache"
    if settings.runtime in ("docker", "auto"):
        from faas.runtime.docker_backend import DockerBackend

        docker = DockerBackend(
            run_dir=run_dir,
            cache_dir=cache_dir,
            pool_size=settings.pool_size,
            docker_url=settings.docker_url,
            node_id=node_id,
            code_cache_ttl_s=settings.code_cache_ttl_s,
            code_cache_sweep_s=settings.code_cache_sweep_s,
            code_cache_max_bytes=settings.code_cache_max_bytes,
        )
        try:
            await docker.start()
            return docker
        except Unavailable as exc:
            if settings.runtime == "docker":
                raise
            log.warning("runtime auto: %s; running instances as local processes", exc)
    backend = ProcessBackend(
        run_dir=run_dir,
        cache_dir=cache_dir,
        pool_size=settings.pool_size,
        code_cache_ttl_s=settings.code_cache_ttl_s,
        code_cache_sweep_s=settings.code_cache_sweep_s,
        code_cache_max_bytes=settings.code_cache_max_bytes,
        isolation=settings.process_isolation,
    )
    await backend.start()
    return backend


async def node_lease(etcd: Etcd, settings: Settings, node_id: str) -> Lease:
    """The node's lease: the one its previous agent held, when etcd still has it, else a new one.

    Waits (retrying with backoff) for as long as etcd is unreachable: a node agent that cannot
    record anything has nothing to do yet."""
    backoff = Backoff()
    while True:
        lease = Lease(etcd, settings.lease_ttl_s, owner=f"node:{node_id}")
        try:
            kv = await etcd.get(keys.node(node_id))
            if kv is not None:
                previous = NodeRecord.model_validate_json(kv.value).lease_id
                if previous and await lease.adopt(previous):
                    log.info("node %s: kept the lease %x of the previous agent", node_id, previous)
                    return lease
            await lease.grant()
            return lease
        except Unavailable as exc:
            log.warning("node %s: etcd unreachable (%s); waiting for it", node_id, exc)
            await backoff.sleep()


class NodeAgent:
    def __init__(
        self, *, settings: Settings, etcd: Etcd, backend: RuntimeBackend, node_id: str, address: str, lease: Lease
    ) -> None:
        self.settings = settings
        self.etcd = etcd
        self.backend = backend
        self.node_id = node_id
        self.address = address
        self.lease = lease
        self.specs: dict[str, InstanceSpec] = {}
        self.addresses: dict[str, str] = {}
        self.recent_exits: dict[str, InstanceExit] = {}
        self._exits_changed = asyncio.Condition()
        self.tasks = TaskSet(f"agent:{node_id}")
        # instance -> (CPU seconds, when, cores since the one before) at its last measurement
        self._cpu_seen: dict[str, tuple[float, float, float]] = {}
        backend.set_exit_callback(self._on_instance_exit)

    def _instance_usage(self) -> tuple[dict[str, float], dict[str, float]]:
        """Each instance's CPU (cores, since the last report) and resident memory (MiB)."""
        try:
            pids = self.backend.usage_pids()
        except Exception:  # noqa: BLE001 - a report without usage is better than none
            log.exception("cannot list the instances' processes")
            return {}, {}
        now = time.monotonic()
        cpu: dict[str, float] = {}
        rss: dict[str, float] = {}
        for instance_id, members in pids.items():
            used = [u for u in map(proc_usage, members) if u is not None]
            if not used:
                continue
            cpu_s = sum(u[0] for u in used)
            rss[instance_id] = round(sum(u[1] for u in used) / (1024 * 1024), 1)
            last = self._cpu_seen.get(instance_id)
            if last is not None and now - last[1] < _MIN_USAGE_WINDOW_S:
                cpu[instance_id] = last[2]  # a second record moments after the last: its figure stands
                continue
            cores = round((cpu_s - last[0]) / (now - last[1]), 3) if last is not None and cpu_s >= last[0] else 0.0
            cpu[instance_id] = cores
            self._cpu_seen[instance_id] = (cpu_s, now, cores)
        for gone in set(self._cpu_seen) - set(pids):
            del self._cpu_seen[gone]
        return cpu, rss

    def node_record(self, runtime_error: str = "") -> NodeRecord:
        total, avail = machine_memory_mb()
        cpu, rss = self._instance_usage()
        if self.settings.node_memory_mb:
            total = avail = self.settings.node_memory_mb
        return NodeRecord(
            node_id=self.node_id,
            address=self.address,
            lease_id=self.lease.lease_id,
            runtime=self.backend.name,
            isolation=getattr(self.backend, "isolation", ""),
            memory_total_mb=total,
            memory_free_mb=avail,
            cpu_load=os.getloadavg()[0] / (os.cpu_count() or 1),
            instances=len(self.specs),
            runtime_error=runtime_error,
            instance_cpu=cpu,
            instance_rss_mb=rss,
        )

    async def start(self) -> None:
        """Record what the backend adopted, drop stale records, register the node (retrying)."""
        for spec, address in self.backend.adopted():
            self.specs[spec.instance_id] = spec
            self.addresses[spec.instance_id] = address
        backoff = Backoff()
        while True:
            try:
                # The lease can lapse before the node is recorded at all (a backend slow to start on
                # a busy machine): a put under it would fail forever.
                await self._renew_lease_if_lost()
                await self._reconcile_records()
                await self._put_node_record()
                break
            except Unavailable as exc:
                log.warning("node %s: cannot record itself yet: %s", self.node_id, exc)
                await backoff.sleep()
        self.tasks.spawn(self._report_forever(), name="report", long_lived=True)

    async def _renew_lease_if_lost(self) -> bool:
        """Grant a new lease if etcd said the current one is gone (True); raises ``Unavailable``."""
        if not self.lease.lost.is_set():
            return False
        log.warning("node %s: lease gone; recording the node and its instances again", self.node_id)
        await self.lease.release()
        fresh = Lease(self.etcd, self.settings.lease_ttl_s, owner=f"node:{self.node_id}")
        await fresh.grant()
        self.lease = fresh
        return True

    async def _put_node_record(self, runtime_error: str = "") -> None:
        record = self.node_record(runtime_error)
        await self.etcd.put(keys.node(self.node_id), record.model_dump_json().encode(), lease=self.lease.lease_id)

    def _instance_record(self, spec: InstanceSpec) -> InstanceRecord:
        return InstanceRecord(
            instance_id=spec.instance_id,
            namespace=spec.namespace,
            function=spec.function,
            version=spec.version,
            node_id=self.node_id,
            address=self.addresses[spec.instance_id],
            concurrency=spec.concurrency,
            memory_mb=spec.memory_mb,
            function_uid=spec.function_uid,
        )

    async def _reconcile_records(self) -> None:
        """Make etcd's instance records of this node match the instances it runs.

        A live instance whose record is missing or under another lease is recorded under the current
        one (create-if-absent, or compare on the record's revision, so a concurrent reap wins); a
        record of this node naming no live instance is deleted."""
        kvs, _ = await self.etcd.get_prefix(keys.instances_prefix())
        recorded: dict[str, tuple[bytes, int, int]] = {}
        for kv in kvs:
            rec = InstanceRecord.model_validate_json(kv.value)
            if rec.node_id == self.node_id:
                recorded[rec.instance_id] = (kv.key, kv.mod_revision, kv.lease)
        for instance_id, (key, _, _) in recorded.items():
            if instance_id not in self.specs:
                log.info("node %s: deleting the record of %s, which no longer runs here", self.node_id, instance_id)
                await self.etcd.delete(key)
        for instance_id, spec in list(self.specs.items()):
            found = recorded.get(instance_id)
            if found is not None and found[2] == self.lease.lease_id:
                continue
            key = keys.instance(spec.namespace, spec.function, spec.version, instance_id)
            guard = self.etcd.mod_revision(key) == found[1] if found else self.etcd.create_revision(key) == 0
            value = self._instance_record(spec).model_dump_json().encode()
            ok, _ = await self.etcd.txn([guard], [self.etcd.op_put(key, value, lease=self.lease.lease_id)])
            if ok:
                log.info("node %s: recorded instance %s under lease %x", self.node_id, instance_id, self.lease.lease_id)

    async def close(self) -> None:
        await self.tasks.cancel_all()
        await self.backend.close()
        try:
            await self.etcd.delete(keys.node(self.node_id))
        except FaasError:
            pass
        await self.lease.revoke()

    async def _report_forever(self) -> NoReturn:
        while True:
            await asyncio.sleep(_REPORT_INTERVAL_S)
            try:
                if await self._renew_lease_if_lost():
                    await self._put_node_record()
                    await self._reconcile_records()
                runtime_error = ""
                try:
                    await self.backend.check()
                except Unavailable as exc:
                    runtime_error = exc.message
                    log.warning("runtime backend unavailable: %s", runtime_error)
                await self._put_node_record(runtime_error)
            except FaasError as exc:
                log.warning("node report failed: %s", exc)

    async def launch(self, spec: InstanceSpec) -> str:
        address = await self.backend.launch(spec, timeout_s=self.settings.cold_start_timeout_s)
        self.specs[spec.instance_id] = spec
        self.addresses[spec.instance_id] = address
        return address

    async def stop(self, instance_id: str) -> None:
        spec = self.specs.pop(instance_id, None)
        self.addresses.pop(instance_id, None)
        await self.backend.stop(instance_id)
        if spec is not None:
            # Normally the scheduler deleted it before asking; this covers a record written again
            # (by a reconcile) in between.
            try:
                await self.etcd.delete(keys.instance(spec.namespace, spec.function, spec.version, instance_id))
            except FaasError as exc:
                log.warning("could not delete the record of %s: %s", instance_id, exc)

    async def _on_instance_exit(self, exit: InstanceExit) -> None:
        async with self._exits_changed:
            self.recent_exits[exit.instance_id] = exit
            while len(self.recent_exits) > _RECENT_EXITS_KEPT:
                self.recent_exits.pop(next(iter(self.recent_exits)))
            self._exits_changed.notify_all()
        spec = self.specs.pop(exit.instance_id, None)
        self.addresses.pop(exit.instance_id, None)
        if spec is None:
            return
        log.info("instance %s exited (%s); removing its record", exit.instance_id, exit.detail)
        try:
            await self.etcd.delete(keys.instance(spec.namespace, spec.function, spec.version, exit.instance_id))
        except FaasError as exc:
            log.warning("could not delete the record of %s: %s", exit.instance_id, exc)

    async def wait_exit(self, instance_id: str, wait_s: float) -> InstanceExit:
        """How an instance ended, waiting up to ``wait_s`` for its exit to be noticed."""
        async with self._exits_changed:
            try:
                await asyncio.wait_for(
                    self._exits_changed.wait_for(lambda: instance_id in self.recent_exits), wait_s
                )
            except TimeoutError:
                raise NotFound(f"instance {instance_id!r} has not exited") from None
            return self.recent_exits[instance_id]


def build_app(settings: Settings, member_id: str, address: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        etcd = etcd_from_settings(settings)
        await etcd.connect()
        # The lease first: a restarted agent keeps its predecessor's (and so its instance records)
        # only if it refreshes it before the TTL runs out.
        lease = await node_lease(etcd, settings, member_id)
        backend = await start_backend(settings, member_id)
        agent = NodeAgent(
            settings=settings, etcd=etcd, backend=backend, node_id=member_id, address=address, lease=lease
        )
        membership = Membership(
            etcd, member_record("node", member_id, address), settings.lease_ttl_s
        )
        tasks = TaskSet("agent-app")
        await agent.start()
        tasks.spawn(membership.keep_forever(), name="membership", long_lived=True)
        app.state.agent = agent
        try:
            yield
        finally:
            await tasks.cancel_all()
            await membership.deregister()
            await agent.close()
            await etcd.close()

    app = FastAPI(title="faas node agent", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"ok": True, "runtime": app.state.agent.backend.name}

    @app.post("/v1/instances")
    async def launch(spec: InstanceSpec) -> dict[str, str]:
        return {"address": await app.state.agent.launch(spec)}

    @app.delete("/v1/instances/{instance_id}", status_code=204)
    async def stop(instance_id: str) -> None:
        await app.state.agent.stop(instance_id)

    @app.get("/v1/instances/{instance_id}/exit")
    async def instance_exit(instance_id: str, wait_s: float = 0.0) -> InstanceExit:
        """How an instance ended on its own (404 if it has not, within ``wait_s``)."""
        return await app.state.agent.wait_exit(instance_id, min(max(wait_s, 0.0), 10.0))

    @app.get("/v1/instances")
    async def list_instances() -> list[InstanceStatus]:
        return await app.state.agent.backend.list_instances()

    return app
