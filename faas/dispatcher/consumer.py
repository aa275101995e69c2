"""The async side of a dispatcher: consumes the invocation queue with the shared consumer group.

Guarantees:
- an event is acknowledged only together with its recorded outcome (``InvocationQueue``), and that
  bookkeeping is shielded from cancellation, so a dispatcher stopping mid-way leaves the event pending
  for another dispatcher rather than lost;
- a failed attempt is retried after ``async_retry_base_s * 2**(attempt-1)`` seconds with +-50% jitter,
  up to the version's ``max_retries``; an event older than its ``max_event_age_s``, or out of retries,
  goes to the dead-letter stream with its last error;
- events a dead dispatcher held are reclaimed after ``async_visibility_s``;
- at most ``_MAX_IN_FLIGHT`` events run at once per dispatcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, NoReturn

from faas.core.errors import FaasError, NotFound
from faas.core.queue import AsyncEnvelope, InvocationQueue
from faas.core.settings import Settings
from faas.core.tasks import TaskSet
from faas.dispatcher.service import Dispatcher

log = logging.getLogger("faas.consumer")

_MAX_IN_FLIGHT = 64
_READ_BLOCK_MS = 1000


class AsyncConsumer:
    def __init__(self, *, settings: Settings, queue: InvocationQueue, dispatcher: Dispatcher, consumer_id: str) -> None:
        self.settings = settings
        self.queue = queue
        self.dispatcher = dispatcher
        self.consumer_id = consumer_id
        self.slots = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self.tasks = TaskSet(f"consumer:{consumer_id}")

    async def close(self) -> None:
        await self.tasks.cancel_all()

    async def run_forever(self) -> NoReturn:
        while True:
            try:
                await self.queue.ensure_group()
                break
            except FaasError as exc:
                log.warning("cannot prepare the queue: %s", exc)
                await asyncio.sleep(1.0)
        while True:
            try:
                await self.queue.move_due()
                batch = await self.queue.reclaim(
                    self.consumer_id, min_idle_s=self.settings.async_visibility_s, count=16
                )
                if not batch:
                    batch = await self.queue.read(self.consumer_id, count=16, block_ms=_READ_BLOCK_MS)
                for msg_id, env in batch:
                    await self.slots.acquire()
                    self.tasks.spawn(self._handle(msg_id, env), name=f"event:{msg_id}")
            except FaasError as exc:
                log.warning("queue consumer: %s", exc)
                await asyncio.sleep(1.0)

    async def _handle(self, msg_id: str, env: AsyncEnvelope | None) -> None:
        try:
            if env is None:
                await asyncio.shield(self.queue.drop_unreadable(msg_id))
                return
            await self._run(msg_id, env)
        except FaasError as exc:  # Redis down while recording: the event stays pending, reclaimed later
            log.warning("event %s: %s", msg_id, exc)
        finally:
            self.slots.release()

    async def _run(self, msg_id: str, env: AsyncEnvelope) -> None:
        try:
            spec = await self.dispatcher.catalog.version(env.namespace, env.function, env.version)
        except NotFound as exc:
            await asyncio.shield(self.queue.dead_letter(msg_id, env, exc.to_body()["error"]))
            return
        age = time.time() - env.enqueued_at
        if age > spec.max_event_age_s:
            too_old = {"kind": "event_too_old", "type": "MaxEventAgeExceeded",
                       "message": f"event is {age:.0f} s old; the function's max_event_age_s is {spec.max_event_age_s:g}"}  # fmt: skip
            await asyncio.shield(self.queue.dead_letter(msg_id, env, too_old))
            return
        await self.queue.mark_running(env)
        deadline = time.time() + self.settings.cold_start_timeout_s + spec.timeout_s + 2.0
        error: dict[str, Any]
        try:
            result = await self.dispatcher.invoke(
                env.namespace, env.function, env.version, env.payload.encode(), request_id=env.id, deadline=deadline
            )
        except FaasError as exc:
            error = exc.to_body()["error"]
        else:
            if result.status == 200:
                await asyncio.shield(self.queue.succeed(msg_id, env, result.body.decode()))
                return
            error = json.loads(result.body).get("error", {"kind": "error", "message": result.body.decode()[:500]})
        if env.attempt <= spec.max_retries and age < spec.max_event_age_s:
            delay = self.settings.async_retry_base_s * 2 ** (env.attempt - 1) * random.uniform(0.5, 1.5)
            await asyncio.shield(self.queue.retry_later(msg_id, env, error, delay))
        else:
            await asyncio.shield(self.queue.dead_letter(msg_id, env, error))
