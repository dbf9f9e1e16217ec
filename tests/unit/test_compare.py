"""Contact sheets, sample checks and checkpoint ranking, on a fake run folder of generated images (no engine)."""

import json
import struct

import numpy as np
import pytest
from PIL import Image

from spyke_lora._cli import main
from spyke_lora._compare import (
    ColourHistogramScorer,
    check_sample,
    contact_sheet,
    rank_checkpoints,
    review,
    sheet_layout,
)
from spyke_lora._compare._sheet import MISSING
from spyke_lora._errors import ConfigError

NAME = "spyke_plasma_v1"
PROMPTS = ["spyke_plasma_v1, standing, full body", "spyke_plasma_v1, crouching, side view"]
CFGS = [5.0, 7.0]
STEPS = [200, 400]


def noise_image(seed: int, size: int = 64) -> Image.Image:
    """A picture: a random smooth gradient plus blocks; different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(0, 1) * x + rng.uniform(0, 1) * y for _ in range(3)], axis=2)
    blocks = np.kron(rng.uniform(0, 1, (8, 8, 3)), np.ones((size // 8, size // 8, 1)))
    return Image.fromarray(((0.5 * base + 0.5 * blocks).clip(0, 1) * 255).astype(np.uint8))


def write_checkpoint(path, step):
    """A LoRA file as far as its header tells (one 4-byte tensor), saved at ``step`` (its ``ss_steps``)."""
    text = json.dumps(
        {
            "__metadata__": {"ss_steps": str(step)},
            "lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    return path


def fake_run(folder, steps=STEPS, prompts=PROMPTS, cfgs=CFGS, image=None, extra_lines=()):
    """A run folder: a sample per step x prompt x CFG and its manifest, and each step's LoRA file."""
    (folder / "sample").mkdir(parents=True, exist_ok=True)
    for step in steps:
        if step:
            write_checkpoint(folder / f"{NAME}-step{step:08d}.safetensors", step)
    lines = []
    seed = 0
    for step in steps:
        for p, prompt in enumerate(prompts):
            for c, cfg in enumerate(cfgs):
                seed += 1
                rel = f"sample/{NAME}_{step:06d}_{p * len(cfgs) + c:02d}_20261124120000_1234.png"
                (image(step, prompt, cfg) if image else noise_image(seed)).save(folder / rel)
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
    lines += list(extra_lines)
    (folder / f"{NAME}.samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def region(sheet, box):
    return np.asarray(sheet.crop(box), dtype=np.float64)


# --- the sheet ------------------------------------------------------------------------------------------------------


def test_the_sheet_has_a_row_per_step_and_a_column_per_prompt_and_cfg(tmp_path):
    run = fake_run(tmp_path / "run")
    path = contact_sheet(run, cell=128)
    assert path == (run / f"{NAME}.contact-sheet.png").absolute()
    layout = sheet_layout(2, 4, 128)
    sheet = Image.open(path).convert("RGB")
    assert sheet.size == (layout.width, layout.height)
    assert layout.width == layout.label_width + 4 * (128 + layout.gap) + layout.gap
    assert layout.height == layout.header_height + 2 * (128 + layout.gap) + layout.gap
    cells = [region(sheet, layout.cell_box(r, c)) for r in range(2) for c in range(4)]
    for i, a in enumerate(cells):
        assert a.std() > 10  # a picture, not a flat fill
        for b in cells[i + 1 :]:
            assert np.abs(a - b).mean() > 5
    # the cell shows its own sample: step 400, second prompt, CFG 5 is the 7th image made
    expected = np.asarray(noise_image(7).resize((128, 128), Image.Resampling.LANCZOS), dtype=np.float64)
    assert np.abs(region(sheet, layout.cell_box(1, 2)) - expected).mean() < 3
    for r in range(2):
        assert (region(sheet, layout.label_box(r)) < 128).any()  # "step 200", the file name
    for c in range(4):
        assert (region(sheet, layout.header_box(c)) < 128).any()  # prompt, "CFG 5"
    assert not hidden_files(run)


def hidden_files(folder):
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_the_label_font_is_readable_at_256(tmp_path):
    layout = sheet_layout(3, 9, 256)
    assert 14 <= layout.font_size <= 16
    assert layout.cell_box(0, 0)[2] - layout.cell_box(0, 0)[0] == 256
    with pytest.raises(ConfigError, match="at least 64 px"):
        sheet_layout(1, 1, 10)


def test_a_missing_image_is_a_grey_cell_and_a_warning(tmp_path):
    run = fake_run(tmp_path / "run")
    missing = next((run / "sample").glob(f"{NAME}_000400_01_*.png"))
    missing.unlink()
    rv = review(run, train_images=())
    cell = rv.cell(400, PROMPTS[0], 7.0)
    assert [w.kind for w in cell.warnings] == ["missing"]
    assert any(
        line.startswith('step 400, CFG 7, "spyke_plasma_v1, standing, full body": image missing: sample/')
        for line in rv.warnings
    )
    sheet = Image.open(contact_sheet(run, cell=128, train_images=())).convert("RGB")
    box = sheet_layout(2, 4, 128).cell_box(1, 1)
    pixels = region(sheet, box).reshape(-1, 3)
    grey = (pixels == MISSING).all(axis=1).mean()
    assert grey > 0.8 and (pixels < 60).any()  # grey, with the word "missing"


def test_a_letterboxed_sample_keeps_its_aspect(tmp_path):
    run = fake_run(
        tmp_path / "run",
        steps=[200],
        prompts=PROMPTS[:1],
        cfgs=[7.0],
        image=lambda *a: noise_image(3).resize((128, 64)),
    )
    sheet = Image.open(contact_sheet(run, cell=128)).convert("RGB")
    x0, y0, x1, _ = sheet_layout(1, 1, 128).cell_box(0, 0)
    top = region(sheet, (x0, y0, x1, y0 + 30))
    assert (top == 40).all()  # the letterbox above the picture
    assert region(sheet, (x0, y0 + 40, x1, y0 + 88)).std() > 10


def test_later_manifest_lines_supersede_earlier_ones(tmp_path):
    run = fake_run(tmp_path / "run")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(run / "sample" / "resampled.png")
    extra = {
        "step": 200,
        "prompt": PROMPTS[1],
        "cfg_scale": 5,
        "seed": 1234,
        "path": "sample/resampled.png",
        "checkpoint": str(run / f"{NAME}-step00000200.safetensors"),
    }
    with (run / f"{NAME}.samples.jsonl").open("a") as f:
        f.write(json.dumps(extra) + "\n" + '{"step": 600, "prom')  # and a line cut short by a kill
    rv = review(run, train_images=())
    assert [s.step for s in rv.steps] == [200, 400]
    assert rv.columns == tuple((p, c) for p in PROMPTS for c in CFGS)
    cell = rv.cell(200, PROMPTS[1], 5.0)
    assert cell.path == run / "sample" / "resampled.png"
    assert cell.checkpoint == f"{NAME}-step00000200.safetensors"
    assert [w.kind for w in cell.warnings] == ["black"]
    assert len(rv.cells) == 8


def test_columns_follow_the_prompts_first_appearance_then_cfg(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 200], prompts=PROMPTS[::-1], cfgs=[9.0, 5.0])
    rv = review(run, train_images=())
    assert rv.columns == ((PROMPTS[1], 5.0), (PROMPTS[1], 9.0), (PROMPTS[0], 5.0), (PROMPTS[0], 9.0))
    assert [s.step for s in rv.steps] == [0, 200] and rv.steps[0].checkpoint is None
    assert rv.warnings == ()


# --- the checks -----------------------------------------------------------------------------------------------------


def test_black_uniform_and_nan_samples_are_named():
    assert [w.kind for w in check_sample(Image.new("RGB", (64, 64)))] == ["black"]
    noisy_black = np.random.default_rng(0).integers(0, 3, (64, 64, 3)).astype(np.uint8)
    assert [w.message for w in check_sample(noisy_black)] == ["all black (NaN weights?)"]
    flat = check_sample(Image.new("RGB", (64, 64), (128, 130, 90)))
    assert [(w.kind, w.message) for w in flat] == [("uniform", "one flat colour (rgb 128, 130, 90): no picture")]
    nan = np.full((16, 16), np.nan, np.float32)
    assert [w.kind for w in check_sample(Image.fromarray(nan, "F"))] == ["nan", "black"]
    dark_scene = np.zeros((64, 64, 3), np.uint8)
    dark_scene[20:30, 20:30] = 200  # a lamp in the night: not black
    assert check_sample(dark_scene) == []
    assert check_sample(noise_image(1)) == []


def test_a_copy_or_mirror_of_a_training_image_is_a_near_duplicate(tmp_path):
    train = tmp_path / "10_spyke_plasma_v1"
    train.mkdir()
    for i in range(4):
        noise_image(100 + i).save(train / f"img{i}.png")
    paths = sorted(train.iterdir())
    copy = noise_image(102).resize((512, 512), Image.Resampling.BICUBIC)
    (found,) = check_sample(copy, paths)
    assert found.kind == "near-duplicate" and found.path == train / "img2.png"
    assert found.message == "near-duplicate of training image 10_spyke_plasma_v1/img2.png (memorised?)"
    mirror = noise_image(101).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (found,) = check_sample(mirror, paths)
    assert found.path == train / "img1.png" and "(mirrored)" in found.message
    assert check_sample(noise_image(5), paths) == []


def test_the_run_config_names_the_training_images(tmp_path):
    run = fake_run(tmp_path / "run")
    train = tmp_path / "data" / "10_spyke_plasma_v1"
    train.mkdir(parents=True)
    noise_image(3).save(train / "pose3.png")  # sample of step 200, prompt 1, CFG 5 is noise_image(3)
    noise_image(50).save(train / "other.jpg", quality=95)
    (run / f"{NAME}.config.toml").write_text(
        'output_name = "spyke_plasma_v1"\ntrain_dir = "../data/10_spyke_plasma_v1"\n'
    )
    rv = review(run)
    assert set(rv.train_images) == {train / "pose3.png", train / "other.jpg"}
    assert [w.kind for w in rv.cell(200, PROMPTS[1], 5.0).warnings] == ["near-duplicate"]
    assert rv.warnings == (
        (
            'step 200, CFG 5, "spyke_plasma_v1, crouching, side view": near-duplicate of training image '
            "10_spyke_plasma_v1/pose3.png (memorised?) — sample/spyke_plasma_v1_000200_02_20261124120000_1234.png"
        ),
    )
    assert review(run, train_images=()).warnings == ()


def test_a_step_of_black_samples_is_broken(tmp_path):
    run = fake_run(
        tmp_path / "run",
        steps=[200, 400, 600],
        image=lambda step, p, c: Image.new("RGB", (64, 64)) if step == 400 else noise_image(step + int(c) + len(p)),
    )
    rv = review(run, train_images=())
    assert [s.broken for s in rv.steps] == [False, True, False]
    assert (
        rv.warnings[-1] == "step 400: every sample is black, flat or NaN: the weights are broken; do not use this file"
    )
    assert sum("all black (NaN weights?)" in line for line in rv.warnings) == 4


# --- ranking --------------------------------------------------------------------------------------------------------


class Brightness:
    name = "brightness"

    def __init__(self):
        self.calls = []

    def __call__(self, samples, train_images):
        self.calls.append((list(samples), list(train_images)))
        return float(np.mean([np.asarray(Image.open(p)).mean() for p in samples]))


def test_checkpoints_are_ranked_best_first_broken_last(tmp_path):
    levels = {0: 100, 200: 60, 400: 200, 600: 2, 800: 120}

    def image(step, prompt, cfg):
        if step == 600:
            return Image.new("RGB", (64, 64))
        return Image.fromarray(np.clip(np.asarray(noise_image(step)) * 0.2 + levels[step], 0, 255).astype(np.uint8))

    run = fake_run(tmp_path / "run", steps=[0, 200, 400, 600, 800], image=image)
    scorer = Brightness()
    ranking = rank_checkpoints(run, scorer, train_images=())
    assert [step for step, _ in ranking] == [400, 800, 200, 600]  # no base model; the black step last
    assert ranking[0][1] > ranking[1][1] > ranking[2][1]
    assert len(scorer.calls) == 4 and all(len(samples) == 4 for samples, _ in scorer.calls)
    rv = review(run, train_images=(), scorer=Brightness())
    assert rv.scorer == "brightness" and rv.steps[2].score == pytest.approx(ranking[0][1])
    # the sheet draws each ranked step's score under its file name: with a scorer, the label of every step but the
    # base model's changes, and nothing else in the rows does
    plain = Image.open(contact_sheet(run, out=tmp_path / "plain.png", cell=96, train_images=())).convert("RGB")
    scored = Image.open(contact_sheet(run, out=tmp_path / "scored.png", cell=96, train_images=(), scorer=Brightness()))
    scored = scored.convert("RGB")
    layout = sheet_layout(5, 4, 96)
    assert plain.size == scored.size == (layout.width, layout.height)
    labels_changed = [
        not np.array_equal(region(plain, layout.label_box(r)), region(scored, layout.label_box(r))) for r in range(5)
    ]
    assert labels_changed == [False, True, True, True, True]  # steps 0 (base, not ranked), 200, 400, 600, 800
    for r in range(5):
        for c in range(4):
            assert np.array_equal(region(plain, layout.cell_box(r, c)), region(scored, layout.cell_box(r, c)))


def test_the_colour_histogram_scorer_prefers_the_training_palette(tmp_path):
    def palette(colours, seed):
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(colours), (8, 8))
        return Image.fromarray(np.kron(np.array(colours, np.uint8)[pick], np.ones((8, 8, 1), np.uint8)))

    train_colours = [(220, 30, 40), (250, 200, 60), (30, 30, 30)]
    other_colours = [(40, 90, 220), (60, 200, 120), (240, 240, 240)]
    for i in range(3):
        palette(train_colours, i).save(tmp_path / f"train{i}.png")
        palette(train_colours, 10 + i).save(tmp_path / f"good{i}.png")
        palette(other_colours, 20 + i).save(tmp_path / f"bad{i}.png")
    train = [tmp_path / f"train{i}.png" for i in range(3)]
    scorer = ColourHistogramScorer()
    good = scorer([tmp_path / f"good{i}.png" for i in range(3)], train)
    bad = scorer([tmp_path / f"bad{i}.png" for i in range(3)], train)
    assert 0 <= bad < good <= 1 and good > 0.8 and bad < 0.2
    with pytest.raises(ConfigError, match="needs the training images"):
        ColourHistogramScorer()([tmp_path / "good0.png"], [])


# --- errors and the command -----------------------------------------------------------------------------------------


def test_a_folder_without_samples_is_refused_with_the_way_to_make_them(tmp_path):
    with pytest.raises(ConfigError, match=r"has no NAME\.samples\.jsonl.*`sample_prompts`.*`spyke-lora sample`"):
        contact_sheet(tmp_path)
    fake_run(tmp_path)
    (tmp_path / "other.samples.jsonl").write_text((tmp_path / f"{NAME}.samples.jsonl").read_text())
    with pytest.raises(ConfigError, match=r"several runs \(other, spyke_plasma_v1\).*--name"):
        review(tmp_path)
    with pytest.raises(ConfigError, match=r"no nope\.samples\.jsonl \(it has the samples of other, spyke_plasma_v1\)"):
        review(tmp_path, "nope")
    assert review(tmp_path, NAME, train_images=()).name == NAME
    assert review(tmp_path / "other.samples.jsonl", train_images=()).name == "other"


def test_the_compare_command_writes_the_sheet_and_prints_the_warnings(tmp_path, capsys):
    run = fake_run(
        tmp_path / "run",
        image=lambda s, p, c: Image.new("RGB", (64, 64)) if s == 400 and c == 7 else noise_image(s + int(c) + len(p)),
    )
    assert main(["compare", str(run), "--cell", "96", "--out", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    assert f"contact sheet: {tmp_path / 'sheet.png'}" in out
    assert out.count("warning: step 400, CFG 7") == 2 and "all black (NaN weights?)" in out
    assert Image.open(tmp_path / "sheet.png").size == (sheet_layout(2, 4, 96).width, sheet_layout(2, 4, 96).height)
    assert main(["compare", str(run), "--name", NAME]) == 0
    assert (run / f"{NAME}.contact-sheet.png").is_file()
