"""The supervisor of the embedded platform: ``faas up`` starts it and returns once the platform is ready.

``python -m faas.launcher.supervisor --home H`` (settings from ``FAAS_*``) runs detached, in its own
session, with its output in ``<home>/logs/supervisor.log``.

Guarantees:
- it starts the whole platform (``EmbeddedCluster.start``: either a ready platform or nothing) and
  reports each step and the outcome in ``<home>/run/supervisor.json``, which ``faas up`` follows;
- from then on it keeps every component running: one that exits or is killed is started again with
  the same command line, environment, data and ports, after the delay ``RestartPolicy`` gives (0.1 s
  at first, doubling while it keeps failing; crash loops are reported and retried every 30 s); the
  state file (``<home>/run/cluster.json``) always names the live pids, the restart counts and the
  last exits, for ``faas status`` and ``faas down``;
- SIGTERM or SIGINT stops everything it runs, restarted components included, newest first, then the
  function hosts a killed node agent may have left, and exits (``faas down`` sends SIGTERM).

Caveat: nothing restarts the supervisor itself.  If it is killed, the components go on running
unsupervised; ``faas status`` says so, and ``faas down`` still stops them from the state file.  A
real deployment gives the same job to systemd or to compose restart policies (README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from faas.core.errors import FaasError
from faas.core.procs import pid_alive, proc_stat
from faas.core.settings import Settings
from faas.launcher.embedded import EmbeddedCluster


def status_path(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.json"


def read_status(settings: Settings) -> dict[str, Any] | None:
    """The supervisor's report (``phase``: starting, ready, failed, stopping), or None."""
    try:
        data = json.loads(status_path(settings).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def supervisor_alive(status: dict[str, Any] | None) -> bool:
    return bool(status) and pid_alive(int(status.get("pid", 0)), status.get("start_ticks"))  # type: ignore[union-attr]


class StatusFile:
    """``<home>/run/supervisor.json``, rewritten atomically on every change."""

    def __init__(self, settings: Settings) -> None:
        self.path = status_path(settings)
        stat = proc_stat(os.getpid())
        self.data: dict[str, Any] = {
            "pid": os.getpid(),
            "start_ticks": stat[1] if stat else None,
            "phase": "starting",
            "steps": [],
            "error": None,
            "url": settings.gateway_url,
            "since": time.time(),
        }

    def write(self, **changes: Any) -> None:
        self.data.update(changes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)

    def progress(self, label: str, seconds: float | None) -> None:
        self.data["steps"].append([label, seconds])
        self.write()


async def supervise(settings: Settings) -> int:
    status = StatusFile(settings)
    status.write()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    cluster = EmbeddedCluster(settings, progress=status.progress)
    starting = asyncio.create_task(cluster.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()  # EmbeddedCluster.start stops what it started when cancelled
        await asyncio.gather(starting, return_exceptions=True)
        status.write(phase="failed", error="stopped while starting")
        return 1
    stopping.cancel()
    try:
        starting.result()
    except FaasError as exc:
        status.write(phase="failed", error=exc.message)
        print(f"supervisor: the platform did not start: {exc.message}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        status.write(phase="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    status.write(phase="ready")
    print(f"supervisor: platform ready at {settings.gateway_url}; keeping it running", file=sys.stderr, flush=True)
    try:
        await cluster.supervise(stop)
    finally:
        status.write(phase="stopping")
        await cluster.stop()
        status.path.unlink(missing_ok=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="faas-supervisor")
    parser.add_argument("--home", type=Path, default=None, help="the platform's data folder")
    args = parser.parse_args()
    settings = Settings(**({"home": args.home} if args.home is not None else {}))
    sys.exit(asyncio.run(supervise(settings)))


if __name__ == "__main__":
    main()
