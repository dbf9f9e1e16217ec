"""``spyke-lora calibrate``: measure this machine's device and fit the memory model's constants to it.

Each point trains the tiny world's full-size SD1.5 (nothing is downloaded) for a few steps in a fresh process
(``python -m spyke_lora._calibrate_point``), at a resolution with gradient checkpointing on or off;
:func:`~spyke_lora._memory.fit` turns the points into constants, written to ``memory-DEVICE.json`` in the cache
folder, where ``plan()`` finds them (:func:`~spyke_lora._memory.load_calibrations`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._files import write_atomically
from ._memory import MemoryConstants, calibration_path, fit, read_model_size
from .tiny_world import build_tiny_world

__all__ = ["RESOLUTIONS", "calibrate"]

RESOLUTIONS = (64, 128, 256, 512)


def calibrate(
    device: str,
    work: Path,
    *,
    resolutions: Sequence[int] = RESOLUTIONS,
    steps: int = 3,
    report: Callable[[str], None] = print,
    run: Callable[[list[str]], None] | None = None,
) -> tuple[MemoryConstants, list[dict]]:
    """Measure ``device`` and write the memory model's constants fitted to it where ``plan()`` reads them.

    Args:
        device: "cpu", "cuda" or "mps".
        work: a folder for the tiny worlds, the runs and the points' figures.
        resolutions: each measured with gradient checkpointing on and off, each point a fresh process; the largest,
            checkpointed point also samples its final file (the sampling phase).
        steps: training steps per point.
        report: called with a line of progress at a time.
        run: runs one point's command line (tests inject it); None: a subprocess.

    Returns:
        The fitted constants and the measured points.

    Raises:
        RuntimeError: a point's process failed (its last output is in the message).
    """

    work.mkdir(parents=True, exist_ok=True)
    points = []
    for resolution in resolutions:
        for gc in ("on", "off"):
            out = work / f"point-{resolution}-{gc}.json"
            point = (work, resolution, gc, steps, out)
            cmd = [sys.executable, "-m", "spyke_lora._calibrate_point", *map(str, point), "--device", device]
            if resolution == max(resolutions) and gc == "on":
                cmd.append("--sample")  # one sample of the final file: the sampling phase's figure
            report(f"measuring {resolution} px, gradient checkpointing {gc} ...")
            started = time.perf_counter()
            (run or _run)(cmd)
            points.append(json.loads(out.read_text(encoding="utf-8")))
            figure = points[-1].get("device_peak_bytes", points[-1]["peak_bytes"])
            report(f"  peak {figure / 2**30:.2f} GiB ({time.perf_counter() - started:.0f} s)")
    world = build_tiny_world(work / f"world{resolutions[0]}", resolution=resolutions[0])
    model = read_model_size(world.base_model)
    constants = fit(
        points, model, device, source=f"calibrated on this machine's {device.upper()} ({time.strftime('%Y-%m-%d')})"
    )
    path = write_atomically(
        calibration_path(device), json.dumps({"constants": constants.to_json(), "points": points}, indent=1)
    )
    report(f"wrote {path}")
    return constants, points


def _run(cmd: list[str]) -> None:
    """Run one point's process; a RuntimeError with its last output when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"a calibration run failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
