"""The node agent: one per host, runs instances through a ``RuntimeBackend``.

Guarantees:
- the node is registered at ``/faas/nodes/{id}`` under the node's lease, refreshed with its free
  memory and CPU load every ``_REPORT_INTERVAL_S``; the scheduler writes instance records under the
  same lease, so when the agent dies its instances disappear from the routing tables;
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

from fastapi import FastAPI

from faas.core import keys
from faas.core.errors import FaasError, NotFound, Unavailable
from faas.core.etcd import Etcd, Lease
from faas.core.models import MemberRecord, NodeRecord
from faas.core.service import Membership, etcd_from_settings, install_error_handlers
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.runtime.backend import InstanceExit, InstanceSpec, InstanceStatus, RuntimeBackend

log = logging.getLogger("faas.agent")

_REPORT_INTERVAL_S = 2.0
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

    run_dir, cache_dir = settings.run_dir.absolute(), settings.code_cache_dir.absolute()
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
    )
    await backend.start()
    return backend


class NodeAgent:
    def __init__(self, *, settings: Settings, etcd: Etcd, backend: RuntimeBackend, node_id: str, address: str) -> None:
        self.settings = settings
        self.etcd = etcd
        self.backend = backend
        self.node_id = node_id
        self.address = address
        self.lease = Lease(etcd, settings.lease_ttl_s, owner=f"node:{node_id}")
        self.specs: dict[str, InstanceSpec] = {}
        self.recent_exits: dict[str, InstanceExit] = {}
        self._exits_changed = asyncio.Condition()
        self.tasks = TaskSet(f"agent:{node_id}")
        backend.set_exit_callback(self._on_instance_exit)

    def node_record(self, runtime_error: str = "") -> NodeRecord:
        total, avail = machine_memory_mb()
        if self.settings.node_memory_mb:
            total = avail = self.settings.node_memory_mb
        return NodeRecord(
            node_id=self.node_id,
            address=self.address,
            lease_id=self.lease.lease_id,
            runtime=self.backend.name,
            memory_total_mb=total,
            memory_free_mb=avail,
            cpu_load=os.getloadavg()[0] / (os.cpu_count() or 1),
            instances=len(self.specs),
            runtime_error=runtime_error,
        )

    async def start(self) -> None:
        await self.lease.grant()
        await self.etcd.put(keys.node(self.node_id), self.node_record().model_dump_json().encode(), lease=self.lease.lease_id)
        self.tasks.spawn(self._report_forever(), name="report", long_lived=True)

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
                if self.lease.lost.is_set():
                    await self.lease.revoke()
                    self.lease = Lease(self.etcd, self.settings.lease_ttl_s, owner=f"node:{self.node_id}")
                    await self.lease.grant()
                runtime_error = ""
                try:
                    await self.backend.check()
                except Unavailable as exc:
                    runtime_error = exc.message
                    log.warning("runtime backend unavailable: %s", runtime_error)
                record = self.node_record(runtime_error)
                await self.etcd.put(keys.node(self.node_id), record.model_dump_json().encode(), lease=self.lease.lease_id)
            except FaasError as exc:
                log.warning("node report failed: %s", exc)

    async def launch(self, spec: InstanceSpec) -> str:
        address = await self.backend.launch(spec, timeout_s=self.settings.cold_start_timeout_s)
        self.specs[spec.instance_id] = spec
        return address

    async def stop(self, instance_id: str) -> None:
        self.specs.pop(instance_id, None)
        await self.backend.stop(instance_id)

    async def _on_instance_exit(self, exit: InstanceExit) -> None:
        async with self._exits_changed:
            self.recent_exits[exit.instance_id] = exit
            while len(self.recent_exits) > _RECENT_EXITS_KEPT:
                self.recent_exits.pop(next(iter(self.recent_exits)))
            self._exits_changed.notify_all()
        spec = self.specs.pop(exit.instance_id, None)
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
        backend = await start_backend(settings, member_id)
        agent = NodeAgent(settings=settings, etcd=etcd, backend=backend, node_id=member_id, address=address)
        membership = Membership(
            etcd, MemberRecord(role="node", member_id=member_id, address=address, pid=os.getpid()), settings.lease_ttl_s
        )
        tasks = TaskSet("agent-app")
        await agent.start()
        await membership.register()
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
