"""Smooth weighted round robin, as nginx's upstream module does it.

Each choice adds every peer's weight to its running score, picks the peer with the highest score
and takes the total weight off the winner.  Guarantees: over any run of ``total`` consecutive picks
(``total`` = the sum of the weights) each peer is picked exactly its weight's times; picks of one peer
are spread out rather than bunched (weights 5/1/1 give a a b a c a a, not a a a a a b c); a peer of
weight 0 is never picked; ties go to the peer listed first.  Pure and deterministic.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class SmoothWeighted(Generic[K]):
    __slots__ = ("weights", "_keys", "_scores", "_total")

    def __init__(self, weights: Mapping[K, int]) -> None:
        if any(weight < 0 for weight in weights.values()):
            raise ValueError("weights must not be negative")
        self.weights = dict(weights)
        self._keys = [key for key, weight in self.weights.items() if weight > 0]
        if not self._keys:
            raise ValueError("at least one weight must be positive")
        self._scores = [0] * len(self._keys)
        self._total = sum(self.weights[key] for key in self._keys)

    def pick(self) -> K:
        scores = self._scores
        best = 0
        for i, key in enumerate(self._keys):
            scores[i] += self.weights[key]
            if scores[i] > scores[best]:
                best = i
        scores[best] -= self._total
        return self._keys[best]
