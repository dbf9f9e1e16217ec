"""Ready-made callbacks: pass any number to ``train(cfg, callbacks=[...])``.

Each is a plain callable taking one event (see :mod:`spyke_lora.events`); one that returns
:class:`~spyke_lora.Stop` ends the run after the current step.

* :class:`Progress`: tqdm's progress bar: the ipywidgets bar in Jupyter, the text bar in a terminal, one line per
  event elsewhere (a log file, CI).
* :class:`LiveLossChart`: the loss chart, redrawn in place in Jupyter as the run goes.
* :class:`LossHistory`: the steps, losses and learning rates, as lists.
* :class:`StopAfter`: stop at a step number, or after a time budget.
* :class:`StopOnPlateau`: stop when the running average loss has not improved for a number of steps.

A callback given a wrong setting raises :class:`~spyke_lora.ConfigError` when it is made, before any run.
"""

from __future__ import annotations

import io
import math
import sys
from typing import IO, Any

from ._errors import ConfigError
from .events import CheckpointSaved, Event, SampleSaved, StepEnded, Stop, TrainEnded, TrainStarted, ValidationEnded

__all__ = ["LiveLossChart", "LossHistory", "Progress", "StopAfter", "StopOnPlateau", "describe", "in_notebook"]


def describe(event: Event) -> str:
    """One readable line for an event, as :class:`Progress` and ``spyke-lora train`` print it.

    Args:
        event: any :mod:`~spyke_lora.events` event.

    Returns:
        The line, without a newline.
    """
    if isinstance(event, TrainStarted):
        resumed = f", resuming after step {event.resumed_from_step}" if event.resumed_from_step else ""
        name = f"{event.device_name}, " if event.device_name else ""
        where = f"{event.processes} processes on {event.device}" if event.processes > 1 else event.device
        return (
            f"started: {event.total_steps} steps on {where} ({name}mixed precision {event.mixed_precision}, "
            f"gradient checkpointing {'on' if event.gradient_checkpointing else 'off'}), writing to "
            f"{event.output_dir}{resumed}"
        )
    if isinstance(event, StepEnded):
        te = f"  te lr {event.lr_text_encoder:.2e}" if event.lr_text_encoder is not None else ""
        memory = f"  mem {event.memory_bytes / 2**30:.2f} GiB" if event.memory_bytes is not None else ""
        return (
            f"step {event.step:>{len(str(event.total_steps))}}/{event.total_steps}  epoch {event.epoch}  "
            f"loss {event.loss:.4f}  avg {event.avg_loss:.4f}  lr {event.lr:.2e}{te}  {event.elapsed_s:.1f}s{memory}"
        )
    if isinstance(event, CheckpointSaved):
        return f"{'final' if event.final else 'checkpoint'} (step {event.step}): {event.path}"
    if isinstance(event, ValidationEnded):
        return (
            f"validation (step {event.step}): held-out loss {event.loss:.4f}, {event.divergence:+.4f} from the "
            f"training average"
        )
    if isinstance(event, SampleSaved):
        return f"sample (step {event.step}, CFG {event.cfg_scale:g}): {event.path}"
    if isinstance(event, TrainEnded):
        where = f"; final LoRA {event.final_path}" if event.final_path else ""
        peak = ""
        if event.peak_memory_bytes is not None:
            predicted = f" (predicted {event.predicted_peak_bytes / 2**30:.2f})" if event.predicted_peak_bytes else ""
            peak = f"; peak memory {event.peak_memory_bytes / 2**30:.2f} GiB{predicted}"
        return f"ended: {event.status} after {event.steps} steps{where}{peak}"
    return repr(event)  # pragma: no cover


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel.

    Returns:
        True inside a Jupyter kernel, where rich output can be displayed and updated in place.
    """
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    """tqdm's progress bar (``tqdm.auto``): the steps done, the rate and the ETA, with the step's loss, average
    loss, learning rate and memory in use as its postfix.

    * A terminal (``stream`` is a tty): tqdm's text bar on ``stream``, with a line (:func:`describe`) for the start,
      each checkpoint and sample written above it, and one for the end under the finished bar.
    * Jupyter: tqdm's ipywidgets bar, plus a line for the start, each checkpoint and the end. Without ipywidgets
      (``pip install 'spyke-lora[notebook]'`` installs it), one line per event, as in a log.
    * Elsewhere (a log file, CI): one line per event, no bar.

    Args:
        stream: where the bar and the lines go; None: stdout.
        notebook: force the Jupyter mode (True) or rule it out (False); None: detect it.
    """

    def __init__(self, stream: IO[str] | None = None, *, notebook: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.notebook = in_notebook() if notebook is None else notebook
        terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._tqdm = _tqdm_auto(self.notebook) if self.notebook or terminal else None  # None: lines only
        self._bar: Any = None
        self._held_out: float | None = None  # the last held-out loss, shown in the bar's postfix

    def __call__(self, event: Event) -> None:
        """Show ``event``: the bar moved, or a line."""
        if isinstance(event, ValidationEnded):
            self._held_out = event.loss
        if self._tqdm is None:
            print(describe(event), file=self.stream, flush=True)
        elif isinstance(event, TrainStarted):
            self._close()
            self._say(event)
            self._open(event.total_steps, event.resumed_from_step)
        elif isinstance(event, StepEnded):
            if self._bar is None:  # no TrainStarted seen: the bar starts at this step
                self._open(event.total_steps, event.step - 1)
            self._bar.set_postfix(_postfix(event, self._held_out), refresh=False)
            self._bar.update(event.step - self._bar.n)  # redraws (mininterval 0): the step's numbers, every step
        elif isinstance(event, TrainEnded):
            self._close()
            self._say(event)
        elif not (self.notebook and isinstance(event, SampleSaved)):  # a line per image would flood the cell
            self._say(event)

    def _open(self, total: int, initial: int) -> None:
        self._bar = self._tqdm(
            total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True, mininterval=0, miniters=1
        )

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _say(self, event: Event) -> None:
        if self._bar is None:
            print(describe(event), file=self.stream, flush=True)
        else:
            self._tqdm.write(describe(event), file=self.stream)  # above the bar, which is drawn again below it
            self.stream.flush()


def _tqdm_auto(notebook: bool) -> Any:
    """``tqdm.auto.tqdm``: the ipywidgets bar in Jupyter, the text bar elsewhere. None (lines, no bar) in Jupyter
    without ipywidgets, where tqdm.auto would warn "IProgress not found" and fall back to its text bar, drawn with
    carriage returns, which a cell's saved output keeps. Imported here, not with this module: in Jupyter without
    ipywidgets, importing tqdm.auto is what warns."""
    if notebook:
        from tqdm import notebook as tqdm_notebook

        if tqdm_notebook.IProgress is None:
            return None
    from tqdm.auto import tqdm

    return tqdm


def _postfix(event: StepEnded, held_out: float | None = None) -> dict[str, str]:
    """The numbers shown after the bar: loss, average loss, the last held-out loss, learning rate and memory."""
    postfix = {"loss": f"{event.loss:.4f}", "avg": f"{event.avg_loss:.4f}"}
    if held_out is not None:
        postfix["val"] = f"{held_out:.4f}"
    postfix["lr"] = f"{event.lr:.2e}"
    if event.memory_bytes is not None:
        postfix["mem"] = f"{event.memory_bytes / 2**30:.2f} GiB"
    return postfix


class LossHistory:
    """Collects every step: ``steps``, ``losses``, ``avg_losses``, ``lrs``, ``epochs`` (parallel lists), and every
    validation pass: ``validation_steps``, ``validation_losses``.

    Example::

        history = LossHistory()
        train(cfg, callbacks=[history])
        history.steps[-1], history.avg_losses[-1]
    """

    def __init__(self) -> None:
        self.validation_steps: list[int] = []
        self.validation_losses: list[float] = []
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.avg_losses: list[float] = []
        self.lrs: list[float] = []
        self.epochs: list[int] = []

    def __call__(self, event: Event) -> None:
        """Record ``event`` when it is a step or a validation pass."""
        if isinstance(event, StepEnded):
            self.steps.append(event.step)
            self.losses.append(event.loss)
            self.avg_losses.append(event.avg_loss)
            self.lrs.append(event.lr)
            self.epochs.append(event.epoch)
        elif isinstance(event, ValidationEnded):
            self.validation_steps.append(event.step)
            self.validation_losses.append(event.loss)

    def __len__(self) -> int:
        """The steps recorded."""
        return len(self.steps)


class LiveLossChart:
    """The loss per step, its running average, the held-out loss of each validation pass and the memory in use on
    the training device (GiB, on a second y axis; when the steps report it), redrawn in place in Jupyter every
    ``every`` steps and at the end: the same matplotlib chart as the run's ``NAME.loss.png``, shown as one PNG
    output updated in place (``IPython.display`` with a display id). Outside Jupyter it only collects, and
    :meth:`save` writes the chart to a file.

    Args:
        every: redraw every this many steps (and at the end).
        size: the chart's width and height in pixels.
        notebook: force the Jupyter mode (True) or rule it out (False); None: detect it.

    Raises:
        ConfigError: ``every`` is below 1.
    """

    def __init__(self, every: int = 10, *, size: tuple[int, int] = (800, 400), notebook: bool | None = None) -> None:
        if every < 1:
            raise ConfigError(f"`every` must be at least 1, got {every}; try LiveLossChart(every=10)")
        self.every = every
        self.size = size
        self.notebook = in_notebook() if notebook is None else notebook
        self.history: list[StepEnded] = []
        self.validations: list[ValidationEnded] = []
        self.memory_budget: int | None = None  # the device's budget, drawn dashed once the run's end reports it
        self._handle: Any = None
        self.draws = 0

    def __call__(self, event: Event) -> None:
        """Collect ``event``; redraw every ``every`` steps and at the end."""
        if isinstance(event, StepEnded):
            self.history.append(event)
            if len(self.history) % self.every == 0:
                self._draw()
        elif isinstance(event, ValidationEnded):
            self.validations.append(event)
        elif isinstance(event, TrainEnded) and self.history:
            self.memory_budget = event.memory_budget_bytes
            self._draw()

    def png(self) -> bytes:
        """The chart of the steps so far, as PNG bytes."""
        from ._records import loss_chart

        buffer = io.BytesIO()
        loss_chart(
            self.history, buffer, size=self.size, validations=self.validations, memory_budget_bytes=self.memory_budget
        )
        return buffer.getvalue()

    def save(self, path: str) -> None:
        """Write the chart of the steps so far to ``path`` (a PNG).

        Args:
            path: the file to write.
        """
        from ._records import loss_chart

        loss_chart(
            self.history, path, size=self.size, validations=self.validations, memory_budget_bytes=self.memory_budget
        )

    def _draw(self) -> None:
        self.draws += 1
        if not self.notebook:
            return
        from IPython.display import Image, display

        image = Image(data=self.png(), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


class StopAfter:
    """Stop once the run reaches step ``steps`` (its global step number), or once ``seconds`` have passed since
    ``train()`` was called, whichever comes first. The LoRA of the step reached is saved under the final name.

    Args:
        steps: the global step number to stop at.
        seconds: the time budget, from the call of ``train()``.

    Raises:
        ConfigError: neither ``steps`` nor ``seconds`` is given, or ``steps`` is below 1.

    Example::

        train(cfg, callbacks=[StopAfter(500, seconds=3600)])
    """

    def __init__(self, steps: int | None = None, *, seconds: float | None = None) -> None:
        if steps is None and seconds is None:
            raise ConfigError(
                "give `steps`, `seconds` or both, got neither; try StopAfter(500) or StopAfter(seconds=3600)"
            )
        if steps is not None and steps < 1:
            raise ConfigError(f"`steps` must be at least 1, got {steps}; try StopAfter(500)")
        self.steps, self.seconds = steps, seconds

    def __call__(self, event: Event) -> Stop | None:
        """A :class:`~spyke_lora.Stop` once the step or the time budget is reached, else None."""
        if not isinstance(event, StepEnded):
            return None
        if self.steps is not None and event.step >= self.steps:
            return Stop(f"reached step {event.step} (StopAfter steps={self.steps})")
        if self.seconds is not None and event.elapsed_s >= self.seconds:
            return Stop(f"time budget of {self.seconds:g} s used at step {event.step}")
        return None


class StopOnPlateau:
    """Stop when the running average loss (``StepEnded.avg_loss``, sd-scripts' "avr_loss") has not gone below its
    best value minus ``min_delta`` for ``patience`` steps, after ``warmup`` steps. A plateau of the training loss
    says training has stopped fitting the data; it does not say the LoRA is good: look at the samples.

    Args:
        patience: the steps without improvement that stop the run.
        min_delta: how much lower than the best the average must go to count as an improvement.
        warmup: the steps seen before a stop can happen.

    Raises:
        ConfigError: ``patience`` is below 1.
    """

    def __init__(self, patience: int = 100, *, min_delta: float = 0.0, warmup: int = 0) -> None:
        if patience < 1:
            raise ConfigError(f"`patience` must be at least 1, got {patience}; try StopOnPlateau(patience=100)")
        self.patience, self.min_delta, self.warmup = patience, min_delta, warmup
        self.best = math.inf
        self.best_step = 0
        self._seen = 0

    def __call__(self, event: Event) -> Stop | None:
        """A :class:`~spyke_lora.Stop` once the average loss has not improved for ``patience`` steps, else None."""
        if not isinstance(event, StepEnded) or not math.isfinite(event.avg_loss):
            return None
        self._seen += 1
        if event.avg_loss < self.best - self.min_delta:
            self.best, self.best_step = event.avg_loss, event.step
            return None
        if self._seen > self.warmup and event.step - self.best_step >= self.patience:
            return Stop(
                f"average loss has not improved on {self.best:.4f} (step {self.best_step}) for {self.patience} steps"
            )
        return None
