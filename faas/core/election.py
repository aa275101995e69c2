"""Leader election on etcd: lease + transaction on ``create_revision == 0`` (as OpenWhisk does it).

Guarantees:
- at most one member holds ``/faas/election/{role}`` at a time; the key lives under the leader's
  lease, so a dead leader's key vanishes within the lease TTL and a standby takes over;
- ``fence()`` gives a comparison that holds only while this member's term is current: a deposed
  leader's fenced transactions fail instead of overwriting the new leader's work;
- ``is_leader`` turns false as soon as the lease is known lost (before the key expires on the server).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

from faas.core import keys
from faas.core.errors import NotLeader, Unavailable
from faas.core.etcd import Etcd, Lease, PrefixMirror
from faas.core.models import LeaderRecord

log = logging.getLogger("faas.election")


class Election:
    def __init__(self, etcd: Etcd, *, role: str, member_id: str, address: str, ttl_s: int) -> None:
        self.etcd = etcd
        self.role = role
        self.member_id = member_id
        self.address = address
        self.ttl_s = ttl_s
        self.key = keys.election(role)
        self.revision = 0  # create_revision of our leader key while we lead
        self.is_leader = False
        self.became_leader = asyncio.Event()
        self._lease: Lease | None = None

    def fence(self) -> Any:
        """A transaction comparison true only while this member's term is the current one."""
        if not self.is_leader:
            raise NotLeader(f"{self.member_id} is not the {self.role} leader")
        return self.etcd.create_revision(self.key) == self.revision

    def require_leader(self) -> None:
        if not self.is_leader:
            raise NotLeader(f"{self.member_id} is a standby {self.role}, not the leader")

    async def campaign_forever(self) -> NoReturn:
        poll_s = min(0.5, self.ttl_s / 4)
        while True:
            try:
                await self._campaign_once(poll_s)
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:
                log.warning("%s %s: election unavailable: %s", self.role, self.member_id, exc)
            self._step_down()
            await asyncio.sleep(poll_s)

    async def _campaign_once(self, poll_s: float) -> None:
        lease = Lease(self.etcd, self.ttl_s, owner=f"{self.role}:{self.member_id}")
        self._lease = lease
        try:
            lease_id = await lease.grant()
            record = LeaderRecord(role=self.role, member_id=self.member_id, address=self.address)
            while True:
                ok, responses = await self.etcd.txn(
                    [self.etcd.create_revision(self.key) == 0],
                    [self.etcd.op_put(self.key, record.model_dump_json().encode(), lease=lease_id)],
                )
                if ok:
                    # The transaction created the key, so its revision is the key's create_revision:
                    # lead at once, without a second round trip during which peers already see our
                    # record but we would still answer "not leader".
                    self.revision = int(responses[0].response_put.header.revision)
                    self.is_leader = True
                    self.became_leader.set()
                    log.info("%s %s: elected leader (revision %d)", self.role, self.member_id, self.revision)
                    await lease.lost.wait()
                    log.warning("%s %s: lost leadership", self.role, self.member_id)
                    return
                if lease.lost.is_set():
                    return
                await asyncio.sleep(poll_s)
        finally:
            self._step_down()
            await lease.revoke()

    def _step_down(self) -> None:
        self.is_leader = False
        self.became_leader.clear()
        self.revision = 0

    async def resign(self) -> None:
        self._step_down()
        if self._lease is not None:
            await self._lease.revoke()


class LeaderWatch:
    """Follows who leads a role, from a watched copy of its election key."""

    def __init__(self, etcd: Etcd, role: str) -> None:
        self.role = role
        self.etcd = etcd
        self._key = keys.election(role)
        self.mirror = PrefixMirror(etcd, self._key)

    def start(self) -> None:
        self.mirror.start()

    async def stop(self) -> None:
        await self.mirror.stop()

    def current(self) -> LeaderRecord | None:
        raw = self.mirror.items.get(self._key)
        return LeaderRecord.model_validate_json(raw) if raw else None

    async def wait_for_leader(self, timeout_s: float, *, not_address: str | None = None) -> LeaderRecord:
        """The current leader, waiting up to ``timeout_s`` for one (other than ``not_address``) to appear.

        While waiting it also reads the key directly, so a failover is seen even if the watch lags.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            leader = self.current()
            if leader is not None and leader.address != not_address:
                return leader
            try:
                kv = await self.etcd.get(self._key)
            except Unavailable:
                kv = None
            if kv is not None:
                fresh = LeaderRecord.model_validate_json(kv.value)
                if fresh.address != not_address:
                    return fresh
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(f"no {self.role} leader is elected")
            async with self.mirror.changed:
                try:
                    await asyncio.wait_for(self.mirror.changed.wait(), min(remaining, 0.25))
                except TimeoutError:
                    pass
