"""Group commit: concurrent writers share one transaction, and so one fsync.

A caller hands its item over (``GroupCommit.submit``) and waits.  One writer task
(``GroupCommit.run_forever``, run by the owner under its task set) takes every item handed over so
far, up to ``max_batch``, commits them with one call of ``commit``, and only then answers each caller
of the batch.  There is no linger: while one commit is in flight the next batch accumulates, so a
lone item under light load is committed at once and batches grow with the load by themselves.

Guarantees:
- ``submit`` returns only after the commit holding its item has returned, with that item's result;
- a commit that raises fails every caller of its batch with that error; what a failed commit leaves
  visible is ``commit``'s contract (``InvocationQueue``'s batch writes are all or none);
- at most one commit is in flight, and items are committed in the order they were submitted;
- a caller cancelled before its batch was taken is left out of it; one cancelled later does not take
  its item back (it may be committed all the same);
- once the writer has stopped (cancelled when its owner shuts down), every caller still waiting, and
  every later ``submit``, gets ``Unavailable``.

Caveat: the owner must run ``run_forever``; nothing else commits what ``submit`` hands over.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, NoReturn, TypeVar

from faas.core.errors import FaasError, Unavailable

log = logging.getLogger("faas.group_commit")

T = TypeVar("T")
R = TypeVar("R")

Commit = Callable[[Sequence[T]], Awaitable[Sequence[R]]]
"""Writes a batch in one transaction; returns one result per item, in order, or raises for all."""


class GroupCommit(Generic[T, R]):
    def __init__(self, commit: Commit[T, R], *, max_batch: int, name: str) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.name = name
        self.max_batch = max_batch
        self._commit = commit
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self.commits = 0  # transactions sent so far (the batches' mean size is items / commits)
        self.items = 0

    async def submit(self, item: T) -> R:
        """Commit ``item`` with whatever else is waiting; its result once the commit has returned."""
        if self._closed:
            raise Unavailable(f"{self.name}: the writer has stopped")
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, waiter))
        self._wake.set()
        return await waiter

    async def run_forever(self) -> NoReturn:
        """The writer: one commit at a time, each of everything that waits (up to ``max_batch``)."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while True:
                while not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                batch = self._take()
                if batch:
                    await self._commit_batch(batch)
                batch = []
        finally:
            self._closed = True
            stopped = Unavailable(f"{self.name}: the writer stopped before the write was confirmed")
            for _, waiter in [*batch, *self._waiting]:
                if not waiter.done():
                    waiter.set_exception(stopped)
            self._waiting.clear()

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        while self._waiting and len(batch) < self.max_batch:
            item, waiter = self._waiting.popleft()
            if not waiter.done():  # done: its caller was cancelled and waits no more
                batch.append((item, waiter))
        return batch

    async def _commit_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.commits += 1
        self.items += len(batch)
        error: BaseException
        try:
            results = await self._commit([item for item, _ in batch])
        except FaasError as exc:
            error = exc
        except Exception as exc:  # a bug: answer the callers, keep the writer alive
            log.exception("%s: a commit of %d items failed unexpectedly", self.name, len(batch))
            error = FaasError(f"{self.name}: the write failed: {type(exc).__name__}: {exc}")
        else:
            if len(results) == len(batch):
                for (_, waiter), result in zip(batch, results, strict=True):
                    if not waiter.done():
                        waiter.set_result(result)
                return
            error = FaasError(f"{self.name}: {len(results)} results for {len(batch)} items")
            log.error("%s", error)
        for _, waiter in batch:
            if not waiter.done():
                waiter.set_exception(error)
