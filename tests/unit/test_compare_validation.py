"""Choosing with the held-out figures: ``NAME.validation.jsonl`` in the review, the ranking, the recommendation, the
table ``spyke-lora compare`` prints and the sheet's row labels, on fake run folders (no engine)."""

import json

import numpy as np
import pytest
from PIL import Image

from spyke_lora._cli import main
from spyke_lora._compare import StepLoss, contact_sheet, rank_checkpoints, review, sheet_layout
from spyke_lora._compare._sheet import figure_lines
from spyke_lora._errors import ConfigError

from .test_compare import NAME, Brightness, fake_run, noise_image, region, write_checkpoint

VAL = "/data/spyke/val"
CLASS = "/data/spyke/class_images"


def figure(step, loss, folder=VAL, held_out=True, images=2):
    checkpoint = f"{NAME}-step{step:08d}.safetensors" if step else None
    return {
        "step": step,
        "checkpoint": checkpoint,
        "folder": folder,
        "loss": loss,
        "images": images,
        "held_out": held_out,
    }


def write_figures(run, lines, append=False):
    for line in lines:  # each step's LoRA file, as the run saved it
        if line["checkpoint"] and not (run / line["checkpoint"]).exists():
            write_checkpoint(run / line["checkpoint"], line["step"])
    with (run / f"{NAME}.validation.jsonl").open("a" if append else "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


BASE_AND_STEPS = [
    figure(0, 1.0969),
    figure(2, 1.0900),
    figure(4, 1.0678),
    figure(6, 1.0701),
    figure(0, 1.2000, CLASS, False, 3),
    figure(4, 1.2040, CLASS, False, 3),
    figure(6, 1.2100, CLASS, False, 3),
]


def black_at(*steps):
    return lambda step, prompt, cfg: Image.new("RGB", (64, 64)) if step in steps else noise_image(step + int(cfg))


# --- ranking ----------------------------------------------------------------------------------------------------------


def test_without_a_scorer_the_steps_are_ranked_by_held_out_loss_broken_last(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6], image=black_at(4))
    write_figures(run, BASE_AND_STEPS + [figure(8, 1.0800)])  # step 8: measured, never sampled
    assert rank_checkpoints(run, train_images=()) == [(6, 1.0701), (8, 1.08), (2, 1.09), (4, 1.0678)]
    rv = review(run, train_images=())
    assert rv.loss_ranking == ((6, 1.0701), (8, 1.08), (2, 1.09), (4, 1.0678))
    assert rv.ranking is None and rv.scorer is None  # the scorer's ranking stays the scorer's
    # with a scorer, the ranking is the scorer's, as without figures
    scored = rank_checkpoints(run, Brightness(), train_images=())
    assert [step for step, _ in scored][-1] == 4 and {step for step, _ in scored} == {2, 4, 6}


def test_non_finite_losses_rank_last_and_are_never_recommended(tmp_path):
    run = fake_run(tmp_path / "run", steps=[2, 4])
    write_figures(run, [figure(2, float("nan")), figure(4, 1.5)])
    rv = review(run, train_images=())
    assert rv.loss_ranking[0] == (4, 1.5) and rv.loss_ranking[1][0] == 2
    assert rv.recommended == 4


def test_the_newest_line_for_a_step_and_folder_wins(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6])
    write_figures(run, BASE_AND_STEPS)
    write_figures(run, [figure(4, 1.1000), figure(0, 1.1900, CLASS, False, 3)], append=True)
    with (run / f"{NAME}.validation.jsonl").open("a") as f:
        f.write('{"step": 6, "checkpoint": "x", "fol')  # a line cut short by a kill
    rv = review(run, train_images=())
    assert rank_checkpoints(run, train_images=()) == [(6, 1.0701), (2, 1.09), (4, 1.1)]
    assert rv.recommended == 6
    row = {r.step: r for r in rv.figures}
    assert row[4].held_out_loss == 1.1
    assert dict(row[4].class_drift)["class_images"] == pytest.approx(1.2040 - 1.1900)
    assert dict(row[0].class_loss) == {"class_images": 1.19}


def test_without_held_out_figures_there_is_no_ranking_and_rank_checkpoints_wants_a_scorer(tmp_path):
    run = fake_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"no held-out figures to rank by.*give a scorer"):
        rank_checkpoints(run, train_images=())
    write_figures(run, [figure(0, 1.2, CLASS, False), figure(200, 1.25, CLASS, False)])  # class images only
    rv = review(run, train_images=())
    assert rv.loss_ranking is None and rv.recommended is None and rv.recommendation is None
    assert [s.class_drift for s in rv.steps] == [(("class_images", pytest.approx(0.05)),), ()]
    with pytest.raises(ConfigError, match="no held-out figures to rank by"):
        rank_checkpoints(run, train_images=())


# --- the review: figures, drift, the recommendation ------------------------------------------------------------------


def test_the_review_carries_each_steps_figures_and_the_drift(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6])
    write_figures(run, BASE_AND_STEPS)
    rv = review(run, train_images=())
    assert rv.validation == run / f"{NAME}.validation.jsonl"
    assert rv.held_out_folder.as_posix() == VAL and rv.held_out_images == 2
    assert [(label, folder.as_posix()) for label, folder in rv.class_folders] == [("class_images", CLASS)]
    base, two, four, six = rv.figures
    assert base == StepLoss(0, None, 1.0969, (("class_images", 1.2),), ())
    assert two == StepLoss(2, f"{NAME}-step00000002.safetensors", 1.09)
    assert four.class_drift == (("class_images", pytest.approx(0.004)),)
    assert dict(six.class_drift)["class_images"] == pytest.approx(0.01)
    summaries = {s.step: s for s in rv.steps}
    assert summaries[4].held_out_loss == 1.0678 and summaries[4].class_loss == (("class_images", 1.204),)
    assert summaries[4].class_drift == four.class_drift and summaries[0].class_drift == ()


def test_the_recommendation_is_the_lowest_held_out_loss_and_says_when_it_is_noise(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6])
    write_figures(run, BASE_AND_STEPS)
    rv = review(run, train_images=())
    assert rv.recommended == 4
    assert rv.recommendation == (
        "recommended: step 4 (spyke_plasma_v1-step00000004.safetensors): the lowest held-out loss, 1.0678 (base "
        "model 1.0969); class drift on class_images +0.0040 (1.2040, base model 1.2000); its samples have no "
        "warnings; step 6 (1.0701) is within 0.22% of it, which is noise on 2 held-out images: compare the two on "
        "the sheet"
    )


def test_a_clear_winner_without_class_figures_gets_the_short_sentence(tmp_path):
    run = fake_run(tmp_path / "run", steps=[2, 4])
    write_figures(run, [figure(2, 1.1000), figure(4, 1.0678)])
    assert review(run, train_images=()).recommendation == (
        "recommended: step 4 (spyke_plasma_v1-step00000004.safetensors): the lowest held-out loss, 1.0678; its "
        "samples have no warnings"
    )


def test_a_broken_step_is_never_recommended_even_with_the_lowest_loss(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6], image=black_at(4))
    write_figures(run, BASE_AND_STEPS)
    rv = review(run, train_images=())
    assert rv.recommended == 6
    assert rv.recommendation == (
        "recommended: step 6 (spyke_plasma_v1-step00000006.safetensors): the lowest held-out loss, 1.0701 (base "
        "model 1.0969); class drift on class_images +0.0100 (1.2100, base model 1.2000); its samples have no "
        "warnings; lower but with broken samples: step 4 (1.0678)"
    )
    run = fake_run(tmp_path / "all", steps=[2, 4], image=black_at(2, 4))
    write_figures(run, [figure(2, 1.1), figure(4, 1.0)])
    rv = review(run, train_images=())
    assert rv.recommended is None
    assert rv.recommendation == (
        "no recommendation: every step with a held-out loss has broken samples or a non-finite loss"
    )


def test_drift_needs_the_base_models_figure_on_the_class_folder(tmp_path):
    run = fake_run(tmp_path / "run", steps=[2, 4])
    write_figures(run, [figure(2, 1.1), figure(4, 1.05), figure(4, 1.3, CLASS, False)])
    rv = review(run, train_images=())
    assert rv.figures[1].class_loss == (("class_images", 1.3),) and rv.figures[1].class_drift == ()
    assert rv.recommendation == (
        "recommended: step 4 (spyke_plasma_v1-step00000004.safetensors): the lowest held-out loss, 1.0500; loss on "
        "class_images 1.3000 (no base-model figure on it, so no drift); its samples have no warnings"
    )
    assert rv.table() == "\n".join(
        [
            f"held-out loss: sd-scripts' validation loss on 2 images in {VAL}, never trained on (lower is better):",
            "  step  held-out  class_images loss",
            "  2       1.1000                  -",
            "  4       1.0500             1.3000  <- recommended",
            f"class_images loss: the base model has no figure on {CLASS}, so no drift; measure it with "
            f'validation_loss([None, *files], cfg, folder="{CLASS}")',
        ]
    )


def test_the_table_has_a_row_per_step_measured_the_base_model_first(tmp_path):
    run = fake_run(tmp_path / "run", steps=[2, 4, 6], image=black_at(6))  # step 0 measured, not sampled
    write_figures(run, BASE_AND_STEPS)
    assert review(run, train_images=()).table() == "\n".join(
        [
            f"held-out loss: sd-scripts' validation loss on 2 images in {VAL}, never trained on (lower is better):",
            "  step            held-out  drift class_images",
            "  0 (base model)    1.0969            (1.2000)",
            "  2                 1.0900                   -",
            "  4                 1.0678             +0.0040  <- recommended",
            "  6                 1.0701             +0.0100  broken samples",
            f"drift class_images: the loss on {CLASS} minus the base model's (in brackets on its row); positive: the "
            "LoRA has pulled the class away from the base model",
        ]
    )


# --- the sheet and the command -----------------------------------------------------------------------------------------


def test_the_sheet_writes_the_figures_under_each_rows_label(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6])
    plain = np.asarray(Image.open(contact_sheet(run, out=tmp_path / "plain.png", cell=96, train_images=())))
    write_figures(run, BASE_AND_STEPS[:-1])  # step 6: held-out only
    rv = review(run, train_images=())
    assert [figure_lines(rv, s) for s in rv.steps] == [
        ["held-out 1.0969", "class_images 1.2000"],  # the base model: the reference figures
        ["held-out 1.0900"],
        ["held-out 1.0678", "drift +0.0040"],
        ["held-out 1.0701"],
    ]
    sheet = Image.open(contact_sheet(run, out=tmp_path / "figures.png", cell=96, train_images=())).convert("RGB")
    plain = Image.fromarray(plain).convert("RGB")
    layout = sheet_layout(4, 4, 96)
    assert sheet.size == plain.size == (layout.width, layout.height)
    for r in range(4):
        assert not np.array_equal(region(plain, layout.label_box(r)), region(sheet, layout.label_box(r)))
        for c in range(4):
            assert np.array_equal(region(plain, layout.cell_box(r, c)), region(sheet, layout.cell_box(r, c)))
    # the recommended row is marked in green
    label = region(sheet, layout.label_box(2))
    assert ((label[..., 1] > 100) & (label[..., 0] < 90) & (label[..., 2] < 90)).any()
    assert not (
        (region(sheet, layout.label_box(1))[..., 1] > 100)
        & (region(sheet, layout.label_box(1))[..., 0] < 90)
        & (region(sheet, layout.label_box(1))[..., 2] < 90)
    ).any()


def test_several_class_folders_get_a_column_and_a_label_each(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2])
    write_figures(
        run,
        [
            figure(0, 1.0),
            figure(2, 0.99),
            figure(0, 1.2, CLASS, False),
            figure(2, 1.21, CLASS, False),
            figure(0, 0.8, "/other/class_images", False),
            figure(2, 0.85, "/other/class_images", False),
            figure(0, 0.5, "/data/boys", False),
            figure(2, 0.49, "/data/boys", False),
        ],
    )
    rv = review(run, train_images=())
    assert [label for label, _ in rv.class_folders] == [CLASS, "/other/class_images", "boys"]
    assert figure_lines(rv, rv.steps[1]) == [
        "held-out 0.9900",
        f"drift {CLASS} +0.0100",
        "drift /other/class_images +0.0500",
        "drift boys -0.0100",
    ]
    assert rv.table().splitlines()[1].split("  ")[-1] == "drift boys"


def test_the_compare_command_prints_the_table_and_the_recommendation(tmp_path, capsys):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6])
    write_figures(run, BASE_AND_STEPS)
    assert main(["compare", str(run), "--cell", "96"]) == 0
    out = capsys.readouterr().out.splitlines()
    rv = review(run)
    start = out.index(rv.table().splitlines()[0])
    assert out[start:] == [*rv.table().splitlines(), rv.recommendation]
    assert out[-1].startswith("recommended: step 4 (spyke_plasma_v1-step00000004.safetensors): the lowest held-out")


def test_a_run_without_the_validation_manifest_is_as_before(tmp_path, capsys):
    run = fake_run(tmp_path / "run", steps=[0, 200, 400])
    rv = review(run, train_images=())
    assert (rv.validation, rv.figures, rv.held_out_folder, rv.held_out_images, rv.class_folders) == (
        None,
        (),
        None,
        None,
        (),
    )
    assert (rv.loss_ranking, rv.recommended, rv.recommendation, rv.table()) == (None, None, None, "")
    assert all((s.held_out_loss, s.class_loss, s.class_drift) == (None, (), ()) for s in rv.steps)
    assert all(figure_lines(rv, s) == [] for s in rv.steps)
    assert main(["compare", str(run), "--cell", "96", "--rank", "--train-images", str(run / "sample")]) == 0
    before = capsys.readouterr().out
    assert "held-out" not in before and "recommended" not in before
    # an empty or unreadable manifest is no manifest
    (run / f"{NAME}.validation.jsonl").write_text('{"step": 2, "lo\n')
    assert main(["compare", str(run), "--cell", "96", "--rank", "--train-images", str(run / "sample")]) == 0
    assert capsys.readouterr().out == before
    assert review(run, train_images=()) == rv


def test_only_the_base_models_figure_is_no_recommendation(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 200])
    write_figures(run, [figure(0, 1.0969)])
    rv = review(run, train_images=())
    assert rv.loss_ranking == () and rank_checkpoints(run, train_images=()) == [] and rv.recommended is None
    assert rv.recommendation == (
        "no recommendation: only the base model has a held-out loss; measure the saved files with "
        "validation_loss(files, cfg)"
    )
