import runpy
from pathlib import Path

from spyke_lora import StepEnded, Stop, TrainStarted

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_example_script_stops_at_its_time_budget(capsys):
    example = runpy.run_path(str(EXAMPLES / "train_spyke.py"))  # not as __main__: defines, does not train
    watch, budget = example["watch"], example["BUDGET_S"]
    assert watch(TrainStarted(920, "mps", "no", Path("/o"))) is None
    assert "920 steps on mps, mixed precision no" in capsys.readouterr().out
    assert watch(StepEnded(1, 920, 1, 0.2, 0.2, 1e-4, 5e-5, budget - 1)) is None
    assert watch(StepEnded(2, 920, 1, 0.2, 0.2, 1e-4, 5e-5, budget + 1)) == Stop("time budget of 60 minutes used")


def test_the_spyke_example_is_the_recipe():
    from spyke_lora import TrainConfig

    cfg = TrainConfig.from_toml(EXAMPLES / "spyke.toml")
    assert (cfg.max_train_epochs, cfg.save_every_n_steps, cfg.network_dim, cfg.network_alpha) == (2, 200, 32, 16)
    assert cfg.save_state and cfg.sample_cfg_scales == (5, 7, 9) and len(cfg.sample_prompts) == 3
    assert all(p.startswith("spyke_plasma_v1, ") for p in cfg.sample_prompts)
    assert cfg.validation_dir.parts[-2:] == ("val", "1_spyke_plasma_v1")  # held-out images, a folder of their own
