import asyncio
import threading
import time

import numpy as np
import pytest

from danlu.serve.batching import MicroBatcher, QueueFull


def frame(*values):
    return [{"x": v} for v in values]


def refusing_negatives(passes: list | None = None, pause_first: float = 0.0):
    """A model that returns each row's x and raises on a negative one; `passes` records each pass's
    rows, and the first pass sleeps `pause_first` seconds (so later callers queue up meanwhile)."""

    def infer(batch):
        values = np.array([row["x"] for row in batch])
        if passes is not None:
            passes.append(values.tolist())
            if len(passes) == 1:
                time.sleep(pause_first)
        if (values < 0).any():
            raise ValueError("negative")
        return values

    return infer


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_share_one_forward_pass_and_get_their_own_rows():
    calls = []

    def infer(batch):
        calls.append(len(batch))
        return np.array([row["x"] for row in batch]) * 10

    async def main():
        batcher = MicroBatcher(infer, max_batch=64, max_wait_ms=50)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(frame(i, i + 0.5)) for i in range(8)))
        await batcher.stop()
        return results

    results = run(main())
    assert calls == [16]  # eight requests of two rows, one forward pass
    for i, result in enumerate(results):
        assert list(result) == [10 * i, 10 * i + 5]


def test_max_batch_caps_the_rows_per_forward_pass():
    calls = []

    async def main():
        batcher = MicroBatcher(
            lambda b: calls.append(len(b)) or np.zeros(len(b)), max_batch=4, max_wait_ms=50
        )
        await batcher.start()
        await asyncio.gather(*(batcher.submit(frame(i)) for i in range(10)))
        await batcher.stop()

    run(main())
    assert sum(calls) == 10 and max(calls) <= 4


def test_a_large_request_never_rides_with_queued_rows_past_max_batch():
    calls = []

    def infer(batch):
        calls.append(len(batch))
        return np.array([row["x"] for row in batch])

    async def main():
        batcher = MicroBatcher(infer, max_batch=8, max_wait_ms=50, max_queue_rows=10_000)
        await batcher.start()
        sizes = [3, 1024, 5, 2, 7, 1, 9, 4]  # queued together: small, one large, small, one over max_batch
        results = await asyncio.gather(
            *(batcher.submit(frame(*range(100 * i, 100 * i + n))) for i, n in enumerate(sizes))
        )
        await batcher.stop()
        return sizes, results

    sizes, results = run(main())
    assert sum(calls) == sum(sizes)
    for rows in calls:  # a pass holds at most max_batch rows, or exactly one larger request
        assert rows <= 8 or rows in (1024, 9), calls
    assert 1024 in calls and 9 in calls  # the large requests ran alone
    for i, (n, result) in enumerate(zip(sizes, results, strict=True)):
        assert list(result) == list(range(100 * i, 100 * i + n))


def test_a_full_queue_refuses_and_a_stuck_inference_times_out_and_frees_its_slot():
    release = threading.Event()

    def infer(batch):
        release.wait(5)  # stuck until the test lets go
        return np.zeros(len(batch))

    async def main():
        batcher = MicroBatcher(infer, max_batch=1, max_wait_ms=0, max_queue_rows=2, timeout_s=0.3)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(frame(1, 2)))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(frame(3))
        with pytest.raises(asyncio.TimeoutError):
            await first
        assert batcher.queued_rows == 0  # the timed-out request gave its slot back
        release.set()
        await asyncio.sleep(0.05)
        result = await batcher.submit(frame(4))
        await batcher.stop()
        return result

    assert list(run(main())) == [0.0]


def test_a_model_error_reaches_the_callers_and_the_batcher_keeps_serving():
    async def main():
        batcher = MicroBatcher(refusing_negatives(), max_wait_ms=0)
        await batcher.start()
        with pytest.raises(ValueError):
            await batcher.submit(frame(-1))
        result = await batcher.submit(frame(7))
        await batcher.stop()
        return result

    start = time.monotonic()
    assert list(run(main())) == [7]
    assert time.monotonic() - start < 5


def test_one_callers_bad_rows_in_a_shared_pass_fail_that_caller_alone():
    passes = []
    infer = refusing_negatives(passes, pause_first=0.2)  # the others queue up and share the next pass

    async def main():
        batcher = MicroBatcher(infer, max_wait_ms=0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(frame(1)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(frame(x))) for x in (2, -1, 3)]
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        await batcher.stop()
        return results

    results = run(main())
    assert [list(r) for r in (results[0], results[1], results[3])] == [[1], [2], [3]]
    assert isinstance(results[2], ValueError)
    assert [2, -1, 3] in passes  # they did share a pass, which failed, then ran on their own


def test_a_steady_set_of_clients_is_served_once_all_are_in_not_after_the_window():
    calls = []

    def infer(batch):
        calls.append(len(batch))
        return np.zeros(len(batch))

    async def client(batcher, i):
        for _ in range(5):  # each client sends its next request when the last one is answered
            await batcher.submit(frame(i))

    async def main():
        batcher = MicroBatcher(infer, max_batch=64, max_wait_ms=60_000)  # a window no test outlives
        await batcher.start()
        await asyncio.wait_for(asyncio.gather(*(client(batcher, i) for i in range(4))), 30)
        await batcher.stop()

    run(main())
    assert calls == [4] * 5  # every pass waited for all four clients, and no longer


def test_small_batches_run_on_the_event_loop_and_larger_ones_on_the_inference_thread():
    threads = {}

    def infer(batch):
        threads[len(batch)] = threading.current_thread()
        return np.zeros(len(batch))

    async def main():
        batcher = MicroBatcher(infer, max_batch=64, max_wait_ms=0, inline_rows=4)
        await batcher.start()
        await batcher.submit(frame(*range(4)))
        await batcher.submit(frame(*range(5)))
        await batcher.stop()

    run(main())
    assert threads[4] is threading.main_thread()
    assert threads[5] is not threading.main_thread()


def test_only_a_model_whose_full_batch_is_quick_gets_inline_batches(monkeypatch):
    from types import SimpleNamespace

    from danlu.serve import app
    from danlu.serve.app import INLINE_BUDGET_S, inline_rows

    # a clock that moves only by what each prediction costs, so a loaded machine cannot change the answer
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(app, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def predictor(seconds_per_row: float, calls: list):
        def decoded_items(rows):
            calls.append(len(rows))
            clock.now += seconds_per_row * len(rows)

        family = SimpleNamespace(warmup_items=lambda state: ["row"])
        return SimpleNamespace(family=family, state=None, decoded_items=decoded_items)

    calls = []
    assert inline_rows(predictor(INLINE_BUDGET_S / 128, calls), 64, warm_up_s=0.0) == 64  # half the budget
    assert calls == [1, 1, 1, 64, 64, 64]  # one row, then a full batch, best of three each
    calls = []
    # one row within the budget, a full batch of 64 eight times over it
    assert inline_rows(predictor(INLINE_BUDGET_S / 8, calls), 64, warm_up_s=0.0) == 0
    assert calls == [1, 1, 1, 64, 64, 64]
    calls = []
    assert inline_rows(predictor(2 * INLINE_BUDGET_S, calls), 64, warm_up_s=0.0) == 0  # one row over it
    assert calls == [1, 1, 1]  # a full batch is not tried
    calls = []
    assert inline_rows(predictor(0.0, calls), 64, warm_up_s=1.0) == 0  # a slow warm-up: not timed
    assert calls == []


def test_the_torch_thread_runs_everything_on_one_daemon_thread_and_hands_back_errors():
    from danlu.serve.batching import TorchThread

    worker = TorchThread("danlu-test")
    names = {worker.submit(lambda: threading.current_thread().name).result() for _ in range(5)}
    assert names == {"danlu-test"}
    assert worker.submit(lambda: threading.current_thread().daemon).result()
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result()
    assert worker.submit(sum, [1, 2, 3]).result() == 6  # an error does not end the thread
    worker.shutdown(wait=True)
    assert not worker._thread.is_alive()
