"""Every Redis key name the platform uses is built here."""

from __future__ import annotations

PREFIX = "faas:"


def function_logs(ns: str, name: str) -> str:
    return f"{PREFIX}logs:{ns}:{name}"


# Async invocations (faas/core/queue.py).
ASYNC_STREAM = f"{PREFIX}async:stream"
ASYNC_GROUP = "dispatchers"
ASYNC_DELAYED = f"{PREFIX}async:delayed"
DEAD_LETTERS = f"{PREFIX}async:dead"


def invocation(invocation_id: str) -> str:
    return f"{PREFIX}inv:{invocation_id}"


def idempotency(ns: str, name: str, key: str) -> str:
    return f"{PREFIX}idem:{ns}:{name}:{key}"
