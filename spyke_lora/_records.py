"""Run records: what every run leaves next to its LoRA files, written as it goes, to reproduce and compare runs.

In ``output_dir``, for ``output_name`` NAME (next to ``NAME_dataset.toml``, ``NAME_sample_prompts.txt`` and
``NAME.samples.jsonl``, which the run also writes):

* ``NAME.config.toml``: the resolved config; ``TrainConfig.from_toml`` reads it back equal.
* ``NAME.command.sh``: the same run with the sd-scripts command line, runnable as-is.
* ``NAME.environment.json``: Python, platform, package versions, device, mixed precision, the sd-scripts commit.
* ``NAME.events.jsonl``: every event, one JSON object per line, with the time it was delivered.
* ``NAME.loss.png``: the loss chart, written when the run ends (whatever the reason).

A resumed run appends to the events of the run it continues; a fresh run starts them anew.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._config import TrainConfig
from ._errors import ConfigError
from ._files import atomic_path, write_atomically
from ._lock import output_in_use
from ._user_warnings import warn_caller
from .events import Event, StepEnded, TrainEnded, TrainStarted, ValidationEnded

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["RunRecord", "config_diff", "loss_chart", "read_run", "runs"]

_PACKAGES = ("torch", "torchvision", "accelerate", "transformers", "diffusers", "safetensors", "numpy", "spyke-lora")


def record_paths(cfg: TrainConfig) -> dict[str, Path]:
    """The path of each record file of ``cfg``'s run, by kind."""
    base = cfg.output_dir / cfg.output_name
    return {
        "config": base.with_name(f"{cfg.output_name}.config.toml"),
        "command": base.with_name(f"{cfg.output_name}.command.sh"),
        "environment": base.with_name(f"{cfg.output_name}.environment.json"),
        "events": base.with_name(f"{cfg.output_name}.events.jsonl"),
        "loss_chart": base.with_name(f"{cfg.output_name}.loss.png"),
    }


class RunRecorder:
    """The callback ``train()`` puts first: writes the records. A failed write is warned about once, then records
    are off for the run: they must never cost the training itself."""

    def __init__(self, cfg: TrainConfig, command: str, engine: dict[str, str]) -> None:
        self.cfg = cfg
        self.paths = record_paths(cfg)
        self.command = command
        self.engine = engine
        self.enabled = True

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        try:
            if isinstance(event, TrainStarted):
                self._start(event)
            with self.paths["events"].open("a", encoding="utf-8") as f:
                f.write(json.dumps(event_to_json(event)) + "\n")
            if isinstance(event, TrainEnded):
                recorded = read_events(self.paths["events"])
                history = [e for e in recorded if e["event"] == "StepEnded"]
                validations = [e for e in recorded if e["event"] == "ValidationEnded"]
                if history:
                    loss_chart(
                        history,
                        self.paths["loss_chart"],
                        title=self.cfg.output_name,
                        validations=validations,
                        memory_budget_bytes=event.memory_budget_bytes,
                    )
        except OSError as e:
            self.enabled = False
            warn_caller(f"could not write the run records in {self.cfg.output_dir}: {e}; training goes on without them")

    def _start(self, event: TrainStarted) -> None:
        if not event.resumed_from_step:
            self.paths["events"].unlink(missing_ok=True)
        write_atomically(self.paths["config"], self.cfg.to_toml_string())
        write_atomically(
            self.paths["command"],
            f"#!/bin/sh\n# {self.cfg.output_name}: the same run with sd-scripts' command line\n{self.command}\n",
        )
        os.chmod(self.paths["command"], 0o755)
        environment = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": {name: _version(name) for name in _PACKAGES},
            "device": event.device,
            "mixed_precision": event.mixed_precision,
            **self.engine,
        }
        write_atomically(self.paths["environment"], json.dumps(environment, indent=1) + "\n")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def event_to_json(event: Event) -> dict[str, Any]:
    """One line of ``NAME.events.jsonl``: the event's name, the time now, and its fields as JSON values."""
    data = {"event": type(event).__name__, "time": round(time.time(), 3)}
    for key, value in dataclasses.asdict(event).items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN: "nan", "inf"
        data[key] = value
    return data


# The fields `runs` reads of each event, and their JSON types: an event without them (an edited file, a line cut
# short) is skipped like a line that is not JSON. Losses are numbers, or "nan"/"inf" as text (event_to_json).
_NUMBER = (int, float)
_LOSS = (int, float, str)
_READ_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "TrainStarted": {"total_steps": (int,), "device": (str,)},
    "StepEnded": {"step": (int,), "loss": _LOSS, "avg_loss": _LOSS},
    "TrainEnded": {"status": (str,)},
}


def read_events(path: Path, *, warn: bool = False) -> list[dict[str, Any]]:
    """The events of a run. A line that is not a complete event (cut short by a kill, edited) is skipped, and bytes
    that are not UTF-8 are replaced.

    Args:
        path: The run's ``NAME.events.jsonl``.
        warn: Say what was skipped or replaced, in a :class:`~spyke_lora.SpykeLoraWarning` naming the file.

    Returns:
        The events, in their order, as JSON objects.

    Raises:
        OSError: The file cannot be read.
    """
    events, note = _read_events(Path(path))
    if warn and note:
        warn_caller(note)
    return events


def _read_events(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The events that can be read, and what was skipped or replaced (None when nothing was)."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    out, skipped = [], 0
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if _is_event(event):
            out.append(event)
        elif line.strip():
            skipped += 1
    replaced = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if not (skipped or replaced):
        return out, None
    said = [f"{skipped} line(s) that are not a complete event skipped"] if skipped else []
    said += [f"{replaced} byte sequence(s) that are not UTF-8 replaced"] if replaced else []
    return out, f"{path}: {' and '.join(said)} (a run killed mid-write, or an edited file)"


def _is_event(event: Any) -> bool:
    """A JSON object with an event name, a time and the fields of :data:`_READ_FIELDS` of their types."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return False
    fields = {"time": _NUMBER, **_READ_FIELDS.get(event["event"], {})}
    for name, types_ in fields.items():
        value = event.get(name)
        if isinstance(value, bool) or not isinstance(value, types_):
            return False
        if types_ is _LOSS and isinstance(value, str) and not _is_float(value):
            return False
    return True


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- reading runs -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run, from its records."""

    name: str
    folder: Path
    status: str  # "completed", "stopped", "failed", "interrupted"; no end recorded: "running" (lock held), "killed"
    steps: int
    total_steps: int
    final_loss: float | None
    final_avg_loss: float | None
    duration_s: float  # training time, summed over resumed parts
    started_at: float  # unix time of the first TrainStarted
    device: str
    checkpoints: int
    config: Path
    peak_memory_bytes: int | None = None  # the highest of its parts' measured peaks (TrainEnded), None: not recorded
    predicted_peak_bytes: int | None = None  # what plan() predicted for it

    def __str__(self) -> str:
        loss = f"{self.final_avg_loss:.4f}" if self.final_avg_loss is not None else "-"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started_at))
        steps = f"{self.steps}/{self.total_steps}"
        return (
            f"{self.name:<24} {self.status:<11} {steps:>11} {loss:>9} {_duration(self.duration_s):>8}  "
            f"{self.device:<4} {when}  {self.folder}"
        )

    HEADER = f"{'run':<24} {'status':<11} {'steps':>11} {'avg loss':>9} {'time':>8}  {'dev':<4} {'started':<16}  folder"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def read_run(events_path: str | os.PathLike[str], *, warn: bool = False) -> RunRecord:
    """The :class:`RunRecord` of one ``NAME.events.jsonl``.

    Args:
        events_path: The file.
        warn: Warn about the lines skipped and the bytes replaced (:func:`read_events`).

    Returns:
        The run's record, from the events that could be read.

    Raises:
        ConfigError: It has no run's start (``TrainStarted``): it is not a run's record.
        OSError: It cannot be read.
    """
    path = Path(events_path)
    name = path.name[: -len(".events.jsonl")]
    events, note = _read_events(path)
    starts = [e for e in events if e["event"] == "TrainStarted"]
    if not starts:
        raise ConfigError(f"{path} has no TrainStarted event: it is not a spyke-lora run record")
    if warn and note:
        warn_caller(note)
    steps = [e for e in events if e["event"] == "StepEnded"]
    duration, open_start = 0.0, None
    for e in events:
        if e["event"] == "TrainStarted":
            open_start = e["time"]
        elif e["event"] == "TrainEnded" and open_start is not None:
            duration += e["time"] - open_start
            open_start = None
    if open_start is not None:  # no end recorded: count to the last event
        duration += events[-1]["time"] - open_start
    last = events[-1]
    if last["event"] == "TrainEnded":
        status = last["status"]
    else:
        try:  # only a lock really held means a live run: a SIGKILLed run leaves its lock file behind
            status = "running" if output_in_use(path.parent, name) else "killed"
        except OSError:  # its lock file cannot be opened: no live run can be seen
            status = "killed"
    final = steps[-1] if steps else None
    ends = [e for e in events if e["event"] == "TrainEnded"]
    peaks = [e["peak_memory_bytes"] for e in ends if _is_int(e.get("peak_memory_bytes"))]
    return RunRecord(
        name=name,
        folder=path.parent,
        status=status,
        steps=final["step"] if final else (starts[-1].get("resumed_from_step") or 0),
        total_steps=starts[-1]["total_steps"],
        final_loss=_number(final["loss"]) if final else None,
        final_avg_loss=_number(final["avg_loss"]) if final else None,
        duration_s=duration,
        started_at=starts[0]["time"],
        device=starts[-1]["device"],
        checkpoints=sum(1 for e in events if e["event"] == "CheckpointSaved"),
        config=path.with_name(f"{name}.config.toml"),
        peak_memory_bytes=max(peaks) if peaks else None,
        predicted_peak_bytes=next(
            (
                e["predicted_peak_bytes"]
                for e in reversed(ends)
                if _is_int(e.get("predicted_peak_bytes")) and e["predicted_peak_bytes"]
            ),
            None,
        ),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value)  # "nan" / "inf" strings included


def runs(folder: str | os.PathLike[str]) -> list[RunRecord]:
    """The runs recorded in a folder: their config, how they ended, their losses, from each ``NAME.events.jsonl``.

    Args:
        folder: a run's ``output_dir``, or the folder that holds several (one level of subfolders is read).

    Returns:
        A :class:`RunRecord` per run, oldest first. A record that cannot be read is left out, and the lines of one
        that cannot be read are skipped (bytes that are not UTF-8 replaced), each said in a
        :class:`~spyke_lora.SpykeLoraWarning` naming the file.

    Raises:
        ConfigError: ``folder`` is not a folder.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is not a folder; give the output_dir of your runs (or its parent)")
    found = sorted(folder.glob("*.events.jsonl")) + sorted(folder.glob("*/*.events.jsonl"))
    records = []
    for path in found:
        try:
            records.append(read_run(path, warn=True))
        except ConfigError:
            warn_caller(f"{path} has no complete TrainStarted event: it is left out (not a spyke-lora run record)")
        except OSError as e:
            warn_caller(f"{path} cannot be read ({e.strerror or e}): it is left out")
    return sorted(records, key=lambda r: r.started_at)


def config_diff(a: TrainConfig | str | os.PathLike[str], b: TrainConfig | str | os.PathLike[str]) -> list[str]:
    """What changed from one config to another.

    Args:
        a: the first config, or its TOML file (a run's ``NAME.config.toml``).
        b: the second, likewise.

    Returns:
        One line per field that differs, in field order: ``learning_rate: 0.0001 -> 5e-05``; empty when none does.

    Raises:
        ConfigError: a TOML file is not a valid config.
    """
    first, second = (x if isinstance(x, TrainConfig) else TrainConfig.from_toml(x) for x in (a, b))
    before, after = first.to_dict(), second.to_dict()
    return [
        f"{key}: {_show(before.get(key))} -> {_show(after.get(key))}"
        for key in before | after
        if before.get(key) != after.get(key)
    ]


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value) if isinstance(value, (str, list, dict)) else str(value)


# --- the loss chart -----------------------------------------------------------------------------------------------


_DPI = 100  # `size` is in pixels: the figure is size / 100 inches at 100 dots per inch
_GREY, _BLUE, _RED, _ORANGE = "#aaaaaa", "#1f5fbf", "#d62728", "#ff7f0e"
_SAGE = "#7a9e7a"  # the memory line: a muted green, apart from the loss per step's grey and the other colours
_BUDGET = "#4d6b4d"  # the device's memory budget: a darker green, dashed, on the memory axis
_HEADROOM = 1.15  # the memory axis ends 15 % above the higher of the peak and the budget: neither is on the edge


def loss_chart(
    history: Sequence[StepEnded | dict[str, Any]],
    path: str | os.PathLike[str] | IO[bytes],
    *,
    title: str = "",
    size: tuple[int, int] = (800, 400),
    validations: Sequence[ValidationEnded | dict[str, Any]] = (),
    memory_budget_bytes: int | None = None,
) -> Path | None:
    """Draw a run's losses as a PNG line chart.

    The loss per step (grey), its running average (blue), the held-out validation loss of each pass (orange dots), a
    red line at each step whose loss was NaN or infinite, and, when the steps recorded it, the memory in use on the
    training device (a thin muted green line, in GiB, on a second y axis at the right) under the device's memory
    budget (a dashed line: how close the run came to swapping). That axis runs from zero to 15 % above the higher of
    the two, and the legend sits below the plot, so that no line is hidden under it. Drawn with matplotlib's object
    API and Agg canvas: the caller's pyplot and backend are left alone.

    Args:
        history: the steps, as :class:`~spyke_lora.StepEnded` events or their JSON (a run's ``events.jsonl``).
        path: the PNG file to write (atomically), or a binary file object to write into.
        title: the chart's title.
        size: width and height in pixels.
        validations: the validation passes, as :class:`~spyke_lora.ValidationEnded` events or their JSON.
        memory_budget_bytes: the device's memory budget the run was planned against
            (:attr:`~spyke_lora.TrainEnded.memory_budget_bytes`), drawn when the steps recorded their memory.

    Returns:
        The file written; None when ``path`` is a file object.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = _loss_figure(
        history, title=title, size=size, validations=validations, memory_budget_bytes=memory_budget_bytes
    )
    FigureCanvasAgg(figure)  # the figure's canvas: Agg, whatever backend the caller's pyplot uses
    if hasattr(path, "write"):
        figure.savefig(path, format="png", dpi=_DPI)
        return None
    out = Path(path)
    with atomic_path(out, keep_suffix=True) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    return out


def _loss_figure(
    history: Sequence[StepEnded | dict[str, Any]],
    *,
    title: str,
    size: tuple[int, int],
    validations: Sequence[ValidationEnded | dict[str, Any]] = (),
    memory_budget_bytes: int | None = None,
) -> Figure:
    """The chart as a matplotlib figure, not drawn yet (what :func:`loss_chart` saves; the tests look into it)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    points = [
        (h["step"], _number(h["loss"]), _number(h["avg_loss"])) if isinstance(h, dict) else (h.step, h.loss, h.avg_loss)
        for h in history
    ]
    steps = [step for step, _, _ in points]
    width, height = size
    # a hair over the size, so that the canvas' int() of inches x dpi never loses a pixel to floating point
    # (2.01 x 100 is 200.99999999999997)
    figure = Figure(figsize=((width + 1e-3) / _DPI, (height + 1e-3) / _DPI), dpi=_DPI, layout="constrained")
    axes = figure.add_subplot()
    marker = "o" if len(points) == 1 else None  # a single step is a dot, not an invisible line
    for index, colour, width_pt, label in ((1, _GREY, 1.0, "loss per step"), (2, _BLUE, 2.0, "running average")):
        values = [p[index] if math.isfinite(p[index]) else math.nan for p in points]  # a gap at NaN/Inf
        axes.plot(steps, values, color=colour, linewidth=width_pt, marker=marker, markersize=4, label=label)
    held_out = [(v["step"], _number(v["loss"])) if isinstance(v, dict) else (v.step, v.loss) for v in validations]
    if held_out:
        axes.plot(
            [s for s, _ in held_out],
            [v if math.isfinite(v) else math.nan for _, v in held_out],
            color=_ORANGE,
            linewidth=1.5,
            marker="o",
            markersize=5,
            label="held-out loss",
        )
    for n, (step, loss, _) in enumerate(s for s in points if not math.isfinite(s[1])):
        axes.axvline(step, color=_RED, linewidth=1.5, label="non-finite loss" if n == 0 else "_nolegend_")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    if title:
        axes.set_title(title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    memory = [(h.get("memory_bytes") if isinstance(h, dict) else h.memory_bytes) for h in history]  # old records: none
    if any(m is not None for m in memory):
        right = axes.twinx()  # its own y axis at the right, sharing the steps
        _memory_lines(right, steps, memory, memory_budget_bytes, marker)
        axes.set_zorder(right.get_zorder() + 1)  # the loss curves over the memory line
        axes.patch.set_visible(False)  # (the loss axes' white background would hide it)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # one legend for both axes, below the plot (constrained layout makes room): over the plot it would hide the
    # lines that reach the top, as the memory line and the loss of the first steps do
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 3), fontsize="small")
    return figure


def _memory_lines(
    right: Any, steps: list[int], memory: list[int | None], budget: int | None, marker: str | None
) -> None:
    """The memory in use on ``right`` (GiB), the budget dashed above it, from zero to 15 % above the higher."""
    right.plot(
        steps,
        [m / 2**30 if m is not None else math.nan for m in memory],
        color=_SAGE,
        linewidth=0.8,
        marker=marker,
        markersize=3,
        label="memory (GiB)",
    )
    top = max(m for m in memory if m is not None)
    if budget is not None and budget > 0:
        right.axhline(
            budget / 2**30,
            color=_BUDGET,
            linestyle="--",
            linewidth=1.0,
            label=f"memory budget ({budget / 2**30:.1f} GiB)",
        )
        top = max(top, budget)
    right.set_ylabel("memory in use, GiB")
    # from zero: a flat 5.2 GiB is not drawn as a swing; and room above, so the top line is not on the frame
    right.set_ylim(0, top * _HEADROOM / 2**30 if top > 0 else 1.0)
