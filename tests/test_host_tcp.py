"""The function host's benchmark listener (``host.py --tcp-port``): loopback TCP, same HTTP contract."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from faas.runtime.process_backend import HOST_SCRIPT
from tests.code_server import CodeServer
from tests.helpers import make_zip

pytestmark = pytest.mark.timeout(30)

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


async def _port_from_log(log: Path, process: asyncio.subprocess.Process) -> int:
    give_up_at = time.monotonic() + 10
    while time.monotonic() < give_up_at:
        text = await asyncio.to_thread(log.read_bytes)
        assert process.returncode is None, text
        match = _LISTENING.search(text)
        if match:
            return int(match[1])
        await asyncio.sleep(0.01)
    raise AssertionError("the host never said where it listens")


async def test_host_serves_the_invoke_contract_on_a_loopback_port(run_dir: Path) -> None:
    log = run_dir / "host.err"
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-S", "-E", str(HOST_SCRIPT), "--tcp-port", "0",
            "--cache-dir", str(run_dir / "cache"), "--instance-id", "tcp-0",
            stdout=asyncio.subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
    code = CodeServer()
    try:
        port = await _port_from_log(log, process)
        archive = make_zip({"app.py": "def handler(event, context):\n    return event\n"})
        url, _, sha = code.publish(archive)
        spec = {
            "code_url": url, "sha256": sha, "size": len(archive), "handler": "app.handler",
            "namespace": "default", "function": "echo", "version": 1, "memory_mb": 128,
            "timeout_s": 5, "concurrency": 1, "environment": {},
        }  # fmt: skip
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            assert (await client.post("/_/specialize", json=spec)).status_code == 200
            answer = await client.post("/_/invoke", json={"n": 1})
        assert answer.status_code == 200
        assert answer.json() == {"n": 1}  # the result, as the caller gets it
    finally:
        code.httpd.shutdown()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 5)
