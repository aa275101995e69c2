"""Uploads that cannot hurt the gateway, against the real platform (process backend only: nothing
here reaches an instance).

Zip bombs are refused from the archive's directory without inflating anything, an archive lying
about its sizes fails its CRC check in a worker thread, an upload larger than the limit is refused
before it is read, and names with a trailing newline are refused.  While a bomb is being refused,
the gateway keeps answering other calls within 100 ms, and nothing is created.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zipfile
from urllib.parse import urlsplit

import httpx
import pytest

from bench.zip_bomb import build_bomb
from faas.core.errors import InvalidRequest, PayloadTooLarge
from faas.core.models import name_problem
from gateway.archive import MAX_COMPRESSION_RATIO, check_archive_layout, verify_archive_members
from tests.conftest import Platform
from tests.helpers import make_zip

# The platform's process backend only: nothing here reaches an instance.
process_only = pytest.mark.parametrize("platform", ["process"], indirect=True)

HANDLER = "def handler(event, context):\n    return 1\n"
CONFIG = json.dumps({"handler": "handler.handler"})


def lying_zip() -> bytes:
    """A member whose headers declare 100 bytes but whose data inflates to 4 MiB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", HANDLER)
        zf.writestr("data.bin", bytes(range(256)) * 16384)
    data = bytearray(buffer.getvalue())
    true_size = struct.pack("<I", 256 * 16384)
    # The uncompressed size sits at offset 22 of a local header and 24 of a central directory entry.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            if data[at + offset : at + offset + 4] == true_size:
                data[at + offset : at + offset + 4] = struct.pack("<I", 100)
            at = data.find(signature, at + 4)
    return bytes(data)


async def put(gw: httpx.AsyncClient, name: str, code: bytes) -> httpx.Response:
    return await gw.put(
        f"/v1/functions/{name}",
        data={"config": CONFIG},
        files={"code": ("code.zip", code, "application/zip")},
    )


async def _health_latencies(gw: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        resp = await gw.get("/healthz")
        assert resp.status_code == 200
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    return latencies


@pytest.mark.integration
@process_only
async def test_a_zip_bomb_is_refused_from_its_directory_and_the_gateway_keeps_answering(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    bomb = await asyncio.to_thread(build_bomb, 1)  # 1 GiB of zeros, about 4.5 MB sent
    async with httpx.AsyncClient(base_url=platform.settings.gateway_url, timeout=10, headers=platform.admin_headers) as other:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_health_latencies(other, stop))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        refused = await put(gw, "bombed", bomb)
        took = time.perf_counter() - started
        await asyncio.sleep(0.05)
        stop.set()
        latencies = await watcher
    assert refused.status_code == 400, refused.text
    assert "likely zip bomb" in refused.json()["error"]["message"]
    assert took < 2.0, f"refusing the bomb took {took:.2f} s"
    assert latencies and max(latencies) < 0.1, f"the gateway stalled: slowest /healthz {max(latencies):.3f} s"
    assert (await gw.get("/v1/functions/bombed")).status_code == 404


@pytest.mark.integration
@process_only
async def test_an_archive_lying_about_its_sizes_fails_its_crc_check(gw: httpx.AsyncClient) -> None:
    refused = await put(gw, "liar", lying_zip())
    assert refused.status_code == 400, refused.text
    assert "corrupt" in refused.json()["error"]["message"]
    assert (await gw.get("/v1/functions/liar")).status_code == 404


@pytest.mark.integration
@process_only
async def test_an_upload_past_the_limit_is_refused_before_it_is_read(
    platform: Platform, gw: httpx.AsyncClient
) -> None:
    url = urlsplit(platform.settings.gateway_url)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    key = platform.admin_headers["Authorization"].encode()
    writer.write(
        b"PUT /v1/functions/huge HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=b\r\n"
        b"authorization: " + key + b"\r\ncontent-length: 1100000000\r\n\r\n" + b"x" * 65536
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    took = time.perf_counter() - started
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert took < 1.0, f"the 413 took {took:.2f} s"
    assert (await gw.get("/healthz")).status_code == 200
    assert (await gw.get("/v1/functions/huge")).status_code == 404


@pytest.mark.integration
@process_only
async def test_names_with_a_trailing_newline_are_refused(gw: httpx.AsyncClient) -> None:
    archive = make_zip({"handler.py": HANDLER})
    bad_function = await put(gw, "newline%0A", archive)
    assert bad_function.status_code == 400, bad_function.text
    assert "invalid function name" in bad_function.json()["error"]["message"]
    bad_namespace = await gw.get("/v1/functions", params={"namespace": "team-a\n"})
    assert bad_namespace.status_code == 400
    assert "invalid namespace" in bad_namespace.json()["error"]["message"]
    listed = (await gw.get("/v1/functions")).json()["functions"]
    assert not any(f["name"].startswith("newline") for f in listed)


# -- the checks themselves, on real archives (pure logic) -------------------------------------------


def test_declared_sizes_and_ratios_are_checked_without_inflating() -> None:
    small = make_zip({"handler.py": HANDLER, "data.txt": "a line of text\n" * 1000})
    check_archive_layout(
        small, handler_module="handler", handler="handler.handler", max_bytes=10**6, max_unpacked=10**6
    )
    verify_archive_members(small)
    with pytest.raises(PayloadTooLarge, match="unpacked bytes"):
        check_archive_layout(
            small, handler_module="handler", handler="handler.handler", max_bytes=10**6, max_unpacked=1000
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", HANDLER)
        zf.writestr("zeros.bin", bytes(8 * 1024 * 1024))  # about 1000x
    with pytest.raises(InvalidRequest, match=f"more than {MAX_COMPRESSION_RATIO}x"):
        check_archive_layout(
            buffer.getvalue(),
            handler_module="handler",
            handler="handler.handler",
            max_bytes=10**8,
            max_unpacked=10**9,
        )
    with pytest.raises(InvalidRequest, match="corrupt"):
        verify_archive_members(lying_zip())


def test_a_name_must_match_whole() -> None:
    assert name_problem("team-a") is None
    assert name_problem("team-a\n") is not None
    assert name_problem("team-a\n", "namespace") is not None

    with zipfile.ZipFile(io.BytesIO(lying_zip())) as zf:
        assert zf.getinfo("data.bin").file_size == 100  # the lie is in the headers, as intended
