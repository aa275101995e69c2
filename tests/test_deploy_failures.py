"""A deploy while S3 or etcd is unreachable fails with a clear 503 and creates nothing.

Each case runs a second, real gateway process whose settings point one dependency at a closed port,
beside the healthy test platform that then proves nothing became visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from faas.launcher.embedded import find_free_port, settings_env
from tests.conftest import ROOT, Platform
from tests.helpers import make_zip

pytestmark = pytest.mark.integration


@contextmanager
def broken_gateway(platform: Platform, *, keys_load: bool = True, **overrides: str) -> Iterator[str]:
    port = find_free_port()
    env = dict(os.environ)
    env.update(settings_env(platform.settings))
    env.update({"FAAS_GATEWAY_PORT": str(port), "PYTHONPATH": str(ROOT), **overrides})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--id", f"gateway-broken-{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                # Healthy, and (when etcd is reachable) the API keys loaded: a call is then judged by them.
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200 and (
                    not keys_load
                    or httpx.get(f"{url}/v1/whoami", headers=platform.admin_headers, timeout=1).status_code == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _deploy(url: str, name: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.put(
        f"{url}/v1/functions/{name}",
        data={"config": json.dumps({"handler": "handler.handler"})},
        files={"code": ("code.zip", make_zip({"handler.py": "def handler(e, c):\n    return 1\n"}), "application/zip")},
        timeout=60,
        headers=headers,
    )


def test_s3_unreachable_at_deploy_is_503_and_nothing_is_created(platform: Platform) -> None:
    closed = find_free_port()
    with broken_gateway(platform, FAAS_S3_ENDPOINT=f"http://127.0.0.1:{closed}") as url:
        resp = _deploy(url, "no-s3", platform.admin_headers)
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["kind"] == "unavailable" and "object store" in err["message"]
    assert httpx.get(f"{platform.url}/v1/functions/no-s3", headers=platform.admin_headers).status_code == 404


def test_etcd_unreachable_at_deploy_is_503_and_nothing_is_created(platform: Platform) -> None:
    closed = find_free_port()
    with broken_gateway(platform, keys_load=False, FAAS_ETCD_URL=f"http://127.0.0.1:{closed}") as url:
        resp = _deploy(url, "no-etcd", platform.admin_headers)
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["kind"] == "unavailable" and "etcd" in err["message"]
    assert httpx.get(f"{platform.url}/v1/functions/no-etcd", headers=platform.admin_headers).status_code == 404
