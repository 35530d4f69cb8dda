"""Dynamic micro-batching: concurrent requests are gathered for up to `max_wait_ms` or `max_batch` rows,
run as one forward pass on an inference thread (off the event loop), and each caller gets its own rows back.
Requests that arrive while a batch runs are queued and join the next one at once. The extra wait of up to
`max_wait_ms` applies only under load, and only until the batch has as many callers as the last one: a
lone request never waits, and a steady set of clients is served as soon as all of them are in.

A forward pass never holds more than max(max_batch, the rows of one request): a request that would
overflow the batch starts the next one. Batches of at most `inline_rows` rows run on the event loop
itself: for a model whose whole batch takes well under a millisecond (measured at start-up), the hop to
the thread and back costs more than the forward pass.

A pass that fails runs each caller's rows again on their own: one caller's bad rows fail that caller
alone. The queue is bounded (`QueueFull` -> 503) and every caller waits at most `timeout_s` (`TimeoutError`
-> 504); a caller that gives up frees its queue slot at once, even while its batch is still running.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any


class TorchThread(Executor):
    """One daemon thread for a server's torch work: loading, warm-up and every forward pass that does not
    run inline on the event loop (MicroBatcher.inline_rows: batches of a model whose full batch takes
    under a millisecond).

    torch's parallel CPU kernels (OpenMP) slow down when a second thread has used them: each thread gets
    its own team of workers on the same cores. On a 2-core machine a 2048-wide MLP's forward pass takes
    0.70 ms on a thread that alone ran torch and 0.97 ms once the main thread has run torch too
    (benchmarks/torch_threads.py). A daemon thread, so a forward pass that never returns does not hold
    the process at exit."""

    def __init__(self, name: str = "danlu-torch") -> None:
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._work.put(None)
        if wait:
            self._thread.join()


class QueueFull(Exception):
    """More rows are waiting than the queue holds."""


@dataclass
class _Job:
    rows: list
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    """Batches calls to `infer(rows) -> array with one row (or value) per input row`."""

    def __init__(
        self,
        infer: Callable[[list], Any],
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        max_queue_rows: int = 4096,
        timeout_s: float = 30.0,
        on_batch: Callable[[int], None] | None = None,
        inline_rows: int = 0,
        executor: Executor | None = None,
    ) -> None:
        self.infer, self.max_batch, self.max_wait = infer, max_batch, max_wait_ms / 1000
        self.max_queue_rows, self.timeout_s, self.on_batch = max_queue_rows, timeout_s, on_batch
        self.inline_rows = inline_rows
        self.queued_rows = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = executor if executor is not None else TorchThread("danlu-infer")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, rows: list) -> Any:
        """The model's output for `rows`.

        Raises:
            QueueFull: the queue holds max_queue_rows already. asyncio.TimeoutError: no answer in timeout_s.
        """
        count = len(rows)
        if self.queued_rows + count > self.max_queue_rows:
            raise QueueFull
        job = _Job(rows)
        self.queued_rows += count
        try:
            self._queue.put_nowait(job)
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        finally:
            self.queued_rows -= count  # the slot is free when the caller is answered or gives up
            job.future.cancel()  # a no-op when answered; otherwise the worker skips the abandoned rows

    async def _next_job(self, carried: _Job | None) -> _Job:
        return carried if carried is not None else await self._queue.get()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_callers = 0
        carried: _Job | None = None  # taken from the queue but did not fit: it starts the next batch
        while True:
            jobs = [await self._next_job(carried)]
            carried = None
            rows = len(jobs[0].rows)
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                if not self._queue.empty():
                    job = self._queue.get_nowait()
                else:
                    # Wait for company only until the batch has as many callers as the last one: at
                    # light load a lone request goes straight to the model, and a steady set of clients
                    # is served as soon as all of them are in, not after the whole window.
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or len(jobs) >= last_callers:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if rows + len(job.rows) > self.max_batch:
                    carried = job  # a pass never exceeds max(max_batch, one request's rows)
                    break
                jobs.append(job)
                rows += len(job.rows)
            live = [job for job in jobs if not job.future.cancelled()]
            last_callers = len(live)
            if not live:
                continue
            if not await self._answer(live, loop) and len(live) > 1:
                # one caller's rows failed the shared pass: each caller's rows run again on their own, so
                # only the caller whose rows fail gets the error
                for job in live:
                    await self._answer([job], loop)

    async def _answer(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> bool:
        """One forward pass of the jobs' rows, each job answered with its own; False when it failed
        (a lone job is then given the error; the batcher keeps serving)."""
        batch = [row for job in jobs for row in job.rows] if len(jobs) > 1 else jobs[0].rows
        try:
            if len(batch) <= self.inline_rows:
                output = self.infer(batch)
            else:
                output = await loop.run_in_executor(self._executor, self.infer, batch)
        except Exception as exc:
            if len(jobs) == 1 and not jobs[0].future.done():
                jobs[0].future.set_exception(exc)
            return False
        if self.on_batch is not None:
            self.on_batch(len(batch))
        start = 0
        for job in jobs:
            end = start + len(job.rows)
            if not job.future.done():
                job.future.set_result(output[start:end])
            start = end
        return True
