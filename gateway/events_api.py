"""Event subscriptions (management API) and event ingestion (CloudEvents, object-store webhooks).

Guarantees:
- a subscription is checked whole (its source, its function, the version its qualifier names)
  before it is stored; a bad one gets 400/404 and nothing is written;
- an ingested request is parsed and validated whole before anything is queued: a malformed
  CloudEvent or notification gets 400 and no invocation; an oversized one gets 413;
- every invocation one request produces (one per matching subscription and event) is queued by the
  primary trigger in one transaction: all of them, or none (503, safe to retry);
- a subscription whose qualifier no longer resolves (alias or version deleted) is skipped and
  logged; it does not block delivery to the others.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request, Response
from redis.exceptions import RedisError

from faas.core import redis_keys, wire
from faas.core.clients import TriggerClient
from faas.core.errors import InvalidRequest, NotFound, PayloadTooLarge, error_from_body
from faas.core.ownership import claim
from faas.core.registry import Catalog
from faas.core.settings import Settings
from faas.core.subscriptions import (
    NamedSubscriptionSpec,
    Subscription,
    SubscriptionIndex,
    SubscriptionSpec,
    SubscriptionStore,
    check_subscription_name,
    ensure_queue_group,
    subscription_from_request,
)
from gateway.auth import caller
from gateway.cloudevents import event_matches, parse_http
from gateway.object_events import record_matches, records_from_minio, records_from_seaweedfs

log = logging.getLogger("faas.gateway.events")
MAX_FAN_OUT = 1000  # invocations one ingestion request may queue (the trigger's batch limit)

NamespaceQuery = Annotated[str | None, Query(description="namespace (default: the platform's default)")]


def install_event_routes(
    app: FastAPI,
    settings: Settings,
    *,
    namespace_of: Callable[..., str],
    check_name: Callable[[str], str],
    read_payload: Callable[..., Any],
) -> None:
    def store() -> SubscriptionStore:
        return app.state.subscriptions  # type: ignore[no-any-return]

    async def prepare_source(sub: Subscription) -> None:
        """Create a queue subscription's consumer group now, so "latest" means "from this call on"."""
        if sub.queue is not None:
            await ensure_queue_group(app.state.redis, sub)

    async def forget_sources(subs: Iterable[Subscription]) -> None:
        """Remove what deleted queue subscriptions kept in Redis: their consumer group and in-flight hash.

        Best effort (the subscription itself is already gone): an outcome recorded later for one of
        its batches still completes; only its acknowledgement at the source finds no group."""
        for sub in subs:
            if sub.queue is None:
                continue
            group = redis_keys.queue_subscription_group(sub.namespace, sub.function, sub.name)
            try:
                await app.state.redis.xgroup_destroy(sub.queue.stream, group)
                await app.state.redis.delete(redis_keys.queue_subscription_inflight(sub.namespace, sub.function, sub.name))
            except RedisError as exc:
                log.warning("could not remove the consumer group of %s: %s", sub.ref, exc)

    app.state.forget_sources = forget_sources

    async def check_target(sub: Subscription) -> None:
        if sub.object_store is not None and sub.object_store.bucket == settings.s3_bucket:
            raise InvalidRequest(f"bucket {settings.s3_bucket!r} holds the platform's code archives; use another")
        # A stream or bucket serves one namespace (faas/core/ownership.py).
        if sub.queue is not None:
            await claim(app.state.registry.etcd, "stream", sub.queue.stream, sub.namespace)
        if sub.object_store is not None:
            await claim(app.state.registry.etcd, "bucket", sub.object_store.bucket, sub.namespace)
        catalog: Catalog = app.state.catalog
        await catalog.resolve(sub.namespace, sub.function, sub.qualifier)

    # -- management ---------------------------------------------------------------------------

    @app.put("/v1/functions/{name}/subscriptions/{subscription}", tags=["events"])
    async def put_subscription(
        name: str,
        subscription: str,
        spec: SubscriptionSpec,
        response: Response,
        namespace: NamespaceQuery = None,
    ) -> Subscription:
        """Create or replace one event subscription of a function."""
        ns = namespace_of(namespace)
        sub = subscription_from_request(
            ns, check_name(name), check_subscription_name(subscription), spec, origin="api"
        )
        await check_target(sub)
        await prepare_source(sub)
        try:
            previous: Subscription | None = await store().get(ns, name, subscription)
        except NotFound:
            previous = None
        created = await store().put(sub)
        await app.state.subscription_index.refresh()  # events posted right after this call see it
        if previous is not None and not same_stream(previous, sub):
            await forget_sources([previous])
        response.status_code = 201 if created else 200
        return sub

    @app.put("/v1/functions/{name}/subscriptions", tags=["events"])
    async def replace_declared_subscriptions(
        name: str,
        subscriptions: Annotated[list[NamedSubscriptionSpec], Body(embed=True, max_length=100)],
        namespace: NamespaceQuery = None,
    ) -> dict[str, list[Subscription]]:
        """Make the function's declared (``faas.yaml``) subscriptions exactly these, in one transaction.

        Subscriptions added one by one (``faas events add``) are left alone."""
        ns = namespace_of(namespace)
        check_name(name)
        declared = []
        for spec in subscriptions:
            fields = spec.model_dump(exclude={"name"})
            sub = subscription_from_request(
                ns, name, spec.name, SubscriptionSpec(**fields), origin="manifest"
            )
            await check_target(sub)
            declared.append(sub)
        for sub in declared:
            await prepare_source(sub)
        before = {s.name: s for s in await store().list_subscriptions(ns, name) if s.origin == "manifest"}
        stored = await store().replace_declared(ns, name, declared)
        await app.state.subscription_index.refresh()
        kept = {s.name: s for s in stored}
        await forget_sources(old for n, old in before.items() if not same_stream(old, kept.get(n)))
        return {"subscriptions": stored}

    @app.get("/v1/functions/{name}/subscriptions", tags=["events"])
    async def list_function_subscriptions(
        name: str, namespace: NamespaceQuery = None
    ) -> dict[str, list[Subscription]]:
        ns = namespace_of(namespace)
        await app.state.catalog.function(ns, check_name(name))
        return {"subscriptions": await store().list_subscriptions(ns, name)}

    @app.get("/v1/subscriptions", tags=["events"])
    async def list_subscriptions(namespace: NamespaceQuery = None) -> dict[str, list[Subscription]]:
        return {"subscriptions": await store().list_subscriptions(namespace_of(namespace))}

    @app.get("/v1/functions/{name}/subscriptions/{subscription}", tags=["events"])
    async def get_subscription(
        name: str, subscription: str, namespace: NamespaceQuery = None
    ) -> Subscription:
        return await store().get(
            namespace_of(namespace), check_name(name), check_subscription_name(subscription)
        )

    @app.delete("/v1/functions/{name}/subscriptions/{subscription}", status_code=204, tags=["events"])
    async def delete_subscription(name: str, subscription: str, namespace: NamespaceQuery = None) -> Response:
        ns = namespace_of(namespace)
        gone = await store().get(ns, check_name(name), check_subscription_name(subscription))
        await store().delete(ns, name, subscription)
        await app.state.subscription_index.refresh()
        await forget_sources([gone])
        return Response(status_code=204)

    # -- ingestion ----------------------------------------------------------------------------

    async def deliver(pairs: Iterable[tuple[Subscription, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Queue one invocation per (subscription, event) pair, all in one transaction."""
        catalog: Catalog = app.state.catalog
        items: list[dict[str, object]] = []
        for sub, event in pairs:
            try:
                spec = await catalog.resolve(sub.namespace, sub.function, sub.qualifier)
            except (NotFound, InvalidRequest) as exc:  # its alias or version is gone: this one only
                log.warning("subscription %s skipped: %s", sub.ref, exc)
                continue
            # Anything else (etcd unreachable) fails the whole request with 503: the sender retries.
            items.append({
                "namespace": sub.namespace, "function": sub.function, "version": spec.version,
                "function_uid": spec.function_uid, "payload": json.dumps(event),
                "source": {"kind": sub.kind, "subscription": sub.name},
            })  # fmt: skip
        if not items:
            return []
        if len(items) > MAX_FAN_OUT:
            raise PayloadTooLarge(
                f"this request would queue {len(items)} invocations (events x matching subscriptions); "
                f"the limit is {MAX_FAN_OUT}: send fewer events per request"
            )
        trigger: TriggerClient = app.state.trigger
        resp = await trigger.enqueue(items, deadline=time.time() + wire.ENQUEUE_DEADLINE_S)
        if resp.status != 202:
            raise error_from_body(_json(resp.body), resp.status)
        invocations: list[dict[str, Any]] = json.loads(resp.body)["invocations"]
        return invocations

    def subscriptions(kind: str) -> list[Subscription]:
        index: SubscriptionIndex = app.state.subscription_index
        return index.active(kind)

    @app.post("/v1/events", status_code=202, tags=["events"])
    async def post_cloudevents(request: Request, namespace: NamespaceQuery = None) -> dict[str, Any]:
        """CloudEvents 1.0 over HTTP (binary, structured or batched mode).  Each event goes, as an async
        invocation, to every subscription of the namespace whose ``type``/``source`` filters match."""
        ns = namespace_of(namespace, "invoker")
        app.state.rate.take(ns, app.state.limits.of(ns).max_invocations_per_s)
        body = await read_payload(request, asynchronous=True)
        events = parse_http(request.headers, body)
        principal = caller()
        # An invoker key limited to some functions reaches only those.
        subs = [
            s for s in subscriptions("cloudevents")
            if s.namespace == ns and (principal.role != "invoker" or not principal.functions or s.function in principal.functions)
        ]  # fmt: skip
        pairs = [
            (sub, event)
            for event in events
            for sub in subs
            if sub.cloudevents is not None
            and event_matches(event, type=sub.cloudevents.type, source=sub.cloudevents.source)
        ]
        return {"accepted": len(events), "invocations": await deliver(pairs)}

    async def deliver_object_records(records: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = []
        for record in records:
            for sub in subscriptions("object_store"):
                src = sub.object_store
                if src is not None and record_matches(
                    record, bucket=src.bucket, prefix=src.prefix, suffix=src.suffix, events=src.events
                ):
                    pairs.append((sub, {"Records": [record]}))
        return {"records": len(records), "invocations": await deliver(pairs)}

    @app.post("/v1/events/object-store/seaweedfs", status_code=202, tags=["events"])
    async def seaweedfs_notification(request: Request) -> dict[str, Any]:
        """Webhook for SeaweedFS filer notifications: adapted to S3 event ``Records``."""
        body = await read_payload(request)  # a notification lists the object's chunks: allow more than 1 MB
        return await deliver_object_records(records_from_seaweedfs(body, request.headers))

    @app.post("/v1/events/object-store/minio", status_code=202, tags=["events"])
    async def minio_notification(request: Request) -> dict[str, Any]:
        """Webhook for MinIO bucket notifications (already S3-shaped; event names normalised)."""
        body = await read_payload(request)  # a notification lists the object's chunks: allow more than 1 MB
        return await deliver_object_records(records_from_minio(body))


def same_stream(old: Subscription, new: Subscription | None) -> bool:
    """Whether ``new`` keeps reading the stream ``old`` read (so its consumer group stays in use)."""
    if old.queue is None:
        return True
    return new is not None and new.queue is not None and new.queue.stream == old.queue.stream


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
