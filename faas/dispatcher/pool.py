"""Warm instances of one function version and the requests waiting for them (pure logic, no I/O).

Guarantees:
- an instance never has more requests in flight through this dispatcher than its concurrency;
- a released slot goes straight to the oldest waiter, so waiters are served in arrival order;
- every future in ``waiters`` is pending: a waiter that gives up (deadline, cancellation) leaves the
  queue through ``abandon``, which also gives back a slot handed to it in the same instant, so
  ``len(waiters)`` is the number of callers really waiting;
- ``wants_start`` asks for a new instance only while the waiters outnumber the capacity already
  being started, and never beyond ``max_instances`` (coalescing on the dispatcher's side);
- routing picks the least-loaded instance with a free slot (JAE's weighted routing): the lowest sum
  of its in-flight/concurrency ratio here and the load its node agent measured for it (``load``: the
  CPU it used over the last report interval, in cores, plus a quarter of its memory's share of its
  limit), ties broken by the load its node reports, then taken in turn;
- admission (``admit``, asked only of a caller that found no free slot while the pool is at
  ``max_instances``): the queue is bounded. Capacity is ``max_instances * concurrency`` slots; the pool
  keeps ``call_s``, an EWMA of the time a completed call held its slot. A caller joins the queue only
  while ``(waiters ahead + 1) / capacity * call_s`` (its expected wait) plus ``call_s`` (its own call)
  fits in its remaining deadline, and never beyond ``max_waiters`` (a hard cap, so a cold pool, whose
  ``call_s`` is not known yet, still has a bounded queue). A refused caller is told when to come back:
  the expected time for the queue and the calls running now to drain, in whole seconds, at least 1.

Caveats: the estimate is per pool, so it starts over after the pool was dropped (no instance left);
before any call completed, Retry-After uses the function's timeout as the per-call time (an upper
bound), capped at the caller's own remaining deadline. Capacity counts the slots of
``max_instances``, including instances still starting.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faas.core.models import InstanceRecord

# Weight of the newest call in the call-duration EWMA: about the last ten calls count.
CALL_EWMA_WEIGHT = 0.2


@dataclass(eq=False)
class WarmInstance:
    record: InstanceRecord
    client: Any  # the HopClient bound to this instance's address
    base_url: str = ""
    inflight: int = 0
    invocations: int = 0
    dead: bool = False

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    @property
    def free(self) -> bool:
        return not self.dead and self.inflight < self.record.concurrency


@dataclass(eq=False)
class FunctionPool:
    instances: dict[str, WarmInstance] = field(default_factory=dict)
    waiters: deque[asyncio.Future[WarmInstance]] = field(default_factory=deque)
    pending_starts: int = 0
    call_s: float = 0.0  # EWMA of how long a completed call held its slot; 0.0 until one completed
    _turn: int = 0  # where the next pick starts looking: equal scores take turns

    def pick(self, load: Callable[[WarmInstance], tuple[float, float]]) -> WarmInstance | None:
        """The instance to send a call to, its slot taken; ``load(instance)`` is (the load measured
        for the instance, its node's load)."""
        best: WarmInstance | None = None
        best_score = (math.inf, 0.0)
        candidates = list(self.instances.values())
        # Equal scores go round in turn (idle instances share the calls), not always to the first.
        self._turn = turn = (self._turn + 1) % len(candidates) if candidates else 0
        for inst in candidates[turn:] + candidates[:turn]:
            if not inst.free:
                continue
            measured, node = load(inst)
            score = (inst.inflight / inst.record.concurrency + measured, node)
            if best is None or score < best_score:
                best, best_score = inst, score
        if best is not None:
            best.inflight += 1
        return best

    def capacity_starting(self, concurrency: int) -> int:
        return self.pending_starts * concurrency

    def wants_start(self, concurrency: int, max_instances: int) -> bool:
        if len(self.waiters) <= self.capacity_starting(concurrency):
            return False
        return len(self.instances) + self.pending_starts < max_instances

    def at_max(self, max_instances: int) -> bool:
        """No further instance may be started: the running ones and the starts under way fill it."""
        return len(self.instances) + self.pending_starts >= max_instances

    def observe(self, duration_s: float) -> None:
        """A call completed after holding its slot ``duration_s`` seconds."""
        if self.call_s == 0.0:
            self.call_s = max(duration_s, 1e-6)
        else:
            self.call_s += CALL_EWMA_WEIGHT * (duration_s - self.call_s)

    def admit(self, *, capacity: int, max_waiters: int, remaining_s: float, timeout_s: float) -> int:
        """Whether a caller that must wait may join the queue: 0 if it may, else its Retry-After (s).

        ``capacity`` is the number of slots at ``max_instances``; ``timeout_s`` the function's timeout,
        the per-call time assumed while no call has completed yet."""
        ahead = len(self.waiters)
        call_s = self.call_s
        if ahead < max_waiters and (call_s == 0.0 or ((ahead + 1) / capacity + 1) * call_s <= remaining_s):
            return 0
        drain_s = (ahead + 1) / capacity * (call_s or timeout_s)
        return max(1, math.ceil(min(drain_s, remaining_s)))

    def add(self, inst: WarmInstance) -> bool:
        """Add an instance (idempotent); returns False if it was known already."""
        if inst.instance_id in self.instances:
            return False
        self.instances[inst.instance_id] = inst
        self.hand_out(inst)
        return True

    def remove(self, instance_id: str) -> WarmInstance | None:
        inst = self.instances.pop(instance_id, None)
        if inst is not None:
            inst.dead = True
        return inst

    def release(self, inst: WarmInstance) -> None:
        inst.inflight -= 1
        if not inst.dead:
            self.hand_out(inst)

    def hand_out(self, inst: WarmInstance) -> None:
        """Give the instance's free slots to the oldest waiters."""
        while inst.free and self.waiters:
            waiter = self.waiters.popleft()
            if waiter.done():
                continue
            inst.inflight += 1
            waiter.set_result(inst)

    def abandon(self, waiter: asyncio.Future[WarmInstance]) -> None:
        """A waiter gives up (its deadline passed, or its caller went away): take it out of the queue,
        and give back the slot if one was handed to it before it could take it."""
        if not waiter.done():
            waiter.cancel()
        if waiter.cancelled():
            try:
                self.waiters.remove(waiter)
            except ValueError:  # already popped by hand_out or fail_waiters
                pass
        elif waiter.exception() is None:
            self.release(waiter.result())

    def fail_waiters(self, exc: BaseException) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    @property
    def idle(self) -> bool:
        return not self.instances and not self.waiters and self.pending_starts == 0
