"""HTTP face of a dispatcher (internal contract, see docs/contracts.md)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from faas.core import keys, wire
from faas.core.etcd import PrefixMirror
from faas.core.hop_server import Request, Response, app_body, app_headers, released_after
from faas.core.queue import InvocationQueue
from faas.core.registry import Catalog
from faas.core.service import (
    Membership,
    etcd_from_settings,
    hot_routes,
    install_error_handlers,
    member_record,
    redis_from_settings,
)
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.dispatcher.consumer import RECORDS_PER_TRANSACTION, AsyncConsumer
from faas.dispatcher.service import Dispatcher


def build_app(settings: Settings, member_id: str, address: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        etcd = etcd_from_settings(settings)
        await etcd.connect()
        redis = redis_from_settings(settings)
        dispatcher = Dispatcher(settings=settings, etcd=etcd, catalog=Catalog(etcd), redis=redis)
        membership = Membership(
            etcd, member_record("dispatcher", member_id, address), settings.lease_ttl_s
        )
        tasks = TaskSet("dispatcher-app")
        tasks.spawn(membership.keep_forever(), name="membership", long_lived=True)
        await dispatcher.start()
        peers = PrefixMirror(etcd, keys.members_prefix("dispatcher"))
        peers.start()

        def live_consumers() -> set[str]:
            return {key.decode().rsplit("/", 1)[-1] for key in list(peers.items)}

        consumer = AsyncConsumer(
            settings=settings,
            queue=InvocationQueue(
                redis, status_ttl_s=settings.invocation_ttl_s, group_records=RECORDS_PER_TRANSACTION
            ),
            dispatcher=dispatcher,
            consumer_id=member_id,
            live_consumers=live_consumers,
        )
        await peers.wait_ready(timeout_s=None)
        tasks.spawn(consumer.run_forever(), name="async-consumer", long_lived=True)
        app.state.dispatcher = dispatcher
        try:
            yield
        finally:
            await tasks.cancel_all()
            await consumer.close()
            await peers.stop()
            await membership.deregister()
            await dispatcher.close()
            await redis.aclose()
            await etcd.close()

    app = FastAPI(title="faas dispatcher", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"ok": True}

    @app.get("/v1/pools")
    async def pools() -> dict[str, object]:
        """The versions this dispatcher keeps a table of instances for (an operator's view)."""
        dispatcher: Dispatcher = app.state.dispatcher
        return {
            "pools": [
                {"namespace": ns, "function": name, "version": version, "function_uid": uid,
                 "instances": len(pool.instances), "waiters": len(pool.waiters),
                 "pending_starts": pool.pending_starts, "call_ms": round(pool.call_s * 1000, 3)}
                for (ns, name, version, uid), pool in list(dispatcher.pools.items())
            ]
        }  # fmt: skip

    async def invoke(request: Request) -> Response:
        # A hot route: served by the hop server itself, not through FastAPI.
        dispatcher: Dispatcher = app.state.dispatcher
        params = request.params
        headers = request.headers
        deadline = wire.deadline_from_header(
            headers.get(wire.DEADLINE_MS), cold_start_timeout_s=settings.cold_start_timeout_s
        )
        result = await dispatcher.invoke(
            params["ns"], params["name"], params["version"], await request.body.read(),
            request_id=headers.get(wire.REQUEST_ID) or uuid.uuid4().hex, deadline=deadline,
            uid=headers.get(wire.FUNCTION_UID),
        )  # fmt: skip
        return Response(result.status, result.body, result.headers)

    hot_routes(app).add("POST", wire.DISPATCHER_INVOKE_ROUTE, invoke)

    async def app_request(request: Request) -> Response:
        """A web app's request: to one of its instances, streamed both ways (a hot route)."""
        dispatcher: Dispatcher = app.state.dispatcher
        params = request.params
        deadline = wire.deadline_from_header(
            request.headers.get(wire.DEADLINE_MS), cold_start_timeout_s=settings.cold_start_timeout_s
        )
        resp, release = await dispatcher.app_request(
            params["ns"], params["name"], params["version"], method=request.method, path=params["path"] or "/",
            query=request.query, headers=app_headers(request), body=app_body(request), deadline=deadline,
            uid=request.headers.get(wire.FUNCTION_UID),
        )  # fmt: skip
        return await released_after(resp, release, head_request=request.method == "HEAD")

    for method in wire.APP_METHODS:
        hot_routes(app).add(method, wire.APP_ROUTE, app_request)

    return app
