"""HTTP face of the scheduler (internal contract, see docs/contracts.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query

from faas.core.codestore import CodeStore
from faas.core.election import Election
from faas.core.models import InstanceRecord
from faas.core.registry import Catalog
from faas.core.service import (
    Membership,
    etcd_from_settings,
    install_error_handlers,
    local_address,
    member_record,
)
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.scheduler.service import Scheduler


def build_app(settings: Settings, member_id: str, address: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        etcd = etcd_from_settings(settings)
        await etcd.connect()
        election = Election(
            etcd, role="scheduler", member_id=member_id, address=address, ttl_s=settings.lease_ttl_s,
            probe_leader=True, local_address=local_address("scheduler", member_id),
        )
        scheduler = Scheduler(
            settings=settings, etcd=etcd, election=election, catalog=Catalog(etcd), code_store=CodeStore(settings)
        )
        membership = Membership(
            etcd, member_record("scheduler", member_id, address), settings.lease_ttl_s
        )
        tasks = TaskSet("scheduler-app")
        await scheduler.start()
        # Registers as soon as etcd answers (now, or when an outage ends).
        tasks.spawn(membership.keep_forever(), name="membership", long_lived=True)
        app.state.scheduler = scheduler
        try:
            yield
        finally:
            await tasks.cancel_all()
            await membership.deregister()
            await scheduler.close()
            await etcd.close()

    app = FastAPI(title="faas scheduler", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        sched: Scheduler = app.state.scheduler
        return {"ok": True, "leader": sched.election.is_leader}

    @app.post("/v1/acquire/{ns}/{name}/{version}")
    async def acquire(
        ns: str, name: str, version: int, uid: Annotated[str, Query(description="the function's uid")]
    ) -> InstanceRecord:
        sched: Scheduler = app.state.scheduler
        return await sched.acquire(ns, name, version, uid)

    @app.post("/v1/instances/{instance_id}/retire", status_code=204)
    async def retire(instance_id: str) -> None:
        sched: Scheduler = app.state.scheduler
        await sched.retire(instance_id)

    return app
