"""plan(): every bad input refused before anything loads, each message naming its file or field; the step math."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spyke_lora import ConfigError, TrainConfig, plan
from spyke_lora._cli import main

from .conftest import write_images, write_model


def test_a_good_dataset_plans(good):
    p = plan(good)
    assert (p.device, p.mixed_precision, p.model_family) == ("cpu", "no", "sd1")
    assert [(s.folder.name, s.images, s.captions, s.repeats, s.is_reg) for s in p.subsets] == [
        ("10_spyke_plasma_v1", 3, 3, 10, False),
        ("1_person", 2, 2, 1, True),
    ]
    assert (p.batches_per_epoch, p.steps_per_epoch, p.total_steps, p.epochs) == (60, 60, 5, 1)  # 30 train + 30 reg
    assert p.checkpoints == (
        (2, good.output_dir / "spyke_plasma_v1-step00000002.safetensors"),
        (4, good.output_dir / "spyke_plasma_v1-step00000004.safetensors"),
    )
    assert p.final_path == good.output_dir / "spyke_plasma_v1.safetensors"
    assert p.warnings == ()
    assert "--pretrained_model_name_or_path" in p.argv
    text = str(p)
    assert "steps           60 per epoch x 1 epochs = 5" in text and "checkpoints     2, 4, final" in text
    assert not good.output_dir.exists()  # a dry run writes nothing


# --- one case per bad input: (what to break, the phrase the message must contain, the path it must name) ----------


def sdxl_model(cfg):
    write_model(cfg.base_model, "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight")
    return cfg, "sdxl", cfg.base_model


def truncated_model(cfg):
    data = cfg.base_model.read_bytes()
    cfg.base_model.write_bytes(data[:-3])
    return cfg, "truncated", cfg.base_model


def pickle_model(cfg):
    ckpt = cfg.base_model.with_suffix(".ckpt")
    ckpt.write_bytes(b"PK\x03\x04 a zip of pickles")
    return cfg.replace(base_model=ckpt), "pickle", ckpt


def missing_train_dir(cfg):
    return cfg.replace(train_dir=cfg.train_dir.with_name("10_nowhere")), "does not exist", "10_nowhere"


def empty_train_dir(cfg):
    for p in cfg.train_dir.iterdir():
        p.unlink()
    return cfg, "has no images", cfg.train_dir


def truncated_image(cfg):
    image = cfg.train_dir / "img001.png"
    image.write_bytes(image.read_bytes()[:60])
    return cfg, "cannot be decoded (truncated or corrupt)", image


def jpeg_named_png(cfg):
    image = cfg.train_dir / "img002.png"
    Image.open(image).convert("RGB").save(image, format="JPEG")
    return cfg, "is JPEG: rename it to img002.jpg", image


def missing_caption(cfg):
    (cfg.train_dir / "img000.txt").unlink()
    return cfg, "caption file(s) in `train_dir` are missing", cfg.train_dir / "img000.txt"


def empty_caption(cfg):
    (cfg.train_dir / "img000.txt").write_text("  \n")
    return cfg, "caption file(s) in `train_dir` have no text", cfg.train_dir / "img000.txt"


def wrong_size_without_buckets(cfg):
    write_images(cfg.train_dir, 1, "spyke_plasma_v1, big", size=96, start=7)
    return cfg, "are not 64x64, which sd-scripts needs with bucketing off", cfg.train_dir / "img007.png"


def buckets_rejected(cfg):
    return (
        cfg.replace(enable_bucket=True),
        "`extra_args.min_bucket_reso` is 256 but `resolution` is 64",
        "min_bucket_reso",
    )


def same_stem_twice(cfg):
    Image.open(cfg.train_dir / "img000.png").convert("RGB").save(cfg.train_dir / "img000.jpg")
    return cfg, "share the stem 'img000'", cfg.train_dir / "img000.jpg"


def broken_reg_image(cfg):
    image = cfg.reg_dir / "img000.png"
    image.write_bytes(b"not an image at all")
    return cfg, "image(s) in `reg_dir` cannot be decoded", image


def dataset_toml_subset_missing(cfg):
    toml_path = cfg.train_dir.parent / "my_dataset.toml"
    toml_path.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "gone"\nnum_repeats = 2\n')
    changed = cfg.replace(train_dir=None, reg_dir=None, dataset_config=toml_path)
    return changed, "my_dataset.toml datasets[0].subsets[0] folder", cfg.train_dir.parent / "gone"


def augmentation_with_cached_latents(cfg):
    toml_path = cfg.train_dir.parent / "augmented.toml"
    toml_path.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{cfg.train_dir}"\ncolor_aug = true\n')
    changed = cfg.replace(train_dir=None, reg_dir=None, dataset_config=toml_path)
    return changed, "augmented.toml datasets[0].subsets[0] sets color_aug", "cache_latents = false"


def earlier_lora_exists(cfg):
    cfg.output_dir.mkdir()
    (cfg.output_dir / "spyke_plasma_v1-step00000200.safetensors").write_bytes(b"an earlier LoRA")
    return cfg, "already exist", "spyke_plasma_v1-step00000200.safetensors"


BAD = [
    sdxl_model,
    truncated_model,
    pickle_model,
    missing_train_dir,
    empty_train_dir,
    truncated_image,
    jpeg_named_png,
    missing_caption,
    empty_caption,
    wrong_size_without_buckets,
    buckets_rejected,
    same_stem_twice,
    broken_reg_image,
    dataset_toml_subset_missing,
    augmentation_with_cached_latents,
    earlier_lora_exists,
]


@pytest.mark.parametrize("breaker", BAD, ids=lambda f: f.__name__)
def test_bad_input_is_refused_naming_the_file(good, breaker):
    cfg, phrase, names = breaker(good)
    before = sorted(cfg.output_dir.rglob("*")) if cfg.output_dir.exists() else None
    with pytest.raises(ConfigError) as info:
        plan(cfg)
    message = str(info.value)
    assert phrase.lower() in message.lower()
    assert str(names) in message
    after = sorted(cfg.output_dir.rglob("*")) if cfg.output_dir.exists() else None
    assert after == before  # nothing written


def test_problems_are_reported_together(good):
    (good.train_dir / "img000.txt").unlink()
    (good.train_dir / "img001.png").write_bytes(b"broken")
    with pytest.raises(ConfigError) as info:
        plan(good.replace(train_dir=good.train_dir, reg_dir=good.reg_dir.with_name("gone")))
    assert len(info.value.problems) == 3  # missing caption, broken image, missing regularisation folder


# --- images are checked by walking their container (PNG, JPEG, WEBP), not decoded; other formats still decode ------

SAVE = {"png": {"format": "PNG"}, "jpg": {"format": "JPEG", "quality": 95}, "webp": {"format": "WEBP", "quality": 90}}


def noise_image(cfg, ext: str, **save) -> Path:
    """img001 of `good` as a 64 px random-noise image in another format (noise: the data is most of the file)."""
    (cfg.train_dir / "img001.png").unlink()
    image = cfg.train_dir / f"img001.{ext}"
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(pixels).save(image, **(save or SAVE[ext]))
    return image


def refused_as_broken(cfg, image: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan(cfg)
    assert "image(s) in `train_dir` cannot be decoded (truncated or corrupt)" in str(info.value)
    assert str(image) in str(info.value)


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_valid_images_pass_without_being_decoded(good, ext, monkeypatch):
    from PIL import ImageFile

    noise_image(good, ext)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"{self.format} decoded"))
    assert plan(good).warnings == ()


@pytest.mark.parametrize("keep", [0.5, 0.9, -2], ids=["half", "90%", "all-but-2-bytes"])
@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_a_truncated_image_is_refused(good, ext, keep):
    image = noise_image(good, ext)
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * keep) if keep > 0 else keep])
    refused_as_broken(good, image)


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_each_container_check_finds_every_cut(good, ext):
    """The walks themselves, every length: Pillow's WEBP plugin already fails to open a cut file, so plan() alone
    would not show that the RIFF size check works."""
    from spyke_lora._preflight import STRUCTURE_CHECKS

    image = noise_image(good, ext)
    with Image.open(image) as im:
        check, data = STRUCTURE_CHECKS[im.format], image.read_bytes()
    assert check(image) is None
    for cut in range(12, len(data), 7):
        image.write_bytes(data[:cut])
        assert check(image) is not None, cut


def test_a_png_with_a_flipped_byte_in_its_image_data_is_refused(good):
    image = noise_image(good, "png")
    data = bytearray(image.read_bytes())
    data[data.index(b"IDAT") + 100] ^= 0x01  # inside the compressed pixels: the chunk's CRC no longer matches
    image.write_bytes(bytes(data))
    refused_as_broken(good, image)


def test_data_after_a_jpegs_end_is_accepted(good):
    """Cameras and phones append data after EOI (a Motion Photo's video: megabytes); decoders stop at EOI."""
    image = noise_image(good, "jpg")
    image.write_bytes(image.read_bytes() + b"\xff\xd8 a trailer " + bytes(200_000))
    assert plan(good).warnings == ()


def test_a_progressive_jpeg_cut_between_its_scans_is_refused(good):
    image = noise_image(good, "jpg", format="JPEG", quality=90, progressive=True)
    data = image.read_bytes()
    assert plan(good).warnings == ()
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    image.write_bytes(data[:second_scan])  # a complete first scan, then nothing
    refused_as_broken(good, image)


def test_a_truncated_bmp_is_caught_by_the_full_decode(good):
    image = noise_image(good, "bmp", format="BMP")
    assert plan(good).warnings == ()
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # Image.open reads the header; load() fails
    refused_as_broken(good, image)


def test_warnings_do_not_stop_the_run(good):
    (good.train_dir / "img000.txt").write_text("red disc, spyke_plasma_v1")
    (good.reg_dir / "img001.txt").unlink()
    cfg = good.replace(network_alpha=64.0, flip_aug=True, save_every_n_steps=50, num_repeats=4)
    warnings = plan(cfg).warnings
    assert any("`num_repeats` is 4 but the folder name '10_spyke_plasma_v1' says 10: 4 is used" in w for w in warnings)
    assert any("do not start with the trigger 'spyke_plasma_v1'" in w and "img000.txt" in w for w in warnings)
    assert any("in `reg_dir` are missing" in w for w in warnings)  # regularisation may use the class token
    assert any("`network_alpha` 64 is above `network_dim` 32" in w for w in warnings)
    assert any("`flip_aug` is on" in w for w in warnings)
    assert any("`save_every_n_steps` 50 is more than the run's 5 steps" in w for w in warnings)
    small = plan(good.replace(resolution=128, enable_bucket=True, extra_args={"min_bucket_reso": 64})).warnings
    assert any("smaller than the resolution 128" in w for w in small)


def test_spyke_step_math_is_sd_scripts_own(tmp_path):
    """23 images x 10 repeats + 100 regularisation images: sd-scripts pairs each training batch with a
    regularisation batch, so 460 steps per epoch; 2 epochs are the intended 920 steps, 4 epochs would be 1840."""
    write_model(tmp_path / "model.safetensors")
    write_images(tmp_path / "10_spyke_plasma_v1", 23, "spyke_plasma_v1, pose")
    write_images(tmp_path / "reg" / "1_anime_character", 100, "anime character")
    write_images(tmp_path / "val" / "1_spyke_plasma_v1", 3, "spyke_plasma_v1, held out", size=72)  # other bytes
    cfg = TrainConfig.from_toml(Path(__file__).parents[2] / "examples" / "spyke.toml").replace(
        base_model=tmp_path / "model.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        reg_dir=tmp_path / "reg" / "1_anime_character",
        output_dir=tmp_path / "out",
        device="cpu",
        validation_dir=tmp_path / "val" / "1_spyke_plasma_v1",
        extra_args={"min_bucket_reso": 64},  # the generated images are 64 px; the real ones are 512+
    )
    p = plan(cfg)
    assert any("smaller than the resolution 512" in w for w in p.warnings)  # the generated images are 64 px
    assert (p.steps_per_epoch, p.epochs, p.total_steps) == (460, 2, 920)
    assert [step for step, _ in p.checkpoints] == [200, 400, 600, 800]
    assert (p.validation.images, p.validation.steps) == (3, (200, 400, 600, 800, 920))  # a pass at every file
    assert p.checkpoints[0][1].name == "spyke_plasma_v1-step00000200.safetensors"
    assert p.final_path.name == "spyke_plasma_v1.safetensors"
    assert (p.subsets[0].images, p.subsets[0].repeats, p.subsets[1].images, p.subsets[1].is_reg) == (23, 10, 100, True)
    # 4 checkpoints + final at ~75.6 MB, each with its training state (fp32 weights + AdamW moments: 3 x 75.6 MB)
    assert p.estimated_disk_bytes == pytest.approx(5 * 4 * 75.6e6)
    assert plan(cfg.replace(save_state=False)).estimated_disk_bytes == pytest.approx(5 * 75.6e6)
    assert plan(cfg.replace(max_train_epochs=4)).total_steps == 1840


def test_plan_command(good, tmp_path, capsys):
    path = good.to_toml(tmp_path / "c.toml")
    assert main(["plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()  # the plan of `good`: 5 steps, a checkpoint every 2
    assert "steps           60 per epoch x 1 epochs = 5" in lines
    assert "checkpoints     2, 4, final" in lines
    assert f"  {good.output_dir / 'spyke_plasma_v1-step00000004.safetensors'}" in lines
    assert f"  {good.output_dir / 'spyke_plasma_v1.safetensors'}" in lines
    assert main(["plan", str(path), "--set", "resolution=100"]) == 2
    assert "`resolution` must be a multiple of 64, got 100; try 128" in capsys.readouterr().err
    assert main(["plan", str(path), "--set", "save_every_n_steps=3", "--set", "output_name=other"]) == 0
    out = capsys.readouterr().out
    assert "other-step00000003.safetensors" in out


def test_not_enough_disk_is_refused(good, monkeypatch):
    from spyke_lora._preflight import _outputs

    monkeypatch.setattr(_outputs, "free_disk", lambda folder: 50_000_000)
    with pytest.raises(ConfigError, match=r"`output_dir` .* has 50 MB free, and the run writes about 227 MB \(3 files"):
        plan(good)


def test_a_run_on_an_output_in_use_is_refused_before_loading(good):
    from spyke_lora import OutputInUse, train

    from .test_lock import held_by_another_process

    good.output_dir.mkdir()
    with (
        held_by_another_process(good.output_dir, good.output_name) as holder,
        pytest.raises(OutputInUse, match=f"process {holder.pid}"),
    ):
        train(good)
    assert [p.name for p in good.output_dir.iterdir()] == [".spyke_plasma_v1.lock"]  # nothing else written


def test_samples_in_the_plan_and_prompts_without_the_trigger(good):
    p = plan(good)
    assert p.samples_per_checkpoint == 9
    assert (
        "samples         3 prompts x CFG 5, 7, 9 (20 steps, euler_a, 64 px, seed 1234) = 9 images per saved file"
        in str(p)
    )
    assert "--sample_prompts" in p.argv and "--sample_every_n_steps" not in p.argv
    other = good.replace(sample_prompts=("spyke_plasma_v1, in the rain", "a cat"), sample_cfg_scales=(7,))
    assert any("`sample_prompts` [1] do not contain the trigger 'spyke_plasma_v1'" in w for w in plan(other).warnings)
    off = plan(good.replace(sample_prompts=()))
    assert "samples         none" in str(off) and "--sample_prompts" not in off.argv


def test_sample_settings_are_checked(good):
    with pytest.raises(ConfigError) as refused:
        good.replace(sample_prompts=("spyke_plasma_v1 --l 3",), sample_size=100, sample_cfg_scales=())
    text = str(refused.value)
    assert "`sample_prompts[0]` must be one non-empty line without ' --'" in text
    assert "`sample_size` must be a multiple of 8, got 100; try 96" in text
    assert "`sample_cfg_scales` is empty" in text
    with pytest.raises(ConfigError, match="`extra_args.sample_every_n_steps` cannot be set: every saved checkpoint"):
        plan(good.replace(extra_args={"sample_every_n_steps": 10}))


def test_the_prompt_file_is_one_line_per_prompt_and_scale(good):
    from spyke_lora._engine._argv import sample_prompts_text

    cfg = good.replace(
        sample_prompts=("a", "b"),
        sample_cfg_scales=(5, 7.5),
        sample_negative_prompt="lowres",
        sample_size=96,
        sample_steps=4,
        sample_seed=7,
    )
    assert sample_prompts_text(cfg).splitlines()[1:] == [
        "a --n lowres --w 96 --h 96 --d 7 --l 5.0 --s 4",
        "a --n lowres --w 96 --h 96 --d 7 --l 7.5 --s 4",
        "b --n lowres --w 96 --h 96 --d 7 --l 5.0 --s 4",
        "b --n lowres --w 96 --h 96 --d 7 --l 7.5 --s 4",
    ]


def test_tensorboard_option(good, monkeypatch):
    import importlib.util

    argv = plan(good.replace(tensorboard=True)).argv
    i = argv.index("--logging_dir")
    assert argv[i + 1] == str(good.output_dir / "tensorboard") and argv[argv.index("--log_with") + 1] == "tensorboard"
    with pytest.raises(ConfigError, match="`extra_args.logging_dir` cannot be combined with `tensorboard = true`"):
        plan(good.replace(tensorboard=True, extra_args={"logging_dir": "/x"}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the tensorboard package.*pip install 'spyke-lora\[tensorboard\]'"):
        plan(good.replace(tensorboard=True))


def test_a_phone_jpeg_with_more_pictures_mpo_is_walked_not_decoded(good, monkeypatch):
    """Phones save a depth or gain map after the photo; Pillow opens such a file as MPO. Its first picture is
    walked like a JPEG (the rest is data after its EOI), and a file cut inside it is refused."""
    from PIL import ImageFile

    (good.train_dir / "img001.png").unlink()
    image = good.train_dir / "img001.jpg"
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(pixels).save(image, format="MPO", save_all=True, append_images=[Image.fromarray(pixels[::-1])])
    with Image.open(image) as im:
        assert im.format == "MPO"
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"{self.format} decoded"))
        plan(good)
    data = image.read_bytes()
    first_end = data.index(b"\xff\xd9") + 2
    image.write_bytes(data[: first_end // 2])
    refused_as_broken(good, image)


# --- the checks are rules: a function of (context, findings) in its group's module, run in the order of a list ----


def test_a_new_rule_is_a_function_in_the_list(good):
    """A check added to INPUT_RULES (or FOLDER_RULES, for every folder) is run in its place, and its problems and
    warnings are reported with the others, in order."""
    from spyke_lora import _preflight

    def check_output_name(ctx, found):
        if ctx.cfg.output_name.endswith("_v1"):
            found.problem(f"`output_name` {ctx.cfg.output_name!r} ends with _v1")
        else:
            found.warning(f"`output_name` {ctx.cfg.output_name!r} has no version")

    def check_every_folder(folder, found):
        found.problem(f"{folder.where} has {len(folder.images)} images")

    _preflight.INPUT_RULES.append(check_output_name)
    _preflight.FOLDER_RULES.insert(0, check_every_folder)
    try:
        (good.train_dir / "img000.txt").unlink()
        with pytest.raises(ConfigError) as info:
            plan(good)
        _preflight.FOLDER_RULES.remove(check_every_folder)
        (good.train_dir / "img000.txt").write_text("spyke_plasma_v1, red disc")
        warnings = plan(good.replace(output_name="other")).warnings
    finally:
        _preflight.INPUT_RULES.remove(check_output_name)
        if check_every_folder in _preflight.FOLDER_RULES:
            _preflight.FOLDER_RULES.remove(check_every_folder)
    assert info.value.problems == (
        "`train_dir` has 3 images",
        f"1 caption file(s) in `train_dir` are missing: {good.train_dir / 'img000.txt'}; sd-scripts would train on "
        f"the folder's class token 'spyke_plasma_v1' instead",
        "`reg_dir` has 2 images",
        "`output_name` 'spyke_plasma_v1' ends with _v1",
    )
    assert warnings == ("`output_name` 'other' has no version",)


def test_the_run_checks_are_reported_together(good, monkeypatch):
    """The checks that need the step count (memory, the steps left to a resume, the disk) run once the inputs
    passed, and their problems come in one ConfigError, as the inputs' do."""
    from spyke_lora._preflight import _outputs

    monkeypatch.setattr(_outputs, "free_disk", lambda folder: 50_000_000)
    with pytest.raises(ConfigError) as info:
        plan(good.replace(memory_limit="1MB"))
    first, second = info.value.problems
    assert first.startswith("the run's predicted peak memory") and "is above `memory_limit` 0.00 GiB" in first
    assert second.startswith(f"`output_dir` {str(good.output_dir)!r} has 50 MB free")


def test_findings_and_contexts():
    from spyke_lora._preflight import Derived, Findings, names

    found, other = Findings(), Findings(["p"], ["w"])
    found.problem("a")
    found.add(other)
    found.warning("v")
    assert (found.problems, found.warnings) == (["a", "p"], ["w", "v"])
    assert Derived("sd1").problems == ()
    assert names(list(range(7))) == "0, 1, 2, 3, 4 ... and 2 more"


def test_reg_dir_above_a_kohya_folder_offers_the_folder_inside(good):
    parent = good.train_dir.parent / "reg"  # holds reg/1_person, has no image of its own
    with pytest.raises(ConfigError) as e:
        plan(good.replace(reg_dir=parent, reg_repeats=1))
    assert any(
        "`reg_dir` " in p and "holds the kohya dataset folder '1_person' instead of being one" in p
        and f"set `reg_dir = {str(parent / '1_person')!r}`" in p for p in e.value.problems
    ), e.value.problems  # fmt: skip
