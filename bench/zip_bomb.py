"""How fast the gateway refuses a 4 GiB zip bomb, and whether it keeps answering meanwhile.

Run from the repository root::

    .venv/bin/python bench/zip_bomb.py             # about 30 s (most of it building the bomb)
    .venv/bin/python bench/zip_bomb.py --gib 1     # a smaller bomb

One run starts a private embedded platform in a temp dir (the launcher ``faas up`` uses), builds a
real zip bomb (``--gib`` GiB of zeros deflated into one member, about 4.5 MB per GiB) and a normal
archive of the same wire size (random bytes, stored), then, ``--rounds`` times each, in the same run:

- PUTs the bomb and times the answer (it must be 400: refused from the archive's directory, nothing
  inflated);
- PUTs the normal archive under a handler it lacks, so the gateway reads, parses and CRC-checks all
  of it and refuses it only at the handler check: the baseline for "reading an upload this large";

while a second client calls ``GET /healthz`` every 10 ms and records its latency (the gateway must
keep answering).  Figures: the bomb's refusal time p50/max, the baseline's, their ratio, and the
slowest ``/healthz`` during each.  Everything this script starts is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import invoke_latency as il  # noqa: E402

from faas.launcher.embedded import EmbeddedCluster, settings_for_test  # noqa: E402

HANDLER = "def handler(event, context):\n    return 1\n"


def build_bomb(gib: int) -> bytes:
    buffer = io.BytesIO()
    zeros = bytes(16 * 1024 * 1024)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("handler.py", HANDLER)
        with zf.open("bomb.bin", "w", force_zip64=True) as member:
            for _ in range(gib * 64):
                member.write(zeros)
    return buffer.getvalue()


def build_plain(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("handler.py", HANDLER)
        zf.writestr("blob.bin", os.urandom(size))
    return buffer.getvalue()


async def put(
    client: httpx.AsyncClient, url: str, name: str, code: bytes, handler: str
) -> tuple[int, float, str]:
    started = time.perf_counter()
    resp = await client.put(
        f"{url}/v1/functions/{name}",
        data={"config": json.dumps({"handler": handler})},
        files={"code": ("code.zip", code, "application/zip")},
    )
    return resp.status_code, time.perf_counter() - started, resp.text[:160]


async def watch_health(url: str, stop: asyncio.Event, out: list[float]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:  # /healthz needs no key
        while not stop.is_set():
            started = time.perf_counter()
            resp = await client.get(f"{url}/healthz")
            out.append(time.perf_counter() - started)
            if resp.status_code != 200:
                raise RuntimeError(f"/healthz answered {resp.status_code}")
            await asyncio.sleep(0.01)


async def measured(
    url: str, client: httpx.AsyncClient, name: str, code: bytes, handler: str
) -> tuple[int, float, float, str]:
    stop = asyncio.Event()
    health: list[float] = []
    watcher = asyncio.create_task(watch_health(url, stop, health))
    await asyncio.sleep(0.05)
    status, took, text = await put(client, url, name, code, handler)
    await asyncio.sleep(0.05)
    stop.set()
    await watcher
    return status, took, max(health), text


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    il.log(f"building a {args.gib} GiB zip bomb")
    bomb = await asyncio.to_thread(build_bomb, args.gib)
    plain = await asyncio.to_thread(build_plain, len(bomb))
    il.log(
        f"bomb: {len(bomb)} bytes on the wire, declares {args.gib} GiB; baseline archive: {len(plain)} bytes"
    )
    home = Path(tempfile.mkdtemp(prefix="faas-bomb-", dir="/tmp"))
    settings = settings_for_test(home)
    cluster = EmbeddedCluster(settings)
    try:
        await cluster.start()
        url = cluster.settings.gateway_url
        bomb_rows, plain_rows = [], []
        async with httpx.AsyncClient(timeout=120, auth=il.AdminKey(home)) as client:
            for _ in range(args.rounds):
                bomb_rows.append(await measured(url, client, "bombed", bomb, "handler.handler"))
                plain_rows.append(await measured(url, client, "plain", plain, "missing.handler"))
            for name in ("bombed", "plain"):
                if (await client.get(f"{url}/v1/functions/{name}")).status_code != 404:
                    raise RuntimeError(f"{name} was created")
        for rows, expected in ((bomb_rows, 400), (plain_rows, 400)):
            for status, _, _, text in rows:
                if status != expected:
                    raise RuntimeError(f"expected {expected}, got {status}: {text}")
        bomb_s = [r[1] for r in bomb_rows]
        plain_s = [r[1] for r in plain_rows]
        print(
            f"zip bomb ({args.gib} GiB declared, {len(bomb)} bytes sent): refused (400) in p50 "
            f"{statistics.median(bomb_s) * 1000:.0f} ms, max {max(bomb_s) * 1000:.0f} ms; "
            f"slowest /healthz meanwhile {max(r[2] for r in bomb_rows) * 1000:.1f} ms"
        )
        print(
            f"baseline (a plain archive of the same size, read and CRC-checked whole): p50 "
            f"{statistics.median(plain_s) * 1000:.0f} ms, max {max(plain_s) * 1000:.0f} ms; "
            f"slowest /healthz meanwhile {max(r[2] for r in plain_rows) * 1000:.1f} ms"
        )
        print(f"bomb / baseline: {statistics.median(bomb_s) / statistics.median(plain_s):.2f}x")
        print(f"message: {bomb_rows[0][3]}")
    finally:
        await cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
