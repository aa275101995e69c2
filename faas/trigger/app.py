"""HTTP face of a trigger (internal contract, see docs/contracts.md)."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from faas.core import redis_keys, wire
from faas.core.election import Election
from faas.core.hop_server import Request, Response, app_body, app_headers, json_response, relay, relay_app
from faas.core.queue import AsyncEnvelope, EnqueueBatcher, InvocationQueue
from faas.core.registry import Catalog
from faas.core.service import (
    Membership,
    etcd_from_settings,
    hot_routes,
    install_error_handlers,
    local_address,
    member_record,
    redis_from_settings,
)
from faas.core.settings import Settings
from faas.core.subscriptions import SubscriptionIndex
from faas.core.tasks import TaskSet
from faas.trigger.service import Trigger
from faas.trigger.sources import EventSources

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_context(traceparent: str | None) -> str | None:
    """The caller's W3C ``traceparent``, if well formed (a malformed one starts no trace, per the spec)."""
    return traceparent if traceparent and _TRACEPARENT.fullmatch(traceparent) else None


class EnqueueItem(BaseModel):
    namespace: str
    function: str
    version: int
    payload: str  # the event, as JSON text
    id: str | None = None
    source: dict[str, Any] | None = None
    function_uid: str | None = None


class EnqueueBatch(BaseModel):
    events: list[EnqueueItem] = Field(max_length=1000)


def build_app(settings: Settings, member_id: str, address: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        etcd = etcd_from_settings(settings)
        await etcd.connect()
        election = Election(
            etcd, role="trigger", member_id=member_id, address=address, ttl_s=settings.lease_ttl_s,
            probe_leader=True, local_address=local_address("trigger", member_id),
        )
        trigger = Trigger(settings=settings, etcd=etcd, election=election)
        membership = Membership(
            etcd,
            member_record("trigger", member_id, address),
            settings.lease_ttl_s,
        )
        redis = redis_from_settings(settings)
        app.state.queue = InvocationQueue(redis, status_ttl_s=settings.invocation_ttl_s)
        app.state.enqueuer = EnqueueBatcher(app.state.queue)  # async invocations' group commit
        catalog = Catalog(etcd)
        catalog.start()
        subscriptions = SubscriptionIndex(etcd)
        subscriptions.start()
        sources = EventSources(
            etcd=etcd,
            election=election,
            redis=redis,
            queue=app.state.queue,
            catalog=catalog,
            index=subscriptions,
        )
        tasks = TaskSet("trigger-app")
        # Registers as soon as etcd answers; the copies below wait for etcd as long as it is away.
        tasks.spawn(membership.keep_forever(), name="membership", long_lived=True)
        tasks.spawn(app.state.enqueuer.run_forever(), name="enqueue-batcher", long_lived=True)
        await trigger.start()
        await catalog.wait_ready(timeout_s=None)
        await subscriptions.wait_ready(timeout_s=None)
        tasks.spawn(sources.run_forever(), name="event-sources", long_lived=True)
        app.state.trigger = trigger
        try:
            yield
        finally:
            await tasks.cancel_all()
            await sources.close()
            await subscriptions.stop()
            await catalog.stop()
            await membership.deregister()
            await trigger.close()
            await redis.aclose()
            await etcd.close()

    app = FastAPI(title="faas trigger", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        trigger: Trigger = app.state.trigger
        return {"ok": True, "primary": trigger.election.is_leader}

    async def invoke(request: Request) -> Response:
        # A hot route: served by the hop server itself, not through FastAPI.
        trigger: Trigger = app.state.trigger
        params = request.params
        headers = request.headers
        deadline = wire.deadline_from_header(
            headers.get(wire.DEADLINE_MS), cold_start_timeout_s=settings.cold_start_timeout_s
        )
        resp = await trigger.invoke_sync(
            params["ns"],
            params["name"],
            params["version"],
            await request.body.read(),
            request_id=headers.get(wire.REQUEST_ID) or uuid.uuid4().hex,
            deadline=deadline,
            uid=headers.get(wire.FUNCTION_UID),
        )
        return await relay(resp)

    hot_routes(app).add("POST", wire.TRIGGER_INVOKE_ROUTE, invoke)

    async def app_request(request: Request) -> Response:
        """A web app's request, relayed to a dispatcher and back, streamed (a hot route)."""
        trigger: Trigger = app.state.trigger
        params = request.params
        deadline = wire.deadline_from_header(
            request.headers.get(wire.DEADLINE_MS), cold_start_timeout_s=settings.cold_start_timeout_s
        )
        resp = await trigger.app_request(
            params["ns"], params["name"], params["version"], method=request.method, path=params["path"] or "/",
            query=request.query, headers=app_headers(request), body=app_body(request), deadline=deadline,
        )  # fmt: skip
        return await relay_app(resp, head_request=request.method == "HEAD")

    for method in wire.APP_METHODS:
        hot_routes(app).add(method, wire.APP_ROUTE, app_request)

    async def invoke_async(request: Request) -> Response:
        """Write the event durably to the queue, then answer 202 (only the primary does)."""
        trigger: Trigger = app.state.trigger
        trigger.election.require_serving()
        params = request.params
        env = AsyncEnvelope(
            id=request.headers.get(wire.REQUEST_ID) or uuid.uuid4().hex,
            namespace=params["ns"],
            function=params["name"],
            version=params["version"],
            payload=(await request.body.read()).decode(),
            headers={h: request.headers[h] for h in wire.ENVELOPE_HEADERS if h in request.headers},
            trace=trace_context(request.headers.get("traceparent")),
            function_uid=request.headers.get(wire.FUNCTION_UID),
        )
        queue: EnqueueBatcher = app.state.enqueuer
        idempotency_key = request.headers.get(wire.IDEMPOTENCY_KEY)
        if idempotency_key:
            scope = redis_keys.idempotency_scope(
                env.namespace, env.function, idempotency_key, env.function_uid or ""
            )
            existing = await queue.enqueue_once(env, scope, settings.idempotency_window_s)
            if existing is not None:
                return json_response({"id": existing, "status": "duplicate"}, 202)
        else:
            # Idempotent by invocation id: the gateway re-sends a call whose trigger died or froze
            # with the same id, and the first send may have been applied.
            await queue.enqueue_new(env)
        return json_response({"id": env.id, "status": "queued"}, 202)

    hot_routes(app).add("POST", wire.TRIGGER_INVOKE_ASYNC_ROUTE, invoke_async)

    @app.post(wire.TRIGGER_ENQUEUE, status_code=202)
    async def enqueue_events(batch: EnqueueBatch) -> dict[str, Any]:
        """Queue events for several functions in one transaction (event fan-out): all or none."""
        trigger: Trigger = app.state.trigger
        trigger.election.require_serving()
        envs = [
            AsyncEnvelope(id=item.id or uuid.uuid4().hex, namespace=item.namespace, function=item.function,
                          version=item.version, payload=item.payload, source=item.source,
                          function_uid=item.function_uid)
            for item in batch.events
        ]  # fmt: skip
        if envs:
            await app.state.queue.enqueue_many(envs)
        return {"invocations": [{"id": e.id, "function": e.function, "version": e.version} for e in envs]}

    return app
