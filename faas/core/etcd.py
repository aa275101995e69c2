"""The platform's etcd adapter: a thin layer over ``aetcd`` that speaks the platform's errors.

Guarantees:
- every call either succeeds or raises ``Unavailable`` (etcd unreachable or timing out) — callers
  never see gRPC or aetcd exceptions;
- ``Lease`` keeps a lease alive in a guarded task and tells its owner when it is lost;
- ``PrefixMirror`` keeps an in-memory copy of a key prefix (list, then watch from the next revision,
  re-list after any watch failure and every ``resync_s`` in case a watch stalls silently), so readers
  on the hot path never wait on etcd.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions

from faas.core.errors import Unavailable
from faas.core.tasks import TaskSet

log = logging.getLogger("faas.etcd")

_OP_TIMEOUT_S = 5.0


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
    """One connection to etcd, shared by everything in a process."""

    def __init__(self, host: str, port: int, *, timeout_s: float = _OP_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.client = aetcd.Client(host=host, port=port, timeout=int(timeout_s) or 1, connect_wait_timeout=3)

    async def _call(self, what: str, coro: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(coro, self.timeout_s)
        except (aetcd.exceptions.ClientError, OSError) as exc:
            raise Unavailable(f"etcd at {self.host}:{self.port} failed on {what}: {exc or type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise Unavailable(f"etcd at {self.host}:{self.port} did not answer {what} in {self.timeout_s:.0f} s") from exc

    def fork(self) -> Etcd:
        """A separate connection to the same etcd (its own gRPC channel and watch stream)."""
        return Etcd(self.host, self.port, timeout_s=self.timeout_s)

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

    async def refresh_lease(self, lease_id: int) -> int:
        """Refresh a lease; returns its remaining TTL (<= 0 means the lease is gone)."""
        reply = await self._call("lease keepalive", self.client.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call("lease revoke", self.client.revoke_lease(lease_id))

    async def watch_prefix(self, prefix: bytes, *, start_revision: int) -> Any:
        return await self._call("watch", self.client.watch_prefix(prefix, start_revision=start_revision))


class Lease:
    """A lease kept alive by a guarded task; ``lost`` is set when it lapses."""

    def __init__(self, etcd: Etcd, ttl_s: int, *, owner: str) -> None:
        self.etcd = etcd
        self.ttl_s = ttl_s
        self.owner = owner
        self.lease_id = 0
        self.lost = asyncio.Event()
        self._tasks = TaskSet(f"lease:{owner}")

    async def grant(self) -> int:
        self.lease_id = await self.etcd.grant_lease(self.ttl_s)
        self.lost.clear()
        self._tasks.spawn(self._keepalive(self.lease_id), name="keepalive", long_lived=True)
        return self.lease_id

    async def _keepalive(self, lease_id: int) -> None:
        interval = max(self.ttl_s / 3.0, 0.3)
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await self.etcd.refresh_lease(lease_id)
            except Unavailable as exc:
                if loop.time() - last_ok > self.ttl_s:
                    log.warning("%s: lease %x presumed lost: %s", self.owner, lease_id, exc)
                    self.lost.set()
                    return
                continue
            if ttl <= 0:
                log.warning("%s: lease %x expired", self.owner, lease_id)
                self.lost.set()
                return
            last_ok = loop.time()

    async def revoke(self) -> None:
        await self._tasks.cancel_all()
        if self.lease_id:
            try:
                await self.etcd.revoke_lease(self.lease_id)
            except Unavailable:
                pass
            self.lease_id = 0


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
        self.ready = asyncio.Event()
        self.changed = asyncio.Condition()
        self._on_change = on_change
        self._tasks = TaskSet(f"mirror:{prefix.decode()}")

    def start(self) -> None:
        self._tasks.spawn(self._run(), name="watch", long_lived=True)
        self._tasks.spawn(self._resync_forever(), name="resync", long_lived=True)

    async def stop(self) -> None:
        await self._tasks.cancel_all()
        await self.etcd.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except TimeoutError as exc:
            raise Unavailable(f"could not read {self.prefix.decode()} from etcd") from exc

    def _apply(self, kind: str, key: bytes, value: bytes | None) -> None:
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
