"""Running wrk, the compiled HTTP load generator, and reading its report.

wrk (Debian's package ``wrk``, 4.x) runs a closed loop: each of ``-c`` connections sends a request,
waits for its answer, sends the next, for ``-d`` seconds, on ``-t`` threads.  With ``--latency`` it
prints the latency distribution (50/75/90/99%), which ``parse_report`` reads.  Its figures are as
precise as its text: two decimals in the unit it picked (10 us at most, for latencies under 10 ms).

Caveats: wrk's ``Requests/sec`` counts every answer, errors included, so ``WrkResult.ok_rps`` (2xx and
3xx only) is what the benchmark reports; latencies are of every answer; requests cut by the timeout
are counted as ``timeout`` socket errors and are in no latency.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "apt-get install -y wrk"
TIMEOUT_S = 10  # wrk's per-request timeout; a call longer than this counts as a socket error

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([0-9.]+)(us|ms|s|m|h)"
_PERCENTILE = re.compile(r"^\s*([0-9.]+)%\s+" + _TIME + r"\s*$")
_TOTAL = re.compile(r"^\s*(\d+) requests in " + _TIME + r",")
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$")
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)\s*$")
_SOCKET_ERRORS = re.compile(r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$")


class WrkError(Exception):
    """wrk is missing, failed, or printed something this module cannot read."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int  # answers received, errors included
    duration_s: float
    rps: float  # wrk's own Requests/sec: every answer
    percentiles_ms: Mapping[float, float]  # 50.0 -> p50 in ms, from --latency
    non_2xx: int = 0
    socket_errors: Mapping[str, int] = field(default_factory=dict)  # connect, read, write, timeout

    @property
    def ok_requests(self) -> int:
        return self.requests - self.non_2xx

    @property
    def ok_rps(self) -> float:
        return self.ok_requests / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def percentile_ms(self, q: float) -> float:
        return self.percentiles_ms.get(q, math.nan)

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50.0)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99.0)


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_report(text: str) -> WrkResult:
    """The figures of one wrk run from what it printed on stdout (run with ``--latency``)."""
    percentiles: dict[float, float] = {}
    requests: int | None = None
    duration_s = math.nan
    rps: float | None = None
    non_2xx = 0
    socket_errors: dict[str, int] = {}
    in_distribution = False
    for line in text.splitlines():
        if line.strip() == "Latency Distribution":
            in_distribution = True
            continue
        if in_distribution:
            match = _PERCENTILE.match(line)
            if match:
                percentiles[float(match[1])] = _ms(match[2], match[3])
                continue
            in_distribution = False
        if match := _TOTAL.match(line):
            requests = int(match[1])
            duration_s = _ms(match[2], match[3]) / 1000
        elif match := _RPS.match(line):
            rps = float(match[1])
        elif match := _NON_2XX.match(line):
            non_2xx = int(match[1])
        elif match := _SOCKET_ERRORS.match(line):
            socket_errors = dict(
                zip(("connect", "read", "write", "timeout"), map(int, match.groups()), strict=True)
            )
    if requests is None or rps is None:
        raise WrkError(f"no request count or Requests/sec in wrk's output:\n{text}")
    if not percentiles and requests:
        raise WrkError(f"no latency distribution in wrk's output (run it with --latency):\n{text}")
    return WrkResult(requests, duration_s, rps, percentiles, non_2xx, socket_errors)


def find_wrk() -> str:
    """The path of wrk, or ``WrkError`` saying how to install it."""
    found = shutil.which("wrk") or next(
        (p for p in ("/usr/bin/wrk", "/usr/local/bin/wrk") if Path(p).exists()), None
    )
    if found is None:
        raise WrkError(f"wrk not found on PATH; install it (Debian/Ubuntu, as root): {INSTALL_HINT}")
    return found


def version(wrk: str) -> str:
    """wrk's version line (``wrk -v`` prints it, with the usage, and exits 1)."""
    try:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"wrk (version unknown: {exc})"
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "wrk"


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def post_script(body: str, headers: Mapping[str, str]) -> str:
    """A wrk Lua script sending every request as ``POST`` with ``body`` and ``headers``."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}" for name, value in headers.items()]
    return "\n".join(lines) + "\n"


async def run(
    wrk: str, url: str, *, script: Path, threads: int, connections: int, duration_s: float
) -> WrkResult:
    """One bounded wrk run (``-d duration_s``; killed if it has not ended 30 s after that)."""
    if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise WrkError(f"refusing to load anything off loopback: {url}")
    argv = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
        f"--timeout={TIMEOUT_S}s", "--latency", "-s", str(script), url,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), duration_s + 30)
    except BaseException:
        if proc.returncode is None:
            proc.kill()  # the wrk this call started
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    return parse_report(out.decode(errors="replace"))
