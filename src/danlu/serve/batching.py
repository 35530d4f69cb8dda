"""Dynamic micro-batching: concurrent requests are gathered for up to `max_wait_ms` or `max_batch` rows,
run as one forward pass on an inference thread (off the event loop), and each caller gets its own rows back.

The queue is bounded (`QueueFull` -> 503) and every caller waits at most `timeout_s` (`TimeoutError`
-> 504); a caller that gives up frees its queue slot at once, even while its batch is still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


class QueueFull(Exception):
    """More rows are waiting than the queue holds."""


@dataclass
class _Job:
    frame: pd.DataFrame
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    """Batches calls to `infer(frame) -> array with one row (or value) per input row`."""

    def __init__(
        self,
        infer: Callable[[pd.DataFrame], Any],
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        max_queue_rows: int = 4096,
        timeout_s: float = 30.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.infer, self.max_batch, self.max_wait = infer, max_batch, max_wait_ms / 1000
        self.max_queue_rows, self.timeout_s, self.on_batch = max_queue_rows, timeout_s, on_batch
        self.queued_rows = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="danlu-infer")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, frame: pd.DataFrame) -> Any:
        """The model's output for `frame`'s rows.

        Raises:
            QueueFull: the queue holds max_queue_rows already. asyncio.TimeoutError: no answer in timeout_s.
        """
        rows = len(frame)
        if self.queued_rows + rows > self.max_queue_rows:
            raise QueueFull
        job = _Job(frame)
        self.queued_rows += rows
        try:
            self._queue.put_nowait(job)
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        finally:
            self.queued_rows -= rows  # the slot is free when the caller is answered or gives up
            job.future.cancel()  # a no-op when answered; otherwise the worker skips the abandoned rows

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            rows = len(jobs[0].frame)
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                rows += len(job.frame)
            live = [job for job in jobs if not job.future.cancelled()]
            if not live:
                continue
            frame = (
                pd.concat([job.frame for job in live], ignore_index=True) if len(live) > 1 else live[0].frame
            )
            try:
                output = await loop.run_in_executor(self._executor, self.infer, frame)
            except Exception as exc:  # the callers get the error; the batcher keeps serving
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(frame))
            start = 0
            for job in live:
                end = start + len(job.frame)
                if not job.future.done():
                    job.future.set_result(output[start:end])
                start = end
