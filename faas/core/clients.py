"""Typed clients of the platform's internal calls: the one place that knows how to reach each service.

Every internal call goes through here, built from ``faas.core.wire`` (paths, headers, deadlines), on
the hop client (``faas.core.http``).  What each guarantees:

``LeaderClient`` (the base of ``TriggerClient`` and ``SchedulerClient``) calls whoever holds a
role's election, through its unix socket when it runs on this machine (``wire.hop_address``):
- when the leader answers 503 ``not_leader`` or cannot be reached, the call waits (within its
  deadline) for the next leader and is sent there, so a failover shows up as added latency;
- a call still outstanding on a leader when another is elected (the old one froze, or died with the
  connection left hanging) is re-sent to the new one at once, with the same request: a trigger's
  dispatcher joins a re-sent sync call to the running one by request id, an async call is queued at
  most once per id, a scheduler that woke up after its term cannot record its start (fenced);
- no call waits past its deadline: a hop that times out is ``DeadlineExceeded``.
Caveat: a sync call a dead trigger forwarded, whose dispatcher already finished it, runs again
(at-least-once across a trigger crash).

``DispatcherClient`` and ``NodeClient`` call one given member (the trigger ranks dispatchers
itself; node agents are addressed by their node record).

Every client is made with the platform's internal token (``Settings.internal_token``) and sends it
with each call (``faas.core.http``).  A service that refuses it (401: the two processes were given
different tokens) is a platform fault the caller cannot mend: the call fails with ``TokenRefused``
(500, its message names the setting), never with a 401 a user would read as their API key's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from faas.core import wire
from faas.core.election import LeaderWatch
from faas.core.errors import DeadlineExceeded, FaasError, Unavailable, error_from_body
from faas.core.http import HopClient, HopError, HopResponse, HopTimeout, NotDelivered
from faas.core.models import InstanceRecord, InstanceStatus, NodeRecord, VersionKey

log = logging.getLogger("faas.clients")

_JSON = {"content-type": "application/json"}


def response_json(resp: HopResponse) -> object:
    try:
        return json.loads(resp.body)
    except ValueError:
        return resp.body.decode(errors="replace")


def raise_for_error(resp: HopResponse) -> None:
    """The platform's error a non-2xx answer carries (its kind, type and message), raised."""
    if resp.status >= 300:
        raise error_from_body(response_json(resp), resp.status)


class TokenRefused(FaasError):
    """A platform service refused this process's internal token."""


def token_refused(service: str, what: str) -> TokenRefused:
    return TokenRefused(
        f"{what}: {service} refused this process's internal token "
        "(every platform process must run with the same FAAS_INTERNAL_TOKEN)"
    )


class LeaderClient:
    """Calls the elected leader of ``leader.role``; ``start`` it before the first call.  ``http``
    replaces the transport (it must send ``internal_token`` itself)."""

    def __init__(self, leader: LeaderWatch, *, internal_token: str, http: HopClient | None = None) -> None:
        self.leader = leader
        self.http = http or HopClient(internal_token=internal_token)
        # Requests outstanding on each leader's address, cancelled when another leader is elected.
        self._outstanding: dict[str, set[asyncio.Future[HopResponse]]] = {}
        self._follower: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._follower = asyncio.get_running_loop().create_task(
            self._follow_leader(), name=f"{self.leader.role}-client:follow"
        )

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        await self.http.close()

    async def _follow_leader(self) -> None:
        """On every new leader, re-send the calls outstanding on any other one (for as long as the
        client runs: a failure is logged and the watch goes on)."""
        while True:
            try:
                current = self.leader.current()
                leader = await self.leader.wait_for_other_leader(current.address if current else "")
            except Exception:
                log.exception("following the %s leader failed; going on", self.leader.role)
                await asyncio.sleep(0.5)
                continue
            for address, pending in list(self._outstanding.items()):
                if address != leader.address:
                    for request in list(pending):
                        request.cancel()

    async def call(
        self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str], deadline: float,
        what: str, stream: bool = False,
    ) -> HopResponse:  # fmt: skip
        """Send ``method path`` to the leader until one answers other than ``not_leader``, within
        ``deadline`` (epoch seconds); with ``stream`` the body of the answer is still to be read."""
        skip: str | None = None
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"{what} did not finish before its deadline")
            leader = await self.leader.wait_for_leader(remaining, not_address=skip)
            request = asyncio.ensure_future(
                self.http.request(
                    method, wire.hop_address(leader) + path, body=body, headers=headers,
                    timeout_s=remaining + 1.0, stream=True,
                )
            )  # fmt: skip
            pending = self._outstanding.setdefault(leader.address, set())
            pending.add(request)
            try:
                resp = await asyncio.shield(request)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not request.cancelled() or (task is not None and task.cancelling()):
                    request.cancel()
                    raise  # our caller was cancelled, not (only) the request
                log.warning("%s leader changed during %s; sending it to the new one", self.leader.role, what)
                skip = leader.address  # another leader was elected while this one held the call
                continue
            except HopTimeout as exc:
                raise DeadlineExceeded(f"{what} did not finish before its deadline") from exc
            except NotDelivered:
                # It never saw the call: ask again (the same leader, until the election names another:
                # a dead leader's lease is revoked within about a second).
                await asyncio.sleep(0.05)
                continue
            except HopError:
                # The connection broke with the call on it (a pooled connection reset by a dead
                # process): send the call to the next leader.
                skip = leader.address
                await asyncio.sleep(0.05)
                continue
            finally:
                pending.discard(request)
            if resp.status == 401:
                resp.close()
                raise token_refused(f"the {self.leader.role} leader", what)
            if resp.status == 503 or not stream:
                await resp.read()
            if resp.status == 503 and error_from_body(response_json(resp), 503).kind == "not_leader":
                # A standby, or a member elected a moment ago that does not know it yet: ask again
                # shortly, without excluding it (the election key tells who leads).
                await asyncio.sleep(0.1)
                continue
            return resp


class ReadOnce:
    """A request body that can be sent once, telling whether sending it has begun."""

    __slots__ = ("body", "started")

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self.body = body
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self.body:
            yield chunk


class TriggerClient(LeaderClient):
    """The gateway's path to the primary trigger."""

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
        its head, its body still to be read."""
        headers = {
            wire.REQUEST_ID: request_id,
            wire.DEADLINE_MS: wire.deadline_header(deadline),
            wire.FUNCTION_UID: function_uid,
            **(extra_headers or {}),
        }
        path = (wire.trigger_invoke_async if asynchronous else wire.trigger_invoke)(ns, name, version)
        return await self.call(
            "POST", path, body=body, headers=headers, deadline=deadline, what=f"invocation of {name!r}", stream=stream
        )

    async def app_request(
        self, ns: str, name: str, version: int, *, method: str, path: str, query: bytes,
        headers: list[tuple[str, str]], body: bytes | AsyncIterable[bytes], deadline: float, function_uid: str,
    ) -> HopResponse:  # fmt: skip
        """One request of a web app to the primary, its body and answer streamed.  Sent again to a
        new primary only while none of its body has been read (a body read once cannot be re-sent);
        a 503 ``not_leader`` is told from the app's own 503 by ``wire.NOT_LEADER``."""
        once = body if isinstance(body, bytes) else ReadOnce(body)
        target = wire.app_request(ns, name, version, path, query)
        sent = [*headers, (wire.DEADLINE_MS, wire.deadline_header(deadline)), (wire.FUNCTION_UID, function_uid)]
        what = f"a request of app {name!r}"
        skip: str | None = None
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"{what} did not finish before its deadline")
            leader = await self.leader.wait_for_leader(remaining, not_address=skip)
            try:
                resp = await self.http.request(
                    method, wire.hop_address(leader) + target, body=once, headers=sent, timeout_s=remaining + 1.0,
                    stream=True, multiplex=False,
                )  # fmt: skip
            except HopTimeout as exc:
                raise DeadlineExceeded(f"{what} did not finish before its deadline") from exc
            except HopError as exc:
                if isinstance(once, ReadOnce) and once.started:
                    raise Unavailable(f"the trigger went away during {what}: {exc}") from exc
                skip = None if isinstance(exc, NotDelivered) else leader.address
                await asyncio.sleep(0.05)
                continue
            if resp.status == 503 and resp.headers.get(wire.NOT_LEADER) == "1":
                resp.close()
                if isinstance(once, ReadOnce) and once.started:
                    raise Unavailable(f"the trigger lost its leadership during {what}")
                await asyncio.sleep(0.1)
                continue
            return resp

    async def enqueue(self, events: list[dict[str, object]], *, deadline: float) -> HopResponse:
        """Queue events for several functions in one transaction on the primary (all or none).

        Caveat: a batch re-sent after a trigger failover may be queued twice (its events carry no
        ids the trigger could de-duplicate by); a single async call is queued at most once per id."""
        headers = {wire.DEADLINE_MS: wire.deadline_header(deadline), **_JSON}
        body = json.dumps({"events": events}).encode()
        return await self.call(
            "POST", wire.TRIGGER_ENQUEUE, body=body, headers=headers, deadline=deadline, what="enqueueing events"
        )


class SchedulerClient(LeaderClient):
    """A dispatcher's path to the scheduler leader."""

    async def acquire(self, key: VersionKey, deadline: float) -> InstanceRecord:
        """A new instance of ``key``'s version, started and recorded by the scheduler leader."""
        ns, name, version, uid = key
        resp = await self.call(
            "POST", f"{wire.scheduler_acquire(ns, name, version)}?uid={uid}", headers={},
            deadline=deadline, what=f"starting an instance of {name!r}",
        )  # fmt: skip
        raise_for_error(resp)
        return InstanceRecord.model_validate_json(resp.body)

    async def retire(self, instance_id: str) -> None:
        """Tell the leader an instance is broken (best effort: it also finds out by itself)."""
        try:
            resp = await self.call(
                "POST", wire.scheduler_retire(instance_id), headers={}, deadline=time.time() + 10.0,
                what=f"retiring {instance_id}",
            )  # fmt: skip
            raise_for_error(resp)
        except FaasError as exc:
            log.warning("could not report %s to the scheduler: %s", instance_id, exc)


class DispatcherClient:
    """The trigger's calls to a dispatcher it chose (at its ``wire.hop_address``)."""

    def __init__(self, *, internal_token: str, http: HopClient | None = None) -> None:
        self.http = http or HopClient(internal_token=internal_token)

    async def invoke(
        self, address: str, ns: str, name: str, version: int, body: bytes, *, request_id: str, deadline: float,
        function_uid: str | None,
    ) -> HopResponse:  # fmt: skip
        """One sync call, answered at its head (``HopResponse.stream``); ``HopError`` as it comes."""
        headers = {wire.REQUEST_ID: request_id, wire.DEADLINE_MS: wire.deadline_header(deadline)}
        if function_uid is not None:
            headers[wire.FUNCTION_UID] = function_uid
        resp = await self.http.post(
            address + wire.dispatcher_invoke(ns, name, version), body=body, headers=headers,
            timeout_s=deadline - time.time() + 0.5, stream=True,
        )  # fmt: skip
        if resp.status == 401:
            resp.close()
            raise token_refused(f"the dispatcher at {address}", f"invocation of {name!r}")
        return resp

    async def app_request(
        self, address: str, ns: str, name: str, version: int, *, method: str, path: str, query: bytes,
        headers: list[tuple[str, str]], body: bytes | AsyncIterable[bytes], deadline: float,
    ) -> HopResponse:  # fmt: skip
        """One request of a web app, its body and answer streamed (an HTTP connection, not the
        multiplexed one, whose answers come whole); ``HopError`` as it comes."""
        resp = await self.http.request(
            method, address + wire.app_request(ns, name, version, path, query), body=body,
            headers=[*headers, (wire.DEADLINE_MS, wire.deadline_header(deadline))],
            timeout_s=deadline - time.time() + 0.5, stream=True, multiplex=False,
        )  # fmt: skip
        return resp  # a 401 is the app's own: a dispatcher's refusal of the token looks no different

    async def close(self) -> None:
        await self.http.close()


class NodeUnreachable(Unavailable):
    """The node agent refused the connection: it never saw the request."""


class NodeClient:
    """Calls to node agents, addressed by their node records."""

    def __init__(self, *, timeout_s: float, internal_token: str, http: HopClient | None = None) -> None:
        self.timeout_s = timeout_s
        self.http = http or HopClient(internal_token=internal_token)

    async def _request(
        self, node: NodeRecord, method: str, path: str, *, body: object = None, timeout_s: float | None = None
    ) -> HopResponse:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            resp = await self.http.request(
                method, node.address + path, body=data, headers=_JSON if body is not None else {},
                timeout_s=timeout_s or self.timeout_s,
            )  # fmt: skip
        except NotDelivered as exc:
            raise NodeUnreachable(f"node agent {node.node_id} at {node.address} refused the connection") from exc
        except HopError as exc:
            raise Unavailable(f"node agent {node.node_id} at {node.address} failed: {exc}") from exc
        if resp.status == 401:
            raise token_refused(f"node agent {node.node_id}", f"{method} {path}")
        return resp

    async def start_instance(self, node: NodeRecord, body: dict[str, Any]) -> str:
        """Start an instance on ``node``; its address."""
        resp = await self._request(node, "POST", wire.NODE_INSTANCES, body=body)
        raise_for_error(resp)
        return str(json.loads(resp.body)["address"])

    async def stop_instance(self, node: NodeRecord, instance_id: str) -> None:
        resp = await self._request(node, "DELETE", wire.node_instance(instance_id), timeout_s=5.0)
        if resp.status != 404:
            raise_for_error(resp)

    async def instances(self, node: NodeRecord) -> list[InstanceStatus]:
        resp = await self._request(node, "GET", wire.NODE_INSTANCES, timeout_s=5.0)
        raise_for_error(resp)
        return [InstanceStatus.model_validate(item) for item in json.loads(resp.body)]

    async def instance_exit(self, node: NodeRecord, instance_id: str, *, wait_s: float) -> dict[str, Any]:
        """How an instance ended, as its node agent saw it ({} if it did not see it end)."""
        resp = await self._request(
            node, "GET", f"{wire.node_instance_exit(instance_id)}?wait_s={wait_s}", timeout_s=wait_s + 3.0
        )
        if resp.status != 200:
            return {}
        found = json.loads(resp.body)
        return found if isinstance(found, dict) else {}

    async def close(self) -> None:
        await self.http.close()
