"""Three stages of `inferd batch` that overlap: read and convert, score, commit (docs/batch.md, "Throughput").

Reading (pyarrow decode, numpy checks, page faults on a memory-mapped .npy), the runtime's run and the commit's
writes and fsyncs each release the GIL for most of their time, so a reader thread and a writer thread around the
scoring loop hide most of the I/O behind the model, and fsync's waits even on one CPU. The queues between the
stages hold one item each: at most a few chunks are alive at once (one being read, one waiting, one being scored,
one waiting to be committed, one being committed), so memory stays bounded by ``--chunk-rows``, not by the input.

Chunks are committed in the order they were read, by one thread, so the journal's "committed chunks" stays a prefix
of the input and resume is unchanged. An error in any stage stops the run with that error; no thread outlives the
``with`` block.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_END = object()
#: how long the reader waits on a full queue before it looks again whether the run was stopped
_OFFER_S = 0.05


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Pipeline(Generic[T]):
    """Iterate it for the source's items (read ahead by a thread); ``put`` each result for ``commit`` (a thread)."""

    def __init__(self, source: Iterator[T], commit: Callable[..., None],
                 idle: Callable[[], None] | None = None) -> None:
        """``idle``: called on the writer thread after a commit when no result waits (a result waiting, or the
        last item being scored, lets commits be grouped, and the end needs none: see WorkFolder.settle)."""
        self._source, self._commit, self._idle = source, commit, idle
        self._read_q: queue.Queue[Any] = queue.Queue(1)
        self._write_q: queue.Queue[Any] = queue.Queue(1)
        self._stop = threading.Event()
        self._ended = False  # the scoring loop has had the source's last item
        self._write_error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name="inferd-batch-reader")
        self._writer = threading.Thread(target=self._write, name="inferd-batch-writer")

    def __enter__(self) -> Pipeline[T]:
        self._writer.start()
        self._reader.start()
        return self

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._read_q.get()
            if item is _END:
                self._ended = True
                return
            if isinstance(item, _Failed):
                raise item.exc
            self._raise_write_error()
            yield item

    def put(self, *result: Any) -> None:
        """Hand one scored chunk to the writer (waits while the writer is a chunk behind)."""
        self._raise_write_error()
        self._write_q.put(result)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # the writer drains to the end: what was scored is still committed, in order; a second Ctrl-C meanwhile
        # must not leave the writer committing behind the caller's clean-up, so every step is finished first
        interrupted: BaseException | None = None
        steps: list[Callable[[], object]] = [self._stop.set, self._empty_read_queue, lambda: self._write_q.put(_END),
                                             self._writer.join, self._reader.join]
        for step in steps:
            while True:
                try:
                    step()
                    break
                except KeyboardInterrupt as exc:
                    interrupted = exc
        if interrupted is not None:
            raise interrupted
        if kind is None:
            self._raise_write_error()

    def _empty_read_queue(self) -> None:
        """A reader blocked on a full queue sees the stop once there is room again."""
        while True:
            try:
                self._read_q.get_nowait()
            except queue.Empty:
                return

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            raise self._write_error

    def _read(self) -> None:
        try:
            for item in self._source:
                if not self._offer(item):
                    return
            self._offer(_END)
        except BaseException as exc:  # handed to the scoring loop, which raises it
            self._offer(_Failed(exc))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._read_q.put(item, timeout=_OFFER_S)
                return True
            except queue.Full:
                continue
        return False

    def _ending(self) -> bool:
        """Whether the item being scored, if any, is the last: the reader's end waits behind it, or came."""
        with self._read_q.mutex:
            return self._ended or (bool(self._read_q.queue) and self._read_q.queue[0] is _END)

    def _write(self) -> None:
        while (result := self._write_q.get()) is not _END:
            if self._write_error is not None:
                continue  # keep draining so the scoring loop never blocks on a dead writer
            try:
                self._commit(*result)
                if self._idle is not None and self._write_q.empty() and not self._ending():
                    self._idle()
            except BaseException as exc:
                self._write_error = exc
