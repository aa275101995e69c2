"""One settings model for every process of the platform.

Every value comes from an environment variable ``FAAS_<FIELD>`` (or a keyword argument in tests), so
each service can point at an external etcd, Redis and S3 instead of the embedded ones.  Nothing here
is read at import time: services build a ``Settings`` in their entry point and pass it down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAAS_", extra="ignore")

    # Where the embedded platform keeps data, logs, sockets and pid files.
    home: Path = Path(".faas")

    # Backing services.  The embedded launcher starts them on these ports.  ``etcd_url`` may list every
    # member of a cluster, comma separated; clients use them all.
    etcd_url: str = "http://127.0.0.1:2379"
    etcd_peer_port: int = 2380
    # TLS to etcd (``https://`` in ``etcd_url``, or any of these set): the CA that signed etcd's
    # certificate (unset: the system's roots) and this client's certificate and key, both or neither
    # (an etcd with ``--client-cert-auth`` refuses a client without them).  ``faas up`` makes all of
    # them under ``<home>/etcd-tls/`` (faas/launcher/etcd_tls.py).
    etcd_ca_file: Path | None = None
    etcd_cert_file: Path | None = None
    etcd_key_file: Path | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_access_key: str = "faas"
    s3_secret_key: str = "faas-secret-key"
    s3_region: str = "us-east-1"
    s3_bucket: str = "faas-code"
    # Base port for SeaweedFS' internal servers (master, volume, filer and their gRPC ports).
    weed_base_port: int = 9333

    # Public gateway.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080

    # Internal services bind to this host on an ephemeral port and register their address in etcd.
    bind_host: str = "127.0.0.1"
    # Services also listen on a unix socket under ``<home>/run/hop/`` (mode 0600), which callers on
    # the same machine use for the invocation hops instead of TCP (cheaper per call).
    local_sockets: bool = True
    # The platform's internal token: the trigger, dispatchers, schedulers and node agents refuse any
    # request without it (401) but their health check, and every platform process sends it to them.
    # A service started without one refuses to start (faas.core.service.check_internal_token);
    # ``faas up`` makes one on first start, in ``<home>/internal.token`` (mode 0600).
    internal_token: str = ""

    # Leases and elections.  A frozen leader is replaced after about this long (a killed one sooner,
    # see faas/core/election.py); 3 s showed no spurious election under load, two CPU hogs included
    # (python -m bench.chaos.ttl, README).
    lease_ttl_s: int = Field(default=3, ge=1)

    # Object-store notifications (SeaweedFS, MinIO webhooks) are accepted only with this secret, as
    # ``?secret=`` on the webhook URL or a bearer token; empty: refused.  ``faas up`` generates one.
    webhook_secret: str = ""

    # Web apps by host name: with "apps.example.com", a request for "shop.apps.example.com" goes to
    # the app "shop" (mounted at "/", not "/app/shop"). Empty: by path only.
    app_domain: str = ""

    # Per-namespace limits, unless an admin set others for a namespace (faas/core/namespaces.py);
    # 0 is no limit.
    namespace_max_functions: int = Field(default=0, ge=0)
    namespace_max_instances: int = Field(default=0, ge=0)
    namespace_max_invocations_per_s: float = Field(default=0.0, ge=0)

    # Functions.
    default_namespace: str = "default"
    max_sync_payload_bytes: int = 6 * 1024 * 1024
    max_archive_bytes: int = 250 * 1024 * 1024
    max_unpacked_bytes: int = 512 * 1024 * 1024
    keepalive_s: float = 300.0
    reap_interval_s: float = 5.0
    # Code archives no version refers to are deleted from S3 by the scheduler leader, once older
    # than the grace period (which covers a deploy between its upload and its version).
    archive_gc_interval_s: float = 600.0
    archive_gc_grace_s: float = 3600.0
    cold_start_timeout_s: float = 30.0
    # How long a cold start waits for a node agent that answers (one restarting, or none registered)
    # before it fails with 503.
    node_wait_s: float = 10.0
    # A function at max_instances queues at most this many calls per slot (max_instances x
    # concurrency) on a dispatcher, and fewer once its call duration is known and the queue would
    # outlast the callers' deadlines; beyond, a sync call gets 429 with Retry-After at once.
    max_waiters_per_slot: int = Field(default=10, ge=1)
    presign_ttl_s: int = 300

    # The embedded platform (``faas up``): how many etcd members (1, 3 or 5) and node agents it runs.
    etcd_members: int = 1
    nodes: int = Field(default=1, ge=1, le=16)

    # Node agent.  Each node keeps its sockets, journal and code cache under ``<home>/nodes/<id>/``.
    node_id: str = "node-1"
    # process | docker | auto (Docker when a daemon answers, else processes)
    runtime: Literal["process", "docker", "auto"] = "process"
    # The process backend's hosts: "sandbox" (bubblewrap namespaces, a user and a cgroup per host;
    # the node agent fails to start without them), "none" (single-tenant), or "auto": sandboxed where
    # the machine allows it (root, bwrap, cgroups), else none, said in `faas status`.
    process_isolation: Literal["auto", "sandbox", "none"] = "auto"
    docker_url: str | None = None  # None: DOCKER_HOST or the local socket
    pool_size: int = Field(default=2, ge=0)
    node_memory_mb: int = 0  # 0 = read the machine's memory
    # The node's cache of unpacked code archives: an archive no instance of the node runs or is being
    # launched with is evicted once unused this long; the sweep runs this often.
    code_cache_ttl_s: float = Field(default=24 * 3600.0, ge=0)
    code_cache_sweep_s: float = Field(default=600.0, gt=0)
    # The disk quota of that cache: past it, unused code is evicted before a new archive is unpacked,
    # and a launch fails (503) when all of it is in use.  0: no quota.
    code_cache_max_bytes: int = Field(default=8 * 1024 * 1024 * 1024, ge=0)

    # Async invocations.
    max_async_payload_bytes: int = 1024 * 1024
    # An event a dispatcher took and did not finish is handed to another after this long; it must
    # exceed the longest an attempt may take: cold start (30 s) + the longest timeout (900 s) + 2 s.
    async_visibility_s: float = 960.0
    async_retry_base_s: float = 1.0
    # Retries after platform faults (no node agent, no instance, throttled...) do not use up a
    # function's max_retries: they back off from async_retry_base_s, doubling up to this cap, until
    # the event's max_event_age_s.
    async_platform_retry_cap_s: float = Field(default=60.0, gt=0)
    invocation_ttl_s: int = 24 * 3600
    idempotency_window_s: int = 3600

    # Logs kept per function in Redis.
    logs_per_function: int = 1000

    @field_validator("etcd_members")
    @classmethod
    def _odd_members(cls, value: int) -> int:
        if value not in (1, 3, 5):
            raise ValueError("etcd_members must be 1, 3 or 5 (a quorum needs an odd count)")
        return value

    @model_validator(mode="after")
    def _etcd_cert_and_key(self) -> Settings:
        if (self.etcd_cert_file is None) != (self.etcd_key_file is None):
            raise ValueError("etcd_cert_file and etcd_key_file go together: set both or neither")
        return self

    @property
    def etcd_tls(self) -> bool:
        """Whether clients speak TLS to etcd."""
        files = (self.etcd_ca_file, self.etcd_cert_file, self.etcd_key_file)
        return any(f is not None for f in files) or any(
            urlparse(url.strip()).scheme == "https" for url in self.etcd_url.split(",")
        )

    @property
    def etcd_endpoints(self) -> list[tuple[str, int]]:
        """Every (host, port) of ``etcd_url``, which may list several members, comma separated."""
        out = []
        for url in self.etcd_url.split(","):
            parsed = urlparse(url.strip())
            out.append((parsed.hostname or "127.0.0.1", parsed.port or 2379))
        return out

    @property
    def etcd_host_port(self) -> tuple[str, int]:
        """The first etcd endpoint."""
        return self.etcd_endpoints[0]

    @property
    def redis_port(self) -> int:
        return urlparse(self.redis_url).port or 6379

    @property
    def s3_port(self) -> int:
        return urlparse(self.s3_endpoint).port or 80

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def node_dir(self, node_id: str) -> Path:
        """Where the node agent ``node_id`` keeps its instances' sockets, journal and code cache."""
        return self.home / "nodes" / node_id
