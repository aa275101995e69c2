"""The embedded etcd as a boundary, against the real platform (process backend).

etcd takes only clients that present the platform's client certificate (TLS with
``--client-cert-auth``, signed by the CA ``faas up`` made under ``<home>/etcd-tls/``).  A client
without it is refused on every door etcd has (gRPC, its HTTP JSON gateway), whether it speaks plain
text, TLS without a certificate, or TLS with a certificate of another CA; none of their writes
happens (counted by reading the keys back with the platform's certificate), while the platform
serves calls as before.  The certificate never reaches an instance's environment.
"""

from __future__ import annotations

import base64
import os
import ssl
import stat
from pathlib import Path

import aetcd
import aetcd.exceptions
import httpx
import pytest

from faas.core.errors import Unavailable
from faas.core.etcd import Etcd, EtcdTls
from faas.core.service import etcd_from_settings
from faas.launcher.etcd_tls import TLS_DIR, ensure_etcd_tls
from tests.conftest import Platform
from tests.helpers import deploy

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("platform", ["process"], indirect=True)]

ENVIRON = """
import os

def handler(event, context):
    return dict(os.environ)
"""

PROBE_KEY = b"/faas-probe/written-without-a-certificate"


async def _refused(etcd: Etcd) -> None:
    try:
        with pytest.raises(Unavailable):
            await etcd.put(PROBE_KEY, b"should not be here")
    finally:
        await etcd.close()


async def test_etcd_refuses_a_client_without_the_platforms_certificate(
    platform: Platform, gw: httpx.AsyncClient, tmp_path: Path
) -> None:
    s = platform.settings
    endpoints = s.etcd_endpoints
    host, port = endpoints[0]

    # Plain gRPC, as any local process would try first.
    async with aetcd.Client(host=host, port=port, timeout=3) as anonymous:
        with pytest.raises(aetcd.exceptions.ClientError):
            await anonymous.put(PROBE_KEY, b"plain")
    # TLS that trusts etcd's CA but presents no certificate.
    assert s.etcd_ca_file is not None
    await _refused(Etcd(host, port, endpoints=endpoints, timeout_s=3.0, tls=EtcdTls(ca_file=s.etcd_ca_file)))
    # TLS with a certificate a CA of its own signed (made here: another folder, another CA).
    other = ensure_etcd_tls(tmp_path)
    forged = EtcdTls(ca_file=s.etcd_ca_file, cert_file=other.client_cert_file, key_file=other.client_key_file)
    await _refused(Etcd(host, port, endpoints=endpoints, timeout_s=3.0, tls=forged))
    # etcd's HTTP JSON gateway: plain HTTP, and HTTPS without a certificate.
    put = {"key": base64.b64encode(PROBE_KEY).decode(), "value": base64.b64encode(b"http").decode()}
    async with httpx.AsyncClient(trust_env=False, timeout=3.0) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.post(f"http://{host}:{port}/v3/kv/put", json=put)
    ca_only = ssl.create_default_context(cafile=str(s.etcd_ca_file))
    async with httpx.AsyncClient(trust_env=False, timeout=3.0, verify=ca_only) as no_cert:
        with pytest.raises(httpx.HTTPError):
            await no_cert.post(f"https://{host}:{port}/v3/kv/put", json=put)

    # None of those writes happened; the platform's own client gets in.
    etcd = etcd_from_settings(s)
    try:
        assert await etcd.get(PROBE_KEY) is None, "a client without the platform's certificate wrote to etcd"
    finally:
        await etcd.close()

    # And the platform works through it: a deploy (etcd writes) and a call.
    await deploy(gw, "etcd-auth-env", ENVIRON)
    resp = await gw.post("/v1/functions/etcd-auth-env/invoke", json={})
    assert resp.status_code == 200, resp.text
    environment = resp.json()
    # The instance's environment carries none of etcd's credentials (nor their paths).
    leaked = {k: v for k, v in environment.items() if k.startswith("FAAS_ETCD") or TLS_DIR in str(v)}
    assert leaked == {}, leaked


async def test_the_etcd_credentials_are_kept_private_in_the_home_folder(platform: Platform) -> None:
    s = platform.settings
    folder = s.home / TLS_DIR
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(p.name for p in folder.iterdir())
    # The CA's key is not kept: nothing under the home can sign another certificate etcd accepts.
    assert files == ["ca.crt", "client.crt", "client.key", "server.crt", "server.key"], files
    for path in folder.iterdir():
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, path
        assert info.st_uid == os.getuid(), path
    assert (s.etcd_ca_file, s.etcd_cert_file, s.etcd_key_file) == (
        folder / "ca.crt", folder / "client.crt", folder / "client.key"
    )  # fmt: skip
    # The state file (which records the settings) names the key's path, never its content.
    key_text = (folder / "client.key").read_text().strip()
    assert key_text not in (s.run_dir / "cluster.json").read_text()
