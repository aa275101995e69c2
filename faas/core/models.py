"""Records the services exchange and store in etcd.

Every record is a pydantic model serialised as JSON.  A function version is immutable once written;
the function record holds the mutable part (aliases, counters).  Name rules live here so the gateway,
the CLI and the manifest reader reject the same inputs with the same message.

Identity: a function's record gets a random ``uid`` when it is created, kept by all its versions; a
function deleted and created again under the same name gets a new one.  Every version
(``function_uid``), instance record and queued event carries it, and ``VersionKey`` (what pools,
start books and instance counts are keyed by) includes it, so nothing of a deleted function serves
its successor.  Records stored before uids existed load with ``""``, their function's uid for life.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
HANDLER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.[A-Za-z_][A-Za-z0-9_]*$")
APP_ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
APP_CONCURRENCY = 32  # an app's default concurrency: requests one instance serves at once
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RUNTIMES = ("python3.11",)
RESERVED_ENV_PREFIXES = ("FAAS_", "AWS_")
STREAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._/-]{0,199}$")


def name_problem(name: str, what: str = "function name") -> str | None:
    """Why ``name`` is not a valid function or namespace name, or None when it is."""
    if not NAME_RE.fullmatch(name):
        return (
            f"invalid {what} {name!r}: use 1-63 characters, lowercase letters, digits and '-', "
            "starting with a letter"
        )
    if name.endswith("-"):
        return f"invalid {what} {name!r}: must not end with '-'"
    return None


def now() -> float:
    return time.time()


VersionKey = tuple[str, str, int, str]
"""(namespace, function, version, function uid): one version of one incarnation of a function."""


def new_function_uid() -> str:
    return secrets.token_hex(8)


class CodeRef(BaseModel):
    """A code archive in the object store, addressed by its content."""

    key: str
    sha256: str
    size: int


def stream_problem(stream: str) -> str | None:
    """Why ``stream`` cannot name a user's Redis stream, or None when it can."""
    if not STREAM_RE.fullmatch(stream):
        return f"invalid stream name {stream!r}: 1-200 characters of letters, digits and ':._/-'"
    if stream.startswith("faas:"):
        return f"stream name {stream!r} uses the platform's reserved prefix 'faas:'"
    return None


class Destination(BaseModel):
    """Where the outcome of an async invocation is sent: another function (async), or a stream."""

    model_config = ConfigDict(extra="forbid")

    function: str | None = Field(default=None, description="function name, optionally name:qualifier")
    stream: str | None = Field(default=None, description="a Redis stream on the platform's Redis")

    @model_validator(mode="after")
    def _one_target(self) -> Destination:
        if (self.function is None) == (self.stream is None):
            raise ValueError("a destination names exactly one of 'function' or 'stream'")
        if self.function is not None:
            name, _, qualifier = self.function.partition(":")
            problem = name_problem(name, "destination function name")
            if problem:
                raise ValueError(problem)
            if ":" in self.function and not qualifier:
                raise ValueError(f"destination {self.function!r}: the qualifier after ':' is empty")
        if self.stream is not None:
            problem = stream_problem(self.stream)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def function_name(self) -> str:
        return (self.function or "").partition(":")[0]

    @property
    def qualifier(self) -> str | None:
        return (self.function or "").partition(":")[2] or None


class VersionConfig(BaseModel):
    """What a user sets for a version (from ``faas.yaml`` or the API)."""

    # "app": a long-running WSGI/ASGI web app (handler 'module:app'), served at /app/{name}/, kept warm.
    kind: Literal["function", "app"] = "function"
    runtime: Literal["python3.11"] = "python3.11"
    handler: str = "handler.handler"
    memory_mb: int = Field(default=256, ge=64, le=10240)
    timeout_s: float = Field(default=30.0, gt=0, le=900)
    concurrency: int = Field(default=1, ge=1, le=1000)
    min_instances: int = Field(default=0, ge=0, le=100)
    max_instances: int = Field(default=10, ge=1, le=1000)
    environment: dict[str, str] = Field(default_factory=dict)
    description: str = ""
    # Async invocations: retries after the first attempt, and how old an event may get.
    max_retries: int = Field(default=2, ge=0, le=10)
    max_event_age_s: float = Field(default=6 * 3600, ge=60, le=6 * 3600)
    # Async invocations: where a record of the outcome goes (on success / once retries are exhausted).
    on_success: Destination | None = None
    on_failure: Destination | None = None
    # The HTTP trigger (``/fn/{name}/...``) answers callers without an API key (web hooks, browsers).
    # The management routes and the invoke API still need a key.
    public: bool = False
    # An app's instance gets traffic once its answer to GET readiness_path (any status) came back.
    readiness_path: str = Field(default="/", pattern=r"^/[^\s?#]*$", max_length=1024)

    @field_validator("handler")
    @classmethod
    def _handler_shape(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "app":
            if not APP_ENTRY_RE.fullmatch(value):
                raise ValueError(f"an app's entry {value!r} must look like 'module:app' (e.g. 'main:app')")
        elif not HANDLER_RE.fullmatch(value):
            raise ValueError(f"handler {value!r} must look like 'module.function' (e.g. 'handler.handler')")
        return value

    @field_validator("environment")
    @classmethod
    def _env_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if key.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(
                    f"environment variable {key!r} uses a reserved prefix {RESERVED_ENV_PREFIXES}"
                )
        return value

    def model_post_init(self, __context: Any) -> None:
        if self.kind == "app":
            # Always warm: an app has an instance from its deploy on, unless it asks for more.
            if "min_instances" not in self.model_fields_set:
                self.min_instances = 1
            if "concurrency" not in self.model_fields_set:
                self.concurrency = APP_CONCURRENCY
            if self.min_instances < 1:
                raise ValueError("an app keeps at least one instance: min_instances must be 1 or more")
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances must not exceed max_instances")

    @property
    def handler_module(self) -> str:
        return self.handler.split(":", 1)[0] if self.kind == "app" else self.handler.rsplit(".", 1)[0]


class VersionSpec(VersionConfig):
    """One immutable, numbered version of a function."""

    namespace: str
    function: str
    version: int
    code: CodeRef
    created_at: float = Field(default_factory=now)
    function_uid: str = ""  # the uid of the function record this version belongs to

    @property
    def key(self) -> VersionKey:
        return (self.namespace, self.function, self.version, self.function_uid)


def alias_problem(alias: str) -> str | None:
    """Why ``alias`` cannot name an alias, or None when it can (a number would read as a version)."""
    if alias.isdigit():
        return f"invalid alias {alias!r}: a number names a version; an alias must start with a letter"
    problem = name_problem(alias, "alias")
    return problem


class AliasRoute(BaseModel):
    """What an alias holds beyond its version (``FunctionRecord.aliases``): a split of its calls
    between two versions, and the version it pointed to before (``faas rollback``)."""

    weights: dict[int, int] = Field(default_factory=dict)  # version -> percent (sum 100); {}: all to its version
    previous: int | None = None


class AliasSpec(BaseModel):
    """An alias as a caller sets it: one version, or a split between two by percent."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="the version the alias points to (the split's main version)")
    weights: dict[int, int] | None = Field(
        default=None,
        description='percent of the calls per version, summing to 100, naming `version` and at most one other: {"2": 90, "3": 10}',
    )

    @model_validator(mode="after")
    def _check_weights(self) -> AliasSpec:
        if self.weights is None:
            return self
        if self.version not in self.weights:
            raise ValueError(f"weights must give the alias's version {self.version} its share")
        if len(self.weights) > 2:
            raise ValueError(f"an alias splits calls between at most two versions, not {len(self.weights)}")
        for version, pct in self.weights.items():
            if version < 1:
                raise ValueError(f"weights: {version} is not a version number")
            if not 0 <= pct <= 100:
                raise ValueError(f"weights: version {version} has {pct}%; a weight is 0-100")
        if (total := sum(self.weights.values())) != 100:
            raise ValueError(f"weights sum to {total}%, not 100%")
        return self

    def route_weights(self) -> dict[int, int]:
        """The split as stored: {} when every call goes to one version."""
        weights = {v: pct for v, pct in (self.weights or {}).items() if pct > 0}
        return weights if len(weights) > 1 else {}


class AliasView(BaseModel):
    """An alias as the management API shows it."""

    name: str
    version: int
    weights: dict[int, int] = Field(default_factory=dict)  # {} when every call goes to ``version``
    previous: int | None = None  # where ``rollback`` takes it


class FunctionRecord(BaseModel):
    namespace: str
    name: str
    uid: str = ""  # set at creation, never changed; "" for a function created before uids existed
    latest_version: int = 0
    aliases: dict[str, int] = Field(default_factory=dict)  # alias -> its version (a split's main one)
    routes: dict[str, AliasRoute] = Field(default_factory=dict)  # alias -> its split and previous version

    def alias_view(self, alias: str) -> AliasView:
        route = self.routes.get(alias) or AliasRoute()
        return AliasView(name=alias, version=self.aliases[alias], weights=route.weights, previous=route.previous)
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class FunctionView(BaseModel):
    """What the management API returns for a function."""

    namespace: str
    name: str
    uid: str = ""
    latest_version: int
    aliases: dict[str, int]
    routes: dict[str, AliasRoute] = Field(default_factory=dict)
    created_at: float
    updated_at: float
    config: VersionSpec | None = None
    url: str | None = None


class InstanceRecord(BaseModel):
    """A running instance, written by the scheduler under the node's lease."""

    instance_id: str
    namespace: str
    function: str
    version: int
    node_id: str
    address: str  # unix:///path/to.sock or http://127.0.0.1:PORT
    concurrency: int
    memory_mb: int = 0
    started_at: float = Field(default_factory=now)
    function_uid: str = ""

    @property
    def key(self) -> VersionKey:
        return (self.namespace, self.function, self.version, self.function_uid)


class MemberRecord(BaseModel):
    """A live service process (registered under its own lease)."""

    role: str
    member_id: str
    address: str
    pid: int
    started_at: float = Field(default_factory=now)
    info: dict[str, Any] = Field(default_factory=dict)
    # The same service on a unix socket, for callers on the same machine (``wire.hop_address``).
    local_address: str | None = None
    machine: str = ""


class NodeRecord(BaseModel):
    node_id: str
    address: str  # the node agent's HTTP address
    lease_id: int
    runtime: str
    isolation: str = ""  # what keeps its instances apart (the backend's ``isolation``; "" before it said)
    memory_total_mb: int
    memory_free_mb: int
    cpu_load: float = 0.0
    instances: int = 0
    runtime_error: str = ""  # why the backend cannot start instances now ("" when it can)
    # Each instance's use over the last report interval: CPU in cores, resident memory in MiB.
    instance_cpu: dict[str, float] = Field(default_factory=dict)
    instance_rss_mb: dict[str, float] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=now)


class LeaderRecord(BaseModel):
    role: str
    member_id: str
    address: str
    elected_at: float = Field(default_factory=now)
    local_address: str | None = None  # as in MemberRecord
    machine: str = ""


class InstanceStatus(BaseModel):
    """What a node agent reports about one instance it runs (``GET /v1/instances``)."""

    instance_id: str
    address: str
    alive: bool
    state: str = "unknown"  # generic | ready | unknown
    inflight: int = 0
    idle_s: float = 0.0
    invocations: int = 0
    pid: int | None = None


class InstanceExit(BaseModel):
    """Why an instance ended on its own, as its node agent saw it."""

    instance_id: str
    exit_code: int | None = None
    oom_killed: bool = False
    detail: str = ""
