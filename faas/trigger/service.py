"""The trigger: the single entry for events, primary/standby through an etcd election.

Guarantees:
- only the elected primary forwards events; a standby answers 503 ``not_leader`` so the gateway
  re-resolves the primary.  The primary keeps forwarding while etcd is unreachable (its term is not
  known to be over: ``Election.serving``), and stops at once after it was frozen past its lease;
- a sync event goes to the dispatcher that rendezvous hashing assigns to its function (warm instances
  stay on one dispatcher); if that dispatcher is unreachable or saturated (429 with
  ``X-Faas-Saturated: 1``), the next one in the ranking gets it, within the event's deadline; any
  other 429 (a function over its own limit) goes back to the caller with its ``Retry-After``; the
  function uid the gateway resolved goes with it (``X-Faas-Function-Uid``), so the dispatcher
  serves that function or answers 404.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable

from faas.core import keys, wire
from faas.core.clients import DispatcherClient, ReadOnce
from faas.core.election import Election
from faas.core.errors import DeadlineExceeded, Unavailable
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.http import HopError, HopResponse, HopTimeout
from faas.core.models import MemberRecord
from faas.core.rendezvous import rank
from faas.core.settings import Settings
from faas.core.tasks import TaskSet

log = logging.getLogger("faas.trigger")



class Trigger:
    def __init__(self, *, settings: Settings, etcd: Etcd, election: Election) -> None:
        self.settings = settings
        self.election = election
        self.dispatchers = PrefixMirror(etcd, keys.members_prefix("dispatcher"))
        self.dispatcher_client = DispatcherClient(internal_token=settings.internal_token)
        self.tasks = TaskSet("trigger")
        self._addresses: dict[bytes, tuple[bytes, str]] = {}
        # The dispatcher ranking of each function, for the membership of ``_ranked_generation``.
        self._ranked: dict[str, list[str]] = {}
        self._ranked_generation = -1
        self._members: dict[str, str] = {}

    async def start(self) -> None:
        self.dispatchers.start()
        self.tasks.spawn(self.election.campaign_forever(), name="election", long_lived=True)
        await self.dispatchers.wait_ready(timeout_s=None)

    async def close(self) -> None:
        await self.tasks.cancel_all()
        await self.election.resign()
        await self.dispatchers.stop()
        await self.dispatcher_client.close()

    def dispatcher_addresses(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, raw in list(self.dispatchers.items.items()):
            cached = self._addresses.get(key)
            if cached is None or cached[0] is not raw:
                record = MemberRecord.model_validate_json(raw)
                cached = (raw, wire.hop_address(record))
                self._addresses[key] = cached
            out[key.decode().rsplit("/", 1)[-1]] = cached[1]
        return out

    def ranking(self, function_key: str) -> tuple[dict[str, str], list[str]]:
        """The dispatchers (id -> address) and their order of preference for a function, cached until
        the membership changes."""
        generation = self.dispatchers.generation
        if generation != self._ranked_generation:
            self._members = self.dispatcher_addresses()
            self._ranked = {}
            self._ranked_generation = generation
        ranked = self._ranked.get(function_key)
        if ranked is None:
            if len(self._ranked) > 10_000:
                self._ranked.clear()
            ranked = self._ranked[function_key] = rank(self._members, function_key)
        return self._members, ranked

    async def app_request(
        self, ns: str, name: str, version: int, *, method: str, path: str, query: bytes,
        headers: list[tuple[str, str]], body: bytes | AsyncIterable[bytes], deadline: float,
    ) -> HopResponse:  # fmt: skip
        """A web app's request, to the dispatcher rendezvous hashing picks for the app (the next one
        while none has received it), its body and answer streamed."""
        self.election.require_serving()
        members, ranked = self.ranking(f"{ns}/{name}")
        if not members:
            raise Unavailable("no dispatcher is registered")
        once = body if isinstance(body, bytes) else ReadOnce(body)
        last_error = "no dispatcher answered"
        for member_id in ranked:
            if deadline <= time.time():
                break
            try:
                return await self.dispatcher_client.app_request(
                    members[member_id], ns, name, version, method=method, path=path, query=query,
                    headers=headers, body=once, deadline=deadline,
                )  # fmt: skip
            except HopTimeout as exc:
                raise DeadlineExceeded(f"a request of app {name!r} did not finish before its deadline") from exc
            except HopError as exc:
                if isinstance(once, ReadOnce) and once.started:
                    raise Unavailable(f"dispatcher {member_id} went away during a request of app {name!r}") from exc
                last_error = f"dispatcher {member_id} unreachable: {exc}"
                log.warning(last_error)
        raise Unavailable(last_error)

    async def invoke_sync(
        self, ns: str, name: str, version: int, body: bytes, *, request_id: str, deadline: float,
        uid: str | None = None,
    ) -> HopResponse:
        self.election.require_serving()
        members, ranked = self.ranking(f"{ns}/{name}")
        if not members:
            raise Unavailable("no dispatcher is registered")
        last_error = "no dispatcher answered"
        for member_id in ranked:
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            try:
                resp = await self.dispatcher_client.invoke(
                    members[member_id], ns, name, version, body, request_id=request_id, deadline=deadline,
                    function_uid=uid,
                )  # fmt: skip
            except HopTimeout as exc:
                raise DeadlineExceeded(f"invocation of {name!r} did not finish before its deadline") from exc
            except HopError as exc:
                # Refused, or reset by a dispatcher that died: the next one in the ranking gets the call
                # (if the dead one had already started it, the function may run twice).
                last_error = f"dispatcher {member_id} unreachable: {exc}"
                log.warning(last_error)
                continue
            if resp.status == 429 and resp.headers.get(wire.SATURATED) == "1":
                resp.close()
                last_error = f"dispatcher {member_id} saturated"
                continue
            return resp
        raise Unavailable(last_error)
