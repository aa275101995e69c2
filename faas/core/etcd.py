"""The platform's etcd adapter: a thin layer over ``aetcd`` that speaks the platform's errors.

Guarantees:
- every call either succeeds or raises ``Unavailable`` (etcd unreachable or timing out) — callers
  never see gRPC or aetcd exceptions;
- one client talks to every endpoint of the cluster (``FAAS_ETCD_URL`` may list several, comma
  separated): gRPC picks the first that answers and moves to the next when it fails; it reconnects
  within a second of etcd coming back (gRPC's own backoff would grow to two minutes), and keepalive
  pings notice a member that stops answering without waiting on TCP;
- given an ``EtcdTls``, the client speaks TLS, checks etcd's certificate against its CA and presents
  its own certificate (an etcd with ``--client-cert-auth`` refuses a client without one).  Nothing
  is negotiated per connection beyond the handshake, so a restarted etcd takes the client back as
  before (no auth token to renew);
- ``Lease`` keeps a lease alive across an etcd outage of any length: it retries with backoff and
  jitter and tells its owner apart "etcd said the lease is gone" (``lost``: write your keys again
  under a new lease) from "not confirmed lately" (``valid()`` false: an elected leader stops acting);
- ``PrefixMirror`` keeps an in-memory copy of a key prefix (list, then watch from the next revision,
  re-list after any watch failure and every ``resync_s`` in case a watch stalls silently), so readers
  on the hot path never wait on etcd.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

# gRPC's fork handlers, off before gRPC loads: the platform's processes fork only to exec (function
# hosts, servers), never to use gRPC in the child, and with the handlers on, a fork while another
# thread was inside gRPC ("skipping fork() handlers") left the child to crash (SIGSEGV) before its exec.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import aetcd  # noqa: E402
import aetcd.exceptions  # noqa: E402
import grpc  # noqa: E402
from aetcd import rpc, watcher  # noqa: E402

from faas.core.errors import Unavailable
from faas.core.tasks import TaskSet

log = logging.getLogger("faas.etcd")

_OP_TIMEOUT_S = 5.0

Endpoint = tuple[str, int]

GRPC_OPTIONS: dict[str, int] = {
    # Reconnect within a second of etcd coming back: gRPC's default backoff grows to 120 s, so a
    # client that saw a long outage would stay away long after etcd returned.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # A member that is frozen or cut off keeps its TCP connection open: pings notice it in ~4 s, and
    # gRPC then moves to the next endpoint.  etcd must accept pings this often
    # (``--grpc-keepalive-min-time``, which the launcher sets to 1 s).  Only while a call is open (a
    # watch, a lease keepalive): etcd refuses pings on a connection without one ("too_many_pings",
    # it does not permit them without a stream), and an idle client learns of a dead member at its
    # next call anyway.
    "grpc.keepalive_time_ms": 2000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}


def grpc_target(endpoints: Sequence[Endpoint]) -> Endpoint:
    """The (host, port) pair aetcd joins into its gRPC target, for one endpoint or several.

    Several endpoints become one ``ipv4:a:p1,b:p2,...`` target (gRPC's static address list, tried in
    order); aetcd formats its target as ``f"{host}:{port}"``, so the list is split at its last colon.
    Host names are resolved here, once per client."""
    if not endpoints:
        raise Unavailable("no etcd endpoint is configured")
    if len(endpoints) == 1:
        return endpoints[0]
    addresses = [f"{_ipv4(host)}:{port}" for host, port in endpoints]
    head, _, port = ("ipv4:" + ",".join(addresses)).rpartition(":")
    return head, int(port)


def _ipv4(host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise Unavailable(f"cannot resolve the etcd host {host!r}: {exc}") from exc


def jittered(seconds: float) -> float:
    """``seconds`` +-50%: peers that failed together do not retry in lockstep."""
    return seconds * random.uniform(0.5, 1.5)


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """The files a client needs for an etcd that requires TLS (``https://`` endpoints).

    ``ca_file``: the CA etcd's certificate must be signed by (None: the system's roots);
    ``cert_file``/``key_file``: the client's certificate and key, both or neither."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC's channel credentials, read from the files now; raises ``Unavailable`` if one is unreadable."""
        if (self.cert_file is None) != (self.key_file is None):
            raise Unavailable("an etcd client certificate needs both its certificate and its key file")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Unavailable(f"cannot read the etcd TLS file {path}: {exc.strerror or exc}") from exc


class _TlsClient(aetcd.Client):
    """An ``aetcd.Client`` on a TLS channel.

    aetcd 1.0 only makes plaintext channels; this is its ``connect`` with ``secure_channel`` instead
    (and without its username/password login, which the platform does not use)."""

    _is_connecting: bool  # aetcd's, set in its __init__

    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it, as aetcd does
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(target, self._credentials, options=list(self._options.items()))
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(raw: Any) -> KV:
    return KV(raw.key, raw.value, raw.create_revision, raw.mod_revision, raw.lease)


class Etcd:
    """One connection to etcd (one gRPC channel to all its endpoints), shared by a process."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = _OP_TIMEOUT_S,
        endpoints: Sequence[Endpoint] | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints) if endpoints else ((host, port),)
        self.host, self.port = self.endpoints[0]
        self.timeout_s = timeout_s
        self.tls = tls
        target_host, target_port = grpc_target(self.endpoints)
        options: dict[str, Any] = dict(GRPC_OPTIONS)
        common: dict[str, Any] = {
            "host": target_host, "port": target_port, "timeout": int(timeout_s) or 1, "connect_wait_timeout": 3,
        }  # fmt: skip
        if tls is None:
            self.client = aetcd.Client(**common, options=options)
        else:
            if len(self.endpoints) > 1:
                # A list target has no host name of its own to check certificates against: every
                # member's certificate is checked against the first endpoint's host.
                options["grpc.ssl_target_name_override"] = self.host
            self.client = _TlsClient(**common, options=options, credentials=tls.credentials())

    @property
    def where(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.endpoints)

    async def _call(self, what: str, coro: Awaitable[Any], *, timeout_s: float | None = None) -> Any:
        timeout = timeout_s or self.timeout_s
        try:
            return await asyncio.wait_for(coro, timeout)
        except (aetcd.exceptions.ClientError, OSError) as exc:
            raise Unavailable(f"etcd at {self.where} failed on {what}: {exc or type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise Unavailable(f"etcd at {self.where} did not answer {what} in {timeout:.1f} s") from exc

    def fork(self) -> Etcd:
        """A separate connection to the same etcd (its own gRPC channel and watch stream)."""
        return Etcd(self.host, self.port, timeout_s=self.timeout_s, endpoints=self.endpoints, tls=self.tls)

    async def connect(self) -> None:
        await self._call("connect", self.client.connect())

    async def close(self) -> None:
        try:
            await self.client.close()
        except Exception:  # closing a broken channel must not mask the caller's error
            log.debug("etcd close failed", exc_info=True)

    async def get(self, key: bytes) -> KV | None:
        raw = await self._call("get", self.client.get(key))
        return _kv(raw) if raw is not None else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KV], int]:
        """All keys under ``prefix`` and the store revision they were read at."""
        res = await self._call("get_prefix", self.client.get_prefix(prefix))
        return [_kv(kv) for kv in res.kvs], res.header.revision

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> None:
        await self._call("put", self.client.put(key, value, lease=lease))

    async def delete(self, key: bytes) -> bool:
        res = await self._call("delete", self.client.delete(key))
        return bool(res)

    async def delete_prefix(self, prefix: bytes) -> int:
        res = await self._call("delete_prefix", self.client.delete_prefix(prefix))
        return int(res.deleted)

    async def txn(self, compare: list[Any], success: list[Any], failure: list[Any] | None = None) -> tuple[bool, list[Any]]:
        ok, responses = await self._call("txn", self.client.transaction(compare, success, failure or []))
        return bool(ok), responses

    # Transaction building blocks, so callers need not import aetcd.
    def create_revision(self, key: bytes) -> Any:
        return self.client.transactions.create(key)

    def mod_revision(self, key: bytes) -> Any:
        return self.client.transactions.mod(key)

    def op_put(self, key: bytes, value: bytes, lease: int | None = None) -> Any:
        return self.client.transactions.put(key, value, lease=lease)

    def op_delete(self, key: bytes, *, prefix: bool = False) -> Any:
        if prefix:
            from aetcd import utils

            return self.client.transactions.delete(key, range_end=utils.prefix_range_end(key))
        return self.client.transactions.delete(key)

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call("lease grant", self.client.lease(ttl_s))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """Refresh a lease; returns its remaining TTL (<= 0 means the lease is gone)."""
        reply = await self._call("lease keepalive", self.client.refresh_lease(lease_id), timeout_s=timeout_s)
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call("lease revoke", self.client.revoke_lease(lease_id))

    async def watch_prefix(self, prefix: bytes, *, start_revision: int) -> Any:
        return await self._call("watch", self.client.watch_prefix(prefix, start_revision=start_revision))


class Lease:
    """A lease kept alive by a guarded task, through etcd outages of any length.

    Two signals for its owner:

    - ``lost`` is set once etcd says the lease is gone (it expired, was revoked, or this etcd never
      granted it): every key under it is gone too, and the owner grants a new lease and writes them
      again.  A failed keepalive is not a loss: the task retries with backoff and jitter, and etcd
      renews every lease when it comes back after a restart, so the keys usually survive an outage;
    - ``valid()`` holds only while the lease is surely alive: within the TTL etcd gave at the last
      keepalive it answered, counted from when that keepalive was *sent* (monotonic clock, which also
      runs while the process is frozen).  An elected leader acts only while it holds.
    """

    def __init__(self, etcd: Etcd, ttl_s: int, *, owner: str) -> None:
        self.etcd = etcd
        self.ttl_s = ttl_s
        self.owner = owner
        self.lease_id = 0
        self.lost = asyncio.Event()
        self._valid_until = 0.0
        self.last_attempt = 0.0  # when the keepalive last ran (monotonic): a frozen process shows a gap
        self._changed = asyncio.Event()
        self._tasks = TaskSet(f"lease:{owner}")

    def valid(self) -> bool:
        return not self.lost.is_set() and asyncio.get_running_loop().time() < self._valid_until

    def keepalive_running(self) -> bool:
        """The keepalive task ran within two intervals: this process was not frozen meanwhile."""
        return asyncio.get_running_loop().time() - self.last_attempt < 2 * self.interval_s

    @property
    def interval_s(self) -> float:
        return max(self.ttl_s / 3.0, 0.3)

    async def grant(self) -> int:
        """Grant a fresh lease and keep it alive; raises ``Unavailable`` (nothing is kept then)."""
        sent = asyncio.get_running_loop().time()
        lease_id = await self.etcd.grant_lease(self.ttl_s)
        self._keep(lease_id, sent + self.ttl_s)
        return lease_id

    async def adopt(self, lease_id: int) -> bool:
        """Keep alive a lease granted earlier (by this owner's previous process).

        Returns False, keeping nothing, when etcd says it is gone; raises ``Unavailable``."""
        sent = asyncio.get_running_loop().time()
        ttl = await self.etcd.refresh_lease(lease_id, timeout_s=max(self.ttl_s / 2, 0.5))
        if ttl <= 0:
            return False
        self._keep(lease_id, sent + ttl)
        return True

    def _keep(self, lease_id: int, valid_until: float) -> None:
        self.lease_id = lease_id
        self.last_attempt = asyncio.get_running_loop().time()
        self.lost.clear()
        self._set_valid_until(valid_until)
        # Not long-lived: it ends by design when etcd says the lease is gone (``lost`` tells the owner).
        self._tasks.spawn(self._keepalive(lease_id), name="keepalive")

    def _set_valid_until(self, when: float) -> None:
        self._valid_until = when
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_invalid(self) -> None:
        """Return once ``valid()`` is false (lost, or not confirmed within its TTL)."""
        loop = asyncio.get_running_loop()
        while self.valid():
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), max(self._valid_until - loop.time(), 0.0) + 0.001)
            except TimeoutError:
                pass

    async def wait_valid(self) -> bool:
        """Wait until the lease is confirmed again (True) or known lost (False)."""
        while not self.valid():
            if self.lost.is_set():
                return False
            await self._changed.wait()
        return True

    async def _keepalive(self, lease_id: int) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval_s
        retry_s = 0.1
        failing_since: float | None = None
        while True:
            sent = self.last_attempt = loop.time()
            try:
                # Bounded by the interval: an answer that comes later is useless for validity anyway.
                ttl = await self.etcd.refresh_lease(lease_id, timeout_s=interval)
            except Unavailable as exc:
                self.last_attempt = loop.time()
                if failing_since is None:
                    failing_since = sent
                    log.warning("%s: lease %x not refreshed (%s); retrying", self.owner, lease_id, exc)
                await asyncio.sleep(jittered(retry_s))
                retry_s = min(retry_s * 2, interval)
                continue
            if ttl <= 0:
                log.warning("%s: lease %x is gone from etcd", self.owner, lease_id)
                self.lost.set()
                self._set_valid_until(0.0)
                return
            if failing_since is not None:
                log.info("%s: lease %x refreshed again after %.1f s", self.owner, lease_id, loop.time() - failing_since)
                failing_since = None
            retry_s = 0.1
            self._set_valid_until(sent + ttl)
            await asyncio.sleep(interval)

    async def revoke(self) -> None:
        """Stop keeping the lease and revoke it (best effort: an unreachable etcd lets it expire)."""
        await self._tasks.cancel_all()
        self._set_valid_until(0.0)
        if self.lease_id:
            try:
                await self.etcd.revoke_lease(self.lease_id)
            except Unavailable:
                pass
            self.lease_id = 0

    async def release(self) -> None:
        """Stop keeping the lease without revoking it (its keys live until it expires)."""
        await self._tasks.cancel_all()
        self._set_valid_until(0.0)


T = TypeVar("T")
MirrorCallback = Callable[[str, bytes, bytes | None], None]  # (kind, key, value or None on delete)


class PrefixMirror:
    """An in-memory copy of every key under a prefix, kept current by a watch."""

    def __init__(
        self, etcd: Etcd, prefix: bytes, *, on_change: MirrorCallback | None = None, resync_s: float = 5.0
    ) -> None:
        # Each mirror watches on a connection of its own: aetcd multiplexes every watch of a client on
        # one stream and, when a watch creation times out under load, can hand the late reply to the
        # next watch created, which then silently follows the wrong prefix.
        self.etcd = etcd.fork()
        self.prefix = prefix
        self.resync_s = resync_s
        self.items: dict[bytes, bytes] = {}
        self.generation = 0  # counts changes of ``items``: a reader may cache what it derived from them
        self.ready = asyncio.Event()
        self.changed = asyncio.Condition()
        self._parsed: dict[bytes, tuple[bytes, Any]] = {}  # key -> (the value parsed, what it gave)
        self._on_change = on_change
        self._tasks = TaskSet(f"mirror:{prefix.decode()}")

    def parsed(self, key: bytes, parse: Callable[[bytes], T]) -> T | None:
        """The value under ``key`` through ``parse``, parsed once per stored value; None when there is
        none or ``parse`` raises ``ValueError`` (a per-call reader's lookup: a dict get and a compare)."""
        raw = self.items.get(key)
        if raw is None:
            self._parsed.pop(key, None)
            return None
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == raw:
            return cast(T, cached[1])
        try:
            value = parse(raw)
        except ValueError:
            return None
        self._parsed[key] = (raw, value)
        return value

    def start(self) -> None:
        self._tasks.spawn(self._run(), name="watch", long_lived=True)
        self._tasks.spawn(self._resync_forever(), name="resync", long_lived=True)

    async def stop(self) -> None:
        await self._tasks.cancel_all()
        await self.etcd.close()

    async def wait_ready(self, timeout_s: float | None = 10.0) -> None:
        """Wait for the first listing; ``timeout_s=None`` waits as long as etcd is away (logging it)."""
        if timeout_s is not None:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout_s)
            except TimeoutError as exc:
                raise Unavailable(f"could not read {self.prefix.decode()} from etcd") from exc
            return
        while not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), 10.0)
            except TimeoutError:
                log.warning("still waiting for etcd to list %s", self.prefix.decode())

    def _apply(self, kind: str, key: bytes, value: bytes | None) -> None:
        self.generation += 1
        if value is None:
            self.items.pop(key, None)
        else:
            self.items[key] = value
        if self._on_change is not None:
            try:
                self._on_change(kind, key, value)
            except Exception:
                log.exception("mirror callback failed for %r", key)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def refresh(self) -> None:
        """Re-read the prefix now (a writer that must see its own write in this copy at once)."""
        await self._relist()

    async def _relist(self) -> int:
        kvs, revision = await self.etcd.get_prefix(self.prefix)
        fresh = {kv.key: kv.value for kv in kvs}
        changed = False
        for key in list(self.items):
            if key not in fresh:
                self._apply("DELETE", key, None)
                changed = True
        for key, value in fresh.items():
            if self.items.get(key) != value:
                self._apply("PUT", key, value)
                changed = True
        self.ready.set()
        if changed:
            await self._notify()
        return revision

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                revision = await self._relist()
                await self._notify()
                watch = await self.etcd.watch_prefix(self.prefix, start_revision=revision + 1)
                backoff = 0.2
                async for event in watch:
                    if not event.kv.key.startswith(self.prefix):
                        raise RuntimeError(f"watch delivered a foreign key {event.kv.key!r}")
                    if event.kind == "PUT":
                        self._apply("PUT", event.kv.key, event.kv.value)
                    else:
                        self._apply("DELETE", event.kv.key, None)
                    await self._notify()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # watch broken: re-list and re-watch
                log.warning("watch on %s failed (%s); re-listing", self.prefix.decode(), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 3.0)

    async def _resync_forever(self) -> None:
        """Re-list now and then: a watch that stalls silently cannot leave the copy stale for long."""
        while True:
            await asyncio.sleep(self.resync_s)
            try:
                await self._relist()
            except Unavailable as exc:
                log.warning("resync of %s failed: %s", self.prefix.decode(), exc)
