"""The likeness encoders: DINO and CLIP, loaded with transformers' own ``from_pretrained`` and preprocessed with the
image processor saved with each model, so any figure can be recomputed with transformers alone::

    model, processor = AutoModel.from_pretrained(dino), AutoImageProcessor.from_pretrained(dino)
    cls = model(**processor(images=[image], return_tensors="pt")).last_hidden_state[:, 0]  # DINO: the [CLS] token
    clip_model, clip_processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    image = clip_model.get_image_features(**clip_processor(images=[image], return_tensors="pt"))
    text = clip_model.get_text_features(**clip_processor(text=[prompt], padding=True, return_tensors="pt"))

and the figure is the cosine of two such vectors. Every embedding is L2-normalised here, so a cosine is a dot product.

An encoder is anything with ``image_embeddings(paths)`` (and, for CLIP, ``text_embeddings(texts)``) returning one
L2-normalised row per item (:class:`ImageEncoder`, :class:`Encoder`): :func:`~spyke_lora.likeness` takes them
injected (``encoders=``), which is how the recommendation is tested with embeddings the test chooses, and how
another scorer of the same shape would plug in (CCIP's metric is a learned difference, not a cosine, and
dghs-imgutils cannot be installed beside the pinned packages: docs/choosing.md). Models run on the training device (CUDA, else MPS, else the CPU), after training,
never during a run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._device import available_devices, resolve_device
from .._errors import ConfigError

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "ClipEncoder",
    "DinoEncoder",
    "Encoder",
    "LikenessEncoders",
    "ImageEncoder",
    "load_clip",
    "load_dino",
    "scoring_device",
]

DEFAULT_DINO = "facebook/dino-vits16"  # the DreamBooth paper's DINO ViT-S/16 (22 M parameters, 87 MB)
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the paper's CLIP ViT-B/32 (151 M parameters, 605 MB)
BATCH = 16  # images per forward pass: bounds the activations' memory, whatever the number of samples


@runtime_checkable
class ImageEncoder(Protocol):
    """What scores images: one L2-normalised row per image, in the order given."""

    name: str

    def image_embeddings(self, paths: Sequence[Path]) -> np.ndarray:
        """``(len(paths), dim)`` float64, each row of norm 1."""
        ...


@runtime_checkable
class Encoder(ImageEncoder, Protocol):
    """An image encoder that also embeds text in the same space (CLIP): CLIP-T compares the two."""

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float64, each row of norm 1."""
        ...


@dataclasses.dataclass(frozen=True)
class LikenessEncoders:
    """The two encoders :func:`~spyke_lora.likeness` scores with: ``dino`` for DINO (and the copy check), ``clip``
    for CLIP-I and CLIP-T."""

    dino: ImageEncoder
    clip: Encoder


def scoring_device() -> str:
    """The device the training would use (``device = "auto"``): CUDA, else MPS, else the CPU."""
    cuda, mps = available_devices()
    return resolve_device("auto", cuda_available=cuda, mps_available=mps)


def _normalised(vectors: Any) -> np.ndarray:
    array = vectors.detach().to("cpu").double().numpy()
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms == 0, 1.0, norms)


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ConfigError(f"image {str(path)!r} cannot be read ({e}); remove it or give another folder") from e


def _embed_images(
    paths: Sequence[Path], processor: Any, device: str, forward: Callable[[Any], Any], width: int
) -> np.ndarray:
    """``forward`` of the processed images, in batches of :data:`BATCH`, L2-normalised: one row per image
    (``width`` columns; none for no image)."""
    import torch

    rows = []
    for start in range(0, len(paths), BATCH):
        images = [_open_rgb(p) for p in paths[start : start + BATCH]]
        inputs = processor(images=images, return_tensors="pt").to(device)
        with torch.inference_mode():
            rows.append(_normalised(forward(inputs)))
    return np.concatenate(rows) if rows else np.zeros((0, width))


class DinoEncoder:
    """A DINO ViT (any transformers ViT): the ``[CLS]`` token of the last hidden state, L2-normalised."""

    def __init__(self, model: Any, processor: Any, name: str, device: str) -> None:
        self.model, self.processor, self.name, self.device = model, processor, name, device

    def image_embeddings(self, paths: Sequence[Path]) -> np.ndarray:
        """The ``[CLS]`` embedding of each image (``last_hidden_state[:, 0]``), L2-normalised."""
        forward = lambda inputs: self.model(**inputs).last_hidden_state[:, 0]  # noqa: E731
        return _embed_images(paths, self.processor, self.device, forward, self.model.config.hidden_size)


class ClipEncoder:
    """A CLIP model: ``get_image_features`` and ``get_text_features``, L2-normalised."""

    def __init__(self, model: Any, processor: Any, name: str, device: str) -> None:
        self.model, self.processor, self.name, self.device = model, processor, name, device

    def image_embeddings(self, paths: Sequence[Path]) -> np.ndarray:
        """The CLIP image embedding of each image, L2-normalised."""
        forward = lambda inputs: self.model.get_image_features(**inputs)  # noqa: E731
        return _embed_images(paths, self.processor, self.device, forward, self.model.config.projection_dim)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """The CLIP text embedding of each text (cut at the tokenizer's 77 tokens, as SD1.5 cuts a prompt)."""
        import torch

        rows = []
        for start in range(0, len(texts), BATCH):
            inputs = self.processor(
                text=list(texts[start : start + BATCH]),
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,  # 77
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                rows.append(_normalised(self.model.get_text_features(**inputs)))
        return np.concatenate(rows) if rows else np.zeros((0, self.model.config.projection_dim))


def _offline() -> bool:
    """Whether the hub is off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), read now, not at import."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARIABLES)


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _is_hub_id(name: str) -> bool:
    """``facebook/dino-vits16`` or ``gpt2``, not a path on disk (``./dino``, ``~/models/dino``, ``/a/b/c``)."""
    return (
        not Path(name).expanduser().exists()
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None
    )


def _fetch_hint(field: str, name: str, classes: str) -> str:
    return (
        f"fetch it once while online with `huggingface-cli download {name}` (or `hf download {name}`), or save it into "
        f"a folder with {classes}, and pass {field}=FOLDER (--{field} FOLDER)"
    )


def _load(field: str, name: str, model_class: Any, processor_class: Any, classes: str, device: str) -> Any:
    """``(model, processor)`` of ``name`` (a folder or a hub id) on ``device``, in eval mode; a ConfigError naming
    the model and how to fetch it when its files are not here."""
    where = Path(name).expanduser()
    if not _is_hub_id(name) and not where.is_dir():
        raise ConfigError(
            f"`{field}` {name!r} is not a folder on this machine (a model saved with save_pretrained, or a hub id "
            f"such as {DEFAULT_DINO if field == 'dino' else DEFAULT_CLIP!r}); {_fetch_hint(field, 'HUB_ID', classes)}"
        )
    source = str(where) if where.is_dir() else name
    offline = _offline()
    try:
        # online, huggingface_hub draws its own progress bar for the download (left on)
        model = model_class.from_pretrained(source, local_files_only=offline)
        # the slow (PIL) processor, transformers 4.x's default for these models: said, so no warning is printed
        processor = processor_class.from_pretrained(source, local_files_only=offline, use_fast=False)
    except (OSError, ValueError) as e:
        state = (
            "is not in the Hugging Face cache and the hub is off (HF_HUB_OFFLINE)"
            if offline
            else "could not be loaded (no network, or not a model of that name)"
        )
        if where.is_dir():
            state = (
                "is a folder without a complete model and processor (config.json, weights, preprocessor_config.json)"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"`{field}` model {name!r} {state}: {first}; {_fetch_hint(field, name, classes)}") from e
    model.eval()
    return model.to(device), processor


def load_dino(name: str = DEFAULT_DINO, device: str | None = None) -> DinoEncoder:
    """Load a DINO model (a transformers folder or a hub id) and the image processor saved with it.

    Args:
        name: a folder written by ``save_pretrained``, or a hub id (default ``facebook/dino-vits16``).
        device: where to run it; None: the training device (:func:`scoring_device`).

    Returns:
        The :class:`DinoEncoder`.

    Raises:
        ConfigError: the model's files are not here (a missing folder, or offline and not cached), naming the model
            and how to fetch it.
    """
    from transformers import AutoImageProcessor, AutoModel

    device = device or scoring_device()
    classes = "AutoModel.from_pretrained(ID).save_pretrained(FOLDER) and AutoImageProcessor's"
    model, processor = _load("dino", name, AutoModel, AutoImageProcessor, classes, device)
    return DinoEncoder(model, processor, name, device)


def load_clip(name: str = DEFAULT_CLIP, device: str | None = None) -> ClipEncoder:
    """Load a CLIP model (a transformers folder or a hub id) and the processor saved with it (its tokenizer and
    image processor).

    Args:
        name: a folder written by ``save_pretrained``, or a hub id (default ``openai/clip-vit-base-patch32``).
        device: where to run it; None: the training device (:func:`scoring_device`).

    Returns:
        The :class:`ClipEncoder`.

    Raises:
        ConfigError: the model's files are not here, naming the model and how to fetch it.
    """
    from transformers import CLIPModel, CLIPProcessor

    device = device or scoring_device()
    classes = "CLIPModel.from_pretrained(ID).save_pretrained(FOLDER) and CLIPProcessor's"
    model, processor = _load("clip", name, CLIPModel, CLIPProcessor, classes, device)
    return ClipEncoder(model, processor, name, device)
