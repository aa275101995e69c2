"""How every platform process runs: one bound socket, one hop server (``faas.core.hop_server``), one
membership lease.

``run_service`` refuses to start without the platform's internal token (``check_internal_token``),
then binds the listening socket *before* building the app, so the app knows the address
it registers in etcd (the socket is not inherited by child processes); an internal service's hop
server answers only callers that send that token (``faas.core.hop_server``), the gateway's anyone; ``Membership`` keeps
``/faas/members/{role}/{id}`` alive under a lease through etcd outages and re-registers after the
lease is lost.  ``install_error_handlers`` turns every ``FaasError`` into the
platform's JSON error shape once, for the whole app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from faas.core import keys, wire
from faas.core.errors import FaasError, InvalidRequest
from faas.core.etcd import Etcd, EtcdTls, Lease, jittered
from faas.core.hop_server import HopServer, Router
from faas.core.models import MemberRecord
from faas.core.settings import Settings

log = logging.getLogger("faas.service")


def configure_logging(role: str, member_id: str) -> None:
    logging.basicConfig(
        level=os.environ.get("FAAS_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {role}/{member_id} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request at INFO: far too much on the invocation path.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def error_response(exc: FaasError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.http_status, headers=exc.response_headers() or None)


def install_error_handlers(app: FastAPI) -> None:
    async def on_faas_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FaasError)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()
        )
        return error_response(InvalidRequest(problems or "invalid request"))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(FaasError(f"internal error: {type(exc).__name__}: {exc}"))

    app.add_exception_handler(FaasError, on_faas_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def etcd_from_settings(settings: Settings, *, timeout_s: float | None = None) -> Etcd:
    """A client of every etcd endpoint the settings name, over TLS with the client certificate they
    name when they say so (``etcd_tls``)."""
    endpoints = settings.etcd_endpoints
    host, port = endpoints[0]
    tls = EtcdTls(settings.etcd_ca_file, settings.etcd_cert_file, settings.etcd_key_file) if settings.etcd_tls else None
    if timeout_s is None:
        return Etcd(host, port, endpoints=endpoints, tls=tls)
    return Etcd(host, port, endpoints=endpoints, timeout_s=timeout_s, tls=tls)


def redis_from_settings(settings: Settings) -> aioredis.Redis:
    """The Redis client of a service.

    It reconnects by itself, command by command.  After a Redis restart the pool replaces each
    connection the server closed before handing it out, so only commands in flight at the crash
    fail (``Unavailable`` at the adapters), not the first command sent on every pooled connection."""
    options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 3}
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # an older redis-py: no maintenance notifications, the pool checks connections
        pass
    else:
        # With maintenance notifications on ("auto" by default) redis-py's pool skips its check that
        # a connection was not closed by the server; a restarted Valkey then failed one call per
        # pooled connection (seen with redis-py 8.1).  The platform's Valkey sends none.
        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return aioredis.from_url(settings.redis_url, **options)


class Backoff:
    """Exponential backoff with jitter, from ``first_s`` doubling up to ``max_s``."""

    def __init__(self, first_s: float = 0.2, max_s: float = 2.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._next = first_s

    async def sleep(self) -> None:
        await asyncio.sleep(jittered(self._next))
        self._next = min(self._next * 2, self.max_s)

    def reset(self) -> None:
        self._next = self.first_s


class Membership:
    """Keeps this process's member record in etcd for as long as it runs.

    ``keep_forever`` registers (a lease, then the record under it), retrying with backoff and jitter
    while etcd is unreachable, so a service started during an etcd outage registers when etcd is
    back; it registers again whenever etcd says the lease is gone.  An outage that etcd survives
    with its leases (a restart) needs nothing: the record is still there."""

    def __init__(self, etcd: Etcd, record: MemberRecord, ttl_s: int) -> None:
        self.etcd = etcd
        self.record = record
        self.ttl_s = ttl_s
        self.lease: Lease | None = None
        self.registered = asyncio.Event()

    async def register(self) -> None:
        """One attempt: a new lease and the record under it; raises ``Unavailable``, keeping nothing."""
        lease = Lease(self.etcd, self.ttl_s, owner=f"{self.record.role}:{self.record.member_id}")
        lease_id = await lease.grant()
        try:
            await self.etcd.put(
                keys.member(self.record.role, self.record.member_id),
                self.record.model_dump_json().encode(),
                lease=lease_id,
            )
        except BaseException:
            await lease.revoke()
            raise
        self.lease = lease
        self.registered.set()

    async def keep_forever(self) -> NoReturn:
        """Register (retrying while etcd is unreachable), then again whenever the lease is lost."""
        backoff = Backoff()
        while True:
            if self.lease is None:
                try:
                    await self.register()
                except FaasError as exc:
                    log.warning("registration of %s failed: %s", self.record.member_id, exc)
                    await backoff.sleep()
                    continue
                backoff.reset()
            assert self.lease is not None
            await self.lease.lost.wait()
            log.warning("membership lease of %s lost; registering again", self.record.member_id)
            self.registered.clear()
            await self.lease.revoke()
            self.lease = None

    async def deregister(self) -> None:
        try:
            await self.etcd.delete(keys.member(self.record.role, self.record.member_id))
        except FaasError:
            pass
        if self.lease is not None:
            await self.lease.revoke()


def parse_service_args(role: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"faas-{role}")
    parser.add_argument("--id", default=f"{role}-1", help="member id, unique per role")
    parser.add_argument("--host", default=None, help="bind host (default FAAS_BIND_HOST)")
    parser.add_argument("--port", type=int, default=0, help="bind port (default: ephemeral)")
    return parser.parse_args()


def bind_socket(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket's proto says TCP.  Without it Nagle holds each response body for the client's delayed
    # ACK (~40 ms per hop, measured by bench/invoke_latency.py).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    # Not inheritable: a child (a function host) must never hold the service's port open after the
    # service died, which would leave connections to it hanging instead of refused.
    sock.set_inheritable(False)
    return sock


_local_addresses: dict[tuple[str, str], str] = {}


def local_address(role: str, member_id: str) -> str | None:
    """The unix socket address this process serves on besides TCP (bound by ``run_service``), for
    its member and leader records; None when it has none."""
    return _local_addresses.get((role, member_id))


def member_record(role: str, member_id: str, address: str) -> MemberRecord:
    """This process's member record: its TCP address, its unix socket and its machine."""
    return MemberRecord(
        role=role, member_id=member_id, address=address, pid=os.getpid(),
        local_address=local_address(role, member_id), machine=wire.machine_id(),
    )  # fmt: skip


def bind_unix_socket(path: Path) -> socket.socket | None:
    """A listening unix socket at ``path`` only this user may connect to (None if it cannot be made)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a predecessor with this id
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(2048)
        sock.set_inheritable(False)
        return sock
    except OSError as exc:
        log.warning("cannot listen on %s (callers use TCP): %s", path, exc)
        return None


def hot_routes(app: FastAPI) -> Router:
    """The routes of ``app`` served straight by the hop server, before (and instead of) FastAPI."""
    router: Router | None = getattr(app.state, "hot_routes", None)
    if router is None:
        router = Router()
        app.state.hot_routes = router
    return router


# The shortest internal token a service accepts (``faas up`` makes 43 characters).
MIN_TOKEN_CHARS = 16


def check_internal_token(role: str, token: str) -> None:
    """Refuse to run without a usable internal token: a service must never answer anyone who
    reaches its port, and a process without the token could call no other."""
    how = (
        "set the same FAAS_INTERNAL_TOKEN (at least 16 visible ASCII characters, e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) in every platform process's "
        "environment, or start the platform with `faas up`, which makes one in <home>/internal.token"
    )
    if not token:
        raise SystemExit(f"faas {role}: FAAS_INTERNAL_TOKEN is not set; refusing to run the internal services open: {how}")
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise SystemExit(f"faas {role}: FAAS_INTERNAL_TOKEN is too short or has characters a header cannot carry: {how}")


async def serve(
    app: FastAPI, socks: list[socket.socket], *, stop: asyncio.Event, grace_s: float = 3.0,
    internal_token: str | None = None,
) -> None:  # fmt: skip
    """Run ``app`` on ``socks`` until ``stop`` is set: its lifespan around a ``HopServer`` per socket,
    serving its hot routes directly and everything else through FastAPI; with ``internal_token``,
    only to callers that send it (but the health check)."""
    async with app.router.lifespan_context(app) as state:
        servers = [
            HopServer(hot_routes(app), app, state=dict(state or {}), internal_token=internal_token) for _ in socks
        ]
        for server, sock in zip(servers, socks, strict=True):
            await server.start(sock)
        try:
            await stop.wait()
        finally:
            await asyncio.gather(*(server.shutdown(grace_s) for server in servers))


def run_service(
    *,
    role: str,
    build_app: Callable[[Settings, str, str], FastAPI],
    default_host: str | None = None,
    default_port: int = 0,
    internal: bool = True,
) -> None:
    """Entry point shared by every service: ``python -m faas.<role> --id ID``.  An ``internal``
    service answers only callers with the internal token; the gateway (not ``internal``) answers
    anyone, and checks their API keys itself.  Every one needs the token, to call the others."""
    import uvloop

    args = parse_service_args(role)
    settings = Settings()
    check_internal_token(role, settings.internal_token)
    configure_logging(role, args.id)
    host = args.host or default_host or settings.bind_host
    port = args.port or default_port
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    address = f"http://{bound_host}:{bound_port}"
    socks = [sock]
    local_path = wire.local_socket_path(settings.run_dir, role, args.id) if settings.local_sockets else None
    if local_path is not None:
        local_sock = bind_unix_socket(local_path)
        if local_sock is not None:
            socks.append(local_sock)
            _local_addresses[(role, args.id)] = wire.unix_address(local_path)
    app = build_app(settings, args.id, address)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("%s %s listening on %s", role, args.id, address)
        await serve(app, socks, stop=stop, internal_token=settings.internal_token if internal else None)

    uvloop.run(main())
