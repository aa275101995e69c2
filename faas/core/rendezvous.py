"""Rendezvous (highest-random-weight) hashing: the same function maps to the same dispatcher while the
membership holds, and only the functions of a departed dispatcher move when it leaves."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _weight(node: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node}\0{key}".encode(), digest_size=8).digest(), "big")


def rank(nodes: Iterable[str], key: str) -> list[str]:
    """``nodes`` ordered by preference for ``key`` (first = owner, then spill-over order)."""
    return sorted(nodes, key=lambda n: _weight(n, key), reverse=True)
