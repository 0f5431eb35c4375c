"""The batch queue alone, with plain numpy arrays: which requests share a batch, in what order, within how many
rows, and how the waiting count follows every way a request leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from daemon.batchqueue import BatchQueue, Job, batch_key


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """Futures need a loop to belong to; nothing here runs it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def job(loop: asyncio.AbstractEventLoop, rows: int, width: int = 4, dtype: type = np.float32) -> Job:
    inputs = {"x": np.zeros((rows, width), dtype)}
    return Job(inputs, rows, batch_key(inputs, rows), loop.create_future())


def test_batch_keys_equal_only_for_the_same_names_per_row_shapes_and_dtypes() -> None:
    def key(**arrays: np.ndarray) -> tuple[object, ...]:
        return batch_key(arrays, len(next(iter(arrays.values()))))

    a = np.zeros((2, 4), np.float32)
    assert key(x=a) == key(x=np.ones((7, 4), np.float32))  # rows do not matter
    assert key(x=a) != key(x=np.zeros((2, 5), np.float32))
    assert key(x=a) != key(x=a.astype(np.float64))
    assert key(x=a) != key(y=a)
    # inputs that disagree on the rows get a key equal to no other, not even their own twin's
    odd = {"a": np.zeros((2, 2), np.float32), "b": np.zeros((1, 2), np.float32)}
    assert batch_key(odd, 2) != batch_key(odd, 2)
    assert batch_key({"s": np.float32(1.0).reshape(())}, 1) != batch_key({"s": np.float32(1.0).reshape(())}, 1)


def test_a_batch_takes_compatible_jobs_oldest_first_within_max_rows_and_keeps_the_others_in_order(
        loop: asyncio.AbstractEventLoop) -> None:
    q = BatchQueue(max_rows=8)
    jobs = [job(loop, 3), job(loop, 2, width=5), job(loop, 4), job(loop, 2), job(loop, 1), job(loop, 1, width=5)]
    for j in jobs:
        q.push(j)
    assert q.depth == 6
    first = q.take()
    assert first is jobs[0] and q.depth == 5
    batch = [first]
    assert q.grow(batch)  # 3 + 4 + 1 = 8 rows: full, due at once
    assert batch == [jobs[0], jobs[2], jobs[4]]  # the 2-row one would overflow 3 + 4 and was skipped
    assert q.depth == 3
    assert q.take() is jobs[1]  # the others kept their order
    rest = [jobs[1]]
    assert not q.grow(rest) and rest == [jobs[1], jobs[5]]  # 3 rows of width 5: short of full
    assert q.take() is jobs[3] and q.take() is None and q.depth == 0


def test_a_batch_at_a_preferred_size_is_due_before_it_is_full(loop: asyncio.AbstractEventLoop) -> None:
    q = BatchQueue(max_rows=32, preferred=(4,))
    q.push(job(loop, 2))
    batch = [job(loop, 1)]
    assert not q.grow(batch) and [j.rows for j in batch] == [1, 2]  # 3 rows: neither preferred nor full
    q.push(job(loop, 1))
    assert q.grow(batch) and [j.rows for j in batch] == [1, 2, 1]  # 4: preferred, due at once
    q.push(job(loop, 2))
    q.push(job(loop, 3))
    other = [job(loop, 1)]
    assert not q.grow(other) and [j.rows for j in other] == [1, 2, 3]  # 6: past the preferred size, not full


def test_the_count_drops_once_whichever_way_a_job_leaves(loop: asyncio.AbstractEventLoop) -> None:
    q = BatchQueue(max_rows=8)
    taken, expired, cancelled, left = (job(loop, 1) for _ in range(4))
    for j in (taken, expired, cancelled, left):
        q.push(j)
    timer = loop.call_later(3600, lambda: None)
    expired.timer = timer
    assert q.take() is taken and q.depth == 3
    assert q.expire(expired) and timer.cancelled() and q.depth == 2
    assert not q.expire(expired) and not q.expire(taken)  # already gone: counted once
    cancelled.future.cancel()
    assert q.forget(cancelled) and not q.forget(cancelled) and q.depth == 1
    assert q.take() is left  # a cancelled job is never handed out
    assert q.depth == 0 and q.clear() == []


def test_a_job_whose_caller_is_gone_is_skipped_and_clear_hands_back_what_waits(loop: asyncio.AbstractEventLoop
                                                                                ) -> None:
    q = BatchQueue(max_rows=8)
    gone, waits, too = job(loop, 1), job(loop, 2), job(loop, 3)
    for j in (gone, waits, too):
        q.push(j)
    gone.future.cancel()  # cancelled, and its caller has not yet taken it out of the count
    batch = [job(loop, 1)]
    q.grow(batch)
    assert batch[1:] == [waits, too]  # the cancelled one is not batched
    q.forget(gone)
    assert q.depth == 0
    q.push(late := job(loop, 1))
    assert q.clear() == [late] and q.depth == 0 and late.done
