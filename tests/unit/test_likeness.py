"""Likeness (issue 24): every checkpoint's samples scored with DINO, CLIP-I, CLIP-T and copies, on a fake run folder.

Nothing downloads: the DINO and CLIP models are randomly initialised from small configs of the real architectures
(transformers' ViTModel and CLIPModel), saved with their processors into a temporary folder, and loaded by the
library's own code. What holds with any weights is tested on them; the recommendation rule is tested with encoders
whose embeddings the test chooses.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spyke_lora import ConfigError, LikenessEncoders, likeness
from spyke_lora._likeness import COPY_CAP, clip_t_prompt, load_clip, load_dino

from ..likeness_models import build_likeness_models

NAME = "spyke_plasma_v1"
PROMPTS = ["spyke_plasma_v1, standing, full body", "spyke_plasma_v1, crouching, side view"]
CFGS = [5.0, 7.0]


def noise_image(seed: int, size: int = 64) -> Image.Image:
    """A picture: a random smooth gradient plus blocks; different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(0, 1) * x + rng.uniform(0, 1) * y for _ in range(3)], axis=2)
    blocks = np.kron(rng.uniform(0, 1, (8, 8, 3)), np.ones((size // 8, size // 8, 1)))
    return Image.fromarray(((0.5 * base + 0.5 * blocks).clip(0, 1) * 255).astype(np.uint8))


def write_checkpoint(path: Path, step: int) -> Path:
    """A LoRA file as far as its header tells (one 4-byte tensor), saved at ``step`` (its ``ss_steps``)."""
    text = json.dumps(
        {
            "__metadata__": {"ss_steps": str(step)},
            "lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    return path


def fake_run(folder: Path, steps=(0, 2, 4), *, train: int = 3, copy_at: tuple[int, int] | None = None) -> Path:
    """A run folder: training images in ``train/``, a sample per step x prompt x CFG (step 0: the base model) and its
    manifest, each step's LoRA file. ``copy_at=(step, cell)``: that sample is the first training image itself."""
    (folder / "sample").mkdir(parents=True, exist_ok=True)
    (folder / "train").mkdir(exist_ok=True)
    for i in range(train):
        noise_image(1000 + i).save(folder / "train" / f"{i:02d}.png")
    lines, seed = [], 0
    for step in steps:
        if step:
            write_checkpoint(folder / f"{NAME}-step{step:08d}.safetensors", step)
        for p, prompt in enumerate(PROMPTS):
            for c, cfg in enumerate(CFGS):
                seed += 1
                cell = p * len(CFGS) + c
                rel = f"sample/{NAME}_{step:06d}_{cell:02d}_20261208000000_1234.png"
                if copy_at == (step, cell):
                    shutil.copyfile(folder / "train" / "00.png", folder / rel)
                else:
                    noise_image(seed).save(folder / rel)
                checkpoint = f"{NAME}-step{step:08d}.safetensors" if step else None
                lines.append(
                    {
                        "step": step,
                        "prompt": prompt,
                        "cfg_scale": cfg,
                        "seed": 1234,
                        "path": rel,
                        "checkpoint": checkpoint,
                    }
                )
    (folder / f"{NAME}.samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A DINO (ViT, [CLS]) and a CLIP, randomly initialised from small configs, saved with their processors."""
    return build_likeness_models(tmp_path_factory.mktemp("likeness-models"))


def score(run: Path, models, **kw):
    dino, clip = models
    return likeness(run, dino=str(dino), clip=str(clip), train_images=run / "train", make_base=False, **kw)


def test_a_sample_that_is_a_training_image_is_a_copy_with_dino_1(tmp_path, models):
    run = fake_run(tmp_path, copy_at=(4, 1))
    found = score(run, models)
    step4 = next(r for r in found.rows if r.step == 4)
    assert len(step4.copies) == 1
    copy = step4.copies[0]
    assert copy.image == run / "train" / "00.png"
    assert copy.sample == step4.cells[1].sample
    assert copy.similarity == pytest.approx(1.0, abs=1e-6)
    assert copy.threshold == found.copy_threshold <= COPY_CAP
    assert step4.cells[1].copy == copy


def test_scores_are_the_same_on_a_second_call(tmp_path, models):
    run = fake_run(tmp_path)
    assert score(run, models) == score(run, models)


def test_a_figure_is_the_cosine_transformers_own_model_and_processor_give(tmp_path, models):
    import torch
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    run = fake_run(tmp_path)
    found = score(run, models)
    cell = next(r for r in found.rows if r.step == 2).cells[3]
    train = sorted((run / "train").glob("*.png"))
    images = [Image.open(p).convert("RGB") for p in [cell.sample, *train]]
    dino_path, clip_path = models

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))

    model, processor = AutoModel.from_pretrained(dino_path), AutoImageProcessor.from_pretrained(dino_path)
    with torch.no_grad():
        cls = model(**processor(images=images, return_tensors="pt")).last_hidden_state[:, 0]
    assert cell.dino == pytest.approx(np.mean([cos(cls[0], cls[i]) for i in range(1, len(images))]), abs=1e-5)

    model, processor = CLIPModel.from_pretrained(clip_path), CLIPProcessor.from_pretrained(clip_path)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=images, return_tensors="pt"))
        text = model.get_text_features(**processor(text=[cell.clip_t_prompt], padding=True, return_tensors="pt"))
    assert cell.clip_i == pytest.approx(np.mean([cos(image[0], image[i]) for i in range(1, len(images))]), abs=1e-5)
    assert cell.clip_t == pytest.approx(cos(image[0], text[0]), abs=1e-5)
    assert cell.clip_t_prompt == "standing, full body" if cell.prompt == PROMPTS[0] else "crouching, side view"


def test_the_base_and_ceiling_rows_are_present(tmp_path, models):
    found = score(fake_run(tmp_path, train=4), models)
    assert found.base is not None and found.base.kind == "base" and found.base.step == 0
    assert found.base.samples == 4 and found.base.checkpoint is None
    assert found.ceiling.kind == "ceiling" and found.ceiling.step is None and found.ceiling.samples == 4
    assert found.ceiling.clip_t is None and found.ceiling.dino is not None
    assert found.ceiling.note == "the 4 training images against each other"
    assert [r.step for r in found.rows] == [2, 4]
    lines = found.table().splitlines()
    assert lines[1].split()[0] == "base" and lines[-2].split()[:2] == ["own", "images"]
    assert lines[-1].startswith("recommended: step ")


def test_the_ceiling_is_the_held_out_images_against_the_training_images(tmp_path, models):
    run = fake_run(tmp_path)
    held = tmp_path / "val"
    held.mkdir()
    for i in range(2):
        noise_image(2000 + i).save(held / f"{i}.png")
    (run / f"{NAME}.config.toml").write_text(f'validation_dir = "{held}"\ntrain_dir = "train/10_{NAME}"\n')
    found = score(run, models)
    assert found.ceiling.samples == 2 and found.ceiling.note == "2 held-out images against the 3 training images"


def test_a_checkpoint_without_samples_is_reported_not_skipped(tmp_path, models):
    run = fake_run(tmp_path)
    write_checkpoint(run / f"{NAME}-step{6:08d}.safetensors", 6)  # saved, never sampled
    for png in (run / "sample").glob(f"{NAME}_000004_*.png"):  # sampled, images gone
        png.unlink()
    found = score(run, models)
    by_step = {r.step: r for r in found.rows}
    assert sorted(by_step) == [2, 4, 6]
    assert by_step[6].samples == 0 and by_step[6].dino is None and "no samples" in by_step[6].note
    assert by_step[6].checkpoint == run / f"{NAME}-step{6:08d}.safetensors"
    assert by_step[4].samples == 0 and by_step[4].note == "no samples: its images are missing"
    assert found.recommended is by_step[2]
    assert "step 6" not in found.reason and " 6 " in found.table().replace("\n", " \n ")


def test_the_clip_t_prompt_replaces_the_trigger_with_the_class_word():
    assert clip_t_prompt("spyke_plasma_v1, standing in a forest", "spyke_plasma_v1", "person") == (
        "person, standing in a forest"
    )
    assert clip_t_prompt("spyke_plasma_v1, crouching", "spyke_plasma_v1", "") == "crouching"
    assert clip_t_prompt("a photo of spyke_plasma_v1 smiling", "spyke_plasma_v1", "1girl") == "a photo of 1girl smiling"
    assert clip_t_prompt("spyke_plasma_v10 standing", "spyke_plasma_v1", "x") == "spyke_plasma_v10 standing"


def test_the_class_word_is_the_runs_class_folder(tmp_path, models):
    run = fake_run(tmp_path)
    (run / f"{NAME}.config.toml").write_text(f'train_dir = "train/10_{NAME}"\nreg_dir = "reg/1_person"\n')
    found = score(run, models)
    assert {c.clip_t_prompt for r in found.rows for c in r.cells} == {
        "person, standing, full body",
        "person, crouching, side view",
    }
    assert {c.clip_t_prompt for c in score(run, models, class_word="1girl").rows[0].cells} == {
        "1girl, standing, full body",
        "1girl, crouching, side view",
    }


# ---- the recommendation, with embeddings the test chooses --------------------------------------------------------


class Chosen:
    """An encoder whose embedding of each image (by its file name) and text the test sets."""

    def __init__(self, name: str, images: dict[str, np.ndarray], texts: dict[str, np.ndarray] | None = None):
        self.name, self.images, self.texts = name, images, texts or {}

    def image_embeddings(self, paths):
        return np.array([_unit(self.images[Path(p).name]) for p in paths])

    def text_embeddings(self, texts):
        return np.array([_unit(self.texts[t]) for t in texts])


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _angle(similarity: float, away: np.ndarray, towards: np.ndarray) -> np.ndarray:
    """A unit vector at cosine ``similarity`` to ``towards`` (itself a unit vector orthogonal to ``away``)."""
    return similarity * towards + math.sqrt(1 - similarity**2) * away


def chosen_encoders(run: Path, dino_by_step: dict[int, float], clip_t_by_step: dict[int, float], copy_step=None):
    """DINO: training images near e0 (e1, e2 give their spread); a sample of step s at cosine ``dino_by_step[s]``
    (+-0.005 per cell) to e0, off along e3. CLIP: the same images; its text at cosine ``clip_t_by_step[s]``."""
    e = np.eye(6)
    train = sorted((run / "train").glob("*.png"))
    dino = {p.name: e[0] + 0.3 * e[1 + i % 2] * (1 if i < 2 else -1) for i, p in enumerate(train)}
    clip_images = dict(dino)
    for png in sorted((run / "sample").glob("*.png")):
        step, cell = int(png.name.split("_")[-4]), int(png.name.split("_")[-3])
        jitter = 0.005 * (cell - 1.5)
        dino[png.name] = _angle(dino_by_step[step] + jitter, e[3], e[0])
        # CLIP: the image at cosine clip_t to the text (e4), off along e5
        clip_images[png.name] = _angle(clip_t_by_step[step] + jitter, e[5], e[4])
    if copy_step is not None:
        (name,) = [p.name for p in (run / "sample").glob(f"{NAME}_{copy_step:06d}_00_*.png")]
        dino[name] = dino[train[0].name]
    texts = {clip_t_prompt(p, NAME, ""): e[4] for p in PROMPTS}
    return LikenessEncoders(Chosen("chosen-dino", dino), Chosen("chosen-clip", clip_images, texts))


def test_the_file_between_undertrained_and_overfit_is_recommended(tmp_path):
    run = fake_run(tmp_path, steps=(0, 2, 4, 6, 8))
    # step 2 looks like the base model (undertrained); step 8 looks most like the character, forgets the prompt and
    # copies a training image (overfit); step 6 looks a little less like it than 8 and keeps the prompt
    dino = {0: 0.30, 2: 0.31, 4: 0.55, 6: 0.70, 8: 0.80}
    clip_t = {0: 0.30, 2: 0.30, 4: 0.30, 6: 0.29, 8: 0.12}
    found = likeness(run, train_images=run / "train", encoders=chosen_encoders(run, dino, clip_t, copy_step=8))
    assert found.recommended is not None and found.recommended.step == 6
    assert found.recommended.checkpoint == run / f"{NAME}-step{6:08d}.safetensors"
    assert found.dino_model == "chosen-dino" and found.clip_model == "chosen-clip"
    step8 = found.rows[-1]
    assert len(step8.copies) == 1 and step8.copies[0].image == run / "train" / "00.png"
    # DINO is the mean cosine to the training images, each at cosine 1/sqrt(1.09) to e0
    to_train = 1 / math.sqrt(1.09)
    r6, base = found.recommended, found.base
    assert r6.dino == pytest.approx(0.70 * to_train, abs=1e-9) and base.dino == pytest.approx(0.30 * to_train, abs=1e-9)
    assert r6.clip_t == pytest.approx(0.29, abs=1e-9) and found.rows[-1].clip_t == pytest.approx(0.12, abs=1e-9)
    gain = found.rows[-1].dino - r6.dino
    assert found.reason.startswith(
        f"step 6: DINO {r6.dino:.2f} (base {base.dino:.2f}, own images {found.ceiling.dino:.2f}) with CLIP-T 0.29 "
        f"(base 0.30); later steps gain {gain:.2f} DINO and lose 0.17 CLIP-T"
    )
    assert found.reason.endswith(f"— {NAME}-step{6:08d}.safetensors")


def test_figures_too_close_to_tell_apart_give_the_earliest_and_say_so(tmp_path):
    run = fake_run(tmp_path, steps=(0, 2, 4, 6))
    dino = {0: 0.30, 2: 0.60, 4: 0.702, 6: 0.704}
    clip_t = {0: 0.30, 2: 0.30, 4: 0.30, 6: 0.30}
    found = likeness(run, train_images=run / "train", encoders=chosen_encoders(run, dino, clip_t))
    assert found.recommended.step == 4
    assert "steps 4, 6 are too close to tell apart by DINO with 4 samples each (within 2 standard errors)" in (
        found.reason
    )


def test_an_undertrained_run_is_said_to_be_so(tmp_path):
    run = fake_run(tmp_path, steps=(0, 2, 4))
    dino = {0: 0.30, 2: 0.301, 4: 0.302}
    found = likeness(run, train_images=run / "train", encoders=chosen_encoders(run, dino, {0: 0.3, 2: 0.3, 4: 0.3}))
    assert found.recommended.step == 2
    assert "cannot be told apart from the base model's: the LoRA may be undertrained" in found.reason


def test_when_every_file_loses_the_prompt_the_most_faithful_is_named(tmp_path):
    run = fake_run(tmp_path, steps=(0, 2, 4))
    found = likeness(
        run,
        train_images=run / "train",
        encoders=chosen_encoders(run, {0: 0.3, 2: 0.6, 4: 0.8}, {0: 0.30, 2: 0.20, 4: 0.10}),
    )
    assert found.recommended.step == 2
    assert "every file's CLIP-T is below the base's (0.30): each loses prompt fidelity" in found.reason


def test_without_base_samples_the_reason_says_why(tmp_path):
    run = fake_run(tmp_path, steps=(2, 4))
    found = likeness(
        run,
        train_images=run / "train",
        encoders=chosen_encoders(run, {2: 0.6, 4: 0.7}, {2: 0.3, 4: 0.3}),
        make_base=False,
    )
    assert found.base is None and found.recommended.step == 4
    assert "no base samples (step 0)" in found.reason


def test_a_recommended_file_is_on_disk(tmp_path):
    run = fake_run(tmp_path, steps=(0, 2, 4))
    (run / f"{NAME}-step{4:08d}.safetensors").unlink()  # the best file is gone
    found = likeness(
        run,
        train_images=run / "train",
        encoders=chosen_encoders(run, {0: 0.3, 2: 0.5, 4: 0.7}, {0: 0.3, 2: 0.3, 4: 0.3}),
    )
    assert found.recommended.step == 2 and found.recommended.checkpoint.is_file()
    assert next(r for r in found.rows if r.step == 4).checkpoint is None


# ---- loading -------------------------------------------------------------------------------------------------------


def test_a_missing_model_folder_names_the_model_and_how_to_fetch_it(tmp_path):
    with pytest.raises(
        ConfigError, match=r"`dino` '.*nowhere' is not a folder on this machine.*huggingface-cli download"
    ):
        load_dino(str(tmp_path / "nowhere"), device="cpu")


def test_offline_without_the_files_names_the_model_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ConfigError) as e:
        load_clip("openai/clip-vit-base-patch32", device="cpu")
    message = str(e.value)
    assert "`clip` model 'openai/clip-vit-base-patch32' is not in the Hugging Face cache and the hub is off" in message
    assert "huggingface-cli download openai/clip-vit-base-patch32" in message and "save_pretrained" in message


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"`dino` model '.*empty' is a folder without a complete model"):
        load_dino(str(tmp_path / "empty"), device="cpu")


def test_compare_likeness_prints_the_table_and_the_file_recommended(tmp_path, models, capsys):
    from spyke_lora._cli import main

    run = fake_run(tmp_path)
    dino, clip = models
    assert (
        main(["compare", str(run), "--train-images", str(run / "train"), "--dino", str(dino), "--clip", str(clip)]) == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = lines.index(f"likeness (DINO {dino}, CLIP {clip}; docs/choosing.md):")
    assert lines[at - 1] == f"likeness chart: {run / (NAME + '.likeness.png')}"
    assert (run / f"{NAME}.likeness.png").is_file() and (run / f"{NAME}.contact-sheet.png").is_file()
    header = lines[at + 1].split()
    assert header[:7] == ["step", "held-out", "drift", "DINO", "CLIP-I", "CLIP-T", "copies"]
    assert lines[at + 2].split()[0] == "base"
    assert lines[-1].startswith("recommended: step ") and lines[-1].endswith(".safetensors")
    found = score(run, models)
    assert lines[at + 1 :] == found.table().splitlines()


def test_compare_with_a_missing_model_is_refused_before_the_sheet_is_written(tmp_path, capsys):
    from spyke_lora._cli import main

    run = fake_run(tmp_path)
    assert main(["compare", str(run), "--train-images", str(run / "train"), "--dino", str(tmp_path / "no")]) == 2
    assert "is not a folder on this machine" in capsys.readouterr().err
    assert not (run / f"{NAME}.contact-sheet.png").exists() and not (run / f"{NAME}.likeness.png").exists()
