"""The embedded launcher against the real etcd, Valkey and SeaweedFS binaries (nothing mocked).

Skips on a machine without the binaries, but fails in CI (``CI=true``), where they must be installed.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import aetcd
import aetcd.exceptions
import boto3
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from botocore.config import Config
from botocore.exceptions import ClientError

from faas.core.errors import Conflict, Unavailable
from faas.core.service import etcd_from_settings
from faas.core.settings import Settings
from faas.launcher.embedded import (
    EmbeddedCluster,
    etcd_binary,
    pid_alive,
    read_state,
    settings_for_test,
    valkey_binary,
    weed_binary,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _require_binaries() -> None:
    try:
        etcd_binary()
        valkey_binary()
        weed_binary()
    except Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"a backing server binary is missing in CI: {exc.message}")
        pytest.skip(exc.message)


def _listening_addresses(pid: int) -> set[str]:
    """The local addresses (hex ip:port from /proc/net/tcp*) of the TCP sockets ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1])
    return found


def _assert_listening_on_loopback_only(pids: list[int]) -> None:
    if not os.path.exists("/proc/net/tcp"):
        return  # not Linux: nothing to read the sockets from
    for pid in pids:
        addresses = _listening_addresses(pid)
        assert addresses, f"pid {pid} listens on nothing"
        # 127.0.0.1 is 0100007F in /proc/net/tcp; an IPv6 or 0.0.0.0 listener fails here.
        assert all(a.startswith("0100007F:") for a in addresses), addresses


async def test_start_backing_serves_etcd_valkey_and_s3_then_stops_every_process(tmp_path: Path) -> None:
    _require_binaries()
    cluster = EmbeddedCluster(settings_for_test(tmp_path / "home"))
    await cluster.start_backing()
    settings = cluster.settings  # with the credentials the launcher made
    pids: list[int] = []
    try:
        state = read_state(settings)
        assert state is not None
        assert [c["name"] for c in state["components"]] == ["etcd", "valkey", "seaweedfs"]
        pids = [c["pid"] for c in state["components"]]
        assert all(pid_alive(pid) for pid in pids)
        assert cluster.is_running()

        _assert_listening_on_loopback_only(pids)

        # etcd takes the platform's client certificate, and refuses a client without one.
        etcd = etcd_from_settings(settings)
        try:
            await etcd.put(b"/test/launcher", b"hello")
            got = await etcd.get(b"/test/launcher")
            assert got is not None and got.value == b"hello"
            host, port = settings.etcd_host_port
            async with aetcd.Client(host=host, port=port, timeout=5) as anonymous:
                with pytest.raises(aetcd.exceptions.ClientError):
                    await anonymous.put(b"/test/launcher", b"anonymous")
            got = await etcd.get(b"/test/launcher")
            assert got is not None and got.value == b"hello"
        finally:
            await etcd.close()

        valkey = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            assert await valkey.config_get("appendonly") == {"appendonly": "yes"}
            assert await valkey.config_get("appendfsync") == {"appendfsync": "always"}
        finally:
            await valkey.aclose()
        # Every server needs its credential: Valkey its password, S3 the generated key (not the default).
        password = urlparse(settings.redis_url).password
        assert password and password not in " ".join(_cmdline(pid) for pid in pids_of(state))
        anonymous = aioredis.Redis.from_url(f"redis://127.0.0.1:{settings.redis_port}/0")
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await anonymous.ping()
        finally:
            await anonymous.aclose()
        assert settings.s3_secret_key != Settings.model_fields["s3_secret_key"].default
        default_key = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint, aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=str(Settings.model_fields["s3_secret_key"].default), region_name=settings.s3_region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )  # fmt: skip
        with pytest.raises(ClientError):
            default_key.list_objects_v2(Bucket=settings.s3_bucket)

        s3 = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key,
            region_name=settings.s3_region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
        s3.put_object(Bucket=settings.s3_bucket, Key="archives/x.zip", Body=b"code bytes")
        body = s3.get_object(Bucket=settings.s3_bucket, Key="archives/x.zip")["Body"].read()
        assert body == b"code bytes"
        url = s3.generate_presigned_url(
            "get_object", Params={"Bucket": settings.s3_bucket, "Key": "archives/x.zip"}, ExpiresIn=60
        )
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(url, timeout=10) as resp:
            assert resp.read() == b"code bytes"

        # A second launcher on the same home refuses, naming the running pids.
        with pytest.raises(Conflict, match="already running .*faas down"):
            await EmbeddedCluster(settings).start_backing()
    finally:
        outcomes = await cluster.stop()

    assert {o.name for o in outcomes} == {"etcd", "valkey", "seaweedfs"}
    assert not any(pid_alive(pid) for pid in pids)
    assert not cluster.is_running()
    assert read_state(settings) is None


def pids_of(state: dict[str, object]) -> list[int]:
    return [int(c["pid"]) for c in state["components"]]  # type: ignore[index, union-attr, call-overload]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")
