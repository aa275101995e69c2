"""The wire between the platform's services: every internal path and header, and the deadline policy.

Guarantees: a service builds the URL or the headers of an internal call only from here, and reads
them only by these names, so one change here is one change of the contract (docs/contracts.md
describes each call).  No service imports another service's modules; they share this module and
``faas.core`` (an import-linter contract in ``.importlinter`` keeps it so).

Header names are lowercase, as the servers and clients compare them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote

# -- headers ---------------------------------------------------------------------------------------

# The platform's internal token (``Settings.internal_token``): every internal service refuses a
# request without it (401), except its health check (``OPEN_PATHS``).  HTTP hops send it on every
# request; a multiplexed connection presents it once, in its first frame (``faas.core.mux.HELLO``).
INTERNAL_TOKEN = "x-faas-internal-token"
REQUEST_ID = "x-faas-request-id"
DEADLINE_MS = "x-faas-deadline-ms"  # absolute deadline of the call, epoch milliseconds
FUNCTION_UID = "x-faas-function-uid"
IDEMPOTENCY_KEY = "x-faas-idempotency-key"
INVOCATION_TYPE = "x-faas-invocation-type"
# Set by a dispatcher on a 429 that means "this dispatcher is saturated: try the next one".
SATURATED = "x-faas-saturated"
# What an invocation's response tells the caller; a hop passes exactly these on.
VERSION = "x-faas-version"
INSTANCE = "x-faas-instance"
COLD = "x-faas-cold"
DURATION_MS = "x-faas-duration-ms"
FUNCTION_ERROR = "x-faas-function-error"
RETRY_AFTER = "retry-after"
PASSED_HEADERS = (REQUEST_ID, VERSION, INSTANCE, COLD, DURATION_MS, FUNCTION_ERROR, RETRY_AFTER)
# On a standby's 503 ``not_leader``: tells it apart from a web app's own 503 in a relayed answer.
NOT_LEADER = "x-faas-not-leader"
# A web app's request: the public prefix the app is mounted at (its root path), passed to the host.
ROOT_PATH = "x-faas-root-path"
# Headers of a web app's request that are the platform's, never the app's: a client's are dropped at
# the gateway (with the API key it sent), so an app sees only what its callers meant for it.
APP_HOP_HEADERS = frozenset({INTERNAL_TOKEN, DEADLINE_MS, FUNCTION_UID, ROOT_PATH, "connection", "keep-alive",
                             "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"})  # fmt: skip
# Caller headers an async event keeps in its envelope (W3C trace context, and who sent it).
ENVELOPE_HEADERS = ("traceparent", "tracestate", "user-agent")


def passed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an invocation's response that a hop passes on to its caller."""
    return {h: headers[h] for h in PASSED_HEADERS if h in headers}


# -- addresses -------------------------------------------------------------------------------------
#
# A service listens on TCP (``address``) and, on the machine it runs on, on a unix socket too
# (``local_address``, ``http+unix://<quoted socket path>``): a hop between two processes of one
# machine costs less through it.  Records carry the machine they were written on.


def machine_id() -> str:
    """This machine, as far as a unix socket path reaches: the host name and the kernel's boot id
    (two containers of one kernel have distinct host names and file systems)."""
    global _MACHINE
    if _MACHINE is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        _MACHINE = f"{socket.gethostname()}/{boot}"
    return _MACHINE


_MACHINE: str | None = None
# A unix socket path is at most 107 bytes; a longer one is not used (the service is reached on TCP).
MAX_SOCKET_PATH = 100


def local_socket_path(run_dir: Path, role: str, member_id: str) -> Path | None:
    path = run_dir.resolve() / "hop" / f"{role}-{member_id}.sock"
    return path if len(str(path)) <= MAX_SOCKET_PATH else None


def unix_address(path: Path) -> str:
    return "http+unix://" + quote(str(path), safe="")


class Addressed(Protocol):
    address: str
    local_address: str | None
    machine: str


def hop_address(record: Addressed) -> str:
    """Where to send a hop to the service of ``record``: its unix socket when it runs on this
    machine and the socket is in this file system (two containers may share a host name and a
    kernel, not their files), else its TCP address."""
    local = record.local_address
    if local and record.machine == machine_id():
        reachable = _reachable.get(local)
        if reachable is None:
            reachable = _reachable[local] = os.path.exists(unquote(local.removeprefix("http+unix://")))
        if reachable:
            return local
    return record.address


_reachable: dict[str, bool] = {}  # local address -> whether its socket file is in this file system


# -- paths -----------------------------------------------------------------------------------------


def trigger_invoke(ns: str, name: str, version: int) -> str:
    return f"/v1/invoke/{ns}/{name}/{version}"


def trigger_invoke_async(ns: str, name: str, version: int) -> str:
    return f"/v1/invoke-async/{ns}/{name}/{version}"


TRIGGER_ENQUEUE = "/v1/enqueue"


def dispatcher_invoke(ns: str, name: str, version: int) -> str:
    return f"/v1/invoke/{ns}/{name}/{version}"


def scheduler_acquire(ns: str, name: str, version: int) -> str:
    return f"/v1/acquire/{ns}/{name}/{version}"


def scheduler_retire(instance_id: str) -> str:
    return f"/v1/instances/{instance_id}/retire"


def app_request(ns: str, name: str, version: int, path: str, query: bytes) -> str:
    """A web app's request between the trigger and a dispatcher: ``path`` is below the app's root
    (``/`` at least), ``query`` the raw query string."""
    target = f"/v1/app/{ns}/{name}/{version}{path}"
    return f"{target}?{query.decode('latin-1')}" if query else target


def host_app_request(path: str, query: bytes) -> str:
    """A web app's request as its instance's host takes it (``faas/runtime/app_host.py``)."""
    target = f"/_/app{path}"
    return f"{target}?{query.decode('latin-1')}" if query else target


NODE_INSTANCES = "/v1/instances"


def node_instance(instance_id: str) -> str:
    return f"{NODE_INSTANCES}/{instance_id}"


def node_instance_exit(instance_id: str) -> str:
    return f"{NODE_INSTANCES}/{instance_id}/exit"


HEALTH = "/healthz"
# What an internal service answers without the internal token: its liveness check only.
OPEN_PATHS = frozenset({HEALTH})

# The routes the services declare (the same paths, as route templates).
TRIGGER_INVOKE_ROUTE = "/v1/invoke/{ns}/{name}/{version:int}"
TRIGGER_INVOKE_ASYNC_ROUTE = "/v1/invoke-async/{ns}/{name}/{version:int}"
DISPATCHER_INVOKE_ROUTE = "/v1/invoke/{ns}/{name}/{version:int}"
APP_ROUTE = "/v1/app/{ns}/{name}/{version:int}{path:path}"  # the trigger's and the dispatcher's
APP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


# -- deadlines -------------------------------------------------------------------------------------

# Grace on top of a cold start and the function's timeout, for the hops themselves.
DEADLINE_GRACE_S = 2.0
# What an internal hop assumes when a caller sent no deadline (a call made by hand).
DEFAULT_DEADLINE_S = 60.0
# How long the gateway gives an async call to be queued durably.
ENQUEUE_DEADLINE_S = 15.0


def invocation_deadline(*, timeout_s: float, cold_start_timeout_s: float, now: float | None = None) -> float:
    """The absolute deadline (epoch seconds) of one invocation: a cold start, the function's own
    timeout, and a little for the hops.  Every hop passes it on and waits no longer."""
    return (time.time() if now is None else now) + cold_start_timeout_s + timeout_s + DEADLINE_GRACE_S


def deadline_header(deadline: float) -> str:
    return str(int(deadline * 1000))


def deadline_from_header(value: str | None, *, cold_start_timeout_s: float) -> float:
    """The absolute deadline a caller sent, or a default one for a call that sent none."""
    if value:
        try:
            return int(value) / 1000.0
        except ValueError:
            pass
    return time.time() + cold_start_timeout_s + DEFAULT_DEADLINE_S
