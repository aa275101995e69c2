"""Web apps under wrk: a small FastAPI and a small Flask app through the platform, against the same
apps run directly under their usual servers (uvicorn, gunicorn), in one run.

Run from the repository root::

    .venv/bin/python bench/apps.py            # about 2 minutes
    .venv/bin/python bench/apps.py --quick    # about 1 minute

What it does: starts a private embedded platform in a temp dir (process backend, the machine's
default isolation, loopback only), deploys the two apps as ``kind: app`` with ``public: true`` (their
packages vendored into the archive from this environment, as ``faas deploy`` would from
``requirements.txt``), and starts the same ``app.py`` directly: FastAPI under ``uvicorn`` (one
process, uvloop and httptools) and Flask under ``gunicorn`` (one process, ``gthread`` with as many
threads as the app's concurrency).  Then, for each app and concurrency, after a warm-up, it runs
``wrk`` on ``GET /hello`` through the platform (``/app/<name>/hello``) and directly, the rounds
interleaved, and prints req/s and the latency percentiles, and platform/direct.

Caveats: wrk, the platform and the direct servers share the machine's cores; the platform's answer
crosses four processes (gateway, trigger, dispatcher, the instance), the direct one one.  Everything
this script starts is stopped in ``finally``, by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
import invoke_latency as il  # noqa: E402
import wrk  # noqa: E402

from faas.launcher.embedded import EmbeddedCluster, settings_for_test  # noqa: E402

FASTAPI_APP = """
from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello():
    return {"hello": "world"}
"""

FLASK_APP = """
from flask import Flask

app = Flask(__name__)


@app.get("/hello")
def hello():
    return {"hello": "world"}
"""

CONCURRENCY = 32  # the apps' concurrency on the platform, and gunicorn's threads


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def distributions(*roots: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``roots`` need, with their dependencies (extras left out)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        dist = found[name] = importlib.metadata.distribution(name)
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def vendored(app_code: str, *roots: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("app.py", textwrap.dedent(app_code))
        for dist in distributions(*roots):
            for file in dist.files or []:
                parts = Path(str(file)).parts
                if parts[0] == ".." or "__pycache__" in parts or parts[0].endswith((".dist-info", ".egg-info")):
                    continue
                zf.write(Path(str(dist.locate_file(file))), str(file))
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise il.BenchError(f"{url} did not answer 200 within {timeout_s:g} s")
            await asyncio.sleep(0.2)


def start_direct(kind: str, folder: Path, port: int) -> subprocess.Popen[bytes]:
    bin_dir = Path(sys.executable).parent
    if kind == "fastapi":
        argv = [str(bin_dir / "uvicorn"), "app:app", "--host", "127.0.0.1", "--port", str(port),
                "--no-access-log", "--log-level", "warning"]  # fmt: skip
    else:
        argv = [str(bin_dir / "gunicorn"), "app:app", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                "--threads", str(CONCURRENCY), "--worker-class", "gthread", "--log-level", "warning"]  # fmt: skip
    for path in argv[:1]:
        if not Path(path).exists():
            raise il.BenchError(f"{path} is missing: pip install uvicorn gunicorn (the dev extras have both)")
    return subprocess.Popen(argv, cwd=folder, stdout=subprocess.DEVNULL, stderr=(folder / "server.log").open("wb"))


async def run(args: argparse.Namespace) -> int:
    quick = args.quick
    duration, rounds, warmup = (3, 2, 2) if quick else (5, 3, 3)
    wrk_path = wrk.find_wrk()
    home = Path(tempfile.mkdtemp(prefix="faas-bench-apps-", dir="/tmp"))
    cluster = EmbeddedCluster(settings_for_test(home, keepalive_s=900.0, pool_size=2), progress=il._progress)
    settings = cluster.settings
    direct: list[subprocess.Popen[bytes]] = []
    code = il.code_version()
    try:
        log(f"starting the platform in {home}")
        await cluster.start()
        gw = httpx.AsyncClient(base_url=settings.gateway_url, timeout=120, trust_env=False, auth=il.AdminKey(home))
        targets: dict[str, tuple[str, str]] = {}
        for kind, app_code, root in (("fastapi", FASTAPI_APP, "fastapi"), ("flask", FLASK_APP, "flask")):
            name = f"bench-{kind}"
            resp = await gw.put(
                f"/v1/functions/{name}",
                data={"config": json.dumps({"kind": "app", "handler": "app:app", "public": True,
                                            "concurrency": CONCURRENCY, "max_instances": 1, "memory_mb": 512})},
                files={"code": ("code.zip", vendored(app_code, root), "application/zip")},
            )  # fmt: skip
            if resp.status_code != 201:
                raise il.BenchError(f"deploying {name} answered {resp.status_code}: {resp.text}")
            folder = home / f"direct-{kind}"
            folder.mkdir()
            (folder / "app.py").write_text(textwrap.dedent(app_code))
            port = free_port()
            direct.append(start_direct(kind, folder, port))
            platform_url = f"{settings.gateway_url}/app/{name}/hello"
            direct_url = f"http://127.0.0.1:{port}/hello"
            await wait_http(platform_url)
            await wait_http(direct_url)
            targets[kind] = (platform_url, direct_url)
        await gw.aclose()
        script = home / "get.lua"
        script.write_text('wrk.method = "GET"\n')
        results: dict[tuple[str, str, int], list[wrk.WrkResult]] = {}
        for connections in (1, 16):
            threads = 1 if connections == 1 else 2
            for kind, (platform_url, direct_url) in targets.items():
                for url in (platform_url, direct_url):
                    await wrk.run(wrk_path, url, script=script, threads=threads, connections=connections, duration_s=warmup)
                for r in range(rounds):
                    order = [("platform", platform_url), ("direct", direct_url)]
                    for side, url in order if r % 2 == 0 else reversed(order):
                        log(f"{kind} {side} c={connections} round {r + 1}/{rounds}")
                        result = await wrk.run(
                            wrk_path, url, script=script, threads=threads, connections=connections, duration_s=duration
                        )
                        if result.errors:
                            raise il.BenchError(f"{kind} {side} c={connections}: {result.errors} errors")
                        results.setdefault((kind, side, connections), []).append(result)
        rollout = await measure_rollout(settings.gateway_url, home, quick)
        burst = await measure_burst(settings.gateway_url, home, quick)
        print("\n".join(report(results, code, wrk.version(wrk_path), duration, rounds)))
        print("\n".join([*rollout, *burst]))
        return 0
    finally:
        for proc in direct:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        log("stopping the platform")
        await cluster.stop()
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)


VERSION_APP = """
def app(environ, start_response):
    import time
    delay = float(environ.get("QUERY_STRING") or 0)
    if delay:
        time.sleep(delay)
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"v%d"]
"""


def plain_archive(code: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", code)
    return buf.getvalue()


async def deploy_version(gw: httpx.AsyncClient, name: str, version: int, **config: object) -> float:
    """Deploy ``VERSION_APP`` answering ``v<version>``; the seconds the deploy took."""
    started = time.monotonic()
    resp = await gw.put(
        f"/v1/functions/{name}",
        data={"config": json.dumps({"kind": "app", "handler": "app:app", "public": True, **config})},
        files={"code": ("code.zip", plain_archive(VERSION_APP % version), "application/zip")},
    )
    if resp.status_code != 201:
        raise il.BenchError(f"deploying {name} v{version} answered {resp.status_code}: {resp.text}")
    return time.monotonic() - started


async def measure_rollout(gateway: str, home: Path, quick: bool) -> list[str]:
    """Failed requests while version 2 of an app replaces version 1 under a steady stream."""
    callers, before_s, after_s = 8, 2.0, 3.0 if quick else 5.0
    async with httpx.AsyncClient(base_url=gateway, timeout=30, trust_env=False, auth=il.AdminKey(home)) as gw:
        await deploy_version(gw, "bench-rollout", 1, concurrency=8)
        await wait_http(f"{gateway}/app/bench-rollout/")
        answers: list[tuple[float, int, str]] = []
        stop = asyncio.Event()

        async def caller() -> None:
            async with httpx.AsyncClient(base_url=gateway, timeout=30, trust_env=False) as client:
                while not stop.is_set():
                    try:
                        resp = await client.get("/app/bench-rollout/")
                        answers.append((time.monotonic(), resp.status_code, resp.text))
                    except httpx.HTTPError as exc:
                        answers.append((time.monotonic(), 0, type(exc).__name__))

        log(f"rollout: {callers} callers back to back; version 2 deployed after {before_s:g} s")
        tasks = [asyncio.create_task(caller()) for _ in range(callers)]
        await asyncio.sleep(before_s)
        deploy_s = await deploy_version(gw, "bench-rollout", 2, concurrency=8)
        await asyncio.sleep(after_s)
        stop.set()
        await asyncio.gather(*tasks)
    failed = [a for a in answers if a[1] != 200]
    texts = [a[2] for a in answers if a[1] == 200]
    switched = texts.index("v2") if "v2" in texts else len(texts)
    back = sum(1 for t in texts[switched:] if t == "v1")
    return [
        "",
        f"rollout: {len(answers)} requests by {callers} callers back to back while v2 replaced v1 "
        f"(its deploy took {deploy_s:.1f} s, the first instance started and ready before latest moved): "
        f"failed {len(failed)}, served by v1 after the first v2 answer {back}.",
    ]


async def measure_burst(gateway: str, home: Path, quick: bool) -> list[str]:
    """From a burst of slow concurrent requests to the instances added for it serving."""
    burst, delay_s = 16, 1.0
    async with httpx.AsyncClient(base_url=gateway, timeout=60, trust_env=False, auth=il.AdminKey(home)) as gw:
        await deploy_version(gw, "bench-burst", 1, concurrency=4, max_instances=4)
        await wait_http(f"{gateway}/app/bench-burst/")
        started = time.monotonic()
        done: list[float] = []

        async def one() -> None:
            resp = await gw.get(f"/app/bench-burst/?{delay_s}")
            if resp.status_code != 200:
                raise il.BenchError(f"a burst request answered {resp.status_code}: {resp.text}")
            done.append(time.monotonic() - started)

        log(f"burst: {burst} concurrent requests of {delay_s:g} s to an app of concurrency 4 and one instance")
        await asyncio.gather(*(one() for _ in range(burst)))
    done.sort()
    return [
        f"burst: {burst} concurrent requests of {delay_s:g} s each on one instance of concurrency 4 "
        f"(max_instances 4): all answered {done[-1]:.2f} s after the burst began (one instance alone: "
        f"{burst // 4 * delay_s:.0f} s); the first answers at {done[0]:.2f} s, the fifth at {done[4]:.2f} s "
        "(the first served by an instance started for the burst).",
    ]


def report(
    results: dict[tuple[str, str, int], list[wrk.WrkResult]], code: str, wrk_version: str, duration: int, rounds: int
) -> list[str]:
    def med(kind: str, side: str, c: int, what: str) -> float:
        runs = results[(kind, side, c)]
        values = [r.ok_rps if what == "rps" else r.percentile_ms(50.0 if what == "p50" else 99.0) for r in runs]
        return statistics.median(values)

    lines = [
        f"machine: nproc={os.cpu_count()}; code: {code}; load generator: {wrk_version}",
        "",
        f"{'app':<8} {'c':>3} {'platform req/s':>15} {'direct req/s':>13} {'ratio':>6}  "
        f"{'platform p50/p99 ms':>20} {'direct p50/p99 ms':>18}",
    ]
    for kind in ("fastapi", "flask"):
        for c in (1, 16):
            p, d = med(kind, "platform", c, "rps"), med(kind, "direct", c, "rps")
            lines.append(
                f"{kind:<8} {c:>3} {p:>15,.0f} {d:>13,.0f} {p / d:>5.2f}x  "
                f"{med(kind, 'platform', c, 'p50'):>9.2f} / {med(kind, 'platform', c, 'p99'):<8.2f} "
                f"{med(kind, 'direct', c, 'p50'):>8.2f} / {med(kind, 'direct', c, 'p99'):<8.2f}"
            )
    lines += [
        "",
        f"GET /hello (a JSON answer of 18 bytes); wrk -t1 -c1 and -t2 -c16, {rounds} rounds of {duration} s per side "
        "after a warm-up, the sides alternating; figures are the medians over the rounds.",
        "platform: /app/<name>/hello on the gateway (public app: no key), gateway -> trigger -> dispatcher -> instance, "
        f"one instance of concurrency {CONCURRENCY}. direct: uvicorn (FastAPI) or gunicorn gthread with "
        f"{CONCURRENCY} threads (Flask), one process, the same app.py.",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter and fewer rounds")
    parser.add_argument("--keep-home", action="store_true", help="keep the platform's temp dir (logs)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except il.BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
