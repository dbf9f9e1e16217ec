"""A recommendation names a file that holds the weights it was measured on (issue 23, item 1), on hand-written
manifests and header-only safetensors files (no engine).

After a stop at step 3 and a resume that ends at step 6, ``NAME.safetensors`` holds step 6: the manifests' lines for
step 3 name that file, and no review, ranking, recommendation or sheet label may offer "step 3 (NAME.safetensors)".
Held-out passes between saved files (``validate_every_n_steps`` finer than ``save_every_n_steps``) have no file: a
curve, never a candidate. A run with held-out figures and no samples is ranked by them.
"""

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spyke_lora._cli import main
from spyke_lora._compare import _sheet, rank_checkpoints, review
from spyke_lora._engine._after_save import AfterSave, CheckpointSampler, HeldOutPass, SampleSpec
from spyke_lora._engine._held_out import ValidationSpec, append_validation
from spyke_lora._errors import ConfigError

from .test_run_parts import probe_with

NAME = "spyke_plasma_v1"
FINAL = f"{NAME}.safetensors"
VAL = "/data/spyke/val"


def step_file(step):
    return f"{NAME}-step{step:08d}.safetensors"


def write_lora(path, steps=None, model_hash=None, payload=b"\0\0\0\0"):
    """A LoRA file complete as far as its header tells: one tensor, sd-scripts' metadata (``ss_steps``,
    ``sshs_model_hash``) when given."""
    metadata = {"ss_network_module": "networks.lora"}
    if steps is not None:
        metadata["ss_steps"] = str(steps)
    if model_hash is not None:
        metadata["sshs_model_hash"] = model_hash
    header = {
        "__metadata__": metadata,
        "lora_unet_down_blocks_0.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, len(payload)]},
    }
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)
    return path


def line(step, loss, checkpoint, folder=VAL, held_out=True, **identity):
    return {
        "step": step,
        "checkpoint": checkpoint,
        "folder": folder,
        "loss": loss,
        "images": 2,
        "held_out": held_out,
        **identity,
    }


def sample_line(step, checkpoint, run, prompt="spyke_plasma_v1, standing", cfg=5.0, **identity):
    from PIL import Image

    rel = f"sample/{NAME}_{step:06d}_00_20261124120000_1234.png"
    (run / "sample").mkdir(parents=True, exist_ok=True)
    Image.effect_noise((64, 64), 40 + step).convert("RGB").save(run / rel)
    return {
        "step": step,
        "prompt": prompt,
        "cfg_scale": cfg,
        "seed": 1234,
        "path": rel,
        "checkpoint": checkpoint,
        **identity,
    }


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def resumed_run(tmp_path, identity="hash", samples=True):
    """A run stopped at step 3 (its final file then held step 3) and resumed to step 6: the files on disk are step
    2's, step 4's and NAME.safetensors, which now holds step 6. Step 3 had the lowest held-out loss.

    ``identity``: what the manifest lines record of their file: "hash" (``sshs_model_hash`` and ``ss_steps``),
    "steps" (``ss_steps`` alone), or "none" (an old manifest: the file's ``ss_steps`` is compared with the step)."""
    run = tmp_path / "run"
    run.mkdir()
    hashes = {2: "0x02", 3: "0x03", 4: "0x04", 6: "0x06"}
    write_lora(run / step_file(2), 2, hashes[2])
    write_lora(run / step_file(4), 4, hashes[4])
    write_lora(run / FINAL, 6, hashes[6])  # the resumed run's final file, written over the stop's

    def ident(step):
        if identity == "hash":
            return {"ss_steps": step, "sshs_model_hash": hashes[step]}
        if identity == "steps":
            return {"ss_steps": step}
        return {}

    files = {2: step_file(2), 3: FINAL, 4: step_file(4), 6: FINAL}
    losses = {2: 1.09, 3: 1.01, 4: 1.07, 6: 1.08}
    write_jsonl(
        run / f"{NAME}.validation.jsonl",
        [line(0, 1.10, None)] + [line(s, losses[s], files[s], **ident(s)) for s in (2, 3, 4, 6)],
    )
    if samples:
        write_jsonl(
            run / f"{NAME}.samples.jsonl",
            [sample_line(s, files[s] if s else None, run, **(ident(s) if s else {})) for s in (0, 2, 3, 4, 6)],
        )
    return run


# --- after a stop and a resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", ["hash", "steps", "none"])
def test_a_file_written_over_by_the_resume_is_never_recommended_for_the_stops_step(tmp_path, identity):
    run = resumed_run(tmp_path, identity)
    rv = review(run, train_images=())
    assert rv.recommended == 4
    assert rv.recommendation.startswith(f"recommended: step 4 ({step_file(4)}): the lowest held-out loss, 1.0700")
    assert f"step 3 ({FINAL})" not in rv.recommendation and "step 3" not in rv.recommendation
    assert [s for s, _ in rv.loss_ranking] == [4, 6, 2]
    assert rank_checkpoints(run, train_images=()) == [(4, 1.07), (6, 1.08), (2, 1.09)]
    # the final file is step 6's, and labelled so
    assert {r.step: r.checkpoint for r in rv.figures if r.checkpoint} == {2: step_file(2), 4: step_file(4), 6: FINAL}
    rows = {s.step: s for s in rv.steps}
    assert rows[6].checkpoint == FINAL and rows[6].held_out_loss == 1.08
    # step 3's samples stay on the sheet, but not under the name of a file that now holds step 6
    assert rows[3].checkpoint is None and rows[3].held_out_loss is None
    assert "replaced" in rows[3].file_note and "6" in rows[3].file_note and FINAL not in rows[3].file_note
    assert all(c.checkpoint is None for c in rv.row(3))
    assert not any(row.split()[:1] == ["3"] for row in rv.table().splitlines())  # no row for step 3
    assert f"left out: the figure of step 3 measured on {FINAL}; replaced: its file now holds step 6" in rv.table()


def test_the_sheet_never_labels_the_stops_step_with_the_replaced_file(tmp_path, monkeypatch):
    run = resumed_run(tmp_path)
    drawn = []
    real = _sheet._draw_lines

    def record(draw, xy, lines, *a, **kw):
        drawn.append(list(lines))
        return real(draw, xy, lines, *a, **kw)

    monkeypatch.setattr(_sheet, "_draw_lines", record)
    _sheet.contact_sheet(run, cell=64, train_images=())
    texts = [" ".join(lines) for lines in drawn]
    step3 = texts.index("step 3")
    assert FINAL not in texts[step3 + 1].replace(" ", "") and "replaced" in texts[step3 + 1]
    step6 = texts.index("step 6")
    assert FINAL in texts[step6 + 1].replace(" ", "")  # wrapped to the label's width


def test_a_file_changed_since_its_line_was_written_is_dropped_and_said(tmp_path, capsys):
    """The same step, another content (a rerun wrote the file again): the hash tells them apart."""
    run = resumed_run(tmp_path)
    write_lora(run / step_file(4), 4, "0x44")  # step 4 again, other weights
    rv = review(run, train_images=())
    assert 4 not in dict(rv.loss_ranking) and rv.recommended == 6
    assert main(["compare", str(run), "--cell", "64", "--train-images", str(run / "sample")]) == 0
    out = capsys.readouterr().out
    assert f"recommended: step 6 ({FINAL})" in out
    assert f"step 4 ({step_file(4)})" not in out


def test_a_deleted_file_is_no_candidate(tmp_path):
    run = resumed_run(tmp_path)
    (run / step_file(4)).unlink()
    rv = review(run, train_images=())
    assert rv.recommended == 6 and [s for s, _ in rv.loss_ranking] == [6, 2]
    row = {s.step: s for s in rv.steps}[4]
    assert row.checkpoint is None and "not on disk" in row.file_note


def test_a_file_outside_the_run_folder_is_checked_where_it_is(tmp_path):
    run = resumed_run(tmp_path, samples=False)
    other = write_lora(tmp_path / "elsewhere.safetensors", 5, "0x05")
    with (run / f"{NAME}.validation.jsonl").open("a") as f:
        f.write(json.dumps(line(5, 1.00, str(other), ss_steps=5, sshs_model_hash="0x05")) + "\n")
    assert review(run).recommended == 5
    write_lora(other, 5, "0x55")
    assert review(run).recommended == 4


def test_a_line_for_the_same_step_is_kept_when_another_file_still_holds_it(tmp_path):
    """Step 6 was saved as NAME-step00000006 and as NAME.safetensors; a later run replaced NAME.safetensors: the
    step file still holds step 6."""
    run = resumed_run(tmp_path, samples=False)
    write_lora(run / step_file(6), 6, "0x06")
    with (run / f"{NAME}.validation.jsonl").open("a") as f:
        f.write(json.dumps(line(6, 1.08, step_file(6), ss_steps=6, sshs_model_hash="0x06")) + "\n")
        f.write(json.dumps(line(6, 1.08, FINAL, ss_steps=6, sshs_model_hash="0x06")) + "\n")
    write_lora(run / FINAL, 9, "0x09")
    rv = review(run)
    assert {r.step: r.checkpoint for r in rv.figures if r.checkpoint}[6] == step_file(6)
    assert dict(rv.loss_ranking)[6] == 1.08


# --- held-out passes between saved files --------------------------------------------------------------------------------


def between_files(tmp_path, samples=False):
    """validate_every_n_steps = 1, save_every_n_steps = 2: passes at every step, files at 2 and 4 (the final)."""
    run = tmp_path / "run"
    run.mkdir()
    write_lora(run / step_file(2), 2, "0x02")
    write_lora(run / FINAL, 4, "0x04")
    losses = {1: 1.05, 2: 1.09, 3: 1.00, 4: 1.08}
    lines = [line(0, 1.10, None)]
    for step, loss in losses.items():
        lines.append(line(step, loss, None))  # the pass at the step's end, before the save
    lines.append(line(2, 1.09, step_file(2), ss_steps=2, sshs_model_hash="0x02"))  # the save links it to its file
    lines.append(line(4, 1.08, FINAL, ss_steps=4, sshs_model_hash="0x04"))
    write_jsonl(run / f"{NAME}.validation.jsonl", lines)
    if samples:
        write_jsonl(
            run / f"{NAME}.samples.jsonl",
            [sample_line(2, step_file(2), run, ss_steps=2), sample_line(4, FINAL, run, ss_steps=4)],
        )
    return run


@pytest.mark.parametrize("samples", [False, True])
def test_steps_between_files_are_a_curve_never_ranked_or_recommended(tmp_path, samples):
    run = between_files(tmp_path, samples)
    rv = review(run, train_images=())
    assert rv.recommended == 4
    assert rv.recommendation.startswith(f"recommended: step 4 ({FINAL}): the lowest held-out loss, 1.0800")
    assert "step 3" not in rv.recommendation and "step 1" not in rv.recommendation
    assert rank_checkpoints(run, train_images=()) == [(4, 1.08), (2, 1.09)]
    # the passes between files are in the figures (the curve), without a file
    assert [(r.step, r.held_out_loss, r.checkpoint) for r in rv.figures] == [
        (0, 1.10, None),
        (1, 1.05, None),
        (2, 1.09, step_file(2)),
        (3, 1.00, None),
        (4, 1.08, FINAL),
    ]
    table = rv.table()
    assert "steps 1, 3" in table and "no file" in table
    assert not any(row.split()[:1] == ["3"] for row in table.splitlines())


def test_passes_between_files_alone_leave_nothing_to_rank_or_recommend(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / f"{NAME}.validation.jsonl", [line(0, 1.1, None), line(1, 1.0, None), line(3, 0.9, None)])
    rv = review(run)
    assert rv.recommended is None and rv.loss_ranking == ()
    assert rv.recommendation.startswith("no recommendation:") and "no saved file" in rv.recommendation
    assert rank_checkpoints(run) == []  # as with only the base model's figure: nothing to rank


# --- a run with held-out figures and no samples -----------------------------------------------------------------------


def test_a_run_with_held_out_figures_and_no_samples_is_ranked_by_them(tmp_path, capsys):
    run = resumed_run(tmp_path, samples=False)
    assert rank_checkpoints(run) == [(4, 1.07), (6, 1.08), (2, 1.09)]
    assert rank_checkpoints(run, name=NAME) == [(4, 1.07), (6, 1.08), (2, 1.09)]
    rv = review(run)
    assert rv.recommended == 4 and rv.cells == () and rv.columns == ()
    assert "it has no samples to look at" in rv.recommendation
    assert main(["compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"recommended: step 4 ({step_file(4)})" in out and "held-out loss" in out


def test_without_samples_or_figures_the_error_says_both(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ConfigError, match=r"no NAME\.samples\.jsonl.*validation"):
        review(run)
    with pytest.raises(ConfigError, match=rf"no {NAME}\.samples\.jsonl"):
        review(run, NAME)


def test_a_scorer_still_needs_samples(tmp_path):
    from spyke_lora._compare import ColourHistogramScorer

    run = resumed_run(tmp_path, samples=False)
    with pytest.raises(ConfigError, match="samples"):
        rank_checkpoints(run, ColourHistogramScorer())


# --- the writers: every line identifies its file ------------------------------------------------------------------------


def test_a_validation_line_records_the_files_steps_and_hash(tmp_path):
    manifest = tmp_path / f"{NAME}.validation.jsonl"
    path = write_lora(tmp_path / FINAL, 920, "0xabc")
    append_validation(manifest, 920, path, Path(VAL), 1.0, 2, True)
    append_validation(manifest, 0, None, Path(VAL), 1.1, 2, True)
    first, base = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert (first["checkpoint"], first["ss_steps"], first["sshs_model_hash"]) == (FINAL, 920, "0xabc")
    assert "ss_steps" not in base and "sshs_model_hash" not in base


def test_a_sample_line_records_the_files_steps_and_hash(tmp_path):
    folder = tmp_path / "sample"
    folder.mkdir()
    checkpoint = write_lora(tmp_path / FINAL, 500, "0x500")
    spec = SampleSpec((("a prompt", 5.0),), 1234, NAME, folder, tmp_path / f"{NAME}.samples.jsonl")
    events = []
    sampler = CheckpointSampler(spec, events.append)
    sampler.sampler = lambda step: (folder / f"{NAME}_{step:06d}_00_20261124120000_1234.png").write_bytes(b"x")
    sampler.sample(500, checkpoint)
    (record,) = [json.loads(x) for x in spec.manifest.read_text().splitlines()]
    assert (record["checkpoint"], record["ss_steps"], record["sshs_model_hash"]) == (FINAL, 500, "0x500")


class FakeHeldOut:
    def __init__(self, manifest, losses):
        self.spec = ValidationSpec(Path(VAL), "spyke", 1, 1, None, manifest)
        self.images = 2
        self._losses = losses

    def loss(self, context):
        return self._losses.pop(0)


class Tracker:
    """accelerate's tensorboard tracker: ``writer`` is torch's SummaryWriter, whose ``file_writer`` is None once
    closed (and which reopens itself on a write)."""

    name = "tensorboard"

    def __init__(self):
        self.logged, self.finished = [], 0
        self.writer = SimpleNamespace(file_writer=object())

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))
        self.writer.file_writer = object()

    def finish(self):
        self.finished += 1
        self.writer.file_writer = None


class Accelerator:
    def __init__(self):
        self.tracker = Tracker()
        self.trackers = [SimpleNamespace(name="wandb", log=None), self.tracker]  # only TensorBoard's is written


def held_out_pass(tmp_path, losses):
    probe = probe_with([])
    manifest = tmp_path / f"{NAME}.validation.jsonl"
    held = HeldOutPass(FakeHeldOut(manifest, losses), probe)
    accelerator = Accelerator()
    held.batch_context = SimpleNamespace(accelerator=accelerator)
    return probe, held, manifest, accelerator.tracker


def test_a_pass_at_a_step_end_is_linked_to_the_file_saved_at_that_step(tmp_path):
    """sd-scripts calls the step's end (sample_images) before it saves that step's file: the pass at step 2 is made
    before step 2's file exists; the save then links its figure to the file, with no second pass."""
    probe, held, manifest, accelerator = held_out_pass(tmp_path, [1.05, 1.09, 1.00, 1.08])
    after = AfterSave(probe, None, held)
    held.held_out.spec = ValidationSpec(Path(VAL), "spyke", 1, 2, None, manifest)  # every 2 steps, files every 4
    for step in range(1, 5):
        probe.steps_done = step
        after.at_step(step)
    after(write_lora(tmp_path / step_file(4), 4, "0x04"), False)
    probe.steps_done = 6
    after.at_step(6)
    after(write_lora(tmp_path / FINAL, 6, "0x06"), True)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [(x["step"], x["checkpoint"], x["loss"]) for x in lines] == [
        (2, None, 1.05),
        (4, None, 1.09),
        (4, step_file(4), 1.09),
        (6, None, 1.00),
        (6, FINAL, 1.00),
    ]
    assert lines[2]["sshs_model_hash"] == "0x04" and lines[4]["ss_steps"] == 6


def test_every_pass_is_logged_for_tensorboard_and_the_final_one_after_sd_scripts_closed_the_log(tmp_path):
    probe, held, manifest, tracker = held_out_pass(tmp_path, [1.5, 1.25])
    probe.losses.add_micro_batch(torch.tensor(1.0))
    probe.losses.end_step()
    after = AfterSave(probe, None, held)
    held.held_out.spec = ValidationSpec(Path(VAL), "spyke", 1, None, None, manifest)  # at every saved file
    probe.steps_done = 2
    after(write_lora(tmp_path / step_file(2), 2, "0x02"), False)
    assert tracker.logged == [(2, {"loss/validation": 1.5, "loss/validation_divergence": 0.5})]
    assert tracker.finished == 0  # training goes on: the log stays open
    tracker.finish()  # sd-scripts' end_training(), before it saves its final file
    probe.steps_done = 3
    after(write_lora(tmp_path / FINAL, 3, "0x03"), True)
    assert tracker.logged[-1] == (3, {"loss/validation": 1.25, "loss/validation_divergence": 0.25})
    assert tracker.finished == 2 and tracker.writer.file_writer is None  # the log it reopened is closed again
