"""A tiny, fully local world to train in: for the tests, the demo, and trying the library without real data.

* a randomly initialised, full-size SD1.5 checkpoint, built with sd-scripts' own ``model_util`` (sd-scripts' SD1.5
  U-Net has fixed channel sizes, so it cannot be smaller): about 30 s and 2.1 GB the first time, then cached in
  ``$SPYKE_LORA_CACHE`` (default ``~/.cache/spyke-lora``) under a name that changes with the recipe;
* CLIP tokenizer files (the 256 byte-level characters, no merges) in the layout sd-scripts' ``tokenizer_cache_dir``
  expects, so nothing is fetched from the Hugging Face hub;
* a few generated images with captions: a train folder ``2_spyke_plasma_v1`` and a regularisation folder
  ``1_person``; and two held-out images of the character, never trained on, for validation (``val/1_spyke_plasma_v1``);
* on request (:func:`build_likeness_models`), a small random DINO (ViT) and CLIP of the real architectures, saved with
  their processors, for :func:`~spyke_lora.likeness` to load as it loads the real ones (their figures mean nothing).

Nothing here is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ._config import TrainConfig
from ._files import cache_dir

__all__ = ["TinyWorld", "build_likeness_models", "build_tiny_world", "cache_dir"]

TRIGGER = "spyke_plasma_v1"
# Bump when the way the model, tokenizer or images are made changes: the cache key follows it.
RECIPE_VERSION = 1
TOKENIZER_FOLDER = "openai_clip-vit-large-patch14"  # what sd-scripts looks for inside tokenizer_cache_dir

_TRAIN_CAPTIONS = (
    f"{TRIGGER}, red disc, blue background",
    f"{TRIGGER}, green square, yellow background",
    f"{TRIGGER}, white stripes, purple background",
)
_REG_CAPTIONS = ("person, grey background", "person, orange background")
_HELD_OUT_CAPTIONS = (f"{TRIGGER}, cyan ring, black background", f"{TRIGGER}, orange cross, white background")


@dataclasses.dataclass(frozen=True)
class TinyWorld:
    """The paths of a built tiny world (:func:`build_tiny_world`) and its image size; :meth:`config` trains on it."""

    base_model: Path
    tokenizer_cache_dir: Path
    train_dir: Path
    reg_dir: Path
    output_dir: Path
    resolution: int
    validation_dir: Path | None = None  # held-out images (TrainConfig.validation_dir); not set by config()

    def config(self, **changes: Any) -> TrainConfig:
        """A config that trains on this world: the recipe, made small (64 px, no bucketing, 5 steps, a checkpoint
        every 2 steps, no sampling).

        Args:
            **changes: fields of :class:`~spyke_lora.TrainConfig` to set instead.

        Returns:
            The config.

        Raises:
            ConfigError: a change is not a valid field or value.
        """
        base = TrainConfig(
            base_model=self.base_model,
            tokenizer_cache_dir=self.tokenizer_cache_dir,
            train_dir=self.train_dir,
            reg_dir=self.reg_dir,
            output_dir=self.output_dir,
            output_name=TRIGGER,
            resolution=self.resolution,
            enable_bucket=False,  # every image is already resolution x resolution
            max_train_steps=5,
            save_every_n_steps=2,
            sample_prompts=(),  # sampling a random model is only worth it where a test looks at samples
            device="cpu",
        )
        return base.replace(**changes) if changes else base


def build_tiny_world(
    root: str | os.PathLike[str], *, resolution: int = 64, sd_scripts_dir: Path | None = None
) -> TinyWorld:
    """Create the tiny world's data under ``root`` and make sure the cached model and tokenizer exist.

    Safe to call again: existing files are reused. The model (a random, full-size SD1.5, about 30 s and 2.1 GB the
    first time) and the tokenizer are cached in :func:`~spyke_lora._files.cache_dir`.

    Args:
        root: the folder for the images, captions and an ``output`` folder.
        resolution: the images' size in px.
        sd_scripts_dir: the sd-scripts that builds the model; None: the vendored one.

    Returns:
        The world's paths.

    Raises:
        EngineError: sd-scripts is missing when the model has to be built.
    """
    root = Path(root).absolute()
    cache = cache_dir()
    model = cache / f"tiny-sd15-r{RECIPE_VERSION}.safetensors"
    if not model.is_file():
        from . import _engine

        _engine.write_random_sd15_checkpoint(model, seed=0, sd_scripts_dir=sd_scripts_dir)
    tokenizers = cache / f"tokenizer-r{RECIPE_VERSION}"
    write_tokenizer(tokenizers / TOKENIZER_FOLDER)
    train_dir = root / "train" / f"2_{TRIGGER}"
    reg_dir = root / "reg" / "1_person"
    _write_images(train_dir, _TRAIN_CAPTIONS, resolution, seed=1)
    _write_images(reg_dir, _REG_CAPTIONS, resolution, seed=2)
    validation_dir = root / "val" / f"1_{TRIGGER}"
    _write_images(validation_dir, _HELD_OUT_CAPTIONS, resolution, seed=7)
    output_dir = root / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    return TinyWorld(model, tokenizers, train_dir, reg_dir, output_dir, resolution, validation_dir)


def build_likeness_models(root: str | os.PathLike[str]) -> tuple[Path, Path]:
    """A small random DINO (transformers' ``ViTModel``, 64 px, patch 16) and CLIP (``CLIPModel``, 64 px, the tiny
    world's tokenizer) saved with their image processors in ``root/dino`` and ``root/clip``: the folders
    :func:`~spyke_lora.likeness` takes as ``dino=`` and ``clip=``, loaded with ``from_pretrained`` as the real models
    are. The weights are random (seeded, the caller's random state left alone): the figures show the code at work,
    not a likeness. Safe to call again: folders already made are reused.

    Args:
        root: the folder to write them in.

    Returns:
        The DINO folder and the CLIP folder.
    """
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = Path(root).absolute()
    dino, clip = root / "dino", root / "clip"
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if not (dino / "preprocessor_config.json").is_file():
            model = ViTModel(ViTConfig(**small, image_size=64, patch_size=16))  # with its pooler, as dino-vits16
            model.save_pretrained(dino)
            ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(dino)
        if not (clip / "preprocessor_config.json").is_file():
            words = write_tokenizer(root / "tokenizer")
            tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=77)
            ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
            text = {**small, **ids, "vocab_size": len(tokenizer), "max_position_embeddings": 77}
            vision = {**small, "image_size": 64, "patch_size": 16}
            CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
            images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
            CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(clip)
    return dino, clip


def write_tokenizer(folder: Path) -> Path:
    """CLIP tokenizer files whose vocabulary is the 256 byte-level characters, their ``</w>`` forms and the two
    special tokens, with no merges: loads with ``CLIPTokenizer`` and keeps every id below 49408."""
    if (folder / "vocab.json").is_file():
        return folder
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n",
        "tokenizer_config.json": json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        ),
        "special_tokens_map.json": json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        ),
    }
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        for child in tmp.iterdir():
            child.unlink()
        tmp.rmdir()
    return folder


def _write_images(folder: Path, captions: tuple[str, ...], size: int, *, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i, caption in enumerate(captions):
        image = folder / f"img{i:02d}.png"
        if not image.exists():
            background = rng.uniform(0, 255, 3)
            shape = (((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2) < 0.05)[..., None]
            pixels = np.where(shape, rng.uniform(0, 255, 3), background) + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image)
        (folder / f"img{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
