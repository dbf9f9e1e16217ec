"""The held-out figures are sd-scripts' own validation loss: its command line, with the held-out folder as a
dataset block of its own, logs the same numbers to TensorBoard for the same weights."""

import math
import os
import subprocess
import sys

import pytest

from spyke_lora import plan, sd_scripts_argv, validation_loss
from spyke_lora._engine import dataset_toml_text
from spyke_lora._engine._host import VENDORED


def test_the_figures_are_sd_scripts_own_validation_loss(world, out, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # latents encoded at every step (not cached), so sd-scripts' held-out latents are drawn inside its seeded pass,
    # as they are here; with cached latents, its held-out latents come from wherever training left torch's generator
    cfg = world.config(
        output_dir=out,
        max_train_steps=2,
        save_every_n_steps=1,
        cache_latents=False,
        tensorboard=True,
        validation_dir=world.validation_dir,
        max_validation_steps=1,
    )
    out.mkdir(parents=True)
    toml = out / "with_held_out.toml"
    toml.write_text(
        dataset_toml_text(cfg) + "\n[[datasets]]\nvalidation_split = 1.0\nvalidation_seed = 42\n\n"
        f'[[datasets.subsets]]\nimage_dir = "{world.validation_dir}"\nclass_tokens = "spyke_plasma_v1"\n'
    )
    argv = sd_scripts_argv(cfg)
    argv[argv.index("--dataset_config") + 1] = str(toml)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    command = [
        sys.executable,
        str(VENDORED / "train_network.py"),
        *argv,
        "--validate_every_n_steps",
        "1",
        "--max_validation_steps",
        "1",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (logs,) = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(logs)).Reload()
    step_average = {s.step: s.value for s in scalars.Scalars("loss/validation/step_average")}
    (epoch_average,) = [s.value for s in scalars.Scalars("loss/validation/epoch_average")]
    assert sorted(step_average) == [1, 2]

    step1, final = validation_loss(
        [out / "spyke_plasma_v1-step00000001.safetensors", out / "spyke_plasma_v1.safetensors"], cfg
    )
    assert (step1.step, final.step) == (1, 2)
    # its first pass is that pass's own mean; its end-of-epoch pass is the final weights'
    assert step1.loss == pytest.approx(step_average[1], abs=1e-5)
    assert final.loss == pytest.approx(epoch_average, abs=1e-5)
    # and its later step_average is a running mean over the passes of the epoch, not the step's own figure
    assert step_average[2] == pytest.approx((step1.loss + final.loss) / 2, abs=1e-5)
    assert not math.isclose(step_average[2], final.loss, abs_tol=1e-5)


def test_a_split_validates_on_exactly_the_images_sd_scripts_holds_out_of_training(world):
    """With validation_split, sd-scripts splits train_dir (seeded) and trains on the rest; the held-out dataset the
    library validates on is built apart, and must hold the very images sd-scripts' split left out of training."""
    from spyke_lora._engine import build_argv, device_choice, host_for, parse_argv
    from spyke_lora._engine._dataset import image_paths
    from spyke_lora._engine._held_out import held_out_group, validation_spec

    cfg = world.config(validation_split=0.34, reg_dir=None)  # 3 images: 2 trained on, 1 held out
    planned = plan(cfg)
    (held,) = planned.validation.paths
    host = host_for(None)
    with host.active():
        train_network = host.train_network()
        args = parse_argv(train_network.setup_parser(), build_argv(cfg, device_choice(cfg)))
        train_network.train_util.prepare_dataset_args(args, True)
        ours = image_paths(held_out_group(train_network, args, validation_spec(cfg)))
    assert ours == (held,)
    trained = sorted(p for p in world.train_dir.glob("*.png") if p != held)
    assert [(s.folder, s.images) for s in planned.subsets] == [(world.train_dir, len(trained))]
