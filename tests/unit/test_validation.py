"""Held-out validation before anything loads: the config fields, the plan's passes, and the refusals."""

import pytest

from spyke_lora import ConfigError, ValidationPlan, plan
from spyke_lora._engine import dataset_toml_text
from spyke_lora._engine._held_out import validation_spec

from .conftest import write_images


@pytest.fixture
def held_out(good):
    folder = good.train_dir.parent / "val" / "1_spyke_plasma_v1"
    write_images(folder, 2, "spyke_plasma_v1, blue square", start=50)  # other pixels than the training images
    return good.replace(validation_dir=folder)


def test_the_plan_shows_the_held_out_images_and_a_pass_at_every_saved_file(held_out):
    p = plan(held_out)
    images = tuple(held_out.validation_dir / f"img{i:03d}.png" for i in (50, 51))
    assert p.validation == ValidationPlan(held_out.validation_dir, 2, (2, 4, 5), 42, images)
    assert f"2 held-out images in {held_out.validation_dir}, a pass at steps 2, 4, 5 (seed 42)" in str(p)
    # sd-scripts never sees the held-out folder: its arguments are those of the run without it
    assert p.argv == plan(held_out.replace(validation_dir=None)).argv


def test_validate_every_n_steps_adds_the_last_step_and_validation_seed_wins(held_out):
    p = plan(held_out.replace(validate_every_n_steps=3, validation_seed=7))
    assert (p.validation.steps, p.validation.seed) == ((3, 5), 7)
    assert "validation      none" in str(plan(held_out.replace(validation_dir=None)))


def test_a_held_out_image_that_is_also_a_training_image_is_refused_naming_both(held_out):
    twin = held_out.validation_dir / "copy.png"
    twin.write_bytes((held_out.train_dir / "img001.png").read_bytes())  # same bytes, another name
    (held_out.validation_dir / "copy.txt").write_text("spyke_plasma_v1, red disc")
    with pytest.raises(ConfigError) as e:
        plan(held_out)
    (problem,) = [p for p in e.value.problems if "held-out image" in p]
    assert str(twin) in problem and str(held_out.train_dir / "img001.png") in problem
    assert "remove it from one of the two folders" in problem


def test_a_bad_held_out_folder_is_refused_like_a_training_folder(held_out):
    with pytest.raises(ConfigError, match=r"`validation_dir` folder '.*nowhere' does not exist"):
        plan(held_out.replace(validation_dir=held_out.validation_dir.with_name("nowhere")))
    (held_out.validation_dir / "img050.txt").unlink()
    with pytest.raises(ConfigError, match=r"1 caption file\(s\) in `validation_dir` are missing"):
        plan(held_out)


def test_validation_fields_are_checked_together(good):
    with pytest.raises(ConfigError) as e:
        good.replace(validate_every_n_steps=0, max_validation_steps=2)
    assert any("`validate_every_n_steps`" in p and "0" in p for p in e.value.problems)
    with pytest.raises(ConfigError, match="`max_validation_steps` is set but there are no held-out images"):
        good.replace(max_validation_steps=2)
    with pytest.raises(ConfigError, match="`validation_dir` .* is \\(or holds\\) `train_dir`"):
        good.replace(validation_dir=good.train_dir)
    with pytest.raises(ConfigError, match="`extra_args.validate_every_n_epochs` cannot be set: held-out images are"):
        plan(good.replace(extra_args={"validate_every_n_epochs": 1}))


def test_the_spec_takes_the_folders_class_token_and_the_runs_seed(held_out):
    spec = validation_spec(held_out)
    assert (spec.folder, spec.class_tokens, spec.seed, spec.every_n_steps, spec.max_batches) == (
        held_out.validation_dir,
        "spyke_plasma_v1",
        42,
        None,
        None,
    )
    assert validation_spec(held_out.replace(validation_dir=None)) is None


def test_validation_split_holds_out_part_of_train_dir_with_sd_scripts_own_split(good):
    cfg = good.replace(validation_split=0.34)
    p = plan(cfg)
    (held,) = p.validation.paths  # the one sd-scripts' seeded split holds out
    assert p.validation == ValidationPlan(good.train_dir, 1, (2, 4, 5), 42, (held,), 0.34)
    assert held.parent == good.train_dir
    assert f"held out of train_dir by sd-scripts' split (never trained on): {held.name}" in str(p)
    # sd-scripts splits (seeded) and trains on the rest: 2 of the 3 images, x10, plus as many regularisation batches
    assert [(s.folder.name, s.images) for s in p.subsets] == [("10_spyke_plasma_v1", 2), ("1_person", 2)]
    assert p.steps_per_epoch == 40
    text = dataset_toml_text(cfg)
    assert "[[datasets]]\nvalidation_split = 0.34\nvalidation_seed = 42\n" in text
    # sd-scripts' own loop (every epoch end) never runs: the library validates the held-out part itself
    assert p.argv[p.argv.index("--validate_every_n_epochs") + 1] == "1000000000"
    assert "--validate_every_n_epochs" not in plan(good).argv and "validation_split =" not in dataset_toml_text(good)
    spec = validation_spec(cfg)
    assert (spec.folder, spec.split, spec.held_out) == (good.train_dir, 0.34, True)


@pytest.mark.parametrize(
    "split, message",
    [
        (
            0.5,
            "`validation_split` 0.5 of the 3 images in `train_dir`: sd-scripts would train on 2 and validate on 2, "
            "so 1 image(s) would be in both; try 0.75 (2 held out)",
        ),
        (0.1, "`validation_split` 0.1 of the 3 images in `train_dir` holds out none; try 0.417 (1 image)"),
    ],
)
def test_a_split_that_sd_scripts_would_get_wrong_is_refused_with_a_split_that_works(good, split, message):
    with pytest.raises(ConfigError) as e:
        plan(good.replace(validation_split=split))
    assert message in e.value.problems


def test_validation_split_is_checked_with_the_other_fields(good, held_out):
    with pytest.raises(ConfigError, match="`validation_split` is the fraction of `train_dir` held out, .* got 1.0"):
        good.replace(validation_split=1.0)
    with pytest.raises(ConfigError, match="`validation_dir` and `validation_split` are both set"):
        held_out.replace(validation_split=0.2)
