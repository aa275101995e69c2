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


def _incarnation(name: str, uid: str) -> str:
    """A function name qualified by its uid ('@' cannot occur in names); as before uids when "" ."""
    return f"{name}@{uid}" if uid else name


def idempotency_scope(ns: str, name: str, key: str, uid: str = "") -> str:
    """The ``once`` scope of a client's idempotency key, for the function with ``uid``."""
    return f"idem:{ns}:{_incarnation(name, uid)}:{key}"


def timer_tick_scope(ns: str, name: str, subscription: str, tick: int, uid: str = "") -> str:
    """The ``once`` scope of one tick of a timer subscription of the function with ``uid``."""
    return f"timer:{ns}:{_incarnation(name, uid)}:{subscription}:{tick}"


def once(scope: str) -> str:
    """Marks that an enqueue keyed by ``scope`` (a timer tick, an idempotency key) happened."""
    return f"{PREFIX}once:{scope}"


def queue_subscription_group(ns: str, function_name: str, subscription: str) -> str:
    """The consumer group a queue subscription reads the user's stream with."""
    return f"{PREFIX}sub:{ns}:{function_name}:{subscription}"  # ':' cannot occur in the names


def queue_subscription_inflight(ns: str, function_name: str, subscription: str) -> str:
    """Hash: message id -> invocation id, for messages of a user's stream handed to the queue."""
    return f"{PREFIX}sub:{ns}:{function_name}:{subscription}:inflight"
