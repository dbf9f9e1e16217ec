"""Likeness: does each checkpoint look like the character? Every checkpoint's samples scored as the DreamBooth paper
(Ruiz et al., CVPR 2023) scores subject-driven generation: DINO and CLIP-I against the character's images, CLIP-T
against the prompt, and copies of training images, with the base model's samples (the floor) and the character's own
images (the ceiling) as references, and one file recommended with its reason. See docs/choosing.md ("Likeness").

Where things live:

* ``_rows``: the data (:class:`LikenessCopy`, :class:`LikenessCell`, :class:`LikenessRow`, :class:`Likeness`);
* ``_models``: the DINO and CLIP encoders (transformers' ``from_pretrained``), the :class:`Encoder` protocol;
* ``_score``: reading the run's samples and scoring them (:func:`likeness`);
* ``_recommend``: the rule that picks one file, and its reason in words;
* ``_chart``: the likeness chart (``NAME.likeness.png``).

Imports go one way: this package uses ``_compare`` (it scores the cells of :func:`~spyke_lora.review`), and
``_compare`` never imports it (import-linter's acyclic contract): the contact sheet takes likeness figures as plain
data.
"""

from ._chart import likeness_chart
from ._models import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    ClipEncoder,
    DinoEncoder,
    Encoder,
    ImageEncoder,
    LikenessEncoders,
    load_clip,
    load_dino,
    scoring_device,
)
from ._recommend import recommend
from ._rows import Kind, Likeness, LikenessCell, LikenessCopy, LikenessRow
from ._score import COPY_CAP, clip_t_prompt, likeness

__all__ = [
    "COPY_CAP",
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "ClipEncoder",
    "DinoEncoder",
    "Encoder",
    "LikenessEncoders",
    "ImageEncoder",
    "Kind",
    "Likeness",
    "LikenessCell",
    "LikenessCopy",
    "LikenessRow",
    "clip_t_prompt",
    "likeness",
    "likeness_chart",
    "load_clip",
    "load_dino",
    "recommend",
    "scoring_device",
]
