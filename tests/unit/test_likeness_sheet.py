"""The contact sheet's row labels carry the likeness figures (issue 24, item 4), from a Likeness built here."""

from pathlib import Path

import numpy as np
from PIL import Image

from spyke_lora import Likeness, LikenessCopy, LikenessRow
from spyke_lora._compare import contact_sheet, review, sheet_layout, write_sheet
from spyke_lora._compare._sheet import figure_lines

from .test_compare import NAME, fake_run, region


def row(kind, step, dino, clip_i, clip_t, copies=(), samples=4):
    return LikenessRow(
        kind=kind,
        step=step,
        checkpoint=None,
        samples=samples if dino is not None else 0,
        dino=dino,
        clip_i=clip_i,
        clip_t=clip_t,
        dino_se=None,
        clip_i_se=None,
        clip_t_se=None,
        copies=tuple(copies),
        cells=(),
        note="",
    )


def run_likeness(run: Path) -> Likeness:
    copy = LikenessCopy(run / "sample" / "a.png", run / "train" / "1.png", 0.97, 0.93)
    rows = (
        row("checkpoint", 2, 0.5123, 0.7, 0.3111),
        row("checkpoint", 4, 0.7, 0.81234, 0.28, copies=[copy]),
        row("checkpoint", 6, 0.75, 0.82, 0.25, copies=[copy, copy]),
        row("checkpoint", 8, None, None, None),  # scored none of its samples
    )
    return Likeness(
        name=NAME,
        run_dir=run,
        rows=rows,
        base=row("base", 0, 0.4, 0.65, 0.32),
        ceiling=row("ceiling", None, 0.774, 0.885, None),
        recommended=rows[1],
        reason="step 4",
        dino_model="dino",
        clip_model="clip",
    )


def test_each_rows_label_carries_its_dino_clip_i_clip_t_and_copies(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6, 8])
    rv = review(run, train_images=())
    lk = run_likeness(run)
    assert [figure_lines(rv, s, lk) for s in rv.steps] == [
        ["DINO 0.400, CLIP-I 0.650", "CLIP-T 0.320, 0 copies"],  # the base model's row: the floor
        ["DINO 0.512, CLIP-I 0.700", "CLIP-T 0.311, 0 copies"],
        ["DINO 0.700, CLIP-I 0.812", "CLIP-T 0.280, 1 copy"],
        ["DINO 0.750, CLIP-I 0.820", "CLIP-T 0.250, 2 copies"],
        ["likeness: no samples"],  # reported, not left blank
    ]
    assert all(figure_lines(rv, s) == [] for s in rv.steps)  # without a likeness: as before
    # a step the likeness does not have (scored before a new checkpoint was sampled): no line, no error
    fake_run(tmp_path / "more", steps=[0, 10])
    more = review(tmp_path / "more", train_images=())
    assert figure_lines(more, more.steps[1], lk) == []


def test_the_sheet_draws_them_under_the_labels_and_leaves_the_samples_alone(tmp_path):
    run = fake_run(tmp_path / "run", steps=[0, 2, 4, 6, 8])
    lk = run_likeness(run)
    plain = Image.open(contact_sheet(run, out=tmp_path / "plain.png", cell=96, train_images=())).convert("RGB")
    path = contact_sheet(run, out=tmp_path / "figures.png", cell=96, train_images=(), likeness=lk)
    sheet = Image.open(path).convert("RGB")
    layout = sheet_layout(5, 4, 96)
    assert sheet.size == plain.size == (layout.width, layout.height)
    for r in range(5):
        before, after = region(plain, layout.label_box(r)), region(sheet, layout.label_box(r))
        assert not np.array_equal(before, after)  # the figures are drawn in the label
        assert (np.abs(before - after).sum(axis=2) > 0).sum() > 50
        for c in range(4):
            assert np.array_equal(region(plain, layout.cell_box(r, c)), region(sheet, layout.cell_box(r, c)))
    # write_sheet (what `spyke-lora compare` calls) takes it too, and draws the same sheet
    again = write_sheet(review(run, train_images=()), tmp_path / "again.png", 96, likeness=lk)
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(sheet))
