"""A recommendation names a file that holds the weights it was measured on (issue 23, item 1), on the real engine.

One run, held-out figures at every step (``validate_every_n_steps = 1``) and a file every 2 steps, one sample per
saved file, stopped at step 3 (its final file then holds step 3) and resumed to step 6 (its final file now holds step
6): the stop's lines name a file that no longer holds what they measured, and the passes at steps 1, 3 and 5 have no
file. The TensorBoard test reads the shared sampled run (validated at every saved file, its final pass made after
sd-scripts closed its log).
"""

import json
import shutil
from types import SimpleNamespace

import pytest

from spyke_lora import StepEnded, Stop, ValidationEnded, train
from spyke_lora._cli import main
from spyke_lora._compare import rank_checkpoints, review
from spyke_lora._header import read_header

from .helpers import NAME, PROMPTS, SHORT

FINAL = f"{NAME}.safetensors"


def ss_steps(path):
    return int(read_header(path).metadata["ss_steps"])


@pytest.fixture(scope="module")
def resumed(world, tmp_path_factory):
    cfg = world.config(
        output_dir=tmp_path_factory.mktemp("identity") / "out",
        save_state=True,
        validation_dir=world.validation_dir,
        max_validation_steps=1,
        validate_every_n_steps=1,
        sample_prompts=PROMPTS[:1],
        sample_cfg_scales=(5,),
        sample_steps=1,
        **SHORT,
    )
    run = SimpleNamespace(cfg=cfg, events=[])

    def stop_at_3(event):
        run.events.append(event)
        return Stop("test: step 3") if isinstance(event, StepEnded) and event.step == 3 else None

    run.first = train(cfg, callbacks=stop_at_3)
    run.final_then = ss_steps(cfg.output_dir / FINAL)
    run.second = train(cfg, resume="latest", callbacks=run.events.append)
    return run


def test_after_a_resume_the_stops_final_file_is_never_recommended_for_its_step(resumed, tmp_path):
    out = resumed.cfg.output_dir
    assert (resumed.first.steps, resumed.final_then, resumed.second.steps) == (3, 3, 6)
    assert ss_steps(out / FINAL) == 6  # the resumed run's final file is written over the stop's
    manifest = out / f"{NAME}.validation.jsonl"
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    stop_line = next(x for x in lines if x["step"] == 3 and x["checkpoint"] == FINAL)
    assert stop_line["ss_steps"] == 3 and stop_line["sshs_model_hash"]
    # step 3's figure made the lowest: it must still not be offered under a file that holds step 6
    for x in lines:
        if x["step"] == 3:
            x["loss"] = 0.0
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rv = review(out, train_images=())
    assert {s for s, _ in rv.loss_ranking} == {2, 4, 6}
    assert rv.recommended in (2, 4, 6) and f"step 3 ({FINAL})" not in rv.recommendation
    row = rv.figures[[r.step for r in rv.figures].index(rv.recommended)]
    assert ss_steps(out / row.checkpoint) == rv.recommended  # a file on disk that holds the step recommended
    assert [r.step for r in rv.figures if r.checkpoint is None] == [1, 3, 5]  # the curve between the files
    rows = {s.step: s for s in rv.steps}
    assert sorted(rows) == [2, 3, 4, 6]  # a sample after each saved file
    assert rows[3].checkpoint is None and rows[3].file_note == "replaced: its file now holds step 6"
    assert rows[6].checkpoint in (FINAL, f"{NAME}-step00000006.safetensors")
    assert rows[2].checkpoint == f"{NAME}-step00000002.safetensors"
    assert "steps 1, 3, 5" in rv.table() and f"left out: the figure of step 3 measured on {FINAL}" in rv.table()


def test_a_run_with_held_out_figures_and_no_samples_is_ranked_and_compared(resumed, tmp_path, capsys):
    copy = tmp_path / "no-samples"
    shutil.copytree(resumed.cfg.output_dir, copy, ignore=shutil.ignore_patterns("sample", "*.samples.jsonl", "*-state"))
    ranking = rank_checkpoints(copy)
    assert sorted(s for s, _ in ranking) == [2, 4, 6]
    assert [v for _, v in ranking] == sorted(v for _, v in ranking)
    assert main(["compare", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"recommended: step {ranking[0][0]} (" in out and "it has no samples to look at" in out
    assert "held-out passes between saved files at steps 1, 3, 5" in out


def test_every_held_out_pass_is_in_tensorboard_beside_the_training_loss(sampled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (sampled_run.cfg.output_dir / "tensorboard").iterdir()
    (logs,) = {p.parent for p in run.rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(logs)).Reload()
    passes = [e for e in sampled_run.events if isinstance(e, ValidationEnded)]
    assert [e.step for e in passes] == [2, 4, 5]  # the last at the final file, saved after sd-scripts closed its log
    held_out = scalars.Scalars("loss/validation")
    assert [(s.step, s.value) for s in held_out] == [(e.step, pytest.approx(e.loss, rel=1e-6)) for e in passes]
    divergence = scalars.Scalars("loss/validation_divergence")
    assert [s.value for s in divergence] == [pytest.approx(e.divergence, rel=1e-5) for e in passes]
    assert [s.step for s in scalars.Scalars("loss/current")] == [1, 2, 3, 4, 5]  # beside sd-scripts' own
