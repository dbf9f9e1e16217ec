import shlex
from pathlib import Path

import pytest

from spyke_lora import CheckpointSaved, SpykeLoraWarning, StepEnded, TrainConfig, TrainEnded, TrainStarted
from spyke_lora._cli import describe, main
from spyke_lora._engine._host import VENDORED


def write_config(tmp_path, **changes):
    cfg = TrainConfig(
        base_model=tmp_path / "m.safetensors", train_dir=tmp_path / "10_spyke_plasma_v1", output_dir=tmp_path / "o",
        output_name="spyke_plasma_v1", mixed_precision="fp16", **changes,
    )  # fmt: skip
    return cfg.to_toml(tmp_path / "c.toml")


def test_argv_prints_a_runnable_command_line(tmp_path, capsys):
    with pytest.warns(SpykeLoraWarning, match="mixed_precision 'fp16' changed to 'no' on mps"):
        assert main(["argv", str(write_config(tmp_path)), "--device", "mps"]) == 0
    captured = capsys.readouterr()
    words = shlex.split(captured.out)
    assert words[0] == "PYTORCH_ENABLE_MPS_FALLBACK=1"  # MPS needs it in the environment before torch loads
    assert words[2] == str(VENDORED / "train_network.py")
    dataset = Path(words[words.index("--dataset_config") + 1])
    assert dataset == tmp_path / "o" / "spyke_plasma_v1_dataset.toml" and dataset.is_file()  # runnable as printed
    assert f"wrote the dataset TOML it reads: {dataset}" in captured.err
    assert "image_dir = " in dataset.read_text() and "num_repeats = 10" in dataset.read_text()
    assert words[words.index("--mixed_precision") + 1] == "no"
    assert "--no_half_vae" in words


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('base_model = "m"\ntrain_dir = "10_x"\noutput_dir = "o"\noutput_name = "x"\nnetwork_dimm = 4\n')
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spyke-lora: error: invalid configuration in")
    assert "unknown key `network_dimm`; did you mean `network_dim`?" in err


def test_train_refuses_missing_inputs_before_loading_anything(tmp_path, capsys):
    assert main(["train", str(write_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "`base_model`" in err and "does not exist" in err and "`train_dir`" in err


def test_refuses_to_overwrite_an_earlier_lora(tmp_path, capsys):
    (tmp_path / "m.safetensors").write_bytes(b"x")
    (tmp_path / "10_spyke_plasma_v1").mkdir()
    (tmp_path / "o").mkdir()
    earlier = tmp_path / "o" / "spyke_plasma_v1-step00000200.safetensors"
    earlier.write_bytes(b"my earlier LoRA")
    assert main(["train", str(write_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "1 LoRA file(s) named `spyke_plasma_v1` already exist" in err and "overwrite = true" in err
    assert earlier.read_bytes() == b"my earlier LoRA"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [earlier.name]  # nothing written


def test_event_lines():
    assert describe(TrainStarted(920, "mps", "no", Path("/o"))) == (
        "started: 920 steps on mps (mixed precision no), writing to /o"
    )
    assert describe(StepEnded(3, 920, 1, 0.12345, 0.2, 1e-4, 5e-5, 12.0)) == (
        "step   3/920  epoch 1  loss 0.1235  avg 0.2000  lr 1.00e-04  te lr 5.00e-05  12.0s"
    )
    assert describe(CheckpointSaved(200, 1, Path("/o/x.safetensors"), False)) == "checkpoint (step 200): /o/x.safetensors"
    assert describe(TrainEnded("stopped", 3, None)) == "ended: stopped after 3 steps"


def test_event_lines_prove_the_device_lora04():
    """The device's name at the start and the memory in use on it after every step: the proof a Mac trains on its
    GPU, in the notebook's progress and in events.jsonl, instead of watching Activity Monitor."""
    started = TrainStarted(920, "mps", "no", Path("/o"), device_name="Apple M1 Pro")
    assert describe(started) == "started: 920 steps on mps (Apple M1 Pro, mixed precision no), writing to /o"
    step = StepEnded(3, 920, 1, 0.12345, 0.2, 1e-4, None, 12.0, memory_bytes=int(5.5 * 2**30))
    assert describe(step) == "step   3/920  epoch 1  loss 0.1235  avg 0.2000  lr 1.00e-04  12.0s  mem 5.50 GiB"


def test_progress_is_a_bar_in_a_terminal_and_lines_elsewhere():
    import io

    from spyke_lora.callbacks import Progress as _Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    events = [StepEnded(1, 4, 1, 0.5, 0.5, 1e-4, None, 20.0), StepEnded(2, 4, 1, 0.4, 0.45, 1e-4, None, 24.0),
              CheckpointSaved(2, 1, Path("/o/x-step00000002.safetensors"), False)]  # fmt: skip
    terminal = Terminal()
    progress = _Progress(terminal)
    for event in events:
        progress(event)
    text = terminal.getvalue()
    assert text.startswith("\r[######------------------] step 1/4")
    assert "\r[############------------] step 2/4" in text and "eta 0:00:08" in text  # 4 s a step, 2 to go
    assert text.endswith("\ncheckpoint (step 2): /o/x-step00000002.safetensors\n")
    log = io.StringIO()
    progress = _Progress(log)
    for event in events:
        progress(event)
    assert log.getvalue().splitlines() == [describe(e) for e in events]


def test_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    import spyke_lora._train

    def interrupted(cfg, callbacks=(), resume=None, engine_log=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(spyke_lora._train, "train", interrupted)
    assert main(["train", str(write_config(tmp_path))]) == 130
    assert "spyke-lora: interrupted" in capsys.readouterr().err


def test_sample_command_refuses_files_that_are_not_loras(tmp_path, capsys):
    config = write_config(tmp_path)
    not_a_lora = tmp_path / "notes.safetensors"
    not_a_lora.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["sample", str(config), str(tmp_path / "missing.safetensors"), str(not_a_lora)]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors' does not exist" in err and "notes.safetensors" in err


def test_sample_event_line():
    from spyke_lora import SampleSaved

    line = describe(SampleSaved(200, "spyke_plasma_v1, x", 7.0, 1234, Path("/r/sample/a.png"), None))
    assert line == "sample (step 200, CFG 7): /r/sample/a.png"
