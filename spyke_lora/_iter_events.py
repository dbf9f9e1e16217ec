"""``iter_events(cfg)``: a run as an iterator of events, for code that prefers a loop to callbacks."""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ._config import TrainConfig
from ._launch import Launch, resolve_launch
from ._train import TrainResult, run_training
from .events import Event

__all__ = ["EventStream", "iter_events"]

_DONE = object()
_LET_GO = "the loop over iter_events() ended"


class _Channel:
    """What the run's thread and the loop share. The thread holds only this (never the stream), so a stream the
    loop lets go of is freed at once, and freeing it stops the run."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self.turn = threading.Semaphore(0)  # released when the loop asks for the next event (or lets go)
        self.closed = threading.Event()
        self.result: TrainResult | None = None
        self.error: BaseException | None = None

    def work(self, cfg: TrainConfig, resume: str | os.PathLike[str] | None, launch: Launch | None = None) -> None:
        try:
            self.result = run_training(
                cfg, self.deliver, resume=resume, engine_log="auto", let_go=self.let_go_reason, launch=launch
            )
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread, which raises it
            self.error = e
        finally:
            self.queue.put(_DONE)

    def deliver(self, event: Event) -> None:
        """Hand ``event`` to the loop and wait for its turn. The stop after a let-go comes through
        :meth:`let_go_reason`, which the run polls (before its first event too), not through an answer here."""
        if not self.closed.is_set():
            self.queue.put(event)
            self.turn.acquire()  # until the loop has handled it, or let go

    def let_go(self) -> None:
        """The loop wants no more events: the run stops at its next safe point (before loading anything, when it
        has not got that far)."""
        self.closed.set()
        self.turn.release()  # a worker waiting for its turn goes on, and stops

    def let_go_reason(self) -> str | None:
        """The run's ``let_go``: a stop reason once the loop has let go, else None."""
        return _LET_GO if self.closed.is_set() else None

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error


def _end(channel: _Channel, thread: threading.Thread) -> None:
    """Stop the run and wait for it to end (its LoRA saved, its locks freed). Not from the run's own thread (a
    garbage collection there), which cannot wait for itself: it is asked to stop, and ends on its own."""
    channel.let_go()
    if threading.current_thread() is not thread:
        thread.join()


def _generate(channel: _Channel, thread: threading.Thread) -> Iterator[Event]:
    """The loop's side: yield each event, then let the run go on to the next; raise the run's error at the end."""
    try:
        while (item := channel.queue.get()) is not _DONE:
            yield item
            channel.turn.release()
    finally:  # the end of the run, or the loop left: break, an exception, Ctrl-C, close(), the stream freed
        _end(channel, thread)
    channel.raise_error()


class EventStream:
    """The events of one run, in order. The run goes on in a worker thread, one event at a time: it waits for the
    loop to ask for the next event, so leaving the loop after ``StepEnded(step=3)`` ends the run exactly as a
    callback returning :class:`Stop` there would (that step's LoRA saved under the final name). Every way of letting
    go of the stream ends the run and waits for it to end: leaving the loop (``break``, an exception, Ctrl-C),
    :meth:`close`, a ``with`` block, or dropping the last reference, even before the first event (the run then
    stops before loading the model). ``result`` is the :class:`TrainResult` once the run has ended; an error the
    run raised (a refused config, ``NonFiniteLoss``, ...) is raised by the loop, or by :meth:`close`."""

    def __init__(
        self, cfg: TrainConfig, resume: str | os.PathLike[str] | None = None, launch: Launch | None = None
    ) -> None:
        self._channel = _Channel()
        self._thread = threading.Thread(
            target=self._channel.work, args=(cfg, resume, launch), name="spyke-lora-run", daemon=True
        )
        self._thread.start()
        self._events = _generate(self._channel, self._thread)
        # the stream dropped without being iterated or closed: its generator never ran, so this ends the run
        self._finalizer = weakref.finalize(self, _end, self._channel, self._thread)

    @property
    def result(self) -> TrainResult | None:
        """The run's :class:`TrainResult`; None until it has ended (or when it raised)."""
        return self._channel.result

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop the run after its current step (if it is still going; before loading anything if it has not got
        that far) and wait for it to end."""
        self._events.close()  # a started loop: its own ending
        _end(self._channel, self._thread)  # one that never started
        self._channel.raise_error()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # the block's own exception wins
            self._events.close()
            _end(self._channel, self._thread)


def iter_events(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    processes: int | None = None,
    launch: Launch | None = None,
) -> EventStream:
    """Train ``cfg`` and yield its events as they happen.

    The same events, in the same order, as ``train(cfg, callbacks=...)`` delivers; the run waits for the loop, one
    event at a time, so leaving the loop stops it after that step (see :class:`EventStream`).

    Usage::

        for event in iter_events(cfg):
            print(event)
            if isinstance(event, StepEnded) and event.loss > 1:
                break  # the run stops after this step, its LoRA saved

    Args:
        cfg: What to train.
        resume: As for :func:`~spyke_lora.train`: ``"latest"`` or a state folder.
        processes: As for :func:`~spyke_lora.train`: a multi-process run.
        launch: As for :func:`~spyke_lora.train`.

    Returns:
        The stream of events; its ``result`` is the :class:`~spyke_lora.TrainResult` once the run has ended.

    Raises:
        ConfigError: From the loop, when the run is refused (as every error the run raises).
    """
    return EventStream(cfg, resume, resolve_launch(processes, launch))
