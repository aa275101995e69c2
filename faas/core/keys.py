"""The etcd key schema: every key the platform reads or writes is built here, nowhere else.

Layout (all under ``/faas/``)::

    functions/{ns}/{name}                      FunctionRecord (aliases, latest version)
    versions/{ns}/{name}/{version:010d}        VersionSpec (immutable)
    instances/{ns}/{name}/{version}/{id}       InstanceRecord, under the node's lease
    nodes/{node_id}                            NodeRecord, under the node's lease
    members/{role}/{member_id}                 MemberRecord, under the member's lease
    election/{role}                            LeaderRecord, under the leader's lease
    subscriptions/{ns}/{function}/{name}       Subscription (event source -> function)
    timers/{ns}/{function}/{name}              last tick a timer subscription fired
    keys/{key_id}                              ApiKeyRecord (the secret's hash, never the secret)
    namespaces/{ns}/limits                     NamespaceLimits
    owners/{streams|buckets}/{name}            the namespace that owns a stream or bucket
"""

from __future__ import annotations

ROOT = "/faas/"


def _b(s: str) -> bytes:
    return s.encode()


def function(ns: str, name: str) -> bytes:
    return _b(f"{ROOT}functions/{ns}/{name}")


def functions_prefix(ns: str | None = None) -> bytes:
    return _b(f"{ROOT}functions/" + (f"{ns}/" if ns else ""))


def version(ns: str, name: str, number: int) -> bytes:
    return _b(f"{ROOT}versions/{ns}/{name}/{number:010d}")


def all_versions_prefix() -> bytes:
    return _b(f"{ROOT}versions/")


def versions_prefix(ns: str, name: str) -> bytes:
    return _b(f"{ROOT}versions/{ns}/{name}/")


def instance(ns: str, name: str, number: int, instance_id: str) -> bytes:
    return _b(f"{ROOT}instances/{ns}/{name}/{number}/{instance_id}")


def instances_prefix(ns: str | None = None, name: str | None = None) -> bytes:
    path = f"{ROOT}instances/"
    if ns:
        path += f"{ns}/"
        if name:
            path += f"{name}/"
    return _b(path)


def node(node_id: str) -> bytes:
    return _b(f"{ROOT}nodes/{node_id}")


def nodes_prefix() -> bytes:
    return _b(f"{ROOT}nodes/")


def member(role: str, member_id: str) -> bytes:
    return _b(f"{ROOT}members/{role}/{member_id}")


def members_prefix(role: str | None = None) -> bytes:
    return _b(f"{ROOT}members/" + (f"{role}/" if role else ""))


def election(role: str) -> bytes:
    return _b(f"{ROOT}election/{role}")


def subscription(ns: str, function_name: str, name: str) -> bytes:
    return _b(f"{ROOT}subscriptions/{ns}/{function_name}/{name}")


def subscriptions_prefix(ns: str | None = None, function_name: str | None = None) -> bytes:
    path = f"{ROOT}subscriptions/"
    if ns:
        path += f"{ns}/"
        if function_name:
            path += f"{function_name}/"
    return _b(path)


def timer_tick(ns: str, function_name: str, name: str) -> bytes:
    """The last tick a timer subscription fired (epoch seconds), written by the primary trigger."""
    return _b(f"{ROOT}timers/{ns}/{function_name}/{name}")


def timer_ticks_prefix(ns: str, function_name: str | None = None) -> bytes:
    return _b(f"{ROOT}timers/{ns}/" + (f"{function_name}/" if function_name else ""))


def api_key(key_id: str) -> bytes:
    return _b(f"{ROOT}keys/{key_id}")


def api_keys_prefix() -> bytes:
    return _b(f"{ROOT}keys/")


def namespace_limits(ns: str) -> bytes:
    return _b(f"{ROOT}namespaces/{ns}/limits")


def namespaces_prefix() -> bytes:
    return _b(f"{ROOT}namespaces/")


def owner(kind: str, name: str) -> bytes:
    return _b(f"{ROOT}owners/{kind}s/{name}")
