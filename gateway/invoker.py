"""The gateway's path to the primary trigger.

Guarantees: a call goes to whoever holds the trigger election; when the primary answers 503
``not_leader`` or cannot be reached, the call waits (within its deadline) for the next primary and
is sent there, so a trigger failover shows up as added latency, not as an error.  A call still
waiting on a primary when another is elected (the old one froze, or died with the connection left
hanging) is re-sent to the new one at once, with the same request id: the dispatcher that may still
be running it joins the re-sent call to the running one (``Dispatcher.invoke``) instead of running
the function twice; an async call is queued at most once per id (the trigger's enqueue is
idempotent by invocation id).  Caveat: a sync call the dead primary forwarded and whose dispatcher
already finished it runs again (at-least-once across a trigger crash).
"""

from __future__ import annotations

import asyncio
import json
import time

from faas.core import wire
from faas.core.election import LeaderWatch
from faas.core.errors import DeadlineExceeded, error_from_body
from faas.core.http import HopClient, HopError, HopResponse, HopTimeout


class TriggerClient:
    def __init__(self, leader: LeaderWatch) -> None:
        self.leader = leader
        self.http = HopClient()
        # Requests outstanding on each primary's address, cancelled when another primary is elected.
        self._outstanding: dict[str, set[asyncio.Future[HopResponse]]] = {}
        self._follower: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._follower = asyncio.get_running_loop().create_task(self._follow_leader(), name="trigger-client:follow")

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        await self.http.close()

    async def _follow_leader(self) -> None:
        """On every new primary, re-send the calls outstanding on any other one."""
        while True:
            current = self.leader.current()
            leader = await self.leader.wait_for_other_leader(current.address if current else "")
            for address, pending in list(self._outstanding.items()):
                if address != leader.address:
                    for request in list(pending):
                        request.cancel()

    async def invoke(
        self,
        ns: str,
        name: str,
        version: int,
        body: bytes,
        *,
        request_id: str,
        deadline: float,
        function_uid: str,
        asynchronous: bool = False,
        extra_headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> HopResponse:
        """Send a call to the primary, sync (the result) or ``asynchronous`` (enqueued: 202), for
        ``version`` of the function with ``function_uid``; with ``stream`` the response comes back at
        its head, its body still to be read (``faas.core.http.HopResponse``)."""
        headers = {
            wire.REQUEST_ID: request_id,
            wire.DEADLINE_MS: wire.deadline_header(deadline),
            wire.FUNCTION_UID: function_uid,
            **(extra_headers or {}),
        }
        path = (wire.trigger_invoke_async if asynchronous else wire.trigger_invoke)(ns, name, version)
        return await self._post(path, body, headers, deadline, what=f"invocation of {name!r}", stream=stream)

    async def enqueue(self, events: list[dict[str, object]], *, deadline: float) -> HopResponse:
        """Queue events for several functions in one transaction on the primary (all or none)."""
        body = json.dumps({"events": events}).encode()
        headers = {wire.DEADLINE_MS: wire.deadline_header(deadline), "content-type": "application/json"}
        return await self._post(wire.TRIGGER_ENQUEUE, body, headers, deadline, what="enqueueing events")

    async def _post(
        self, path: str, body: bytes, headers: dict[str, str], deadline: float, *, what: str, stream: bool = False
    ) -> HopResponse:
        skip: str | None = None
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"{what} did not finish before its deadline")
            leader = await self.leader.wait_for_leader(remaining, not_address=skip)
            request = asyncio.ensure_future(
                self.http.post(
                    f"{wire.hop_address(leader)}{path}", body=body, headers=headers, timeout_s=remaining + 1.0, stream=True
                )
            )
            pending = self._outstanding.setdefault(leader.address, set())
            pending.add(request)
            try:
                resp = await asyncio.shield(request)
            except asyncio.CancelledError:
                if not request.cancelled():
                    request.cancel()
                    raise  # our caller was cancelled, not the request
                skip = leader.address  # another primary was elected while this one held the call
                continue
            except HopTimeout as exc:
                raise DeadlineExceeded(f"{what} did not finish before its deadline") from exc
            except HopError:
                # The trigger went away (refused, or a pooled connection reset by a dead process): send
                # the call to the next primary.  If the old primary died after forwarding the call, the
                # function may run twice: a sync call is at-least-once across a trigger crash.
                skip = leader.address
                await asyncio.sleep(0.05)
                continue
            finally:
                pending.discard(request)
            if resp.status == 503 or not stream:
                await resp.read()
            if resp.status == 503 and error_from_body(_json(resp), 503).kind == "not_leader":
                # A standby, or a member elected a moment ago that does not know it yet: ask again
                # shortly, without excluding it (the election key tells who leads).
                await asyncio.sleep(0.1)
                continue
            return resp


def _json(resp: HopResponse) -> object:
    try:
        return json.loads(resp.body)
    except ValueError:
        return resp.body.decode(errors="replace")
