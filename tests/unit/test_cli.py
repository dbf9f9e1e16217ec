import argparse
import io
import json
import re
import shlex
import warnings
from pathlib import Path

import pytest
import tqdm.auto
import tqdm.notebook
import tqdm.std

from spyke_lora import (
    CheckpointSaved,
    Launch,
    SampleSaved,
    SpykeLoraWarning,
    StepEnded,
    TrainConfig,
    TrainEnded,
    TrainStarted,
)
from spyke_lora._cli import describe, main
from spyke_lora._engine._host import VENDORED
from spyke_lora.callbacks import Progress


def write_config(tmp_path, **changes):
    cfg = TrainConfig(
        base_model=tmp_path / "m.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        output_dir=tmp_path / "o",
        output_name="spyke_plasma_v1",
        mixed_precision="fp16",
        **changes,
    )
    return cfg.to_toml(tmp_path / "c.toml")


def test_argv_prints_a_runnable_command_line(tmp_path, capsys):
    with pytest.warns(SpykeLoraWarning, match="mixed_precision 'fp16' changed to 'no' on mps"):
        assert main(["argv", str(write_config(tmp_path)), "--device", "mps"]) == 0
    captured = capsys.readouterr()
    words = shlex.split(captured.out)
    assert words[0] == "PYTORCH_ENABLE_MPS_FALLBACK=1"  # MPS needs it in the environment before torch loads
    assert words[2] == str(VENDORED / "train_network.py")
    dataset = Path(words[words.index("--dataset_config") + 1])
    assert dataset == tmp_path / "o" / "spyke_plasma_v1_dataset.toml"
    assert not (tmp_path / "o").exists()  # printing writes nothing: the TOML's text is shown instead
    assert f"# the dataset TOML it reads, {dataset} (not written: `spyke-lora train` writes it):" in captured.err
    assert "#   image_dir = " in captured.err and "#   num_repeats = 10" in captured.err
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
        "started: 920 steps on mps (mixed precision no, gradient checkpointing on), writing to /o"
    )
    assert describe(TrainStarted(920, "cpu", "no", Path("/o"), gradient_checkpointing=False)) == (
        "started: 920 steps on cpu (mixed precision no, gradient checkpointing off), writing to /o"
    )
    assert describe(StepEnded(3, 920, 1, 0.12345, 0.2, 1e-4, 5e-5, 12.0)) == (
        "step   3/920  epoch 1  loss 0.1235  avg 0.2000  lr 1.00e-04  te lr 5.00e-05  12.0s"
    )
    assert (
        describe(CheckpointSaved(200, 1, Path("/o/x.safetensors"), False)) == "checkpoint (step 200): /o/x.safetensors"
    )
    assert describe(TrainEnded("stopped", 3, None)) == "ended: stopped after 3 steps"
    assert describe(TrainEnded("completed", 5, Path("/o/x.safetensors"), int(7.25 * 2**30), int(7 * 2**30))) == (
        "ended: completed after 5 steps; final LoRA /o/x.safetensors; peak memory 7.25 GiB (predicted 7.00)"
    )


def test_event_lines_prove_the_device_lora04():
    """The device's name at the start and the memory in use on it after every step: the proof a Mac trains on its
    GPU, in the notebook's progress and in events.jsonl, instead of watching Activity Monitor."""
    started = TrainStarted(920, "mps", "no", Path("/o"), device_name="Apple M1 Pro")
    assert describe(started) == (
        "started: 920 steps on mps (Apple M1 Pro, mixed precision no, gradient checkpointing on), writing to /o"
    )
    step = StepEnded(3, 920, 1, 0.12345, 0.2, 1e-4, None, 12.0, memory_bytes=int(5.5 * 2**30))
    assert describe(step) == "step   3/920  epoch 1  loss 0.1235  avg 0.2000  lr 1.00e-04  12.0s  mem 5.50 GiB"


EVENTS = [
    TrainStarted(4, "cpu", "no", Path("/o")),
    StepEnded(1, 4, 1, 0.5, 0.5, 1e-4, None, 4.0),
    StepEnded(2, 4, 1, 0.4, 0.45, 1e-4, None, 8.0, memory_bytes=int(1.5 * 2**30)),
    CheckpointSaved(2, 1, Path("/o/x-step00000002.safetensors"), False),
    SampleSaved(2, "spyke_plasma_v1, standing", 5.0, 42, Path("/o/sample/x_000002_00.png"), None),
    StepEnded(3, 4, 1, float("nan"), 0.45, 1e-4, None, 12.0),
    StepEnded(4, 4, 1, 0.3, 0.4, 1e-4, None, 16.0),
    CheckpointSaved(4, 1, Path("/o/x.safetensors"), True),
    TrainEnded("completed", 4, Path("/o/x.safetensors")),
]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def feed(progress, events, clock=None):
    """Deliver ``events``, with tqdm's clock at each event's ``elapsed_s`` (the last step's for the others)."""
    for event in events:
        if clock is not None and isinstance(event, StepEnded):
            clock[0] = event.elapsed_s
        progress(event)


def screen(text):
    """What a terminal shows after ``text``: each line as its last carriage return left it."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]


def test_progress_shows_the_last_held_out_loss_after_a_validation_pass(monkeypatch):
    from spyke_lora import ValidationEnded

    monkeypatch.setattr(tqdm.std, "time", lambda: 0.0)
    terminal = Terminal()
    steps = [StepEnded(i, 4, 1, 0.5, 0.45, 1e-4, None, 4.0 * i) for i in (1, 2, 3)]
    feed(Progress(terminal), [steps[0], steps[1], ValidationEnded(2, 1, 0.9123, 0.4623), steps[2]])
    text = terminal.getvalue()
    assert "\rvalidation (step 2): held-out loss 0.9123, +0.4623 from the training average\n" in text
    assert "3/4 [" in text and "loss=0.5000, avg=0.4500, val=0.9123, lr=1.00e-04]" in text
    assert "val=" not in text.split("validation (step 2)")[0]  # no figure before the first pass


def test_progress_is_a_tqdm_bar_in_a_terminal(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # 4 s a step, on tqdm's clock
    terminal = Terminal()
    feed(Progress(terminal), EVENTS, clock)
    text = terminal.getvalue()
    # after step 2: 2 of 4 done in 8 s, 8 s to go, and the step's numbers (memory in GiB when known)
    assert "| 2/4 [00:08<00:08,  4.00s/step, loss=0.4000, avg=0.4500, lr=1.00e-04, mem=1.50 GiB]" in text
    assert "| 3/4 [00:12<00:04,  4.00s/step, loss=nan, avg=0.4500, lr=1.00e-04]" in text
    assert "\rcheckpoint (step 2): /o/x-step00000002.safetensors\n" in text  # written above the bar (tqdm.write)
    assert "step 2/4" not in text  # the bar says it, not a line per step
    shown = screen(text)
    assert shown[:4] == [describe(EVENTS[0]), describe(EVENTS[3]), describe(EVENTS[4]), describe(EVENTS[7])]
    # the closed bar stays (10 columns of bar: a StringIO has no terminal width)
    assert shown[4] == "100%|##########| 4/4 [00:16<00:00,  4.00s/step, loss=0.3000, avg=0.4000, lr=1.00e-04]"
    assert shown[5:] == ["ended: completed after 4 steps; final LoRA /o/x.safetensors", ""]


def test_progress_resumes_its_bar_at_the_step_the_run_resumes_from(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    terminal = Terminal()
    progress = Progress(terminal)
    progress(TrainStarted(920, "cpu", "no", Path("/o"), resumed_from_step=600))
    clock[0] = 3.0
    progress(StepEnded(601, 920, 2, 0.1, 0.1, 1e-4, None, 3.0))
    clock[0] = 6.0
    progress(StepEnded(602, 920, 2, 0.1, 0.1, 1e-4, None, 6.0))
    # the rate counts the steps this run did (2 in 6 s), not the 600 before it: 318 steps to go take 15:54
    assert re.search(r" 65%\|#+5? *\| 602/920 \[00:06<15:5[34],  3\.00s/step, loss=0\.1000", terminal.getvalue())


def test_progress_is_one_line_per_event_elsewhere(capsys):
    log = io.StringIO()
    feed(Progress(log), EVENTS)
    assert log.getvalue().splitlines() == [describe(e) for e in EVENTS]
    assert "step 3/4  epoch 1  loss nan  avg 0.4500" in log.getvalue()
    not_a_notebook = io.StringIO()  # a terminal's stream would get a bar; notebook=False only rules out Jupyter
    feed(Progress(not_a_notebook, notebook=False), EVENTS)
    assert not_a_notebook.getvalue() == log.getvalue()
    assert capsys.readouterr().out == ""


def test_progress_in_jupyter_is_tqdms_widget_bar_and_lines_for_files(monkeypatch, capsys):
    """In a Jupyter kernel tqdm.auto's bar is tqdm.notebook's (ipywidgets); outside one it is the text bar, so the
    kernel's choice is made here. The start, the files and the end are lines in the cell; steps and samples are not."""
    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)
    cell = io.StringIO()
    progress = Progress(cell, notebook=True)
    feed(progress, EVENTS[:3])
    # displayed once, at the start (outside a kernel IPython's display prints the text a notebook keeps as well)
    assert capsys.readouterr().out == "  0%|          | 0/4 [00:00<?, ?step/s]\n"
    bar = progress._bar
    left, widget, right = bar.container.children
    assert (widget.value, widget.max) == (2, 4)
    assert left.value.replace("\u2007", " ") == " 50%"
    assert (
        "2/4" in right.value
        and "loss=0.4000,\u2007avg=0.4500,\u2007lr=1.00e-04,\u2007mem=1.50\u2007GiB]" in right.value
    )
    feed(progress, EVENTS[3:])
    assert (widget.value, widget.max, widget.bar_style) == (4, 4, "success")  # closed at TrainEnded, complete
    assert progress._bar is None
    assert cell.getvalue().splitlines() == [describe(e) for e in (EVENTS[0], EVENTS[3], EVENTS[7], EVENTS[8])]
    assert capsys.readouterr().out == ""  # updated in place, never displayed again


def test_progress_in_jupyter_without_ipywidgets_prints_lines_and_no_warning(monkeypatch):
    monkeypatch.setattr(tqdm.notebook, "IProgress", None)  # what tqdm.notebook finds without ipywidgets
    cell = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto would warn "IProgress not found" and draw a \r text bar
        feed(Progress(cell, notebook=True), EVENTS)
    assert cell.getvalue().splitlines() == [describe(e) for e in EVENTS]


def test_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    import spyke_lora._train

    def interrupted(cfg, callbacks=(), resume=None, engine_log=None, launch=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(spyke_lora._train, "train", interrupted)
    assert main(["train", str(write_config(tmp_path))]) == 130
    assert "spyke-lora: interrupted" in capsys.readouterr().err


def test_train_passes_the_launcher_options(tmp_path, monkeypatch):
    import spyke_lora._train

    seen = []
    monkeypatch.setattr(spyke_lora._train, "train", lambda cfg, **kw: seen.append(kw["launch"]))
    config = str(write_config(tmp_path))
    assert (
        main(
            [
                "train",
                config,
                "--processes",
                "8",
                "--num-machines",
                "2",
                "--machine-rank",
                "1",
                "--main-process-ip",
                "10.0.0.1",
                "--main-process-port",
                "29600",
            ]
        )
        == 0
    )
    assert seen[-1] == Launch(
        processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29600
    )
    assert main(["train", config]) == 0 and not seen[-1].multi_process
    assert main(["train", config, "--processes", "3", "--num-machines", "2", "--main-process-ip", "h"]) == 2


def test_sample_command_refuses_files_that_are_not_loras(tmp_path, capsys):
    config = write_config(tmp_path)
    not_a_lora = tmp_path / "notes.safetensors"
    not_a_lora.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert main(["sample", str(config), str(tmp_path / "missing.safetensors"), str(not_a_lora)]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors' does not exist" in err and "notes.safetensors" in err


def test_validate_command_prints_each_files_held_out_loss_against_the_base_model(tmp_path, monkeypatch, capsys):
    import spyke_lora._validation_loss
    from spyke_lora import HeldOutLoss

    calls = []
    folder = tmp_path / "class"

    def measured(files, cfg, folder=None, *, engine_log="auto"):
        calls.append((files, folder))
        return (
            HeldOutLoss(0, None, 1.2, folder, 3),
            HeldOutLoss(200, tmp_path / "x-step00000200.safetensors", 1.25, folder, 3),
        )

    monkeypatch.setattr(spyke_lora._validation_loss, "validation_loss", measured)
    lora = tmp_path / "x-step00000200.safetensors"
    assert main(["validate", str(write_config(tmp_path)), str(lora), "--base", "--folder", str(folder)]) == 0
    assert calls == [([None, lora], folder)]
    assert capsys.readouterr().out.splitlines() == [
        f"held-out loss on 3 images in {folder} (lower is better):",
        "  step      0  1.2000  base model",
        "  step    200  1.2500  +0.0500 vs the base model  x-step00000200.safetensors",
    ]
    monkeypatch.undo()
    assert main(["validate", str(write_config(tmp_path))]) == 2  # nothing to measure, before anything loads
    assert "nothing to measure: give LoRA files" in capsys.readouterr().err


def test_sample_event_line():
    from spyke_lora import SampleSaved

    line = describe(SampleSaved(200, "spyke_plasma_v1, x", 7.0, 1234, Path("/r/sample/a.png"), None))
    assert line == "sample (step 200, CFG 7): /r/sample/a.png"


# --- the subcommands' table: every subcommand, option, help text and default as before (issue 21) ---------------


class _Parsed(Exception):
    """Raised in place of parsing: the parser ``main`` built is in ``parser``."""

    def __init__(self, parser):
        self.parser = parser


def _describe(parser: argparse.ArgumentParser) -> dict:
    """Everything a user sees of ``parser`` and its subcommands, independent of argparse's help layout."""
    default_groups = (parser._positionals, parser._optionals)  # titled by the Python version ("options:" since 3.10)
    groups = {id(a): g.title for g in parser._action_groups if g not in default_groups for a in g._group_actions}
    actions, subcommands = [], {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            subcommands = {name: dict(_describe(sub), help=helps[name]) for name, sub in action.choices.items()}
        fields = ("option_strings", "dest", "nargs", "const", "default", "required", "help", "metavar", "choices")
        row = {name: getattr(action, name) for name in fields if name != "choices" or action.choices is None}
        row = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
        row |= {
            "kind": type(action).__name__,
            "type": getattr(action.type, "__name__", None),
            "group": groups.get(id(action)),
        }
        if isinstance(action.choices, (list, tuple)):
            row["choices"] = list(action.choices)
        if isinstance(action.default, type(lambda: 0)):
            row["default"] = action.default.__name__
        actions.append(row)
    return {
        "prog": parser.prog,
        "description": parser.description,
        "actions": actions,
        "subcommands": subcommands,
        "defaults": {k: getattr(v, "__name__", v) for k, v in parser._defaults.items()},
    }


def parser_of_main(monkeypatch) -> argparse.ArgumentParser:
    """The parser ``main`` builds (no ``COMFYUI_DIR``: ``--comfyui`` required)."""
    monkeypatch.delenv("COMFYUI_DIR", raising=False)

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Parsed) as parsed:
        main(["plan", "x.toml"])
    return parsed.value.parser


def test_every_subcommand_option_and_help_is_as_before(monkeypatch):
    expected = json.loads((Path(__file__).parent / "data" / "cli_parser.json").read_text(encoding="utf-8"))
    assert _describe(parser_of_main(monkeypatch)) == expected
