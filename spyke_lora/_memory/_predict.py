"""The memory model: a run's peak memory on its device, by part, predicted from the base model's header and the
config, before anything is loaded. Pure functions of their inputs; the constants are measured (see ``CPU``).

A run has three phases, and its peak is the highest of them:

* **loading**: sd-scripts reads the checkpoint's state dict (the file's tensor bytes), builds the models in fp32
  and copies the weights in: both are alive at once. On the CPU this is the peak of any run at 256 px or less.
  On CUDA and MPS it happens in the host's RAM: the device sees the VAE and the latent caching only;
* **training**: the U-Net and text encoder in the training dtype (and the VAE, when latents are not cached), the
  LoRA with its gradient and optimizer state, the cached latents, the activations kept for the backward pass
  (``activation_bytes`` per sample, linear and quadratic in the latent's pixels; gradient checkpointing keeps far
  fewer), and a fixed overhead;
* **sampling**: what training holds between steps (weights, LoRA, optimizer state), plus an inference pass at the
  sample size (classifier-free guidance: two samples) and the VAE decoding the image, both proportional to the
  sample's pixels (``sampling_bytes_per_latent_pixel`` per guidance sample).

Figures on the CPU are the process's resident memory (what psutil and the OS show), so they include the Python
runtime with torch and the engine's libraries. On CUDA and MPS they are the allocator's (what torch allocated on
the device), which is what the device's budget limits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "CPU",
    "SD15_FP16",
    "MemoryConstants",
    "MemoryPrediction",
    "ModelSize",
    "RunShape",
    "activation_bytes",
    "constants_for",
    "host_loading_bytes",
    "latent_pixels",
    "lora_parameters",
    "predict",
    "read_model_size",
]

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# Measured: an SD1.5 LoRA of network_dim 32 saved as fp32 is 75.6 MB (792 tensors); its size scales with dim.
_LORA_PARAMETERS_PER_DIM = 75_600_000 / 32 / 4
# Optimizer state per LoRA parameter, in parameter copies (AdamW: exp_avg and exp_avg_sq).
_OPTIMIZER_STATES = {
    "adamw": 2,
    "adam": 2,
    "adamw8bit": 0.5,
    "pagedadamw8bit": 0.5,
    "lion": 1,
    "lion8bit": 0.25,
    "sgdnesterov": 1,
    "sgdnesterov8bit": 0.25,
    "prodigy": 4,
    "dadaptation": 3,
    "dadaptadam": 3,
    "adafactor": 1,
}


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a base model's parts, and the bytes of its tensors as stored in the file."""

    unet: int
    text_encoder: int
    vae: int
    file_tensor_bytes: int
    unet_channels: int = 320  # the U-Net's first block width: activations scale with it (320 for SD1.x and SD2.x)

    @classmethod
    def from_header(cls, tensors: Mapping[str, Mapping]) -> ModelSize:
        """From a checkpoint's safetensors header (``_model.read_header(path).tensors``): no tensor is read."""
        counts = {"unet": 0, "text_encoder": 0, "vae": 0}
        stored = 0
        channels = 320
        for name, entry in tensors.items():
            numel = math.prod(int(d) for d in entry.get("shape", ()))
            stored += numel * _DTYPE_BYTES.get(str(entry.get("dtype", "F32")).upper(), 4)
            if name.startswith("model.diffusion_model."):
                counts["unet"] += numel
                if name == "model.diffusion_model.input_blocks.0.0.weight" and entry.get("shape"):
                    channels = int(entry["shape"][0])
            elif name.startswith(("cond_stage_model.", "conditioner.")):
                counts["text_encoder"] += numel
            elif name.startswith("first_stage_model."):
                counts["vae"] += numel
        return cls(counts["unet"], counts["text_encoder"], counts["vae"], stored, channels)


# The full-size SD1.5 checkpoint as an fp16 file (the tiny world's model, and most SD1.5 downloads).
SD15_FP16 = ModelSize(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863, file_tensor_bytes=2_132_470_614)


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What of a config decides memory: sizes in pixels, precision, what is trained and cached."""

    resolution: int  # the training side in pixels (a bucket's area is at most resolution^2)
    batch_size: int
    gradient_checkpointing: bool
    mixed_precision: str  # "no", "fp16", "bf16"
    cache_latents: bool
    images: int  # images whose latents are cached (training and regularisation, and held-out)
    network_dim: int
    optimizer: str  # sd-scripts' optimizer_type
    train_text_encoder: bool = True
    sample_size: int | None = None  # None: no sampling
    full_precision_vae: bool = True


@dataclasses.dataclass(frozen=True)
class MemoryConstants:
    """What the model cannot read from a header: measured for one kind of device (``spyke-lora calibrate``)."""

    device: str  # "cpu", "cuda", "mps"
    resident: bool  # True: the figures are the process's resident memory; False: the device allocator's
    runtime_bytes: int  # the process before anything is loaded (resident figures only)
    load_overhead_bytes: int  # loading: beyond the state dict and the fp32 models
    train_overhead_bytes: int  # training: beyond weights, LoRA, latents and activations
    # gradient checkpointing on/off -> (bytes per latent pixel, bytes per latent pixel squared), per fp32 sample, for
    # a U-Net of 320 channels
    activation_bytes: Mapping[bool, tuple[float, float]]
    sampling_bytes_per_latent_pixel: float  # an inference pass, per sample of classifier-free guidance
    source: str  # where the figures come from, in words
    calibrated: bool  # measured on this kind of device (else an estimate derived from another)

    def to_json(self) -> dict:
        """The constants as a JSON object (what ``memory-DEVICE.json`` keeps)."""
        data = dataclasses.asdict(self)
        data["activation_bytes"] = {"on": list(self.activation_bytes[True]), "off": list(self.activation_bytes[False])}
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> MemoryConstants:
        """Constants from :meth:`to_json`'s object."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        act = data["activation_bytes"]
        values["activation_bytes"] = {True: tuple(act["on"]), False: tuple(act["off"])}
        return cls(**values)


# Measured on this project's Linux machine (2 CPU cores, torch 2.14.1, sd-scripts v0.10.1) by
# `benchmarks/memory_model.py`, peak resident memory at 64, 128, 256 and 512 px with gradient checkpointing on and
# off; docs/benchmarks.md has the table of predicted against measured. Filled in by `fit()` from those points.
CPU = MemoryConstants(
    device="cpu",
    resident=True,
    runtime_bytes=563_853_312,
    load_overhead_bytes=217_316_862,
    train_overhead_bytes=560_344_965,
    activation_bytes={True: (379_164.1, 0.0), False: (893_314.2, 0.0)},
    sampling_bytes_per_latent_pixel=277_641.0,  # one 512 px run sampling its final file (docs/benchmarks.md 3c)
    source="measured on a Linux CPU (benchmarks/memory_model.py)",
    calibrated=True,
)


def constants_for(device: str, calibrated: Mapping[str, MemoryConstants] | None = None) -> MemoryConstants:
    """The constants for ``device``: a calibration of that device when there is one (``calibrated``, by device);
    else, on CUDA and MPS, an estimate from the CPU's (the same kernels' activations, measured as the allocator sees
    them: no runtime, no host-side loading), marked as such."""
    if calibrated and device in calibrated:
        return calibrated[device]
    if device == "cpu":
        return CPU
    return dataclasses.replace(
        CPU,
        device=device,
        resident=False,
        runtime_bytes=0,
        load_overhead_bytes=0,
        source=f"an estimate from the CPU's measurements: {device.upper()} has not been calibrated on this machine "
        f"(run `spyke-lora calibrate` to measure it)",
        calibrated=False,
    )


def lora_parameters(network_dim: int) -> int:
    """The parameters of an SD1.5 LoRA (U-Net and text encoder) of ``network_dim``."""
    return int(_LORA_PARAMETERS_PER_DIM * network_dim)


def _optimizer_states(optimizer: str) -> float:
    return _OPTIMIZER_STATES.get(optimizer.lower().replace("_", "").replace(".", ""), 2)


@dataclasses.dataclass(frozen=True)
class MemoryPrediction:
    """A run's predicted peak on its device and where it comes from (``parts``, bytes by part; the phases' totals
    in ``phases``)."""

    peak_bytes: int
    parts: Mapping[str, int]
    phases: Mapping[str, int]  # "loading", "training", "sampling" -> that phase's total
    constants: MemoryConstants

    @property
    def phase(self) -> str:
        """The phase that sets the peak."""
        return max(self.phases, key=lambda k: self.phases[k])


def latent_pixels(size: int) -> int:
    """The pixels of the latent of a ``size`` px square image (SD1.5's VAE: an eighth of each side)."""
    return (size // 8) ** 2


def activation_bytes(constants: MemoryConstants, shape: RunShape, model: ModelSize) -> int:
    """The activations a training step keeps for its backward pass."""
    linear, quadratic = constants.activation_bytes[shape.gradient_checkpointing]
    pixels = latent_pixels(shape.resolution)
    per_sample = linear * pixels + quadratic * pixels**2
    half = 0.5 if shape.mixed_precision in ("fp16", "bf16") else 1.0
    return int(per_sample * shape.batch_size * half * model.unet_channels / 320)


def predict(shape: RunShape, model: ModelSize, constants: MemoryConstants) -> MemoryPrediction:
    """The peak memory of a run of ``shape`` on ``model``, by part and phase (see the module's docstring)."""
    fp32 = 4 * (model.unet + model.text_encoder + model.vae)
    weight_bytes = 2 if shape.mixed_precision in ("fp16", "bf16") else 4
    vae_bytes = 4 if shape.full_precision_vae or weight_bytes == 4 else 2
    weights = weight_bytes * (model.unet + model.text_encoder)
    if not shape.cache_latents or constants.resident:  # cached latents: the VAE goes back to the CPU
        weights += vae_bytes * model.vae
    lora = 4 * lora_parameters(shape.network_dim)
    if not shape.train_text_encoder:
        lora = int(lora * 0.87)  # the text encoder's modules are 13 % of an SD1.5 LoRA's parameters (dim 32)
    lora_and_optimizer = int(lora * (2 + _optimizer_states(shape.optimizer)))  # weights, gradients, states
    latents = 4 * 4 * latent_pixels(shape.resolution) * shape.images if shape.cache_latents else 0
    activations = activation_bytes(constants, shape, model)
    sampling = 0
    if shape.sample_size:
        sampling = int(constants.sampling_bytes_per_latent_pixel * 2 * latent_pixels(shape.sample_size))
    if constants.resident:
        loading = model.file_tensor_bytes + fp32 + constants.load_overhead_bytes
    else:  # the device sees the VAE caching latents; the state dict and the fp32 models live in the host's RAM
        loading = vae_bytes * model.vae + constants.load_overhead_bytes
    runtime = constants.runtime_bytes
    phases = {
        "loading": runtime + loading,
        "training": runtime + weights + lora_and_optimizer + latents + activations + constants.train_overhead_bytes,
        # after a saved file, in the training's process: its optimizer state and buffers are still there
        "sampling": runtime + weights + lora_and_optimizer + latents + constants.train_overhead_bytes + sampling
        if sampling
        else 0,
    }
    parts = {
        "runtime": runtime,
        "loading": loading,
        "weights": weights,
        "lora_and_optimizer": lora_and_optimizer,
        "activations": activations,
        "latents": latents,
        "sampling": sampling,
        "overhead": constants.train_overhead_bytes,
    }
    return MemoryPrediction(max(phases.values()), parts, phases, constants)


def host_loading_bytes(model: ModelSize, constants: MemoryConstants) -> int:
    """What loading takes from the host's RAM on CUDA and MPS: the state dict and the fp32 models (with the CPU's
    runtime and overhead)."""
    return (
        CPU.runtime_bytes
        + model.file_tensor_bytes
        + 4 * (model.unet + model.text_encoder + model.vae)
        + (CPU.load_overhead_bytes)
    )


def read_model_size(path: Path) -> ModelSize:
    """:class:`ModelSize` of a safetensors checkpoint, from its header."""
    from .._header import read_header

    return ModelSize.from_header(read_header(path, complete=False).tensors)
