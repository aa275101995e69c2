"""A whole platform for the fault runs, started the way a user starts it: ``faas up`` (the supervisor).

``ChaosPlatform`` picks free loopback ports (``settings_for_test``), passes them to ``faas up --home H``
as ``FAAS_*`` variables, and stops it with ``faas down --home H``.  It reads, and never writes, what
the supervisor records: the state file ``<home>/run/cluster.json`` (the live pid of each component,
re-read on every call since a restarted component has a new pid) and the member and leader records in
etcd.  It starts nothing itself after ``up``: restarting what a fault killed is the supervisor's job.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import httpx

from bench.chaos.count import faas_command
from bench.chaos.records import api_headers
from faas.core.procs import pid_alive
from faas.core.settings import Settings
from faas.launcher.embedded import (
    ADMIN_KEY_FILE,
    ProcessRecord,
    embedded_settings,
    read_members,
    read_state,
    settings_env,
    settings_for_test,
    state_records,
    with_credentials,
)

UP_TIMEOUT_S = 240.0
DOWN_TIMEOUT_S = 150.0
NOOP_HANDLER = "def handler(event, context):\n    return event\n"


class PlatformError(Exception):
    """The platform did not start, or did not do what the runner needed from it (a deploy, a warm-up)."""


def noop_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", NOOP_HANDLER)
    return buf.getvalue()


class ChaosPlatform:
    def __init__(self, home: Path, *, etcd_members: int = 1, log: Any = None, **overrides: Any) -> None:
        self.home = Path(home).resolve()
        self.etcd_members = etcd_members
        # With the credentials 'faas up' finds under the home (made here first), so the runner's own
        # clients of etcd (its TLS client certificate), Valkey and S3 get in too.
        base = settings_for_test(self.home, etcd_members=etcd_members, **overrides)
        self.settings: Settings = with_credentials(embedded_settings(base))
        self.started = False
        self._log = log or (lambda message: None)

    @property
    def url(self) -> str:
        return self.settings.gateway_url

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(settings_env(self.settings))
        env["FAAS_CONFIG_DIR"] = str(self.home / "cli-config")  # where 'faas up' keeps the admin key for the CLI
        return env

    async def _faas(self, *args: str, timeout_s: float) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *faas_command(), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self._env(),
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except BaseException:
            # ``faas up`` stops the supervisor it started when interrupted (SIGINT); then reap it.
            if proc.returncode is None:
                proc.send_signal(2)
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), 60)
                except BaseException:
                    proc.kill()
            raise
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def up(self) -> None:
        """``faas up`` (``--etcd-members`` when more than one); returns once the platform answers."""
        self.home.mkdir(parents=True, exist_ok=True)
        args = ["up", "--home", str(self.home)]
        if self.etcd_members > 1:
            args += ["--etcd-members", str(self.etcd_members)]
        self.started = True  # even a failed or interrupted up may leave something for ``down``
        try:
            code, out, err = await self._faas(*args, timeout_s=UP_TIMEOUT_S)
        except TimeoutError:
            raise PlatformError(f"faas up did not return within {UP_TIMEOUT_S:g} s") from None
        if code != 0:
            raise PlatformError(f"faas up exited with code {code}:\n{err.strip()[-2000:]}")
        if out.strip() != self.url:
            raise PlatformError(f"faas up printed {out.strip()!r}, expected {self.url}")
        # Every client of the runner, the load generator (a child) included, sends the admin key.
        os.environ["FAAS_API_KEY"] = (self.home / ADMIN_KEY_FILE).read_text().strip()

    async def down(self) -> str:
        """``faas down``: stops the supervisor and everything it runs (also after a failed ``up``)."""
        if not self.started:
            return "not started"
        code, out, err = await self._faas("down", "--home", str(self.home), timeout_s=DOWN_TIMEOUT_S)
        self.started = False
        return f"faas down exited {code}: {(out + err).strip()[-500:]}"

    # -- what runs -----------------------------------------------------------------------------

    def records(self) -> dict[str, ProcessRecord]:
        """The components the supervisor runs now, by name (``trigger-1``, ``valkey``, ``etcd-2`` ...)."""
        state = read_state(self.settings)
        if state is None:
            raise PlatformError(f"no state file under {self.home}: the platform is not running")
        return {rec.name: rec for rec in state_records(state)}

    def live_record(self, name: str) -> ProcessRecord:
        rec = self.records().get(name)
        if rec is None:
            raise PlatformError(f"the state file records no component {name!r}")
        if rec.state != "running" or not pid_alive(rec.pid, rec.start_ticks):
            raise PlatformError(f"{name} (pid {rec.pid}) is not running ({rec.state})")
        return rec

    async def members(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(member records by id, leader records by role), from etcd."""
        return await read_members(self.settings)

    # -- functions -----------------------------------------------------------------------------

    async def deploy(self, name: str, **config: Any) -> int:
        """A no-op function (``return event``); returns the new version's number."""
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0, trust_env=False, headers=api_headers()) as client:
            resp = await client.put(
                f"/v1/functions/{name}",
                data={"config": json.dumps({"handler": "handler.handler", "memory_mb": 128, **config})},
                files={"code": ("code.zip", noop_archive(), "application/zip")},
            )
        if resp.status_code != 201:
            raise PlatformError(f"deploy of {name} answered {resp.status_code}: {resp.text[:500]}")
        return int(resp.json()["latest_version"])

    async def warm(self, name: str, *, calls: int, timeout_s: float = 90.0) -> None:
        """``calls`` sync calls at once until all answer 200 (the cold starts happen here), then one
        async call drained to ``succeeded``."""
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout_s, trust_env=False, headers=api_headers()) as client:
            async with asyncio.timeout(timeout_s):
                while True:
                    answers = await asyncio.gather(
                        *(client.post(f"/v1/functions/{name}/invoke", json={"warm": i}) for i in range(calls))
                    )
                    if all(r.status_code == 200 for r in answers):
                        break
                    await asyncio.sleep(0.5)
                resp = await client.post(f"/v1/functions/{name}/invoke-async", json={"warm": "async"})
                if resp.status_code != 202:
                    raise PlatformError(
                        f"warm-up async call of {name} answered {resp.status_code}: {resp.text}"
                    )
                invocation = resp.json()["id"]
                while True:
                    status = (await client.get(f"/v1/invocations/{invocation}")).json().get("status")
                    if status == "succeeded":
                        return
                    if status == "dead-lettered":
                        raise PlatformError(f"warm-up async call of {name} was dead-lettered")
                    await asyncio.sleep(0.2)
