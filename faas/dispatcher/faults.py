"""Whose fault a failed async attempt is, and whether and when to try the event again.

An attempt fails because of the function (its handler raised, timed out or ran out of memory, its
module's import failed, it crashed its host) or because of the platform (no node agent answers, an
instance could not be started for a reason of the node's, the scheduler or an instance could not
be reached, no instance came before the deadline, the function is throttled at ``max_instances``).
Only the function's failures use up the version's ``max_retries``; the platform's are retried with
capped exponential backoff until the event's ``max_event_age_s``, as AWS Lambda retries throttles
and system errors of async invocations for up to six hours.

``fault_of`` decides from the error alone, in this order:

1. the error's own ``fault`` field, set where the kind cannot tell: the function host marks a start
   failure of the user's code or archive (``faas/runtime/host.py``), the dispatcher marks an
   instance that died during a call (``function`` when its node agent saw it exit, else
   ``platform``).  Type names cannot decide this: a handler module's import may raise
   ``TimeoutError`` or ``OSError`` as well as the platform's own start failures are named;
2. the kind (``FUNCTION_KINDS``, ``PLATFORM_KINDS``); an ``instance_start_error`` without a mark is
   the platform's (the pool had no host ready, the host crashed while specialising, Docker failed,
   the code download failed, the scheduler's start timed out);
3. for a body of no known kind, the HTTP status: a 4xx other than 408 and 429 is the function's
   (its event or its code), anything else the platform's.

Caveat: a start that times out (``TimeoutError`` from the pool, the scheduler's "did not start
within") cannot tell a slow node from a handler module whose import takes longer than
``cold_start_timeout_s``; it counts as the platform's, so such an event is retried until its
``max_event_age_s`` instead of ``max_retries`` times.

Every function here is pure; ``faas/dispatcher/consumer.py`` applies them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from faas.core.errors import FAULTS, Fault

# Errors of the function itself (or of its event, which the same function gets every time).
FUNCTION_KINDS = frozenset({
    "function_error",         # the handler raised
    "function_timeout",       # the handler ran past its timeout
    "out_of_memory",          # the handler ran out of memory
    "partial_batch_failure",  # the handler reported failed records of a queue batch
    "invalid_request",        # the event is not valid JSON for the host
    "payload_too_large",
    "not_found",              # the function or version is gone (the consumer dead-letters it at once)
})  # fmt: skip
# Errors of the platform: retried without using up max_retries.  Listed for the reader and the
# tests; an unknown kind is the platform's too (an event must not be lost to a platform error).
PLATFORM_KINDS = frozenset({
    "unavailable",           # no node agent answers, a dependency (etcd, Redis, a peer) is down
    "not_leader",            # a scheduler or trigger mid-failover
    "deadline_exceeded",     # no instance became available, or the scheduler answered too late
    "too_many_requests",     # throttled at max_instances (with retry_after_s)
    "instance_start_error",  # unless marked "function": see the module docstring
    "platform_error",        # an instance's invalid answer, an unexpected answer of a peer
    "conflict",
    "internal_error",        # a bug of the consumer
    "event_too_old",         # aged out waiting in the queue before its next attempt
})  # fmt: skip

Uniform = Callable[[float, float], float]


def fault_of(error: Mapping[str, Any], status: int | None = None) -> Fault:
    """Whose fault the failure described by ``error`` (the wire ``error`` object) is."""
    marked = error.get("fault")
    if marked in FAULTS:
        return "function" if marked == "function" else "platform"
    kind = error.get("kind")
    if kind in FUNCTION_KINDS:
        return "function"
    if kind in PLATFORM_KINDS:
        return "platform"
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return "function"
    return "platform"


def function_backoff(attempt: int, *, base_s: float, uniform: Uniform = random.uniform) -> float:
    """Delay before the retry after function attempt ``attempt`` (1-based): doubling, +-50% jitter."""
    return base_s * 2 ** (attempt - 1) * uniform(0.5, 1.5)


def platform_backoff(
    platform_retry: int, *, base_s: float, cap_s: float, retry_after_s: float | None = None,
    uniform: Uniform = random.uniform,
) -> float:  # fmt: skip
    """Delay before platform retry number ``platform_retry`` (1-based).

    Doubling from ``base_s`` up to ``cap_s``, drawn uniformly from the upper half (so events that
    failed together do not come back together); never sooner than the service's ``retry_after_s``."""
    ceiling = min(cap_s, base_s * 2 ** min(platform_retry - 1, 62))
    delay = uniform(ceiling / 2, ceiling)
    if retry_after_s is not None and retry_after_s > delay:
        delay = float(retry_after_s)
    return delay


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float
    platform: bool  # True: a platform retry, which does not use up max_retries


@dataclass(frozen=True, slots=True)
class GiveUp:
    condition: str  # RetriesExhausted | EventAgeExceeded (the destination record's condition)


def next_step(
    fault: Fault,
    *,
    attempt: int,
    platform_retries: int,
    max_retries: int,
    age_s: float,
    max_event_age_s: float,
    base_s: float,
    platform_cap_s: float,
    retry_after_s: float | None = None,
    uniform: Uniform = random.uniform,
) -> Retry | GiveUp:
    """What to do with an event whose function attempt ``attempt`` just failed with ``fault``.

    A function fault is retried while ``attempt <= max_retries``; a platform fault always is.  No
    retry is scheduled to come due after the event's ``max_event_age_s``: the event is given up now
    (``EventAgeExceeded``), with the error it has, instead of aging out in the retry set."""
    if fault == "function":
        if attempt > max_retries:
            return GiveUp("RetriesExhausted")
        delay = function_backoff(attempt, base_s=base_s, uniform=uniform)
    else:
        delay = platform_backoff(
            platform_retries + 1, base_s=base_s, cap_s=platform_cap_s, retry_after_s=retry_after_s, uniform=uniform
        )
    if age_s + delay >= max_event_age_s:
        return GiveUp("EventAgeExceeded")
    return Retry(delay, platform=fault == "platform")
