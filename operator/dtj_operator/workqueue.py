"""A coalescing work queue: at most one pass per job at a time, bursts merged.

The shape of client-go's workqueue, on asyncio: `kick(key)` marks a job
dirty; a job is never in two passes at once, and kicks that arrive while it
waits or runs merge into one more pass. A short settle delay merges a burst
(nine pods turning Running one after another) into one or two passes. A pass
may ask to run again after a delay (a deadline, a TTL, a refused create):
that replaces a polling timer. A bounded number of passes run at once, in
threads, because the official client blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Key = Any  # hashable
RETRY_SECONDS, MAX_RETRY_SECONDS = 10.0, 300.0
# Runs one pass for `key`; returns seconds until it must run again, or None.
Pass = Callable[[Key], Awaitable[float | None]]


class WorkQueue:
    def __init__(self, run: Pass, *, concurrency: int = 8, settle: float = 0.5) -> None:
        self._run = run
        self._settle = settle
        self._slots = asyncio.Semaphore(concurrency)
        self._dirty: set[Key] = set()
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}

    def kick(self, key: Key) -> None:
        """Ask for a pass of `key` soon (merged with any already waiting)."""
        self._dirty.add(key)
        if key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._drain(key))

    def later(self, key: Key, seconds: float) -> None:
        """Ask for a pass of `key` in `seconds` (the earliest request wins)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(seconds, 0.0)
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def forget(self, key: Key) -> None:
        """The job is gone: drop its timer (a running pass finishes on its own)."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def busy(self) -> bool:
        return bool(self._tasks)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.kick(key)

    async def _drain(self, key: Key) -> None:
        try:
            while key in self._dirty:
                await asyncio.sleep(self._settle)
                self._dirty.discard(key)
                async with self._slots:
                    try:
                        again = await self._run(key)
                        self._failures.pop(key, None)
                    except Exception:  # retry with a growing delay, as kopf would
                        n = self._failures[key] = self._failures.get(key, 0) + 1
                        again = min(RETRY_SECONDS * 2 ** (n - 1), MAX_RETRY_SECONDS)
                        log.exception("reconcile of %s failed; retrying in %.0fs", key, again)
                if again is not None:
                    self.later(key, again)
        finally:
            self._tasks.pop(key, None)
