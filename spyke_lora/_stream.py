"""``iter_events(cfg)``: a run as an iterator of events, for code that prefers a loop to callbacks."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ._config import TrainConfig
from ._train import TrainResult, train
from .events import Event, Stop

__all__ = ["EventStream", "iter_events"]

_DONE = object()


class _Channel:
    """What the run's thread and the loop share. The thread holds only this (never the stream), so a stream the
    loop lets go of is freed at once, and freeing it stops the run."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self.turn = threading.Semaphore(0)  # released when the loop asks for the next event (or leaves)
        self.closed = threading.Event()
        self.result: TrainResult | None = None
        self.error: BaseException | None = None

    def work(self, cfg: TrainConfig, resume: str | os.PathLike[str] | None) -> None:
        try:
            self.result = train(cfg, callbacks=self.deliver, resume=resume)
        except BaseException as e:  # handed to the loop's thread
            self.error = e
        finally:
            self.queue.put(_DONE)

    def deliver(self, event: Event) -> Stop | None:
        if not self.closed.is_set():
            self.queue.put(event)
            self.turn.acquire()  # until the loop has handled it
        return Stop("the loop over iter_events() ended") if self.closed.is_set() else None

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error


def _generate(channel: _Channel, thread: threading.Thread) -> Iterator[Event]:
    try:
        while (item := channel.queue.get()) is not _DONE:
            yield item
            channel.turn.release()
    finally:  # the end of the run, or the loop left: break, an exception, Ctrl-C, close(), the stream freed
        channel.closed.set()
        channel.turn.release()  # a worker waiting for its turn goes on, and stops after its step
        thread.join()
    channel.raise_error()


class EventStream:
    """The events of one run, in order. The run goes on in a worker thread, one event at a time: it waits for the
    loop to ask for the next event, so leaving the loop after ``StepEnded(step=3)`` ends the run exactly as a
    callback returning :class:`Stop` there would (that step's LoRA saved under the final name). Leaving the loop
    (``break``, an exception, Ctrl-C), :meth:`close`, or letting go of the stream stops the run and waits for it to
    end. ``result`` is the :class:`TrainResult` once the run has ended; an error the run raised (a refused config,
    ``NonFiniteLoss``, ...) is raised by the loop, or by :meth:`close`."""

    def __init__(self, cfg: TrainConfig, resume: str | os.PathLike[str] | None = None) -> None:
        self._channel = _Channel()
        thread = threading.Thread(target=self._channel.work, args=(cfg, resume), name="spyke-lora-run", daemon=True)
        thread.start()
        self._events = _generate(self._channel, thread)

    @property
    def result(self) -> TrainResult | None:
        return self._channel.result

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop the run after its current step (if it is still going) and wait for it to end."""
        self._events.close()
        self._channel.raise_error()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._events.close()  # the block's own exception wins


def iter_events(cfg: TrainConfig, *, resume: str | os.PathLike[str] | None = None) -> EventStream:
    """Train ``cfg`` and yield its events as they happen::

        for event in iter_events(cfg):
            print(event)
            if isinstance(event, StepEnded) and event.loss > 1:
                break  # the run stops after this step, its LoRA saved

    The same events, in the same order, as ``train(cfg, callbacks=...)`` delivers; see :class:`EventStream`."""
    return EventStream(cfg, resume)
