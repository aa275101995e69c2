"""The load generator: sync and async calls at fixed rates, in a process of its own.

    python -m bench.chaos.load --url http://127.0.0.1:PORT --function NAME \\
        --sync-rate 20 --async-rate 20 --duration 30 --out records.jsonl

It is an open loop: call k of a kind is sent at start + k / rate whatever the earlier calls did, each
in a task of its own, so calls that hang (a dead trigger, a stopped scheduler) do not slow the rates
down.  Sync calls are ``POST /v1/functions/{name}/invoke``, async calls
``POST /v1/functions/{name}/invoke-async`` (202 ``{"id": ...}``); each payload is
``{"chaos": <client id>}``, unique per call.

Guarantees:
- loopback only: a URL whose host is not 127.0.0.1, ::1 or localhost is refused;
- bounded: ``ceil(rate x duration)`` calls of each kind at most (rates up to 1000/s, durations up to
  600 s); each call waits at most ``--call-timeout``; at most ``--max-inflight`` calls at once (one
  due while that many are in flight is not sent and is recorded as ``skipped``).  The process exits by
  itself at the latest ``duration + call timeout`` after its first call;
- one JSON line per call (``records.CallRecord``), written when the call ends.  SIGTERM or SIGINT stops
  sending, ends the calls in flight (recorded as ``cancelled``) and exits 0 with the file complete;
- on stdout, one JSON line ``{"event": "started", "at": T}`` when the first call is due (``T`` in
  ``time.time()``), and ``{"event": "done", ...}`` with the counts at the end.

``start_load`` and ``run_load`` run it as a child process from asyncio code (the runner, tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import aiohttp

from bench.chaos.records import CANCELLED, SKIPPED, CallKind, CallRecord, api_headers, payload_of

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MAX_RATE = 1000.0
MAX_DURATION_S = 600.0
MAX_INFLIGHT = 4000
DEFAULT_CALL_TIMEOUT_S = 67.0  # the gateway's deadline for a 30 s function (30 + 30 + 2) + 5 s
STARTED_TIMEOUT_S = 30.0  # how long a parent waits for the child's "started" line
EXIT_MARGIN_S = 15.0  # beyond duration + call timeout, before a parent gives up on the child
ROOT = Path(__file__).resolve().parents[2]  # the repository: ``bench`` is importable from here


class LoadError(Exception):
    """The load generator could not run as asked (bad arguments, the child failed or hung)."""


@dataclass(frozen=True, slots=True)
class LoadPlan:
    url: str
    function: str
    sync_rate: float
    async_rate: float
    duration_s: float
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    max_inflight: int = 0  # 0: enough for every call of ``call_timeout_s`` at the given rates

    def __post_init__(self) -> None:
        host = urlparse(self.url).hostname
        if host not in LOOPBACK_HOSTS:
            raise LoadError(f"{self.url}: the load generator only calls a platform on loopback (127.0.0.1)")
        for rate in (self.sync_rate, self.async_rate):
            if not 0 <= rate <= MAX_RATE:
                raise LoadError(f"rates are 0-{MAX_RATE:g} calls/s, not {rate:g}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise LoadError(f"the duration is 0-{MAX_DURATION_S:g} s, not {self.duration_s:g}")
        if not 0 < self.call_timeout_s <= 900:
            raise LoadError(f"the call timeout is 0-900 s, not {self.call_timeout_s:g}")
        if not 0 <= self.max_inflight <= MAX_INFLIGHT:
            raise LoadError(f"--max-inflight is 0-{MAX_INFLIGHT}, not {self.max_inflight}")

    @property
    def inflight_limit(self) -> int:
        if self.max_inflight:
            return self.max_inflight
        wanted = math.ceil((self.sync_rate + self.async_rate) * self.call_timeout_s) + 10
        return min(wanted, MAX_INFLIGHT)

    def schedule(self) -> list[tuple[float, CallKind, int]]:
        """(seconds after the start, kind, sequence number) of every call, in the order they are due."""
        calls: list[tuple[float, CallKind, int]] = []
        rates: list[tuple[CallKind, float]] = [("sync", self.sync_rate), ("async", self.async_rate)]
        for kind, rate in rates:
            if rate > 0:
                calls += [(k / rate, kind, k) for k in range(math.ceil(rate * self.duration_s))]
        calls.sort(key=lambda c: (c[0], c[1]))
        return calls

    def argv(self, out: Path) -> list[str]:
        return [
            "--url", self.url, "--function", self.function,
            "--sync-rate", repr(self.sync_rate), "--async-rate", repr(self.async_rate),
            "--duration", repr(self.duration_s), "--call-timeout", repr(self.call_timeout_s),
            "--max-inflight", str(self.max_inflight), "--out", str(out),
        ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# In the load process


class _Generator:
    def __init__(self, plan: LoadPlan, session: aiohttp.ClientSession, out: IO[str]) -> None:
        self.plan = plan
        self.session = session
        self.out = out
        self.run_id = uuid.uuid4().hex[:10]
        self.inflight = 0
        self.counts: Counter[str] = Counter()
        base = f"{plan.url.rstrip('/')}/v1/functions/{plan.function}"
        self.urls: dict[CallKind, str] = {"sync": f"{base}/invoke", "async": f"{base}/invoke-async"}

    def write(self, record: CallRecord) -> None:
        self.out.write(record.to_json() + "\n")
        outcome = (
            str(record.status) if record.status is not None else (record.client_error or "?").split(":")[0]
        )
        self.counts[f"{record.kind} {outcome}"] += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        print(json.dumps({"event": "started", "at": time.time()}), flush=True)
        async with asyncio.TaskGroup() as group:
            for offset, kind, seq in self.plan.schedule():
                delay = start + offset - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                client_id = f"{self.run_id}-{kind[0]}{seq}"
                if self.inflight >= self.plan.inflight_limit:
                    now = time.time()
                    self.write(CallRecord(kind, client_id, now, now, None, client_error=f"{SKIPPED}: "
                                          f"{self.inflight} calls in flight"))  # fmt: skip
                    continue
                self.inflight += 1
                group.create_task(self.call(kind, client_id))

    async def call(self, kind: CallKind, client_id: str) -> None:
        payload = payload_of(client_id)
        status: int | None = None
        client_error = error_kind = invocation_id = None
        echoed: bool | None = None
        sent_at = time.time()
        try:
            async with self.session.post(self.urls[kind], json=payload) as resp:
                status = resp.status
                body = await resp.read()
            parsed = _json(body)
            if kind == "sync" and status == 200:
                echoed = parsed == payload
            elif kind == "async" and status == 202 and isinstance(parsed, dict) and parsed.get("id"):
                invocation_id = str(parsed["id"])
            elif status >= 300:
                error = parsed.get("error") if isinstance(parsed, dict) else None
                error_kind = str(error.get("kind")) if isinstance(error, dict) else f"HTTP {status}"
        except TimeoutError:
            status, client_error = None, f"timeout: no answer within {self.plan.call_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            status, client_error = None, f"{type(exc).__name__}: {exc}"[:300]
        except asyncio.CancelledError:
            self.write(CallRecord(kind, client_id, sent_at, time.time(), None, client_error=CANCELLED))
            raise
        finally:
            self.inflight -= 1
        self.write(
            CallRecord(
                kind, client_id, sent_at, time.time(), status, client_error, error_kind, invocation_id, echoed
            )
        )


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


async def generate(plan: LoadPlan, out: IO[str]) -> dict[str, int]:
    """Send the plan's calls and write their records to ``out``; returns the counts by outcome.

    A SIGTERM or SIGINT ends the run early (the calls in flight are recorded as cancelled)."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        me.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    connector = aiohttp.TCPConnector(limit=plan.inflight_limit, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=plan.call_timeout_s)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False, headers=api_headers()
    ) as session:
        gen = _Generator(plan, session, out)
        try:
            await gen.run()
        except asyncio.CancelledError:
            if not stopped:
                raise
            me.uncancel()
    return {**dict(sorted(gen.counts.items())), "stopped": int(stopped)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos.load", description="Sync and async calls at fixed rates (loopback only)."
    )
    parser.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8080")
    parser.add_argument("--function", required=True, help="the function to call")
    parser.add_argument("--sync-rate", type=float, default=20.0, help="sync calls per second (default 20)")
    parser.add_argument("--async-rate", type=float, default=20.0, help="async calls per second (default 20)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending (default 30)")
    parser.add_argument("--call-timeout", type=float, default=DEFAULT_CALL_TIMEOUT_S,
                        help="seconds a call may take: the platform's deadline + a margin "
                             f"(default {DEFAULT_CALL_TIMEOUT_S:g})")  # fmt: skip
    parser.add_argument("--max-inflight", type=int, default=0,
                        help="calls in flight at most (default: rate x call timeout)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="where to write the records (JSON lines)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        plan = LoadPlan(
            url=args.url,
            function=args.function,
            sync_rate=args.sync_rate,
            async_rate=args.async_rate,
            duration_s=args.duration,
            call_timeout_s=args.call_timeout,
            max_inflight=args.max_inflight,
        )
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(args.out, "w", encoding="utf-8", buffering=1) as out:  # line-buffered: whole records on disk
        counts = asyncio.run(generate(plan, out))
    print(json.dumps({"event": "done", **counts}), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# From the parent


class LoadProcess:
    """A running ``python -m bench.chaos.load`` child; ``wait()`` reaps it, ``stop()`` ends it early."""

    def __init__(self, plan: LoadPlan, out: Path, proc: asyncio.subprocess.Process) -> None:
        self.plan = plan
        self.out = out
        self.proc = proc
        self.started_at: float | None = None  # time.time() when its first call was due
        self.done: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_started(self, timeout_s: float = STARTED_TIMEOUT_S) -> float:
        """When the first call was due (``time.time()``); raises LoadError if it does not start."""
        if self.started_at is not None:
            return self.started_at
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while self.started_at is None:
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise LoadError(f"the load generator exited before starting: {await self._stderr()}")
                    event = _json(line)
                    if isinstance(event, dict) and event.get("event") == "started":
                        self.started_at = float(event["at"])
        except TimeoutError:
            raise LoadError(f"the load generator did not start within {timeout_s:g} s") from None
        return self.started_at

    async def wait(self, timeout_s: float | None = None) -> Path:
        """Wait for the child to finish on its own (by default: duration + call timeout + a margin)."""
        await self.wait_started()
        bound = (
            timeout_s
            if timeout_s is not None
            else self.plan.duration_s + self.plan.call_timeout_s + EXIT_MARGIN_S
        )
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(bound):
                async for line in self.proc.stdout:
                    event = _json(line)
                    if isinstance(event, dict) and event.get("event") == "done":
                        self.done = event
                code = await self.proc.wait()
        except TimeoutError:
            await self.stop()
            raise LoadError(
                f"the load generator (pid {self.pid}) did not finish within {bound:g} s"
            ) from None
        if code != 0:
            raise LoadError(f"the load generator exited with code {code}: {await self._stderr()}")
        return self.out

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the child (its records stay complete), SIGKILL it after ``grace_s``; reap it."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            data = await asyncio.wait_for(self.proc.stderr.read(), 5.0)
            return data.decode(errors="replace").strip()[-1000:] or "(no output)"
        return "(no output)"


async def start_load(
    url: str,
    function: str,
    *,
    sync_rate: float,
    async_rate: float,
    duration_s: float,
    out: Path,
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    max_inflight: int = 0,
) -> LoadProcess:
    """Start the load generator as a child process (returns once it is spawned; see ``wait_started``)."""
    plan = LoadPlan(url, function, sync_rate, async_rate, duration_s, call_timeout_s, max_inflight)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.chaos.load", *plan.argv(Path(out)),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    return LoadProcess(plan, Path(out), proc)


async def run_load(
    url: str,
    function: str,
    *,
    sync_rate: float,
    async_rate: float,
    duration_s: float,
    out: Path,
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
) -> Path:
    """Run the load generator as a child process to its end; returns the records file ``out``."""
    load = await start_load(
        url, function, sync_rate=sync_rate, async_rate=async_rate, duration_s=duration_s, out=out,
        call_timeout_s=call_timeout_s,
    )  # fmt: skip
    try:
        return await load.wait()
    finally:
        await load.stop()


if __name__ == "__main__":
    sys.exit(main())
