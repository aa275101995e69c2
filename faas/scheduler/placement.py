"""Placement and start coalescing: pure logic, no I/O.

``StartBook`` tracks instance starts in flight per function version (``VersionKey``, which includes
the function's uid: a start for a deleted function is never shared with its successor).  A start of an instance with
concurrency C can serve C waiting requests, so up to C concurrent acquire calls share one start
(coalescing); a further call starts another instance, unless running + starting has reached the
version's ``max_instances``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from faas.core.models import InstanceRecord, NodeRecord, VersionKey


@dataclass
class StartTicket:
    future: asyncio.Future[InstanceRecord]
    unclaimed: int  # how many more acquire calls may share this start


@dataclass
class StartBook:
    starting: dict[VersionKey, list[StartTicket]] = field(default_factory=dict)

    def join(self, key: VersionKey) -> StartTicket | None:
        """A start in flight with spare capacity, claimed for one more caller."""
        for ticket in self.starting.get(key, ()):
            if ticket.unclaimed > 0:
                ticket.unclaimed -= 1
                return ticket
        return None

    def count(self, key: VersionKey) -> int:
        return len(self.starting.get(key, ()))

    def open(self, key: VersionKey, capacity: int) -> StartTicket:
        ticket = StartTicket(asyncio.get_running_loop().create_future(), unclaimed=capacity)
        self.starting.setdefault(key, []).append(ticket)
        return ticket

    def close(self, key: VersionKey, ticket: StartTicket) -> None:
        tickets = self.starting.get(key, [])
        if ticket in tickets:
            tickets.remove(ticket)
        if not tickets:
            self.starting.pop(key, None)


def pick_node(nodes: list[NodeRecord], memory_mb: int) -> NodeRecord | None:
    """The node with the most free memory that can hold ``memory_mb`` more (None if none can)."""
    fitting = [n for n in nodes if n.memory_free_mb >= memory_mb]
    if not fitting:
        return None
    return max(fitting, key=lambda n: (n.memory_free_mb, -n.cpu_load, -n.instances))
