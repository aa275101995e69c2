"""Leader election on etcd: lease + transaction on ``create_revision == 0`` (as OpenWhisk does it).

Guarantees:
- at most one member holds ``/faas/election/{role}`` at a time; the key lives under the leader's
  lease, so a dead leader's key vanishes within the lease TTL and a standby takes over;
- ``fence()`` gives a comparison that holds only while this member's term is current: a deposed
  leader's fenced transactions fail instead of overwriting the new leader's work;
- ``is_leader`` is true only while the lease is confirmed (``Lease.valid``): a leader that cannot
  reach etcd, or was frozen past its TTL, stops acting at once, before anyone else can be elected;
  when etcd confirms the lease again and the key is still this term's, it resumes without a gap;
- ``serving`` is the weaker "this term is not known to be over": it stays true while the lease is
  merely unconfirmed because etcd is unreachable (the keepalive keeps trying), for work that is safe
  for two members to do at once during a takeover (the trigger forwarding invocations), so an etcd
  outage does not stop it; it is false in a process that was frozen (its keepalive did not run), so
  a leader resumed after SIGSTOP serves nothing until etcd confirms its term;
- a standby watches the key and campaigns the moment it is deleted; with ``probe_leader`` it also
  checks that the leader's address still accepts connections, and revokes the lease of a leader
  whose port refuses them twice in a row (its process is gone), so a killed leader is replaced in
  about a second instead of a TTL.  A frozen leader still accepts connections (the kernel does), so
  it is replaced when its lease lapses.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn
from urllib.parse import urlparse

from faas.core import keys, wire
from faas.core.errors import NotLeader, Unavailable
from faas.core.etcd import Etcd, Lease, PrefixMirror
from faas.core.models import LeaderRecord

log = logging.getLogger("faas.election")

_PROBE_INTERVAL_S = 0.25
_PROBE_TIMEOUT_S = 0.5
_REFUSALS_TO_DEPOSE = 2


class Election:
    def __init__(
        self,
        etcd: Etcd,
        *,
        role: str,
        member_id: str,
        address: str,
        ttl_s: int,
        probe_leader: bool = False,
        local_address: str | None = None,
    ) -> None:
        self.etcd = etcd
        self.role = role
        self.member_id = member_id
        self.address = address
        self.local_address = local_address
        self.ttl_s = ttl_s
        self.probe_leader = probe_leader
        self.key = keys.election(role)
        self.revision = 0  # create_revision of our leader key while we lead
        self.became_leader = asyncio.Event()
        self._leading = False
        self._term = False  # elected, and not known to have lost the term
        self._lease: Lease | None = None
        self._watch = LeaderWatch(etcd, role)

    @property
    def is_leader(self) -> bool:
        return self._leading and self._lease is not None and self._lease.valid()

    def fence(self) -> Any:
        """A transaction comparison true only while this member's term is the current one."""
        if not self.is_leader:
            raise NotLeader(f"{self.member_id} is not the {self.role} leader")
        return self.etcd.create_revision(self.key) == self.revision

    def require_leader(self) -> None:
        if not self.is_leader:
            raise NotLeader(f"{self.member_id} is a standby {self.role}, not the leader")

    @property
    def serving(self) -> bool:
        lease = self._lease
        return self._term and lease is not None and (lease.valid() or lease.keepalive_running())

    def require_serving(self) -> None:
        if not self.serving:
            raise NotLeader(f"{self.member_id} is a standby {self.role}, not the leader")

    async def campaign_forever(self) -> NoReturn:
        poll_s = min(0.5, self.ttl_s / 4)
        self._watch.start()
        try:
            while True:
                try:
                    await self._campaign_once(poll_s)
                except asyncio.CancelledError:
                    raise
                except Unavailable as exc:
                    log.warning("%s %s: election unavailable: %s", self.role, self.member_id, exc)
                self._step_down()
                await asyncio.sleep(poll_s)
        finally:
            await self._watch.stop()

    async def _campaign_once(self, poll_s: float) -> None:
        lease = Lease(self.etcd, self.ttl_s, owner=f"{self.role}:{self.member_id}")
        self._lease = lease
        try:
            lease_id = await lease.grant()
            refusals = 0
            while True:
                record = LeaderRecord(
                    role=self.role, member_id=self.member_id, address=self.address,
                    local_address=self.local_address, machine=wire.machine_id(),
                )  # fmt: skip
                ok, responses = await self.etcd.txn(
                    [self.etcd.create_revision(self.key) == 0],
                    [self.etcd.op_put(self.key, record.model_dump_json().encode(), lease=lease_id)],
                )
                if ok:
                    # The transaction created the key, so its revision is the key's create_revision:
                    # lead at once, without a second round trip during which peers already see our
                    # record but we would still answer "not leader".
                    self.revision = int(responses[0].response_put.header.revision)
                    await self._lead(lease)
                    return
                if lease.lost.is_set():
                    return
                refusals = await self._wait_for_vacancy(poll_s, refusals)
        finally:
            self._step_down()
            await lease.revoke()

    async def _lead(self, lease: Lease) -> None:
        """Act as leader while the lease is confirmed; return when this term is over."""
        resumed = False
        self._term = True
        while True:
            self._leading = True
            self.became_leader.set()
            if resumed:
                log.warning("%s %s: lease confirmed again; leading on (revision %d)", self.role, self.member_id, self.revision)
            else:
                log.info("%s %s: elected leader (revision %d)", self.role, self.member_id, self.revision)
            await lease.wait_invalid()
            self._leading = False
            self.became_leader.clear()
            if lease.lost.is_set():
                log.warning("%s %s: lost leadership (lease gone)", self.role, self.member_id)
                return
            log.warning("%s %s: lease not confirmed within its TTL; acting no more until it is", self.role, self.member_id)
            if not await lease.wait_valid():
                log.warning("%s %s: lost leadership (lease gone)", self.role, self.member_id)
                return
            # etcd kept the lease, so it kept our key, unless someone deleted it meanwhile.
            try:
                kv = await self.etcd.get(self.key)
            except Unavailable:
                return
            if kv is None or kv.create_revision != self.revision:
                log.warning("%s %s: lost leadership (the key changed hands)", self.role, self.member_id)
                return
            resumed = True

    async def _wait_for_vacancy(self, poll_s: float, refusals: int) -> int:
        """Wait until the key may be free (deleted, or ``poll_s`` passed); returns the refusal count.

        With ``probe_leader``, a leader whose port refuses connections ``_REFUSALS_TO_DEPOSE`` times in
        a row has its lease revoked: a process that no longer listens cannot be leading."""
        interval = min(poll_s, _PROBE_INTERVAL_S) if self.probe_leader else poll_s
        if self._watch.current() is not None:
            await self._watch.wait_change(interval)  # a deletion wakes us at once
        else:
            # Our copy has no key, yet the transaction found one: the copy lags (or the key went
            # just now).  Try again soon, not in a tight loop.
            await asyncio.sleep(min(interval, 0.1))
        leader = self._watch.current()
        if not self.probe_leader or leader is None or leader.member_id == self.member_id:
            return 0
        if not await _refuses_connections(leader.address):
            return 0
        refusals += 1
        if refusals < _REFUSALS_TO_DEPOSE:
            return refusals
        await self._depose(leader)
        return 0

    async def _depose(self, leader: LeaderRecord) -> None:
        try:
            kv = await self.etcd.get(self.key)
            if kv is None or kv.lease == 0:
                return
            current = LeaderRecord.model_validate_json(kv.value)
            if current.member_id != leader.member_id or current.address != leader.address:
                return  # a new term began meanwhile
            log.warning(
                "%s %s: leader %s at %s refuses connections; revoking its lease",
                self.role, self.member_id, leader.member_id, leader.address,
            )  # fmt: skip
            await self.etcd.revoke_lease(kv.lease)
        except Unavailable as exc:
            log.warning("%s %s: could not depose %s: %s", self.role, self.member_id, leader.member_id, exc)

    def _step_down(self) -> None:
        self._leading = False
        self._term = False
        self.became_leader.clear()
        self.revision = 0

    async def resign(self) -> None:
        self._step_down()
        if self._lease is not None:
            await self._lease.revoke()


async def _refuses_connections(address: str) -> bool:
    """True when nothing listens at ``address`` (connection refused); False if it accepts or hangs."""
    parsed = urlparse(address)
    if parsed.scheme != "http" or parsed.hostname is None or parsed.port is None:
        return False
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parsed.hostname, parsed.port), _PROBE_TIMEOUT_S)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    writer.close()
    return False


class LeaderWatch:
    """Follows who leads a role, from a watched copy of its election key."""

    def __init__(self, etcd: Etcd, role: str) -> None:
        self.role = role
        self.etcd = etcd
        self._key = keys.election(role)
        self.mirror = PrefixMirror(etcd, self._key)
        self._parsed: tuple[bytes, LeaderRecord] | None = None

    def start(self) -> None:
        self.mirror.start()

    async def stop(self) -> None:
        await self.mirror.stop()

    def current(self) -> LeaderRecord | None:
        raw = self.mirror.items.get(self._key)
        if not raw:
            return None
        if self._parsed is None or self._parsed[0] is not raw:
            self._parsed = (raw, LeaderRecord.model_validate_json(raw))
        return self._parsed[1]

    async def wait_for_other_leader(self, address: str) -> LeaderRecord:
        """Return once the key changes to a leader other than the one at ``address`` (however long).

        Only a change seen from now on counts: a copy that lags behind what the caller read directly
        from etcd must not look like a new election."""
        seen = self.mirror.items.get(self._key)
        while True:
            raw = self.mirror.items.get(self._key)
            if raw is not None and raw is not seen:
                leader = self.current()
                if leader is not None and leader.address != address:
                    return leader
                seen = raw
            await self.wait_change(1.0)

    async def wait_change(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the key to change."""
        async with self.mirror.changed:
            try:
                await asyncio.wait_for(self.mirror.changed.wait(), timeout_s)
            except TimeoutError:
                pass

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
            await self.wait_change(min(remaining, 0.25))
