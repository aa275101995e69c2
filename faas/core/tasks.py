"""Guarded background tasks.

``spawn`` is the only way services start a task they do not await on the spot: it keeps a strong
reference (so the task cannot be garbage-collected mid-flight), logs an unexpected exception or exit,
and lets the owner cancel everything it started with ``cancel_all``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("faas.tasks")


class TaskSet:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str, long_lived: bool = False) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.owner}:{name}")
        self._tasks.add(task)

        def _done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.error("%s: task %s failed", self.owner, t.get_name(), exc_info=exc)
            elif long_lived:
                log.error("%s: long-lived task %s exited unexpectedly", self.owner, t.get_name())

        task.add_done_callback(_done)
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def __len__(self) -> int:
        return len(self._tasks)
