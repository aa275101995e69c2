"""The faults: which process each one hits, how it is found, and the one signal (or stop) it gets.

Every victim is a component the supervisor of *this* run's platform started: its pid comes from the
state file (``<home>/run/cluster.json``) or from an etcd record, and is signalled only while the state
file names that pid for that component and ``/proc/<pid>/stat`` still shows the recorded start time
(a recycled pid is never signalled).  The runner never starts or restarts anything: after a SIGKILL the
supervisor starts the component again by itself, which is what the runs measure.

| fault | victim | how it is found |
| --- | --- | --- |
| ``trigger`` | the primary trigger | ``/faas/election/trigger`` -> its member record's pid |
| ``scheduler`` | the scheduler leader, right after a new version of the cold-start function is deployed | ``/faas/election/scheduler`` |
| ``dispatcher`` | the dispatcher that owns the load's function (rendezvous hashing, as the trigger picks) | ``/faas/members/dispatcher/`` |
| ``node`` | the node agent, right after a new version of the cold-start function is deployed | the state file (role ``node``) |
| ``valkey``, ``etcd`` | the server | the state file |
| ``etcd3-member``, ``etcd3-leader`` | an etcd follower / the etcd leader of 3 members | ``POST /v3/maintenance/status`` on each member |
| ``sigstop-trigger``, ``sigstop-scheduler`` | as ``trigger`` / ``scheduler``, stopped (SIGSTOP) for the lease TTL + 3 s, then SIGCONT | as above |

A stopped process is always continued (SIGCONT in ``finally``, also on Ctrl-C or a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx

from bench.chaos.platform import ChaosPlatform, PlatformError
from faas.core.errors import Unavailable
from faas.core.procs import pid_alive
from faas.core.rendezvous import rank
from faas.core.settings import Settings
from faas.launcher.embedded import etcd_http_client, etcd_http_url, etcd_members

NAMESPACE = "default"
SIGSTOP_BEYOND_TTL_S = 3.0
PICK_TIMEOUT_S = 15.0  # how long a victim may take to be found (a leader just elected, a record catching up)


@dataclass(frozen=True, slots=True)
class Victim:
    name: str  # the component's name in the state file: trigger-2, valkey, etcd-3 ...
    pid: int
    start_ticks: int | None
    why: str  # "primary trigger", "etcd leader (member 8e9e05c52164694d)" ...


Picker = Callable[[ChaosPlatform, str], Awaitable[Victim]]


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    default_repeat: int
    pick: Picker  # (platform, the load's function) -> the victim
    action: Literal["kill", "stop"] = "kill"
    etcd_members: int = 1
    cold_starts: bool = False  # deploy a new version of the load's function just before the fault
    summary: str = ""


@dataclass(slots=True)
class Injection:
    fault: str
    victim: str
    pid: int
    why: str
    at: float  # time.time() of the signal
    action: str
    resumed_at: float | None = None  # SIGCONT, for a stop
    deployed_version: int | None = None  # the cold-start function's version deployed just before

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _victim(platform: ChaosPlatform, name: str, why: str, *, pid: int | None = None) -> Victim:
    """The live component ``name``; with ``pid`` (from etcd), only if the state file names that pid."""
    rec = platform.live_record(name)
    if pid is not None and pid != rec.pid:
        raise PlatformError(f"{name}: etcd records pid {pid}, the state file {rec.pid} (not settled yet)")
    return Victim(rec.name, rec.pid, rec.start_ticks, why)


def leader_of(role: str) -> Picker:
    async def pick(platform: ChaosPlatform, function: str) -> Victim:
        members, leaders = await platform.members()
        leader = leaders.get(role)
        if leader is None:
            raise PlatformError(f"no {role} leader is elected")
        member_id = str(leader.get("member_id"))
        member = members.get(member_id)
        if member is None:
            raise PlatformError(f"the {role} leader {member_id} has no member record")
        why = "primary trigger" if role == "trigger" else f"{role} leader"
        return _victim(platform, member_id, why, pid=int(member.get("pid", 0)))

    return pick


async def owning_dispatcher(platform: ChaosPlatform, function: str) -> Victim:
    members, _ = await platform.members()
    dispatchers = [m for m, rec in members.items() if rec.get("role") == "dispatcher"]
    if not dispatchers:
        raise PlatformError("no dispatcher is registered")
    owner = rank(dispatchers, f"{NAMESPACE}/{function}")[0]
    return _victim(platform, owner, f"dispatcher owning {function}", pid=int(members[owner].get("pid", 0)))


async def node_agent(platform: ChaosPlatform, function: str) -> Victim:
    nodes = sorted(name for name, rec in platform.records().items() if rec.role == "node")
    if not nodes:
        raise PlatformError("the state file records no node agent")
    return _victim(platform, nodes[0], "node agent")


def server(name: str) -> Picker:
    async def pick(platform: ChaosPlatform, function: str) -> Victim:
        return _victim(platform, name, name)

    return pick


async def etcd_status(client: httpx.AsyncClient, settings: Settings, port: int) -> dict[str, Any]:
    """``POST /v3/maintenance/status`` of one member (etcd's JSON gateway)."""
    resp = await client.post(etcd_http_url(settings, "127.0.0.1", port, "/v3/maintenance/status"), json={})
    resp.raise_for_status()
    data = resp.json()
    if not isinstance(data, dict):
        raise PlatformError(f"etcd :{port} answered {data!r} to its status")
    return data


def etcd_member(*, leader: bool) -> Picker:
    async def pick(platform: ChaosPlatform, function: str) -> Victim:
        members = etcd_members(platform.settings)
        ids: dict[str, str] = {}
        leaders: set[str] = set()
        async with etcd_http_client(platform.settings, timeout_s=3.0) as client:
            for member in members:
                try:
                    status = await etcd_status(client, platform.settings, member.client_port)
                except httpx.HTTPError as exc:
                    raise PlatformError(f"{member.name} does not answer its status: {exc}") from exc
                ids[member.name] = str(status.get("header", {}).get("member_id"))
                leaders.add(str(status.get("leader")))
        if len(leaders) != 1 or next(iter(leaders)) not in ids.values():
            raise PlatformError(f"the etcd members do not agree on a leader: {sorted(leaders)}")
        leader_id = next(iter(leaders))
        for member in members:
            if (ids[member.name] == leader_id) == leader:
                role = "leader" if leader else "follower"
                return _victim(platform, member.name, f"etcd {role} (member {ids[member.name]})")
        raise PlatformError("no etcd member to pick")

    return pick


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("trigger", 10, leader_of("trigger"), summary="kill -9 of the primary trigger"),
        Fault("scheduler", 3, leader_of("scheduler"), cold_starts=True,
              summary="kill -9 of the scheduler leader during cold starts"),
        Fault("dispatcher", 3, owning_dispatcher, summary="kill -9 of the dispatcher owning the function"),
        # Warm calls never reach the node agent: only cold starts show what its restart costs.
        Fault("node", 3, node_agent, cold_starts=True, summary="kill -9 of the node agent during cold starts"),
        Fault("valkey", 3, server("valkey"), summary="kill -9 of Valkey"),
        Fault("etcd", 3, server("etcd"), summary="kill -9 of etcd (one member)"),
        Fault("etcd3-member", 3, etcd_member(leader=False), etcd_members=3,
              summary="kill -9 of an etcd follower (3 members)"),
        Fault("etcd3-leader", 3, etcd_member(leader=True), etcd_members=3,
              summary="kill -9 of the etcd leader (3 members)"),
        Fault("sigstop-trigger", 3, leader_of("trigger"), action="stop",
              summary="SIGSTOP of the primary trigger for the lease TTL + 3 s"),
        Fault("sigstop-scheduler", 3, leader_of("scheduler"), action="stop", cold_starts=True,
              summary="SIGSTOP of the scheduler leader for the lease TTL + 3 s, during cold starts"),
    )
}  # fmt: skip


async def find_victim(fault: Fault, platform: ChaosPlatform, function: str) -> Victim:
    """The fault's victim; retried for a while (a leader just elected, a record catching up)."""
    deadline = time.monotonic() + PICK_TIMEOUT_S
    while True:
        try:
            return await fault.pick(platform, function)
        except (PlatformError, Unavailable) as exc:
            if time.monotonic() >= deadline:
                message = exc.message if isinstance(exc, Unavailable) else str(exc)
                raise PlatformError(f"{fault.name}: no victim found: {message}") from exc
        await asyncio.sleep(0.25)


def stop_seconds(platform: ChaosPlatform) -> float:
    return platform.settings.lease_ttl_s + SIGSTOP_BEYOND_TTL_S


async def inject(
    fault: Fault,
    platform: ChaosPlatform,
    function: str,
    *,
    before: Callable[[], Awaitable[int]] | None = None,
) -> Injection:
    """Find the victim, run ``before`` (the cold-start deploy), then kill it (or stop and continue it)."""
    victim = await find_victim(fault, platform, function)
    deployed = await before() if before is not None else None
    if not pid_alive(victim.pid, victim.start_ticks) or platform.records()[victim.name].pid != victim.pid:
        raise PlatformError(f"{victim.name} (pid {victim.pid}) changed before it could be signalled")
    injection = Injection(
        fault.name, victim.name, victim.pid, victim.why, time.time(), fault.action, deployed_version=deployed
    )
    if fault.action == "kill":
        os.kill(victim.pid, signal.SIGKILL)  # a component of this run's platform (pid and start time checked)
        return injection
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(stop_seconds(platform))
    finally:
        with contextlib.suppress(ProcessLookupError):
            if pid_alive(victim.pid, victim.start_ticks):
                os.kill(victim.pid, signal.SIGCONT)
        injection.resumed_at = time.time()
    return injection
