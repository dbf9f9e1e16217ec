"""The likeness chart (issue 24, item 4): NAME.likeness.png, drawn from Likeness objects built here (no model)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spyke_lora import ConfigError, likeness_chart
from spyke_lora._likeness import Likeness, LikenessRow
from spyke_lora._likeness._chart import _GREEN, likeness_figure

# step: (DINO, CLIP-I, CLIP-T): likeness climbs towards the ceiling while prompt fidelity falls, as a run overfits
FIGURES = {
    200: (0.52, 0.70, 0.312),
    400: (0.63, 0.76, 0.305),
    600: (0.71, 0.80, 0.300),
    800: (0.73, 0.81, 0.281),
    1000: (0.75, 0.82, 0.262),
}


def row(kind, step, figures, *, se=0.01, checkpoint=None, note=""):
    dino, clip_i, clip_t = figures if figures is not None else (None, None, None)
    return LikenessRow(
        kind=kind,
        step=step,
        checkpoint=checkpoint,
        samples=9 if dino is not None else 0,
        dino=dino,
        clip_i=clip_i,
        clip_t=clip_t,
        dino_se=se if dino is not None else None,
        clip_i_se=se if clip_i is not None else None,
        clip_t_se=se if clip_t is not None else None,
        copies=(),
        cells=(),
        note=note,
    )


def run_likeness(run_dir, *, recommended=600, missing=(), base=True, order=sorted):
    rows = []
    for step in order([*FIGURES, *missing]):
        file = Path(run_dir) / f"spyke-{step:06d}.safetensors"
        figures = None if step in missing else FIGURES[step]
        rows.append(row("checkpoint", step, figures, checkpoint=file, note="no samples" if figures is None else ""))
    return Likeness(
        name="spyke",
        run_dir=Path(run_dir),
        rows=tuple(rows),
        base=row("base", 0, (0.42, 0.66, 0.314), note="the base model's samples") if base else None,
        ceiling=row("ceiling", None, (0.774, 0.885, None), se=0.02),
        recommended=next((r for r in rows if r.step == recommended), None),
        reason="step 600: DINO 0.71 (base 0.42, own images 0.77) with CLIP-T 0.30 (base 0.31)",
        dino_model="facebook/dino-vits16",
        clip_model="openai/clip-vit-base-patch32",
    )


def artist(axes, gid):
    (found,) = [a for a in [*axes.lines, *axes.patches, *axes.texts] if a.get_gid() == gid]
    return found


def legend_texts(figure):
    (legend,) = figure.legends
    return [t.get_text() for t in legend.get_texts()]


def test_the_chart_is_written_whole_next_to_the_run(tmp_path):
    path = likeness_chart(run_likeness(tmp_path))
    assert path == tmp_path / "spyke.likeness.png" and not list(tmp_path.glob(".*"))  # no temporary left
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (800, 600))
    # into a folder, and to a file named by the caller
    (tmp_path / "charts").mkdir()
    assert likeness_chart(run_likeness(tmp_path), tmp_path / "charts") == tmp_path / "charts" / "spyke.likeness.png"
    assert likeness_chart(run_likeness(tmp_path), tmp_path / "mine.png", size=(400, 300)) == tmp_path / "mine.png"
    with Image.open(tmp_path / "mine.png") as image:
        assert image.size == (400, 300)


def test_one_point_per_checkpoint_joined_in_step_order_and_labelled_with_its_step(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # rows given out of order: the path is still drawn in step order
    figure = likeness_figure(run_likeness(tmp_path, order=lambda steps: sorted(steps, reverse=True)))
    FigureCanvasAgg(figure).draw()
    (axes,) = figure.axes
    assert "CLIP-T" in axes.get_xlabel() and "DINO" in axes.get_ylabel()
    path = artist(axes, "checkpoints")
    steps = sorted(FIGURES)
    assert list(path.get_xdata()) == [FIGURES[s][2] for s in steps]  # x: prompt fidelity (CLIP-T)
    assert list(path.get_ydata()) == [FIGURES[s][0] for s in steps]  # y: likeness (DINO)
    assert path.get_linestyle() == "-" and path.get_marker() == "o"  # joined
    for s in steps:
        label = artist(axes, f"step-{s}")
        assert label.get_text() == str(s) and label.xy == (FIGURES[s][2], FIGURES[s][0])
    # the standard errors as error bars, one each way per point: x (CLIP-T), then y (DINO)
    x_bars, y_bars = [c for c in axes.collections if c.get_gid() == "checkpoint-errors"]
    assert [(round(a[0], 6), round(b[0], 6)) for a, b in x_bars.get_segments()] == [
        (round(FIGURES[s][2] - 0.01, 6), round(FIGURES[s][2] + 0.01, 6)) for s in steps
    ]
    assert [(round(a[1], 6), round(b[1], 6)) for a, b in y_bars.get_segments()] == [
        (round(FIGURES[s][0] - 0.01, 6), round(FIGURES[s][0] + 0.01, 6)) for s in steps
    ]


def test_the_base_the_ceiling_and_the_recommended_file_are_marked(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = likeness_figure(run_likeness(tmp_path))
    FigureCanvasAgg(figure).draw()
    (axes,) = figure.axes
    base = artist(axes, "base")
    assert (list(base.get_xdata()), list(base.get_ydata()), base.get_marker()) == ([0.314], [0.42], "s")
    ceiling = artist(axes, "ceiling")  # no CLIP-T: a line across the plot at the images' own DINO
    assert list(ceiling.get_ydata()) == [0.774, 0.774] and list(ceiling.get_xdata()) == [0, 1]
    band = artist(axes, "ceiling-band")  # one standard error each way
    assert (round(band.get_y(), 6), round(band.get_y() + band.get_height(), 6)) == (0.754, 0.794)
    low, high = axes.get_ylim()
    assert low < 0.42 and high > 0.794  # the floor and the band are inside the plot
    ring = artist(axes, "recommended")
    assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([0.300], [0.71])  # step 600's point
    assert ring.get_markerfacecolor() == "none" and ring.get_markeredgecolor() == _GREEN
    assert ring.get_markersize() > artist(axes, "checkpoints").get_markersize()  # a ring around the point
    assert legend_texts(figure) == [
        "base model (DINO 0.420)",
        "checkpoints, in step order",
        "own images (DINO 0.774: the ceiling)",
        "recommended: step 600 (spyke-000600.safetensors)",
    ]
    # the legend sits below the plot: it hides no point
    renderer = figure.canvas.get_renderer()
    assert not figure.legends[0].get_window_extent(renderer).overlaps(axes.get_window_extent(renderer))


def test_the_ring_is_drawn_on_the_png_at_the_recommended_point(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = likeness_chart(run_likeness(tmp_path, recommended=800))
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    figure = likeness_figure(run_likeness(tmp_path, recommended=800))
    FigureCanvasAgg(figure).draw()
    (axes,) = figure.axes
    green = np.array([int(_GREEN[i : i + 2], 16) for i in (1, 3, 5)])

    def green_around(clip_t, dino):
        x, y = axes.transData.transform((clip_t, dino))
        column, row_ = round(x), round(600 - y)
        patch = pixels[row_ - 14 : row_ + 15, column - 14 : column + 15]
        return int((np.abs(patch - green).sum(axis=2) <= 60).sum())

    assert green_around(FIGURES[800][2], FIGURES[800][0]) > 40  # the ring's pixels around step 800
    assert green_around(FIGURES[600][2], FIGURES[600][0]) == 0  # and none around the others
    assert green_around(FIGURES[200][2], FIGURES[200][0]) == 0


def test_a_checkpoint_without_samples_is_named_not_drawn_and_no_recommendation_draws_no_ring(tmp_path):
    figure = likeness_figure(run_likeness(tmp_path, missing=(300,), recommended=None, base=False))
    (axes,) = figure.axes
    assert len(artist(axes, "checkpoints").get_xdata()) == len(FIGURES)  # 300 has no point
    assert not [a for a in axes.lines if a.get_gid() in ("recommended", "base")]
    assert legend_texts(figure) == [
        "checkpoints, in step order",
        "own images (DINO 0.774: the ceiling)",
        "no point (no samples scored): step 300",
    ]
    assert likeness_chart(run_likeness(tmp_path, missing=(300,), recommended=None, base=False)).is_file()


def test_a_chart_that_cannot_be_written_is_refused_before_it_is_drawn(tmp_path):
    result = run_likeness(tmp_path)
    with pytest.raises(ConfigError, match="its folder does not exist"):
        likeness_chart(result, tmp_path / "nowhere" / "chart.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        likeness_chart(result, tmp_path / "file" / "chart.png")
    with pytest.raises(ConfigError, match=r"at least 200 x 150 px, got 100 x 80; try size=\(800, 600\)"):
        likeness_chart(result, size=(100, 80))
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(ConfigError, match="read-only"):
                likeness_chart(result, locked)
        finally:
            locked.chmod(0o700)
    assert not (tmp_path / "spyke.likeness.png").exists()


def test_the_chart_leaves_the_callers_matplotlib_alone(tmp_path):
    import matplotlib

    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # read without resolving it
    had_pyplot = "matplotlib.pyplot" in sys.modules
    likeness_chart(run_likeness(tmp_path))
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
