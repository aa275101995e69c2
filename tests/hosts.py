"""Function host processes for tests: ``Host`` (a real ``python -S -E host.py`` and a client on its
socket), the body of a specialisation, and the ``spawn_host`` fixture (registered in conftest.py),
which kills every host it started, with its process group, at the end of the test."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from faas.runtime.process_backend import HOST_SCRIPT
from tests.code_server import CodeServer
from tests.helpers import HostAnswer, make_zip


class Host:
    """One host process and a client on its socket."""

    def __init__(self, process: asyncio.subprocess.Process, socket_path: Path, stdout: Path, cache_dir: Path):
        self.process = process
        self.socket_path = socket_path
        self.stdout = stdout
        self.cache_dir = cache_dir
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=False),
            base_url="http://host",
            verify=False,
            trust_env=False,
            timeout=10.0,
        )

    async def wait_ready(self) -> None:
        give_up_at = time.monotonic() + 10
        while time.monotonic() < give_up_at:
            assert self.process.returncode is None, "host exited while starting"
            try:
                if (await self.client.get("/_/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.005)
        raise AssertionError("host did not become ready")

    async def specialize(
        self, code_server: CodeServer, files: dict[str, str], **overrides: Any
    ) -> httpx.Response:
        archive = make_zip(files)
        url, _, sha = code_server.publish(archive)
        body = specialize_body(url, sha, len(archive))
        body.update(overrides)
        return await self.client.post("/_/specialize", json=body)

    async def invoke(self, event: Any = None, **headers: str) -> HostAnswer:
        return HostAnswer(await self.client.post("/_/invoke", json=event if event is not None else {}, headers=headers))

    async def exited(self, within_s: float = 5.0) -> int:
        return await asyncio.wait_for(self.process.wait(), within_s)


def specialize_body(url: str, sha: str, size: int, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code_url": url,
        "sha256": sha,
        "size": size,
        "handler": "app.handler",
        "namespace": "default",
        "function": "hello",
        "version": 3,
        "memory_mb": 128,
        "timeout_s": 5,
        "concurrency": 1,
        "environment": {"GREETING": "hej"},
    }
    body.update(overrides)
    return body


@pytest.fixture
async def spawn_host(run_dir: Path) -> AsyncIterator[Callable[[], Awaitable[Host]]]:
    hosts: list[Host] = []
    cache_dir = run_dir / "cache"
    numbers = itertools.count()

    async def spawn() -> Host:
        n = next(numbers)
        socket_path = run_dir / f"h{n}.sock"
        stdout = run_dir / f"h{n}.out"
        with stdout.open("wb") as out, (run_dir / f"h{n}.err").open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-S",
                "-E",
                str(HOST_SCRIPT),
                "--socket",
                str(socket_path),
                "--cache-dir",
                str(cache_dir),
                "--instance-id",
                f"test-{n}",
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        host = Host(process, socket_path, stdout, cache_dir)
        hosts.append(host)
        await host.wait_ready()
        return host

    yield spawn
    for host in hosts:
        await host.client.aclose()
        if host.process.returncode is None:
            with_group_kill(host.process.pid)
            await host.process.wait()


def with_group_kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


