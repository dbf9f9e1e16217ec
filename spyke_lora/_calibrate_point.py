"""One memory measurement point of ``spyke-lora calibrate``, run in a fresh process so no earlier run's peak is
counted.

    python -m spyke_lora._calibrate_point WORK RESOLUTION GC STEPS OUT.json [--device DEV] [--batch N]

trains the tiny world's full-size SD1.5 (:mod:`spyke_lora.tiny_world`) at ``RESOLUTION`` px with gradient
checkpointing ``on``/``off`` for ``STEPS`` steps and writes what the memory did, by phase:

* ``runtime_bytes``: resident memory with torch and the engine's libraries imported, before anything is loaded;
* ``load_peak_bytes``: the highest resident memory before the first step (the base model read and converted, the
  latents cached), and ``loaded_bytes``, resident memory when training starts;
* ``train_peak_bytes``: the highest resident memory from then to the end; ``peak_bytes``: the highest of the run,
  from the kernel's high-water mark on Linux (``VmHWM``, exact; the run resets it as it starts), else the polls;
* on CUDA and MPS, the allocator's figures (``device_load_peak_bytes``, ``device_loaded_bytes``,
  ``device_train_peak_bytes``, the training phase's, and ``device_peak_bytes``, the run's): torch's peak counter
  on CUDA, a 10 ms poll of ``torch.mps.current_allocated_memory()`` on MPS (torch keeps no peak there);
* ``step_s``: the seconds between consecutive steps;
* with ``--sample``, ``sample_peak_bytes`` (and on CUDA and MPS ``device_sample_peak_bytes``): the highest memory
  while the final file is sampled (one prompt, two sampler steps), the training peak being taken when that file is
  saved. The run's ``device_peak_bytes`` is then the larger of the two phases; the fit reads each phase's own.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from . import events
from ._config import TrainConfig
from ._files import write_atomically
from ._train import train
from .tiny_world import TinyWorld, build_tiny_world

__all__ = ["main", "measure"]


class _Poller:
    """The highest resident memory (and MPS allocation) since the last :meth:`mark`, polled every 10 ms."""

    def __init__(self, device: str) -> None:
        import psutil

        self._process = psutil.Process()
        self._mps = None
        if device == "mps":
            import torch

            self._mps = torch.mps.current_allocated_memory
        self.peak = self.device_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="spyke-lora-memory-poll")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()

    def sample(self) -> None:
        """Take one reading now."""
        self.peak = max(self.peak, self._process.memory_info().rss)
        if self._mps is not None:
            self.device_peak = max(self.device_peak, int(self._mps()))

    def mark(self) -> tuple[int, int]:
        """The peaks so far, then start again from now."""
        self.sample()
        peaks = (self.peak, self.device_peak)
        self.peak = self._process.memory_info().rss
        self.device_peak = int(self._mps()) if self._mps is not None else 0
        return peaks

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join()


def _high_water_mark() -> int | None:
    """VmHWM of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Phases:
    """The run's callback: marks the peak of each phase (loading, training, sampling) as the events come."""

    def __init__(self, poller: _Poller, figures: dict, device: str, sample: bool, torch: Any) -> None:
        self.poller, self.figures, self.device, self.sample, self.torch = poller, figures, device, sample, torch
        self.step_times: list[float] = []

    def __call__(self, event: events.Event) -> None:
        import psutil

        figures, torch = self.figures, self.torch
        if isinstance(event, events.TrainStarted):
            figures["load_peak_bytes"], device_peak = self.poller.mark()
            figures["loaded_bytes"] = psutil.Process().memory_info().rss
            if self.device == "cuda":
                figures["device_load_peak_bytes"] = torch.cuda.max_memory_allocated()
                figures["device_loaded_bytes"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            elif self.device == "mps":
                figures["device_load_peak_bytes"] = device_peak
                figures["device_loaded_bytes"] = int(torch.mps.current_allocated_memory())
        elif isinstance(event, events.StepEnded):
            self.step_times.append(time.perf_counter())
        elif isinstance(event, events.CheckpointSaved) and event.final and self.sample:
            figures["train_peak_bytes"], figures["device_train_peak_bytes"] = self.poller.mark()
            if self.device == "cuda":
                figures["device_train_peak_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

    def finish(self) -> dict:
        """The figures once the run has ended: the last phase's peak, the whole run's, the seconds per step."""
        figures, device = self.figures, self.device
        last, device_peak = self.poller.mark()
        if device == "cuda":
            device_peak = self.torch.cuda.max_memory_allocated()
        if self.sample:  # the training peak was taken at the final file; what came after is sampling's
            figures["sample_peak_bytes"], figures["device_sample_peak_bytes"] = last, device_peak
            if device != "cpu":  # the fit reads the training phase's own peak, not the run's (sampling's, often)
                figures["device_peak_bytes"] = max(figures["device_train_peak_bytes"], device_peak)
        else:
            figures["train_peak_bytes"] = last
            if device != "cpu":
                figures["device_peak_bytes"] = figures["device_train_peak_bytes"] = device_peak
        # the highest of the phases' polled peaks and, on Linux, the kernel's own high-water mark (VmHWM, which the
        # run's PeakMeter reset when training began, so it covers loading and training exactly). Not getrusage's
        # ru_maxrss: it survives exec, so a process started by a big one (a test run) reports its parent's size
        phases = [figures[k] for k in ("load_peak_bytes", "train_peak_bytes", "sample_peak_bytes") if figures.get(k)]
        figures["peak_bytes"] = max(phases + [_high_water_mark() or 0])
        figures["step_s"] = [b - a for a, b in zip(self.step_times, self.step_times[1:])]
        return figures


def _point_config(
    world: TinyWorld, out: Path, steps: int, gradient_checkpointing: bool, device: str, batch_size: int, sample: bool
) -> TrainConfig:
    """The tiny world's config for one point; ``sample``: one sample of the final file (2 steps, one CFG scale)."""
    cfg = world.config(
        output_dir=out,
        max_train_steps=steps,
        save_every_n_steps=None,
        gradient_checkpointing=gradient_checkpointing,
        device=device,
        train_batch_size=batch_size,
    )
    if sample:  # the sampling phase's peak
        cfg = cfg.replace(sample_prompts=("spyke_plasma_v1, a test",), sample_cfg_scales=(7.0,), sample_steps=2)
    return cfg


def measure(
    work: Path,
    resolution: int,
    gradient_checkpointing: bool,
    steps: int,
    *,
    device: str = "cpu",
    batch_size: int = 1,
    sample: bool = False,
) -> dict:
    """Train the tiny world once and measure what the memory did, by phase.

    Args:
        work: the folder of the tiny world and the run's output.
        resolution: the images' size in px.
        gradient_checkpointing: on or off.
        steps: training steps.
        device: "cpu", "cuda" or "mps".
        batch_size: the training batch size.
        sample: sample the final file once (the sampling phase's figure).

    Returns:
        The figures described in the module's docstring, as a JSON object.
    """
    import psutil

    world = build_tiny_world(work / f"world{resolution}", resolution=resolution)
    import accelerate  # noqa: F401  (the libraries the engine imports, so runtime_bytes counts them)
    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401

    runtime = psutil.Process().memory_info().rss
    out = work / f"out-{resolution}-{'on' if gradient_checkpointing else 'off'}-{time.time_ns()}"
    cfg = _point_config(world, out, steps, gradient_checkpointing, device, batch_size, sample)
    poller = _Poller(device)
    figures: dict = {
        "resolution": resolution,
        "gradient_checkpointing": gradient_checkpointing,
        "steps": steps,
        "batch_size": batch_size,
        "device": device,
        "runtime_bytes": runtime,
    }
    phases = _Phases(poller, figures, device, sample, torch)
    try:
        train(cfg, phases, engine_log=None)
    finally:
        poller.close()
    return phases.finish()


def main(argv: list[str] | None = None) -> None:
    """``python -m spyke_lora._calibrate_point``: measure one point and write its figures to ``OUT.json``."""
    parser = argparse.ArgumentParser(prog="python -m spyke_lora._calibrate_point")
    parser.add_argument("work", type=Path)
    parser.add_argument("resolution", type=int)
    parser.add_argument("gradient_checkpointing", choices=("on", "off"))
    parser.add_argument("steps", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sample", action="store_true", help="sample the final file once (the sampling phase)")
    args = parser.parse_args(argv)
    gc = args.gradient_checkpointing == "on"
    figures = measure(
        args.work, args.resolution, gc, args.steps, device=args.device, batch_size=args.batch, sample=args.sample
    )
    write_atomically(args.out, json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
