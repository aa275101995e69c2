"""API keys: who may call the gateway, in which namespace, with which role.

A key is ``faas_<id>_<secret>``: ``id`` (16 hex digits) names its record in etcd, at
``/faas/keys/<id>``; the secret (32 random bytes, URL-safe base64) is shown once, when the key is
created, and stored only as its SHA-256.  A key belongs to one namespace and has one role:

- ``admin``: everything, in every namespace (it may name one with ``?namespace=``), keys included;
- ``developer``: deploy, delete, invoke, logs, dead letters and subscriptions, in its namespace;
- ``invoker``: invoke only, in its namespace, and only the functions it names if it names any.

Guarantees:

- a secret never leaves this module but in the text returned by ``new_key``: records, listings and
  logs carry the id and the hash, never the secret;
- ``KeyIndex.authenticate`` answers from an in-memory copy of ``/faas/keys/`` kept current by a
  watch (``PrefixMirror``): one SHA-256 the first time a key is seen, then a dict lookup per call (a
  key that passed is remembered, in the gateway's memory only, for as long as its record is the one
  it was checked against); a revoked key stops working on a gateway as soon as its watch delivers
  the deletion (milliseconds), and within the mirror's resync period if the watch was broken;
- the comparison of hashes is constant-time;
- an unknown, malformed or revoked key, and a missing one, are all ``Unauthorized`` (401) with the
  same message: nothing tells a caller which keys exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from faas.core import keys
from faas.core.errors import Forbidden, NotFound, Unauthorized  # re-exported: the gateway names them here
from faas.core.etcd import Etcd, PrefixMirror
from faas.core.models import name_problem

Role = Literal["admin", "developer", "invoker"]
ROLES: tuple[Role, ...] = ("admin", "developer", "invoker")
KEYS_PREFIX = keys.api_keys_prefix().decode()
_KEY_TEXT = re.compile(r"faas_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


NO_KEY = "an API key is required: send 'Authorization: Bearer <key>' (or 'X-Api-Key: <key>')"
BAD_KEY = "the API key is not valid (unknown, revoked or malformed)"


class ApiKeyRecord(BaseModel):
    """What etcd keeps of a key: never the secret."""

    model_config = ConfigDict(extra="forbid")

    id: str
    namespace: str
    role: Role
    functions: list[str] = Field(default_factory=list)
    description: str = ""
    secret_sha256: str
    created_at: float

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        problem = name_problem(value, "namespace")
        if problem:
            raise ValueError(problem)
        return value

    def view(self) -> dict[str, object]:
        """The record as the API shows it: without the hash."""
        return self.model_dump(exclude={"secret_sha256"})


class Principal:
    """The caller of one request, as its key says."""

    __slots__ = ("key_id", "namespace", "role", "functions")

    def __init__(self, key_id: str, namespace: str, role: Role, functions: Iterable[str] = ()) -> None:
        self.key_id = key_id
        self.namespace = namespace
        self.role: Role = role
        self.functions = frozenset(functions)

    def namespace_for(self, requested: str | None) -> str:
        """The namespace a call acts in: the key's own, or for an admin key the one it names.

        A non-admin key naming another namespace gets ``NotFound``, as if it did not exist."""
        if requested is None or requested == self.namespace:
            return self.namespace
        if self.role == "admin":
            return requested
        raise NotFound(f"namespace {requested!r} not found")

    def require(self, role: Role) -> None:
        """Refuse unless the key's role includes ``role`` (admin > developer > invoker)."""
        if ROLES.index(self.role) > ROLES.index(role):
            raise Forbidden(f"this API key's role ({self.role}) cannot do this; it needs {role}")

    def may_invoke(self, function: str) -> None:
        """An invoker key limited to some functions sees the others as absent."""
        if self.role == "invoker" and self.functions and function not in self.functions:
            raise NotFound(f"function {function!r} not found")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(
    namespace: str, role: Role, *, functions: Iterable[str] = (), description: str = ""
) -> tuple[str, ApiKeyRecord]:
    """A new key's text (the only time the secret exists) and the record to store."""
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    record = ApiKeyRecord(
        id=key_id,
        namespace=namespace,
        role=role,
        functions=sorted(set(functions)),
        description=description,
        secret_sha256=_hash(secret),
        created_at=time.time(),
    )
    return f"faas_{key_id}_{secret}", record


def key_id_of(text: str) -> str | None:
    """The id of a key's text, None if it is not a key's text."""
    match = _KEY_TEXT.fullmatch(text)
    return match.group(1) if match else None


def key_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>``, else ``X-Api-Key``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    return None


class KeyStore:
    """Keys in etcd: created, listed and revoked through the gateway's admin API."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def create(
        self, namespace: str, role: Role, *, functions: Iterable[str] = (), description: str = ""
    ) -> tuple[str, ApiKeyRecord]:
        text, record = new_key(namespace, role, functions=functions, description=description)
        await self.etcd.put(_etcd_key(record.id), record.model_dump_json().encode())
        return text, record

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        kv = await self.etcd.get(_etcd_key(key_id)) if _KEY_ID.fullmatch(key_id) else None
        return ApiKeyRecord.model_validate_json(kv.value) if kv is not None else None

    async def list(self, namespace: str | None = None) -> list[ApiKeyRecord]:
        kvs, _ = await self.etcd.get_prefix(KEYS_PREFIX.encode())
        records = [ApiKeyRecord.model_validate_json(kv.value) for kv in kvs]
        return sorted(
            (r for r in records if namespace is None or r.namespace == namespace), key=lambda r: r.created_at
        )

    async def revoke(self, key_id: str) -> None:
        """Delete the key; ``NotFound`` if there is none."""
        if await self.get(key_id) is None:
            raise NotFound(f"API key {key_id!r} not found")
        await self.etcd.delete(_etcd_key(key_id))


def _etcd_key(key_id: str) -> bytes:
    return keys.api_key(key_id)


class KeyIndex:
    """The gateway's per-call check, from an in-memory copy of every key."""

    def __init__(self, etcd: Etcd) -> None:
        self.mirror = PrefixMirror(etcd, KEYS_PREFIX.encode())
        # Keys checked already: key text -> (its record's etcd key, the stored value it was checked
        # against, the caller).  Valid while that stored value is the one in the mirror: a revoked or
        # changed key is checked again (and fails) on its next call.
        self._verified: dict[str, tuple[bytes, bytes, Principal]] = {}

    def start(self) -> None:
        self.mirror.start()

    async def stop(self) -> None:
        await self.mirror.stop()

    @property
    def ready(self) -> bool:
        """Whether the keys have been listed once (before that, no key can be checked)."""
        return self.mirror.ready.is_set()

    def authenticate(self, key: str | None) -> Principal:
        if key is None:
            raise Unauthorized(NO_KEY)
        verified = self._verified.get(key)
        if verified is not None and self.mirror.items.get(verified[0]) is verified[1]:
            return verified[2]
        match = _KEY_TEXT.fullmatch(key)
        if match is None:
            raise Unauthorized(BAD_KEY)
        key_id, secret = match.groups()
        etcd_key = _etcd_key(key_id)
        raw = self.mirror.items.get(etcd_key)
        record = self._record(key_id)
        if record is None or not hmac.compare_digest(_hash(secret), record.secret_sha256):
            raise Unauthorized(BAD_KEY)
        principal = Principal(record.id, record.namespace, record.role, record.functions)
        if raw is not None:
            if len(self._verified) >= 10_000:
                self._verified.clear()
            self._verified[key] = (etcd_key, raw, principal)
        return principal

    def _record(self, key_id: str) -> ApiKeyRecord | None:
        return self.mirror.parsed(_etcd_key(key_id), ApiKeyRecord.model_validate_json)
