"""The developer workflow through the real `faas` CLI against the real platform."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from faas.core import keys
from faas.core.models import NodeRecord
from faas.core.service import etcd_from_settings
from tests.conftest import Platform

pytestmark = pytest.mark.integration


def test_init_deploy_invoke_ls_logs_rm(platform: Platform, tmp_path: Path) -> None:
    init = platform.cli("init", "greeter", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    project = tmp_path / "greeter"
    assert {p.name for p in project.iterdir()} >= {"faas.yaml", "handler.py", "requirements.txt"}

    deployed = platform.cli("deploy", str(project))
    assert deployed.returncode == 0, deployed.stderr
    assert "version 1" in deployed.stdout
    assert f"{platform.url}/fn/greeter/" in deployed.stdout

    cold = platform.cli("invoke", "greeter", "-d", '{"name": "Ada"}', "-v")
    assert cold.returncode == 0, cold.stderr
    result = json.loads(cold.stdout)
    assert "Ada" in json.dumps(result)
    warm = platform.cli("invoke", "greeter", "-v", input='{"name": "Grace"}')
    assert warm.returncode == 0, warm.stderr
    assert "Grace" in warm.stdout

    listed = platform.cli("ls", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert "greeter" in {f["name"] for f in json.loads(listed.stdout)}

    logs = platform.cli("logs", "greeter")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.count("\n") >= 2

    removed = platform.cli("rm", "greeter")
    assert removed.returncode == 0, removed.stderr
    gone = platform.cli("invoke", "greeter", "-d", "{}")
    assert gone.returncode == 1
    assert "not_found" in gone.stderr


def test_requirements_are_vendored(platform: Platform, tmp_path: Path) -> None:
    project = tmp_path / "withdeps"
    project.mkdir()
    (project / "faas.yaml").write_text("name: withdeps\nhandler: handler.handler\n")
    (project / "requirements.txt").write_text("six==1.16.0\n")
    (project / "handler.py").write_text(
        "import six\n\ndef handler(event, context):\n    return {'six': six.__version__, 'file': six.__file__}\n"
    )
    deployed = platform.cli("deploy", str(project))
    assert deployed.returncode == 0, deployed.stderr
    out = platform.cli("invoke", "withdeps", "-d", "{}")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["six"] == "1.16.0"
    # Imported from the vendored copy in the archive, not from any site-packages of the platform.
    assert "site-packages" not in result["file"]


def test_cli_errors_are_clear(platform: Platform, tmp_path: Path) -> None:
    bad_name = platform.cli("init", "Not_Valid", cwd=tmp_path)
    assert bad_name.returncode == 2
    assert "invalid function name" in bad_name.stderr

    project = tmp_path / "bad"
    project.mkdir()
    (project / "handler.py").write_text("def handler(e, c):\n    return 1\n")
    (project / "faas.yaml").write_text("name: bad\nmemory: 10\n")
    out = platform.cli("deploy", str(project))
    assert out.returncode != 0
    assert "memory" in out.stderr and "Traceback" not in out.stderr

    (project / "faas.yaml").write_text("handler: handler.handler\n")
    out = platform.cli("deploy", str(project))
    assert out.returncode != 0 and "name" in out.stderr

    (project / "faas.yaml").write_text("name: bad\nhandler: missing.handler\n")
    out = platform.cli("deploy", str(project))
    assert out.returncode != 0 and "missing" in out.stderr

    (project / "faas.yaml").write_text("name: bad\nhandler: handler.handler\n")
    (project / "handler.py").write_text("def handler(e, c):\n    raise KeyError('nope')\n")
    assert platform.cli("deploy", str(project)).returncode == 0
    failed = platform.cli("invoke", "bad", "-d", "{}")
    assert failed.returncode == 1
    assert "function_error" in failed.stderr and "KeyError" in failed.stderr

    invalid_json = platform.cli("invoke", "bad", "-d", "{nope")
    assert invalid_json.returncode == 2


def test_status_reports_every_component(platform: Platform) -> None:
    env_home = str(platform.settings.home)
    out = platform.cli("status", "--home", env_home, "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    status = json.loads(out.stdout)
    text = json.dumps(status)
    for role in ("gateway", "trigger", "dispatcher", "scheduler", "node", "etcd", "valkey"):
        assert role in text


async def test_status_reports_a_node_whose_runtime_is_down(platform: Platform) -> None:
    etcd = etcd_from_settings(platform.settings)
    lease_id = await etcd.grant_lease(30)
    record = NodeRecord(
        node_id="node-broken",
        address="http://127.0.0.1:9",
        lease_id=lease_id,
        runtime="docker",
        memory_total_mb=1024,
        memory_free_mb=1024,
        runtime_error="Docker daemon at unix:///var/run/docker.sock unreachable: connection refused",
    )
    try:
        await etcd.put(keys.node("node-broken"), record.model_dump_json().encode(), lease=lease_id)
        out = platform.cli("status", "--home", str(platform.settings.home))
        assert out.returncode == 1, out.stdout
        assert "node node-broken: Docker daemon at unix:///var/run/docker.sock unreachable" in out.stdout + out.stderr
    finally:
        await etcd.revoke_lease(lease_id)
        await etcd.close()


def test_async_invoke_and_invocation_lookup(platform: Platform, tmp_path: Path) -> None:
    project = tmp_path / "later"
    project.mkdir()
    (project / "faas.yaml").write_text("name: later\nhandler: handler.handler\n")
    (project / "handler.py").write_text("def handler(event, context):\n    return {'got': event}\n")
    assert platform.cli("deploy", str(project)).returncode == 0
    queued = platform.cli("invoke", "later", "--async", "-d", '{"n": 7}')
    assert queued.returncode == 0, queued.stderr
    invocation_id = json.loads(queued.stdout)["id"]
    deadline = time.monotonic() + 30
    while True:
        shown = platform.cli("invocation", invocation_id)
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        if record["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, record
        time.sleep(0.3)
    assert record["result"] == {"got": {"n": 7}}
    missing = platform.cli("invocation", "no-such-id")
    assert missing.returncode == 1 and "not_found" in missing.stderr
