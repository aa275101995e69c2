"""The public gateway: management API, HTTP invocation, logs.  OpenAPI at ``/docs``.

Guarantees:
- a deploy is atomic: the archive is checked, stored in S3 by content hash, then the version is
  created in one etcd transaction; if either store fails the caller gets 503 and no version exists;
- a deploy or a delete is answered once this gateway's watched catalog shows it (or after 2 s), so
  the caller's next invocation through this gateway reaches what it just deployed, never a deleted
  function (each invocation carries the function's uid to the dispatcher, ``X-Faas-Function-Uid``);
- an invocation payload over ``max_sync_payload_bytes`` is refused with 413 before it is read whole;
- every error is ``{"error": {"kind", "type", "message"}}`` with a precise status.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from faas.core import redis_keys, wire
from faas.core.api_keys import NO_KEY, KeyIndex, KeyStore, Principal, Role, Unauthorized
from faas.core.body import BodyTooLarge
from faas.core.clients import SchedulerClient, TriggerClient
from faas.core.codestore import CodeStore
from faas.core.election import LeaderWatch
from faas.core.errors import (
    FaasError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
)
from faas.core.hop_server import Request as HopRequest
from faas.core.hop_server import Response as HopServerResponse
from faas.core.hop_server import app_body, relay, relay_app
from faas.core.http import HopResponse
from faas.core.models import (
    AliasSpec,
    AliasView,
    FunctionRecord,
    FunctionView,
    VersionConfig,
    VersionSpec,
    name_problem,
)
from faas.core.namespaces import LimitsIndex, NamespaceLimits, RateLimiter, read_limits, set_limits
from faas.core.ownership import claim
from faas.core.queue import InvocationQueue
from faas.core.registry import Catalog, FunctionRegistry
from faas.core.service import (
    Membership,
    etcd_from_settings,
    hot_routes,
    install_error_handlers,
    member_record,
    redis_from_settings,
)
from faas.core.settings import Settings
from faas.core.subscriptions import SubscriptionIndex, SubscriptionStore
from faas.core.tasks import TaskSet
from gateway.archive import check_archive_layout, verify_archive_members
from gateway.auth import authenticate, caller, caller_or_none, identify
from gateway.events_api import install_event_routes
from gateway.http_events import build_event, build_response

# The multipart form around a code archive: its config field (at most 1 MiB, as Starlette reads form
# fields) and the part headers.
UPLOAD_FORM_OVERHEAD_BYTES = 2 * 1024 * 1024

class KeySpec(BaseModel):
    """An API key to create: its namespace (default: the admin's), role, and for an invoker the
    functions it may call (none: all of the namespace's)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str | None = None
    role: Role
    functions: list[str] = Field(default_factory=list)
    description: str = Field(default="", max_length=200)


NamespaceQuery = Annotated[str | None, Query(description="namespace (default: the platform's default)")]


def build_app(settings: Settings, member_id: str, address: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        etcd = etcd_from_settings(settings)
        await etcd.connect()
        catalog = Catalog(etcd)
        catalog.start()
        leader = LeaderWatch(etcd, "trigger")
        leader.start()
        code_store = CodeStore(settings)
        redis = redis_from_settings(settings)
        membership = Membership(
            etcd,
            member_record("gateway", member_id, address),
            settings.lease_ttl_s,
        )
        tasks = TaskSet("gateway")
        # The gateway starts even while etcd is unreachable: it then answers 503 until etcd is back.
        tasks.spawn(membership.keep_forever(), name="membership", long_lived=True)
        app.state.registry = FunctionRegistry(etcd)
        app.state.catalog = catalog
        app.state.code_store = code_store
        app.state.trigger = TriggerClient(leader, internal_token=settings.internal_token)
        app.state.trigger.start()
        scheduler_leader = LeaderWatch(etcd, "scheduler")
        scheduler_leader.start()
        app.state.scheduler = SchedulerClient(scheduler_leader, internal_token=settings.internal_token)
        app.state.scheduler.start()
        app.state.redis = redis
        app.state.queue = InvocationQueue(redis, status_ttl_s=settings.invocation_ttl_s)
        app.state.subscriptions = SubscriptionStore(etcd)
        subscription_index = SubscriptionIndex(etcd)
        subscription_index.start()
        app.state.subscription_index = subscription_index
        key_index = KeyIndex(etcd)
        key_index.start()
        limits = LimitsIndex(etcd, settings)
        limits.start()
        app.state.limits = limits
        app.state.rate = RateLimiter()
        app.state.key_index = key_index
        app.state.key_store = KeyStore(etcd)
        try:
            yield
        finally:
            await tasks.cancel_all()
            await membership.deregister()
            await app.state.trigger.close()
            await app.state.scheduler.close()
            await leader.stop()
            await scheduler_leader.stop()
            await subscription_index.stop()
            await key_index.stop()
            await limits.stop()
            await catalog.stop()
            await redis.aclose()
            await etcd.close()

    async def identify_caller(request: Request) -> None:
        identify(
            app.state.key_index, request.url.path, request.headers.get, request.query_params.get("secret"),
            settings.webhook_secret,
        )  # fmt: skip

    app = FastAPI(
        title="faas gateway",
        description="Deploy and invoke Python functions.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(identify_caller)],
    )
    install_error_handlers(app)

    def namespace_of(namespace: str | None, role: Role = "developer", principal: Principal | None = None) -> str:
        """The namespace a call acts in (the key's own; an admin key may name another) once the key
        is allowed ``role`` there."""
        if namespace is not None:
            problem = name_problem(namespace, "namespace")
            if problem:
                raise InvalidRequest(problem)
        principal = principal or caller()
        ns = principal.namespace_for(namespace)
        principal.require(role)
        return ns

    def check_name(name: str) -> str:
        problem = name_problem(name)
        if problem:
            raise InvalidRequest(problem)
        return name

    def function_url(name: str, kind: str = "function") -> str:
        return f"{settings.gateway_url}/{'app' if kind == 'app' else 'fn'}/{name}/"

    def view(record: FunctionRecord, spec: VersionSpec | None) -> FunctionView:
        return FunctionView(
            **record.model_dump(), config=spec, url=function_url(record.name, spec.kind if spec else "function")
        )

    def not_an_app(spec: VersionSpec) -> VersionSpec:
        """``spec``, unless it is a web app's: those answer HTTP at /app/{name}/, not events."""
        if spec.kind == "app":
            raise InvalidRequest(
                f"{spec.function!r} is a web app: send it HTTP requests at /app/{spec.function}/, not events"
            )
        return spec

    @app.get("/healthz", tags=["platform"])
    async def healthz() -> dict[str, object]:
        return {"ok": True}

    # -- management ---------------------------------------------------------------------------

    @app.put("/v1/functions/{name}", status_code=201, response_model=FunctionView, tags=["functions"])
    async def deploy(
        name: str,
        config: Annotated[str, Form(description="JSON of the version's configuration (VersionConfig)")],
        code: Annotated[UploadFile, File(description="zip archive of the function's code")],
        namespace: NamespaceQuery = None,
    ) -> FunctionView:
        """Create the function, or a new version of it, from a config and a code archive."""
        ns = namespace_of(namespace)
        check_name(name)
        try:
            parsed = VersionConfig.model_validate_json(config)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidRequest(f"invalid function config: {problems}") from exc
        await check_destinations(ns, name, parsed)
        await check_function_quota(ns, name)
        data = await code.read(settings.max_archive_bytes + 1)
        check_archive_layout(
            data,
            handler_module=parsed.handler_module,
            handler=parsed.handler,
            max_bytes=settings.max_archive_bytes,
            max_unpacked=settings.max_unpacked_bytes,
        )
        await asyncio.to_thread(verify_archive_members, data)  # inflates: off the event loop
        code_store: CodeStore = app.state.code_store
        registry: FunctionRegistry = app.state.registry
        ref = await code_store.put_archive(data)
        spec = await registry.create_version(ns, name, parsed, ref, move_latest=parsed.kind != "app")
        if parsed.kind == "app":
            await start_app_version(ns, spec)
        record = await registry.get_function(ns, name)
        await app.state.catalog.wait_until_seen(
            ns, name, uid=spec.function_uid, version=spec.version, updated_at=record.updated_at
        )
        return view(record, spec)

    async def start_app_version(ns: str, spec: VersionSpec) -> None:
        """Start a new version's first instance (import, lifespan startup, readiness request) and only
        then point ``latest`` at it: an app that does not start leaves the version before serving."""
        scheduler: SchedulerClient = app.state.scheduler
        deadline = time.time() + settings.cold_start_timeout_s + APP_START_GRACE_S
        try:
            await scheduler.acquire(spec.key, deadline)
        except FaasError as exc:
            record = await app.state.registry.get_function(ns, spec.function)
            serving = record.aliases.get("latest")
            where = (
                f"version {serving} keeps serving" if serving != spec.version else "the app has no version that started"
            )
            raise type(exc)(
                f"version {spec.version} of app {spec.function!r} did not start, so it was not made latest "
                f"({where}): {exc.message}",
                error_type=exc.error_type, fault=exc.fault,
            ) from exc
        await app.state.registry.set_alias(ns, spec.function, "latest", AliasSpec(version=spec.version))

    async def check_function_quota(ns: str, name: str) -> None:
        """A deploy that would create a function refused when the namespace has its limit of them."""
        limit = app.state.limits.of(ns).max_functions
        if not limit:
            return
        registry: FunctionRegistry = app.state.registry
        existing = {record.name for record in await registry.list_functions(ns)}
        if name not in existing and len(existing) >= limit:
            raise TooManyRequests(
                f"namespace {ns!r} has {len(existing)} functions, its limit: delete one or ask an admin for more"
            )

    def take_invocation(ns: str) -> None:
        app.state.rate.take(ns, app.state.limits.of(ns).max_invocations_per_s)

    async def check_destinations(ns: str, name: str, config: VersionConfig) -> None:
        for which, dest in (("on_success", config.on_success), ("on_failure", config.on_failure)):
            if dest is not None and dest.stream is not None:
                await claim(app.state.registry.etcd, "stream", dest.stream, ns)  # one namespace's stream
            if dest is None or dest.function is None:
                continue
            if dest.function_name == name:
                raise InvalidRequest(f"{which}: a function cannot be its own destination (it would loop)")
            try:
                await app.state.catalog.resolve(ns, dest.function_name, dest.qualifier)
            except NotFound as exc:
                raise InvalidRequest(f"{which}: destination {dest.function!r} does not exist: {exc}") from exc

    @app.get("/v1/functions", tags=["functions"])
    async def list_functions(namespace: NamespaceQuery = None) -> dict[str, list[FunctionView]]:
        ns = namespace_of(namespace)
        registry: FunctionRegistry = app.state.registry
        out = []
        for record in await registry.list_functions(ns):
            try:
                spec = await registry.get_version(
                    ns, record.name, record.aliases.get("latest", record.latest_version)
                )
            except NotFound:
                spec = None
            out.append(view(record, spec))
        return {"functions": out}

    @app.get("/v1/functions/{name}", response_model=FunctionView, tags=["functions"])
    async def get_function(name: str, namespace: NamespaceQuery = None) -> FunctionView:
        ns = namespace_of(namespace)
        registry: FunctionRegistry = app.state.registry
        record = await registry.get_function(ns, check_name(name))
        spec = await registry.get_version(ns, name, record.aliases.get("latest", record.latest_version))
        return view(record, spec)

    @app.get("/v1/functions/{name}/versions", tags=["functions"])
    async def list_versions(name: str, namespace: NamespaceQuery = None) -> dict[str, list[VersionSpec]]:
        registry: FunctionRegistry = app.state.registry
        return {"versions": await registry.list_versions(namespace_of(namespace), check_name(name))}

    # -- aliases --------------------------------------------------------------------------------

    async def alias_written(ns: str, record: FunctionRecord) -> None:
        """Wait until this gateway's own copy shows the alias change (its next call sees it)."""
        await app.state.catalog.wait_until_seen(
            ns, record.name, uid=record.uid, version=record.latest_version, updated_at=record.updated_at
        )

    @app.get("/v1/functions/{name}/aliases", tags=["aliases"])
    async def list_aliases(name: str, namespace: NamespaceQuery = None) -> dict[str, list[AliasView]]:
        """The function's aliases: each one's version, its split between two versions if it has one,
        and the version ``rollback`` would take it back to."""
        ns = namespace_of(namespace)
        record = await app.state.registry.get_function(ns, check_name(name))
        return {"aliases": [record.alias_view(alias) for alias in sorted(record.aliases)]}

    @app.put("/v1/functions/{name}/aliases/{alias}", response_model=AliasView, tags=["aliases"])
    async def set_alias(name: str, alias: str, spec: AliasSpec, namespace: NamespaceQuery = None) -> AliasView:
        """Point an alias at a version, or split its calls between two versions by percent
        (``{"version": 2, "weights": {"2": 90, "3": 10}}``); creates the alias if it is new."""
        ns = namespace_of(namespace)
        registry: FunctionRegistry = app.state.registry
        record = await registry.set_alias(ns, check_name(name), alias, spec)
        await alias_written(ns, record)
        return record.alias_view(alias)

    @app.delete("/v1/functions/{name}/aliases/{alias}", status_code=204, tags=["aliases"])
    async def delete_alias(name: str, alias: str, namespace: NamespaceQuery = None) -> Response:
        ns = namespace_of(namespace)
        registry: FunctionRegistry = app.state.registry
        record = await registry.delete_alias(ns, check_name(name), alias)
        await alias_written(ns, record)
        return Response(status_code=204)

    @app.post("/v1/functions/{name}/aliases/{alias}/rollback", response_model=AliasView, tags=["aliases"])
    async def rollback_alias(name: str, alias: str, namespace: NamespaceQuery = None) -> AliasView:
        """Point the alias back at the version it pointed to before its last move (409 when it never
        moved)."""
        ns = namespace_of(namespace)
        registry: FunctionRegistry = app.state.registry
        record = await registry.rollback(ns, check_name(name), alias)
        await alias_written(ns, record)
        return record.alias_view(alias)

    @app.delete("/v1/functions/{name}", status_code=204, tags=["functions"])
    async def delete_function(name: str, namespace: NamespaceQuery = None) -> Response:
        ns = namespace_of(namespace)
        registry: FunctionRegistry = app.state.registry
        subscriptions = await app.state.subscriptions.list_subscriptions(ns, check_name(name))
        await registry.delete_function(ns, name)
        await app.state.catalog.wait_until_seen(ns, name, uid=None)
        await app.state.forget_sources(subscriptions)
        try:
            await app.state.redis.delete(redis_keys.function_logs(ns, name))
        except Exception:  # logs are best effort; the function is gone either way
            pass
        return Response(status_code=204)

    @app.get("/v1/functions/{name}/logs", tags=["functions"])
    async def function_logs(
        name: str, namespace: NamespaceQuery = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict[str, list[dict[str, Any]]]:
        ns = namespace_of(namespace)
        await app.state.catalog.function(ns, check_name(name))
        try:
            raw = await app.state.redis.lrange(redis_keys.function_logs(ns, name), 0, limit - 1)
        except Exception as exc:
            raise Unavailable(f"log store (Redis) unreachable: {exc}") from exc
        return {"logs": [json.loads(item) for item in reversed(raw)]}

    # -- invocation ---------------------------------------------------------------------------

    async def read_payload(request: Request, *, asynchronous: bool = False) -> bytes:
        limit = settings.max_async_payload_bytes if asynchronous else settings.max_sync_payload_bytes
        kind = "an asynchronous" if asynchronous else "a synchronous"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"payload is {declared} bytes; the limit for {kind} call is {limit}")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"payload exceeds the limit of {limit} bytes for {kind} call")
            chunks.append(chunk)
        return b"".join(chunks)

    async def invoke_version(
        ns: str, name: str, qualifier: str | None, body: bytes, request_id: str, *, stream: bool = False
    ) -> tuple[Any, VersionSpec]:
        catalog: Catalog = app.state.catalog
        spec = not_an_app(await catalog.resolve(ns, name, qualifier))
        deadline = wire.invocation_deadline(timeout_s=spec.timeout_s, cold_start_timeout_s=settings.cold_start_timeout_s)
        trigger: TriggerClient = app.state.trigger
        resp = await trigger.invoke(
            ns, name, spec.version, body, request_id=request_id, deadline=deadline, function_uid=spec.function_uid,
            stream=stream,
        )
        return resp, spec

    async def invoke_call(
        headers: Mapping[str, str], body: bytes, name: str, namespace: str | None, qualifier: str | None, *,
        asynchronous: bool, stream: bool = False, principal: Principal | None = None,
    ) -> HopResponse:  # fmt: skip
        principal = principal or caller()
        ns = namespace_of(namespace, "invoker", principal)
        check_name(name)
        principal.may_invoke(name)
        take_invocation(ns)
        body = body or b"{}"
        try:
            json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"the event must be JSON: {exc}") from exc
        request_id = uuid.uuid4().hex
        if not asynchronous:
            resp, _ = await invoke_version(ns, name, qualifier, body, request_id, stream=stream)
            return resp
        spec = not_an_app(await app.state.catalog.resolve(ns, name, qualifier))
        key = headers.get(wire.IDEMPOTENCY_KEY)
        if key is not None and not (0 < len(key) <= 256):
            raise InvalidRequest("X-Faas-Idempotency-Key must be 1-256 characters")
        trigger: TriggerClient = app.state.trigger
        return await trigger.invoke(
            ns,
            name,
            spec.version,
            body,
            request_id=request_id,
            deadline=time.time() + wire.ENQUEUE_DEADLINE_S,
            function_uid=spec.function_uid,
            asynchronous=True,
            extra_headers={
                **{h: headers[h] for h in wire.ENVELOPE_HEADERS if h in headers},
                **({wire.IDEMPOTENCY_KEY: key} if key else {}),
            },
        )

    def invocation_kind(invocation_type: str | None) -> bool:
        """Whether an ``X-Faas-Invocation-Type`` asks for an asynchronous call."""
        kind = (invocation_type or "RequestResponse").lower()
        if kind not in ("requestresponse", "sync", "async", "event"):
            raise InvalidRequest(
                f"unknown X-Faas-Invocation-Type {invocation_type!r}: use RequestResponse or async"
            )
        return kind in ("async", "event")

    def as_response(resp: HopResponse) -> Response:
        return Response(
            resp.body, status_code=resp.status, headers=wire.passed_headers(resp.headers), media_type="application/json"
        )

    # The two invocation routes are hot routes: the hop server runs these handlers itself, without
    # FastAPI (whose routes below document them in the OpenAPI schema and serve the same calls made
    # through the ASGI app).
    async def hot_invoke(request: HopRequest, *, asynchronous: bool | None = None) -> HopServerResponse:
        principal = authenticate(app.state.key_index, request.headers.get)  # before reading the body
        query = parse_qs(request.query.decode("latin-1")) if request.query else {}
        if asynchronous is None:
            asynchronous = invocation_kind(request.headers.get(wire.INVOCATION_TYPE))
        limit = settings.max_async_payload_bytes if asynchronous else settings.max_sync_payload_bytes
        declared = request.headers.get("content-length")
        kind = "an asynchronous" if asynchronous else "a synchronous"
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"payload is {declared} bytes; the limit for {kind} call is {limit}")
        try:
            body = await request.body.read(limit)
        except BodyTooLarge as exc:
            raise PayloadTooLarge(f"payload exceeds the limit of {limit} bytes for {kind} call") from exc
        resp = await invoke_call(
            request.headers, body, request.params["name"], _last(query, "namespace"), _last(query, "qualifier"),
            asynchronous=asynchronous, stream=True, principal=principal,
        )  # fmt: skip
        return await relay(resp)

    async def hot_invoke_async(request: HopRequest) -> HopServerResponse:
        return await hot_invoke(request, asynchronous=True)

    # Every other route runs in FastAPI, which reads a whole multipart upload before the route
    # sees it: bodies past the largest the API takes (a code archive and its form) stop at the server.
    hot_routes(app).fallback_body_limit = settings.max_archive_bytes + UPLOAD_FORM_OVERHEAD_BYTES

    def guard(request: HopRequest) -> None:
        """The API key (or webhook secret) checked before FastAPI reads a body."""
        secret = _last(parse_qs(request.query.decode("latin-1")), "secret") if request.query else None
        identify(app.state.key_index, request.path, request.headers.get, secret, settings.webhook_secret)

    hot_routes(app).fallback_guard = guard
    hot_routes(app).add("POST", "/v1/functions/{name}/invoke", hot_invoke)
    hot_routes(app).add("POST", "/v1/functions/{name}/invoke-async", hot_invoke_async)

    # Web apps (versions of kind "app"): /app/{name}/... passed through to an instance as HTTP, both
    # bodies streamed.  A hot route: FastAPI would read the body whole.
    async def app_request(request: HopRequest) -> HopServerResponse:
        name = check_name(request.params["name"])
        authorization = request.headers.get("authorization")
        platform_key = bool(request.headers.get("x-api-key")) or _is_platform_key(authorization)
        if platform_key:
            principal = authenticate(app.state.key_index, request.headers.get)
            ns = namespace_of(None, "invoker", principal)
            principal.may_invoke(name)
            spec = await app.state.catalog.resolve(ns, name, None)
        else:
            ns = settings.default_namespace
            try:
                spec = await app.state.catalog.resolve(ns, name, None)
            except (NotFound, InvalidRequest):
                spec = None
            if spec is None or not spec.public:
                raise Unauthorized(NO_KEY)  # the same answer whether the app exists or not
        if spec.kind != "app":
            raise NotFound(f"{name!r} is a function, not an app: its HTTP trigger is /fn/{name}/")
        take_invocation(ns)
        root = request.params.get("root", f"/app/{name}")
        headers = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in request.raw_headers
            if not n.startswith(b"x-faas-") and n not in _APP_DROPPED and not (n == b"authorization" and platform_key)
        ]
        if request.client is not None:
            forwarded = next((v for n, v in headers if n == "x-forwarded-for"), None)
            headers = [(n, v) for n, v in headers if n != "x-forwarded-for"]
            headers.append(("x-forwarded-for", f"{forwarded}, {request.client[0]}" if forwarded else request.client[0]))
        headers.append((wire.ROOT_PATH, root))
        path = "/" + request.params.get("path", "").lstrip("/")  # below the root path; "/app/shop" is "/"
        trigger: TriggerClient = app.state.trigger
        resp = await trigger.app_request(
            ns, name, spec.version, method=request.method, path=path, query=request.query, headers=headers,
            body=app_body(request), function_uid=spec.function_uid,
            deadline=wire.invocation_deadline(timeout_s=spec.timeout_s, cold_start_timeout_s=settings.cold_start_timeout_s),
        )  # fmt: skip
        return await relay_app(resp, head_request=request.method == "HEAD")

    for method in wire.APP_METHODS:
        hot_routes(app).add(method, "/app/{name}", app_request)
        hot_routes(app).add(method, "/app/{name}/{path:path}", app_request)

    app_domain = settings.app_domain.strip(".").lower()

    def by_host(request: HopRequest) -> tuple[Any, dict[str, Any]] | None:
        """``<name>.<app_domain>``: the app ``name``, mounted at its host's root."""
        host = request.headers.get("host", "").rsplit(":", 1)[0].lower()
        if not host.endswith("." + app_domain):
            return None
        name = host[: -len(app_domain) - 1]
        if "." in name or request.method not in wire.APP_METHODS:
            return None
        return app_request, {"name": name, "path": request.path, "root": ""}

    if app_domain:
        hot_routes(app).by_host = by_host

    @app.post("/v1/functions/{name}/invoke", tags=["invocation"])
    async def invoke(
        name: str,
        request: Request,
        namespace: NamespaceQuery = None,
        qualifier: Annotated[
            str | None, Query(description="version number or alias (default: latest)")
        ] = None,
        invocation_type: Annotated[
            str | None,
            Header(alias="X-Faas-Invocation-Type", description="RequestResponse (default) or async"),
        ] = None,
    ) -> Response:
        """Invoke: synchronously (the response is the result), or with ``X-Faas-Invocation-Type: async``
        enqueue the event durably and answer 202 with its invocation id."""
        asynchronous = invocation_kind(invocation_type)
        body = await read_payload(request, asynchronous=asynchronous)
        return as_response(await invoke_call(request.headers, body, name, namespace, qualifier, asynchronous=asynchronous))

    @app.post("/v1/functions/{name}/invoke-async", status_code=202, tags=["invocation"])
    async def invoke_async(
        name: str,
        request: Request,
        namespace: NamespaceQuery = None,
        qualifier: Annotated[
            str | None, Query(description="version number or alias (default: latest)")
        ] = None,
    ) -> Response:
        """Enqueue the event (durably, before answering) and return 202 with its invocation id."""
        body = await read_payload(request, asynchronous=True)
        return as_response(await invoke_call(request.headers, body, name, namespace, qualifier, asynchronous=True))

    @app.get("/v1/dead-letters", tags=["invocation"])
    async def list_dead_letters(
        function: Annotated[str | None, Query(description="only this function's")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        namespace: NamespaceQuery = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """Async events of the namespace that ran out of retries or age, with their last error."""
        ns = namespace_of(namespace)
        return {"dead_letters": await app.state.queue.dead_letters(limit=limit, function=function, namespace=ns)}

    @app.post("/v1/dead-letters/{dead_letter_id}/redrive", status_code=202, tags=["invocation"])
    async def redrive_dead_letter(dead_letter_id: str, namespace: NamespaceQuery = None) -> dict[str, Any]:
        """Put a dead-lettered event of the namespace back on the queue as a fresh first attempt."""
        env = await app.state.queue.redrive(dead_letter_id, namespace=namespace_of(namespace))
        return {"id": env.id, "status": "queued"}

    @app.get("/v1/invocations/{invocation_id}", tags=["invocation"])
    async def invocation_status(invocation_id: str) -> dict[str, Any]:
        """An async invocation: its status, attempts, result or last error, and timings.

        ``queued`` (waiting for a dispatcher), ``running``, ``failed`` (the last attempt failed; the next
        one is due at ``retry_at``), and the final ``succeeded`` or ``dead-lettered`` (out of retries
        or age; listed under ``/v1/dead-letters`` for redrive).  ``attempts`` counts the function's
        attempts, ``platform_retries`` the retries after platform faults (which do not use up
        ``max_retries``); the last ``error`` says whose fault it was (``fault``)."""
        principal = caller()
        principal.require("invoker")
        found = await app.state.queue.status(invocation_id)
        missing = NotFound(f"invocation {invocation_id!r} not found (unknown, or older than its retention)")
        if found is None:
            raise missing
        try:
            principal.namespace_for(str(found.get("namespace") or settings.default_namespace))
            principal.may_invoke(str(found.get("function") or ""))
        except NotFound:
            raise missing from None  # another namespace's, or a function the key may not call
        return found

    @app.api_route(
        "/fn/{name}/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        tags=["invocation"],
    )
    async def http_trigger(
        name: str, path: str, request: Request, namespace: NamespaceQuery = None
    ) -> Response:
        """HTTP trigger: the handler receives an API Gateway proxy (v2.0) event.  Without an API key,
        only a function deployed with ``public: true`` answers (in the namespace named, or the default)."""
        principal = caller_or_none()
        if principal is None:
            ns = namespace or settings.default_namespace
            try:
                public = (await app.state.catalog.resolve(ns, check_name(name), None)).public
            except (NotFound, InvalidRequest):
                public = False
            if not public:
                raise Unauthorized(NO_KEY)  # the same answer whether the function exists or not
        else:
            ns = namespace_of(namespace, "invoker", principal)
            check_name(name)
            principal.may_invoke(name)
        take_invocation(ns)
        body = await read_payload(request)
        request_id = uuid.uuid4().hex
        event = build_event(request, path, body, request_id)
        resp, _ = await invoke_version(ns, name, None, json.dumps(event).encode(), request_id)
        headers = wire.passed_headers(resp.headers)
        if resp.status != 200:
            return Response(
                resp.body, status_code=resp.status, headers=headers, media_type="application/json"
            )
        return build_response(json.loads(resp.body), headers)

    # -- API keys (admin) -----------------------------------------------------------------------

    @app.get("/v1/namespaces/{ns}/limits", tags=["keys"])
    async def get_namespace_limits(ns: str) -> dict[str, Any]:
        """A namespace's own limits (``own``, unset fields are the defaults) and those in force."""
        caller().require("admin")
        own = await read_limits(app.state.registry.etcd, namespace_of(ns, "admin"))
        return {"namespace": ns, "own": own.model_dump(), "effective": app.state.limits.of(ns).model_dump()}

    @app.put("/v1/namespaces/{ns}/limits", tags=["keys"])
    async def put_namespace_limits(ns: str, limits: NamespaceLimits) -> dict[str, Any]:
        """Set a namespace's limits (admin): a field left out is the platform's default, 0 is no limit."""
        caller().require("admin")
        await set_limits(app.state.registry.etcd, namespace_of(ns, "admin"), limits)
        return {"namespace": ns, "own": limits.model_dump()}

    @app.get("/v1/whoami", tags=["keys"])
    async def whoami() -> dict[str, Any]:
        """The calling key: its id, namespace, role and (for an invoker) functions."""
        principal = caller()
        return {
            "key_id": principal.key_id, "namespace": principal.namespace, "role": principal.role,
            "functions": sorted(principal.functions),
        }  # fmt: skip

    @app.post("/v1/keys", status_code=201, tags=["keys"])
    async def create_key(spec: KeySpec) -> dict[str, Any]:
        """Create an API key.  Its text is in this answer only: it is stored hashed."""
        admin = caller()
        admin.require("admin")
        ns = spec.namespace or admin.namespace
        problem = name_problem(ns, "namespace")
        if problem:
            raise InvalidRequest(problem)
        for function in spec.functions:
            check_name(function)
        if spec.functions and spec.role != "invoker":
            raise InvalidRequest("only an invoker key can be limited to some functions")
        text, record = await app.state.key_store.create(
            ns, spec.role, functions=spec.functions, description=spec.description
        )
        return {**record.view(), "key": text}

    @app.get("/v1/keys", tags=["keys"])
    async def list_keys(namespace: NamespaceQuery = None) -> dict[str, list[dict[str, Any]]]:
        """Every key (of one namespace with ``?namespace=``), without secrets or hashes."""
        caller().require("admin")
        return {"keys": [r.view() for r in await app.state.key_store.list(namespace)]}

    @app.delete("/v1/keys/{key_id}", status_code=204, tags=["keys"])
    async def revoke_key(key_id: str) -> Response:
        """Revoke a key: every gateway refuses it within moments."""
        caller().require("admin")
        await app.state.key_store.revoke(key_id)
        return Response(status_code=204)

    install_event_routes(
        app, settings, namespace_of=namespace_of, check_name=check_name, read_payload=read_payload
    )
    return app


# How long a web app's new version may take to pass its readiness request at deploy, beyond a cold start.
APP_START_GRACE_S = 30.0
# A web app's request headers the gateway never passes on: the platform key's, and the framing of the
# client's connection (each hop frames its own).
_APP_DROPPED = frozenset({b"x-api-key", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
                          b"upgrade", b"proxy-connection"})  # fmt: skip


def _is_platform_key(authorization: str | None) -> bool:
    """Whether an Authorization header carries a platform API key (else it is the app's business)."""
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and value.strip().startswith("faas_")


def _last(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None
