"""The seam between the node agent and what actually runs instances.

A backend turns an ``InstanceSpec`` into a running, specialised function host reachable at an address
(``unix:///…`` or ``http://127.0.0.1:PORT``).  Implementations: ``process_backend.ProcessBackend``
(local processes, the embedded default) and ``docker_backend.DockerBackend``.  The node agent is the only
caller; it serialises nothing, so implementations must be safe for concurrent ``launch`` calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from pydantic import BaseModel, Field

from faas.core.models import InstanceExit, InstanceStatus

__all__ = ["InstanceExit", "InstanceSpec", "InstanceStatus", "RuntimeBackend", "InstanceExitCallback"]


class InstanceSpec(BaseModel):
    """Everything a host needs to become an instance of one function version."""

    instance_id: str
    namespace: str
    function: str
    version: int
    handler: str
    code_url: str  # short-lived presigned GET URL; the instance holds no S3 credentials
    sha256: str
    size: int
    memory_mb: int
    timeout_s: float
    concurrency: int
    environment: dict[str, str] = Field(default_factory=dict)
    function_uid: str = ""  # the function's identity (a function deleted and created again differs)
    kind: str = "function"  # or "app": the host serves the WSGI/ASGI app ``handler`` names (module:app)
    readiness_path: str = "/"

    def specialize_body(self) -> dict[str, object]:
        return {
            "code_url": self.code_url,
            "sha256": self.sha256,
            "size": self.size,
            "handler": self.handler,
            "namespace": self.namespace,
            "function": self.function,
            "version": self.version,
            "memory_mb": self.memory_mb,
            "timeout_s": self.timeout_s,
            "concurrency": self.concurrency,
            "environment": self.environment,
            "kind": self.kind,
            "readiness_path": self.readiness_path,
        }


InstanceExitCallback = Callable[[InstanceExit], Awaitable[None]]


class RuntimeBackend(Protocol):
    name: str

    async def start(self) -> None:
        """Prepare the backend (fill the pre-warmed pool).  Raises ``Unavailable`` if it cannot run."""

    async def close(self) -> None:
        """Stop every instance and pool member this backend started."""

    async def launch(self, spec: InstanceSpec, *, timeout_s: float) -> str:
        """Start (or take from the pool) a host, specialise it with ``spec``, return its address.

        On failure the host is destroyed, never reused, and ``InstanceStartError`` (the handler's
        import problem, a bad archive, a sha256 mismatch) or ``Unavailable`` is raised.
        """

    async def check(self) -> None:
        """Raise ``Unavailable`` if the backend cannot start instances right now (e.g. Docker is down)."""

    async def stop(self, instance_id: str) -> None:
        """Stop an instance; a no-op if it is already gone."""

    async def list_instances(self) -> list[InstanceStatus]:
        """The specialised instances this backend runs, with their live load."""

    def usage_pids(self) -> dict[str, list[int]]:
        """Each instance's processes, whose CPU and memory are its use (the node's load report)."""
        ...

    def set_exit_callback(self, callback: InstanceExitCallback) -> None:
        """Register a coroutine called with how an instance ended, when it exits on its own."""

    def adopted(self) -> list[tuple[InstanceSpec, str]]:
        """The instances ``start`` adopted from a previous agent on this node, still running:
        (spec, address).  Every other host a previous agent left was killed by ``start``."""
