"""Fault injection: a load generator, a counting step and a runner that kills platform components.

Run from the repository root (``bench/README.md`` explains every column)::

    .venv/bin/python -m bench.chaos --fault trigger --repeat 10 --json /tmp/chaos.json
    .venv/bin/python -m bench.chaos --fault all          # every fault, its default repetitions

Modules: ``load`` (the load generator, a process of its own), ``count`` (drain and count, and
"recovered with no human action"), ``faults`` (what each fault hits and how), ``platform`` (``faas up``
/ ``faas down`` in a temp home), ``runner`` and ``report``.

The API for tests (what a CI test needs to put a platform under load, break it and count)::

    from bench.chaos import run_load, start_load, summarise, check_recovery

    load = await start_load(url, "fn", sync_rate=20, async_rate=20, duration_s=15, out=tmp / "r.jsonl")
    started = await load.wait_started()          # time.time() of the first call
    await asyncio.sleep(5)
    fault_at = time.time(); os.kill(victim_pid, signal.SIGKILL)
    records = await load.wait()                  # the child ends by itself; load.stop() ends it early
    summary = await summarise(records, url, fault_at, drain_timeout_s=60)
    assert summary.async_lost == 0
    assert (await check_recovery(url, "fn", home=home, within_s=60)).recovered

- ``start_load(url, function, *, sync_rate, async_rate, duration_s, out, call_timeout_s=67.0,
  max_inflight=0) -> LoadProcess``: spawns ``python -m bench.chaos.load`` (loopback URLs only).
  ``LoadProcess.wait_started()``, ``.wait() -> Path`` (raises ``LoadError`` if the child fails or
  outlives duration + call timeout + 15 s), ``.stop()``, ``.pid``, ``.done`` (its closing counts).
  Pass ``call_timeout_s`` = the platform's deadline for the function (``cold_start_timeout_s`` +
  the function's ``timeout_s`` + 2 s) plus a margin.
- ``run_load(...) -> Path``: the same, waited to its end (for ``asyncio.create_task`` beside a kill).
- ``summarise(records_path, url, fault_at, *, drain_timeout_s=60.0) -> Summary``: polls every
  acknowledged async id until final; ``Summary`` has ``sync_sent``, ``sync_failed``,
  ``sync_failures`` (by kind), ``recovery_s`` (fault -> first successful sync call sent after it,
  None if none), ``error_window_s``, ``async_acknowledged``, ``async_completed``, ``async_lost``,
  ``async_duplicated``, ``async_dead_lettered``, ``async_dead_lettered_platform``, ``lost_ids`` ...
- ``check_recovery(url, function, *, home, within_s) -> Recovery``: ``faas status --home H -o json``
  ok and then a fresh sync call 200, within ``within_s`` (``recovered``, ``after_s``, ``detail``).
- ``FAULTS`` and ``inject(fault, platform, function)`` for a ``ChaosPlatform`` (the runner's way).

Imports are lazy, so ``python -m bench.chaos.load`` does not import the module it runs twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.chaos.count import Recovery, Summary, check_recovery, summarise
    from bench.chaos.faults import FAULTS, inject
    from bench.chaos.load import LoadError, LoadProcess, run_load, start_load
    from bench.chaos.platform import ChaosPlatform
    from bench.chaos.records import CallRecord, read_records

_EXPORTS = {
    "start_load": "bench.chaos.load",
    "run_load": "bench.chaos.load",
    "LoadProcess": "bench.chaos.load",
    "LoadError": "bench.chaos.load",
    "summarise": "bench.chaos.count",
    "check_recovery": "bench.chaos.count",
    "Summary": "bench.chaos.count",
    "Recovery": "bench.chaos.count",
    "CallRecord": "bench.chaos.records",
    "read_records": "bench.chaos.records",
    "FAULTS": "bench.chaos.faults",
    "inject": "bench.chaos.faults",
    "ChaosPlatform": "bench.chaos.platform",
}

__all__ = [
    "FAULTS",
    "CallRecord",
    "ChaosPlatform",
    "LoadError",
    "LoadProcess",
    "Recovery",
    "Summary",
    "check_recovery",
    "inject",
    "read_records",
    "run_load",
    "start_load",
    "summarise",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bench.chaos' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
