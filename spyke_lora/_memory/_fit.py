"""Fitting the memory model's constants to measured points, and the calibration files that keep them.

``spyke-lora calibrate`` (``spyke_lora._calibrate``) measures the points, each in a fresh process
(``spyke_lora._calibrate_point``); :func:`fit` turns them into :class:`~._predict.MemoryConstants`, kept in
``memory-DEVICE.json`` in the cache folder (:func:`calibration_path`), where ``plan()`` finds them
(:func:`load_calibrations`). Pure maths and file reading: nothing here trains.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .._files import cache_dir
from ._predict import CPU, MemoryConstants, ModelSize, RunShape, latent_pixels, predict

__all__ = ["calibration_path", "fit", "load_calibrations", "point_shape", "training_points", "training_residual"]


def calibration_path(device: str) -> Path:
    """Where the constants measured on ``device`` are kept: ``$SPYKE_LORA_CACHE/memory-DEVICE.json``."""
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


def point_shape(point: Mapping, images: int) -> RunShape:
    """The :class:`RunShape` a measured point trained (``images`` images, the tiny world's network)."""
    return RunShape(
        resolution=point["resolution"],
        batch_size=point.get("batch_size", 1),
        gradient_checkpointing=point["gradient_checkpointing"],
        mixed_precision=point.get("mixed_precision", "no"),
        cache_latents=True,
        images=images,
        network_dim=32,
        optimizer="AdamW",
    )


def _peaks(point: Mapping, resident: bool) -> tuple[int, int]:
    """(loading peak, training peak) of a point as the model predicts them: resident or allocator figures.

    On CUDA and MPS the training phase's own peak is ``device_train_peak_bytes``; ``device_peak_bytes`` is the whole
    run's, which for a point that also sampled is the larger of training and sampling (see :func:`training_points`).
    """
    if resident:
        return point["load_peak_bytes"], point["train_peak_bytes"]
    return point["device_load_peak_bytes"], point.get("device_train_peak_bytes", point["device_peak_bytes"])


def training_points(points: Sequence[Mapping], resident: bool) -> list[Mapping]:
    """The points whose training peak is known: on CUDA and MPS, a point that sampled and was measured before the
    training phase's own peak was kept (``device_train_peak_bytes``, an older calibration file) only knows the
    larger of training and sampling, which is not a training figure, so it is left out of the training fit (its
    sampling figure is still used) -- unless it is the only kind there is."""
    if resident:
        return list(points)
    known = [p for p in points if "device_train_peak_bytes" in p or not p.get("device_sample_peak_bytes")]
    return known or list(points)


def training_residual(point: Mapping, model: ModelSize, constants: MemoryConstants, images: int) -> float:
    """A point's training peak less what the model knows without fitting: runtime, weights, LoRA, latents."""
    known = predict(point_shape(point, images), model, constants)
    parts = known.parts
    known_bytes = parts["runtime"] + parts["weights"] + parts["lora_and_optimizer"] + parts["latents"]
    return _peaks(point, constants.resident)[1] - known_bytes


def fit(
    points: Sequence[Mapping], model: ModelSize, device: str, *, images: int = 5, source: str = ""
) -> MemoryConstants:
    """Constants that make the model reproduce ``points`` (``_measure`` results): the runtime and the loading
    overhead from their medians; the training overhead and the activations (linear and quadratic in the latent's
    pixels, for checkpointing on and off) by least squares over the training phase's peaks (never a peak that
    sampling set: :func:`training_points`); the sampling constant from the points that sampled.

    Args:
        points: The measured points (``python -m spyke_lora._calibrate_point``'s figures).
        model: The sizes of the model they trained.
        device: "cpu", "cuda" or "mps": resident figures on the CPU, the allocator's elsewhere.
        images: The images whose latents the points cached.
        source: Where the figures come from, in words (the plan shows it).

    Returns:
        The fitted constants, marked calibrated.
    """
    import numpy as np

    resident = device == "cpu"
    runtime = int(statistics.median(p["runtime_bytes"] for p in points)) if resident else 0
    fp32 = 4 * (model.unet + model.text_encoder + model.vae)
    if resident:
        load_extra = [p["load_peak_bytes"] - runtime - model.file_tensor_bytes - fp32 for p in points]
    else:
        load_extra = [p["device_load_peak_bytes"] - 4 * model.vae for p in points]
    base = MemoryConstants(
        device,
        resident,
        runtime,
        int(statistics.median(load_extra)),
        0,
        {True: (0.0, 0.0), False: (0.0, 0.0)},
        0.0,
        source,
        True,
    )
    rows, values = [], []
    for p in training_points(points, resident):
        pixels = latent_pixels(p["resolution"]) * p.get("batch_size", 1)
        gc = bool(p["gradient_checkpointing"])
        rows.append([1.0, pixels * gc, pixels**2 * gc, pixels * (not gc), pixels**2 * (not gc)])
        values.append(training_residual(p, model, base, images))
    a, y = np.array(rows, dtype=float), np.array(values, dtype=float)
    solution = np.linalg.lstsq(a, y, rcond=None)[0]
    if (solution[1:] < 0).any():  # a negative term is noise being fitted: a straight line per setting instead
        solution = np.zeros(5)
        solution[[0, 1, 3]] = np.linalg.lstsq(a[:, [0, 1, 3]], y, rcond=None)[0]
    c, on1, on2, off1, off2 = (float(v) for v in solution)
    sampling = _sampling_constant(
        points,
        model,
        dataclasses.replace(
            base, train_overhead_bytes=int(c), activation_bytes={True: (on1, on2), False: (off1, off2)}
        ),
        images,
    )
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
    key = "sample_peak_bytes" if constants.resident else "device_sample_peak_bytes"
    per_pixel = []
    for p in points:
        if p.get(key):
            trained = predict(point_shape(p, images), model, constants)
            held = trained.phases["training"] - trained.parts["activations"]  # what stays between steps
            per_pixel.append((p[key] - held) / (2 * latent_pixels(p["resolution"])))
    return float(statistics.median(per_pixel)) if per_pixel else CPU.sampling_bytes_per_latent_pixel
