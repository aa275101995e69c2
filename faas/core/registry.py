"""Functions and their versions in etcd.

Guarantees:
- a version is created in one etcd transaction that also moves ``latest``; concurrent deploys of the
  same function get consecutive numbers (compare-and-swap on the function record, retried);
- versions are immutable; deleting a function deletes its record, every version and its event
  subscriptions in one transaction;
- creating a function (the first version, when no record exists) gives it a new random ``uid``,
  which every later version carries as ``function_uid``: a function deleted and created again is a
  different function even though its version numbers start at 1 again;
- ``Catalog`` serves lookups from a watched in-memory copy and falls back to etcd on a miss, so a
  version created a moment ago is never reported missing; asked for a version of a given function
  uid, it re-reads etcd when its copy holds another uid (the copy lags a delete and re-create), and
  answers ``NotFound`` when that function no longer exists;
- ``Catalog.wait_until_seen`` lets the process that wrote a function read its own write through the
  copy (the gateway waits for it before answering a deploy or a delete);
- aliases: ``latest`` moves to each new version (dropping any split it had); any other alias moves
  only when set (``set_alias``, compare-and-swap on the function record), to one version or split by
  percent between two; every move remembers the version it left (``rollback`` goes back to it).  A
  split alias sends its calls to its versions by smooth weighted round robin per process
  (``Catalog.resolve``): every run of 100 calls a process resolves through it holds each version's
  percent exactly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from faas.core import keys
from faas.core.errors import Conflict, InvalidRequest, NotFound
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.models import (
    AliasRoute,
    AliasSpec,
    CodeRef,
    FunctionRecord,
    VersionConfig,
    VersionSpec,
    alias_problem,
    new_function_uid,
)
from faas.core.weighted import SmoothWeighted

log = logging.getLogger("faas.registry")
_MAX_CAS_ATTEMPTS = 20
M = TypeVar("M", bound=BaseModel)


class FunctionRegistry:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def get_function(self, ns: str, name: str) -> FunctionRecord:
        kv = await self.etcd.get(keys.function(ns, name))
        if kv is None:
            raise NotFound(f"function {name!r} not found in namespace {ns!r}")
        return FunctionRecord.model_validate_json(kv.value)

    async def list_functions(self, ns: str) -> list[FunctionRecord]:
        kvs, _ = await self.etcd.get_prefix(keys.functions_prefix(ns))
        return [FunctionRecord.model_validate_json(kv.value) for kv in kvs]

    async def get_version(self, ns: str, name: str, number: int) -> VersionSpec:
        kv = await self.etcd.get(keys.version(ns, name, number))
        if kv is None:
            raise NotFound(f"version {number} of function {name!r} not found")
        return VersionSpec.model_validate_json(kv.value)

    async def list_versions(self, ns: str, name: str) -> list[VersionSpec]:
        await self.get_function(ns, name)
        kvs, _ = await self.etcd.get_prefix(keys.versions_prefix(ns, name))
        return [VersionSpec.model_validate_json(kv.value) for kv in kvs]

    async def resolve(self, ns: str, name: str, qualifier: str | None = None) -> VersionSpec:
        record = await self.get_function(ns, name)
        return await self.get_version(ns, name, resolve_qualifier(record, qualifier))

    async def create_version(
        self, ns: str, name: str, config: VersionConfig, code: CodeRef, *, move_latest: bool = True
    ) -> VersionSpec:
        """A new version; ``latest`` moves to it unless ``move_latest`` is False and the function
        has a version already (a web app's moves once its new version has started)."""
        fkey = keys.function(ns, name)
        for _ in range(_MAX_CAS_ATTEMPTS):
            kv = await self.etcd.get(fkey)
            now = time.time()
            if kv is None:
                record = FunctionRecord(namespace=ns, name=name, uid=new_function_uid(), created_at=now)
                guard = self.etcd.create_revision(fkey) == 0
            else:
                record = FunctionRecord.model_validate_json(kv.value)
                guard = self.etcd.mod_revision(fkey) == kv.mod_revision
            number = record.latest_version + 1
            spec = VersionSpec(
                **config.model_dump(), namespace=ns, function=name, version=number, code=code, created_at=now,
                function_uid=record.uid,
            )
            record.latest_version = number
            if move_latest or "latest" not in record.aliases:
                _move_alias(record, "latest", number, {})
            record.updated_at = now
            ok, _ = await self.etcd.txn(
                [guard],
                [
                    self.etcd.op_put(fkey, record.model_dump_json().encode()),
                    self.etcd.op_put(keys.version(ns, name, number), spec.model_dump_json().encode()),
                ],
            )
            if ok:
                return spec
        raise Conflict(f"function {name!r} is being changed concurrently; try again")

    async def set_alias(self, ns: str, name: str, alias: str, spec: AliasSpec) -> FunctionRecord:
        """Point ``alias`` at ``spec``'s version (or split), creating it; the function record after."""
        if problem := alias_problem(alias):
            raise InvalidRequest(problem)

        def change(record: FunctionRecord) -> None:
            for version in {spec.version, *(spec.weights or {})}:
                if version > record.latest_version:
                    raise InvalidRequest(
                        f"function {name!r} has no version {version} (its latest is {record.latest_version})"
                    )
            _move_alias(record, alias, spec.version, spec.route_weights())

        return await self._change(ns, name, change)

    async def delete_alias(self, ns: str, name: str, alias: str) -> FunctionRecord:
        if alias == "latest":
            raise InvalidRequest("the alias 'latest' cannot be deleted: it follows every deploy")

        def change(record: FunctionRecord) -> None:
            if alias not in record.aliases:
                raise NotFound(f"function {name!r} has no alias {alias!r}")
            del record.aliases[alias]
            record.routes.pop(alias, None)

        return await self._change(ns, name, change)

    async def rollback(self, ns: str, name: str, alias: str = "latest") -> FunctionRecord:
        """Point ``alias`` back at the version it pointed to before its last move (a split is dropped)."""

        def change(record: FunctionRecord) -> None:
            if alias not in record.aliases:
                raise NotFound(f"function {name!r} has no alias {alias!r}")
            previous = (record.routes.get(alias) or AliasRoute()).previous
            if previous is None:
                raise Conflict(f"alias {alias!r} of function {name!r} has no previous version to go back to")
            _move_alias(record, alias, previous, {})

        return await self._change(ns, name, change)

    async def _change(self, ns: str, name: str, change: Callable[[FunctionRecord], None]) -> FunctionRecord:
        """Apply ``change`` to the function record by compare-and-swap (retried on a concurrent write)."""
        fkey = keys.function(ns, name)
        for _ in range(_MAX_CAS_ATTEMPTS):
            kv = await self.etcd.get(fkey)
            if kv is None:
                raise NotFound(f"function {name!r} not found in namespace {ns!r}")
            record = FunctionRecord.model_validate_json(kv.value)
            change(record)
            record.updated_at = time.time()
            ok, _ = await self.etcd.txn(
                [self.etcd.mod_revision(fkey) == kv.mod_revision],
                [self.etcd.op_put(fkey, record.model_dump_json().encode())],
            )
            if ok:
                return record
        raise Conflict(f"function {name!r} is being changed concurrently; try again")

    async def delete_function(self, ns: str, name: str) -> None:
        fkey = keys.function(ns, name)
        ok, _ = await self.etcd.txn(
            [self.etcd.create_revision(fkey) > 0],
            [
                self.etcd.op_delete(fkey),
                self.etcd.op_delete(keys.versions_prefix(ns, name), prefix=True),
                self.etcd.op_delete(keys.subscriptions_prefix(ns, name), prefix=True),
                self.etcd.op_delete(keys.timer_ticks_prefix(ns, name), prefix=True),
            ],
        )
        if not ok:
            raise NotFound(f"function {name!r} not found in namespace {ns!r}")


def _move_alias(record: FunctionRecord, alias: str, version: int, weights: dict[int, int]) -> None:
    """Point ``alias`` at ``version`` (split by ``weights`` when it has two), remembering where it was."""
    old = record.aliases.get(alias)
    route = record.routes.get(alias) or AliasRoute()
    previous = old if old is not None and old != version else route.previous
    record.aliases[alias] = version
    if weights or previous is not None:
        record.routes[alias] = AliasRoute(weights=weights, previous=previous)
    else:
        record.routes.pop(alias, None)


Pick = Callable[[FunctionRecord, str, dict[int, int]], int]
"""Chooses one version of a split alias (function record, alias, its weights)."""


def resolve_qualifier(record: FunctionRecord, qualifier: str | None, pick: Pick | None = None) -> int:
    """The version number a qualifier (None, an alias, or a number) designates; for a split alias,
    the one ``pick`` chooses (without ``pick``: the alias's main version)."""
    if not qualifier:
        qualifier = "latest"
    if qualifier.isdigit():
        number = int(qualifier)
        if number < 1 or number > record.latest_version:
            raise NotFound(f"version {number} of function {record.name!r} not found")
        return number
    if qualifier not in record.aliases:
        raise InvalidRequest(f"unknown alias {qualifier!r} for function {record.name!r}")
    route = record.routes.get(qualifier)
    if pick is not None and route is not None and route.weights:
        return pick(record, qualifier, route.weights)
    return record.aliases[qualifier]


class Catalog:
    """Watched copy of every function record and version, for lookups on the invocation path."""

    def __init__(self, etcd: Etcd) -> None:
        self.registry = FunctionRegistry(etcd)
        self._functions = PrefixMirror(etcd, keys.functions_prefix())
        self._versions = PrefixMirror(etcd, keys.all_versions_prefix())
        self._parsed: dict[bytes, tuple[bytes, object]] = {}
        # Split aliases' round robins: (namespace, function uid, alias) -> the weights' rotation.
        self._splits: dict[tuple[str, str, str], SmoothWeighted[int]] = {}

    def _pick(self, record: FunctionRecord, alias: str, weights: dict[int, int]) -> int:
        key = (record.namespace, record.uid or record.name, alias)
        rotation = self._splits.get(key)
        if rotation is None or rotation.weights != weights:
            if len(self._splits) > 10_000:
                self._splits.clear()
            rotation = self._splits[key] = SmoothWeighted(weights)
        return rotation.pick()

    def start(self) -> None:
        self._functions.start()
        self._versions.start()

    async def wait_ready(self, timeout_s: float | None = 10.0) -> None:
        await self._functions.wait_ready(timeout_s)
        await self._versions.wait_ready(timeout_s)

    async def stop(self) -> None:
        await self._functions.stop()
        await self._versions.stop()

    def _parse(self, key: bytes, raw: bytes, model: type[M]) -> M:
        """Parse once per stored value: the mirror keeps the same bytes object until the key changes."""
        cached = self._parsed.get(key)
        if cached is not None and cached[0] is raw:
            return cached[1]  # type: ignore[return-value]
        value = model.model_validate_json(raw)
        self._parsed[key] = (raw, value)
        return value

    def functions(self) -> list[FunctionRecord]:
        return [self._parse(k, v, FunctionRecord) for k, v in list(self._functions.items.items())]

    def cached_function(self, ns: str, name: str) -> FunctionRecord | None:
        key = keys.function(ns, name)
        raw = self._functions.items.get(key)
        return self._parse(key, raw, FunctionRecord) if raw is not None else None

    async def function(self, ns: str, name: str) -> FunctionRecord:
        return self.cached_function(ns, name) or await self.registry.get_function(ns, name)

    async def version(self, ns: str, name: str, number: int, *, uid: str | None = None) -> VersionSpec:
        """A version; with ``uid``, only a version of the function with that uid (else ``NotFound``)."""
        key = keys.version(ns, name, number)
        raw = self._versions.items.get(key)
        if raw is not None:
            spec = self._parse(key, raw, VersionSpec)
            if uid is None or spec.function_uid == uid:
                return spec
        # A miss, or a copy that lags a delete and re-create (in either direction): etcd decides.
        spec = await self.registry.get_version(ns, name, number)
        if uid is not None and spec.function_uid != uid:
            raise NotFound(
                f"function {name!r} (uid {uid or '-'}) no longer exists: it was deleted, and the function "
                f"now named {name!r} is another one"
            )
        return spec

    async def resolve(self, ns: str, name: str, qualifier: str | None = None) -> VersionSpec:
        """The version a call of ``qualifier`` goes to (a split alias: the next in its rotation)."""
        record = await self.function(ns, name)
        try:
            number = resolve_qualifier(record, qualifier, self._pick)
        except NotFound:
            record = await self.registry.get_function(ns, name)  # the cache may lag a fresh deploy
            number = resolve_qualifier(record, qualifier, self._pick)
        spec = await self.version(ns, name, number)
        if spec.function_uid != record.uid:
            # The two watched copies lag a delete and re-create differently: read both from etcd.
            record = await self.registry.get_function(ns, name)
            return await self.registry.get_version(ns, name, resolve_qualifier(record, qualifier, self._pick))
        return spec

    async def wait_until_seen(
        self, ns: str, name: str, *, uid: str | None, version: int = 0, updated_at: float = 0.0,
        timeout_s: float = 2.0,
    ) -> bool:  # fmt: skip
        """Wait until this copy shows the function as this process just wrote it: with ``uid`` at
        ``version`` or later (and changed at ``updated_at`` or later), or gone (``uid`` None).  False
        if the watch did not deliver it in time."""

        def seen() -> bool:
            record = self.cached_function(ns, name)
            if uid is None:
                return record is None
            return (
                record is not None and record.uid == uid and record.latest_version >= version
                and record.updated_at >= updated_at
            )  # fmt: skip

        changed = self._functions.changed
        try:
            async with changed:
                await asyncio.wait_for(changed.wait_for(seen), timeout_s)
        except TimeoutError:
            log.warning("the watched copy of %s/%s did not show this write within %.0f s", ns, name, timeout_s)
            return False
        return True
