"""``spyke-lora calibrate``: measure this machine's device and fit the memory model's constants to it.

Each point trains the tiny world's full-size SD1.5 (nothing is downloaded) for a few steps in a fresh process
(``_measure``), at a resolution with gradient checkpointing on or off; :func:`fit` turns the points into
:class:`~._model.MemoryConstants`, which are written to ``memory-DEVICE.json`` in the cache folder, where
``plan()`` finds them (:func:`load_calibrations`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ._predict import MemoryConstants, ModelSize, RunShape, _latent_pixels, predict

__all__ = ["calibrate", "calibration_path", "fit", "load_calibrations", "training_residual"]

RESOLUTIONS = (64, 128, 256, 512)


def calibration_path(device: str) -> Path:
    """Where the constants measured on ``device`` are kept: ``$SPYKE_LORA_CACHE/memory-DEVICE.json``."""
    from ..tiny_world import cache_dir

    return cache_dir() / f"memory-{device}.json"


def load_calibrations(devices: Iterable[str] = ("cpu", "cuda", "mps")) -> dict[str, MemoryConstants]:
    """The calibrations this machine has, by device (a file that cannot be read is ignored: the built-in figures
    are used, and the plan says they are estimates)."""
    found = {}
    for device in devices:
        path = calibration_path(device)
        try:
            found[device] = MemoryConstants.from_json(json.loads(path.read_text(encoding="utf-8"))["constants"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _shape(point: Mapping, images: int) -> RunShape:
    return RunShape(
        resolution=point["resolution"], batch_size=point.get("batch_size", 1),
        gradient_checkpointing=point["gradient_checkpointing"], mixed_precision=point.get("mixed_precision", "no"),
        cache_latents=True, images=images, network_dim=32, optimizer="AdamW",
    )  # fmt: skip


def _figures(point: Mapping, resident: bool) -> tuple[int, int]:
    """(loading peak, training peak) of a point as the model predicts them: resident or allocator figures."""
    if resident:
        return point["load_peak_bytes"], point["train_peak_bytes"]
    return point["device_load_peak_bytes"], point["device_peak_bytes"]


def training_residual(point: Mapping, model: ModelSize, constants: MemoryConstants, images: int) -> float:
    """A point's training peak less what the model knows without fitting: runtime, weights, LoRA, latents."""
    known = predict(_shape(point, images), model, constants)
    parts = known.parts
    known_bytes = parts["runtime"] + parts["weights"] + parts["lora_and_optimizer"] + parts["latents"]
    return _figures(point, constants.resident)[1] - known_bytes


def fit(points: Sequence[Mapping], model: ModelSize, device: str, *, images: int = 5, source: str = "") -> MemoryConstants:
    """Constants that make the model reproduce ``points`` (``_measure`` results): the runtime and the loading
    overhead from their medians; the training overhead and the activations (linear and quadratic in the latent's
    pixels, for checkpointing on and off) by least squares over the training peaks."""
    import numpy as np

    resident = device == "cpu"
    runtime = int(statistics.median(p["runtime_bytes"] for p in points)) if resident else 0
    fp32 = 4 * (model.unet + model.text_encoder + model.vae)
    if resident:
        load_extra = [p["load_peak_bytes"] - runtime - model.file_tensor_bytes - fp32 for p in points]
    else:
        load_extra = [p["device_load_peak_bytes"] - 4 * model.vae for p in points]
    base = MemoryConstants(device, resident, runtime, int(statistics.median(load_extra)), 0,
                           {True: (0.0, 0.0), False: (0.0, 0.0)}, 0.0, source, True)  # fmt: skip
    rows, values = [], []
    for p in points:
        pixels = _latent_pixels(p["resolution"]) * p.get("batch_size", 1)
        gc = bool(p["gradient_checkpointing"])
        rows.append([1.0, pixels * gc, pixels**2 * gc, pixels * (not gc), pixels**2 * (not gc)])
        values.append(training_residual(p, model, base, images))
    a, y = np.array(rows, dtype=float), np.array(values, dtype=float)
    solution = np.linalg.lstsq(a, y, rcond=None)[0]
    if (solution[1:] < 0).any():  # a negative term is noise being fitted: a straight line per setting instead
        solution = np.zeros(5)
        solution[[0, 1, 3]] = np.linalg.lstsq(a[:, [0, 1, 3]], y, rcond=None)[0]
    c, on1, on2, off1, off2 = (float(v) for v in solution)
    sampling = _sampling_constant(points, model, dataclasses.replace(
        base, train_overhead_bytes=int(c), activation_bytes={True: (on1, on2), False: (off1, off2)}), images)
    return MemoryConstants(
        device=device,
        resident=resident,
        runtime_bytes=runtime,
        load_overhead_bytes=base.load_overhead_bytes,
        train_overhead_bytes=int(c),
        activation_bytes={True: (on1, on2), False: (off1, off2)},
        sampling_bytes_per_latent_pixel=sampling,
        source=source or f"calibrated on this machine's {device.upper()}",
        calibrated=True,
    )


def _sampling_constant(points: Sequence[Mapping], model: ModelSize, constants: MemoryConstants, images: int) -> float:
    """Bytes per latent pixel and guidance sample of sampling, from the points measured with ``--sample`` (the
    sampling peak less what training holds between steps); the CPU's figure when no point sampled."""
    from ._predict import CPU

    key = "sample_peak_bytes" if constants.resident else "device_sample_peak_bytes"
    per_pixel = []
    for p in points:
        if p.get(key):
            trained = predict(_shape(p, images), model, constants)
            held = trained.phases["training"] - trained.parts["activations"]  # what stays between steps
            per_pixel.append((p[key] - held) / (2 * _latent_pixels(p["resolution"])))
    return float(statistics.median(per_pixel)) if per_pixel else CPU.sampling_bytes_per_latent_pixel


def calibrate(
    device: str,
    work: Path,
    *,
    resolutions: Sequence[int] = RESOLUTIONS,
    steps: int = 3,
    report: Callable[[str], None] = print,
    run: Callable[[list[str]], None] | None = None,
) -> tuple[MemoryConstants, list[dict]]:
    """Measure ``device`` at ``resolutions`` with gradient checkpointing on and off (each point a fresh process),
    fit the constants, and write them where ``plan()`` reads them. Returns the constants and the points."""
    from ..tiny_world import build_tiny_world

    work.mkdir(parents=True, exist_ok=True)
    points = []
    for resolution in resolutions:
        for gc in ("on", "off"):
            out = work / f"point-{resolution}-{gc}.json"
            cmd = [sys.executable, "-m", "spyke_lora._memory._measure", str(work), str(resolution), gc, str(steps),
                   str(out), "--device", device]  # fmt: skip
            if resolution == max(resolutions) and gc == "on":
                cmd.append("--sample")  # one sample of the final file: the sampling phase's figure
            report(f"measuring {resolution} px, gradient checkpointing {gc} ...")
            started = time.perf_counter()
            (run or _run)(cmd)
            points.append(json.loads(out.read_text(encoding="utf-8")))
            figure = points[-1].get("device_peak_bytes", points[-1]["peak_bytes"])
            report(f"  peak {figure / 2**30:.2f} GiB ({time.perf_counter() - started:.0f} s)")
    world = build_tiny_world(work / f"world{resolutions[0]}", resolution=resolutions[0])
    from ._predict import read_model_size

    model = read_model_size(world.base_model)
    constants = fit(points, model, device, source=f"calibrated on this machine's {device.upper()} ({time.strftime('%Y-%m-%d')})")
    path = calibration_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"constants": constants.to_json(), "points": points}, indent=1), encoding="utf-8")
    report(f"wrote {path}")
    return constants, points


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"a calibration run failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
