"""Per-namespace limits: how many functions, running instances and invocations a second.

A namespace's limits are the platform's defaults (``Settings.namespace_max_*``) unless an admin set
others for it (``PUT /v1/namespaces/{ns}/limits``, kept in etcd at ``/faas/namespaces/{ns}/limits``).
A limit of 0 means none.

Where each is enforced, and its guarantee:

- ``max_functions``: the gateway, when a deploy would create a function (not a new version of one):
  429.  Two deploys racing at the limit may both pass (the count and the create are two steps).
- ``max_instances``: the scheduler leader, before it starts an instance (a call's cold start or
  ``min_instances``): running plus starting instances of the namespace never exceed it (the leader
  is the only one starting instances); a call beyond it gets 429.
- ``max_invocations_per_s``: each gateway, per namespace, as a token bucket (a burst of up to one
  second's worth): a call beyond it gets 429 with ``Retry-After``.  With several gateways each
  allows the rate: the platform as a whole allows it times the number of gateways.

Readers keep an in-memory copy of every namespace's limits (``LimitsIndex``, a ``PrefixMirror``), so
checking costs a dict lookup; a change reaches them within moments.
"""

from __future__ import annotations

import math
import time

from pydantic import BaseModel, ConfigDict, Field

from faas.core import keys
from faas.core.errors import TooManyRequests
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.settings import Settings


class NamespaceLimits(BaseModel):
    """A namespace's own limits; a field left out (None) is the platform's default, 0 is no limit."""

    model_config = ConfigDict(extra="forbid")

    max_functions: int | None = Field(default=None, ge=0)
    max_instances: int | None = Field(default=None, ge=0)
    max_invocations_per_s: float | None = Field(default=None, ge=0)


class Limits(BaseModel):
    """The limits in force for one namespace (defaults applied); 0 is no limit."""

    model_config = ConfigDict(frozen=True)  # shared: ``LimitsIndex`` hands out the same copy

    max_functions: int
    max_instances: int
    max_invocations_per_s: float


class LimitsIndex:
    """Every namespace's limits, kept current from etcd."""

    def __init__(self, etcd: Etcd, settings: Settings) -> None:
        self.mirror = PrefixMirror(etcd, keys.namespaces_prefix())
        self.settings = settings
        # Each namespace's limits as last worked out, for the mirror's ``_generation`` (every call
        # asks: building them again each time was a twentieth of the gateway's CPU per call).
        self._limits: dict[str, Limits] = {}
        self._generation = -1

    def start(self) -> None:
        self.mirror.start()

    async def stop(self) -> None:
        await self.mirror.stop()

    def of(self, ns: str) -> Limits:
        if self._generation != self.mirror.generation:
            self._limits.clear()
            self._generation = self.mirror.generation
        limits = self._limits.get(ns)
        if limits is None:
            if len(self._limits) > 10_000:
                self._limits.clear()
            limits = self._limits[ns] = self._work_out(ns)
        return limits

    def _work_out(self, ns: str) -> Limits:
        own = self._own(ns)
        s = self.settings
        return Limits(
            max_functions=s.namespace_max_functions if own.max_functions is None else own.max_functions,
            max_instances=s.namespace_max_instances if own.max_instances is None else own.max_instances,
            max_invocations_per_s=(
                s.namespace_max_invocations_per_s if own.max_invocations_per_s is None else own.max_invocations_per_s
            ),
        )

    def _own(self, ns: str) -> NamespaceLimits:
        own = self.mirror.parsed(keys.namespace_limits(ns), NamespaceLimits.model_validate_json)
        return own if own is not None else NamespaceLimits()


async def set_limits(etcd: Etcd, ns: str, limits: NamespaceLimits) -> None:
    await etcd.put(keys.namespace_limits(ns), limits.model_dump_json().encode())


async def read_limits(etcd: Etcd, ns: str) -> NamespaceLimits:
    kv = await etcd.get(keys.namespace_limits(ns))
    return NamespaceLimits.model_validate_json(kv.value) if kv is not None else NamespaceLimits()


class RateLimiter:
    """Token buckets per namespace: ``rate`` calls a second, bursts of up to one second's worth (and
    at least one call)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # ns -> (tokens, at)

    def take(self, ns: str, rate: float, *, now: float | None = None) -> None:
        """One call of ``ns``; ``TooManyRequests`` (with the seconds until a token) beyond ``rate``."""
        if rate <= 0:
            return
        now = time.monotonic() if now is None else now
        burst = max(rate, 1.0)  # below one call a second, a bucket still holds the one call
        tokens, at = self._buckets.get(ns, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[ns] = (tokens, now)
            wait_s = (1.0 - tokens) / rate
            raise TooManyRequests(
                f"namespace {ns!r} is at its limit of {rate:g} invocations a second",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        self._buckets[ns] = (tokens - 1.0, now)
