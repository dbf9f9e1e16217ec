"""Run records without the engine: reading runs back, comparing configs, the loss chart."""

import io
import json
import math
import os
import signal

import numpy as np
from PIL import Image

from spyke_lora import StepEnded, TrainConfig, callbacks, config_diff, loss_chart, runs
from spyke_lora._cli import main
from spyke_lora._lock import output_lock
from spyke_lora._records import event_to_json, read_run
from spyke_lora.events import CheckpointSaved, TrainEnded, TrainStarted

from .test_lock import held_by_another_process


def write_events(path, events, start=1000.0):
    lines = []
    for i, event in enumerate(events):
        record = event_to_json(event)
        record["time"] = start + 10 * i
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def step(n, loss, total=4):
    return StepEnded(n, total, 1, loss, loss, 1e-4, 5e-5, float(n))


def test_a_run_is_read_back_from_its_events(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_events(
        out / "a.events.jsonl",
        [
            TrainStarted(4, "mps", "no", out),
            step(1, 0.3),
            step(2, 0.2),
            CheckpointSaved(2, 1, out / "a.st", False),
            TrainEnded("stopped", 2, out / "a.safetensors"),
            TrainStarted(4, "mps", "no", out, resumed_from_step=2),
            step(3, 0.1),
            step(4, 0.05),
            TrainEnded("completed", 4, out / "a.safetensors"),
        ],
        start=1000.0,
    )
    record = read_run(out / "a.events.jsonl")
    assert (record.name, record.status, record.steps, record.total_steps, record.checkpoints) == (
        "a",
        "completed",
        4,
        4,
        1,
    )
    assert record.final_loss == 0.05 and record.duration_s == 40 + 30  # the pause between the parts is not counted
    assert record.config == out / "a.config.toml"


def test_a_run_without_an_end_is_running_while_locked_else_killed(tmp_path):
    write_events(tmp_path / "b.events.jsonl", [TrainStarted(9, "cpu", "no", tmp_path), step(1, float("nan"), 9)])
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"
    assert math.isnan(read_run(tmp_path / "b.events.jsonl").final_loss)
    cfg = TrainConfig(base_model=tmp_path / "m", train_dir=tmp_path / "1_x", output_dir=tmp_path, output_name="b")
    with output_lock(cfg):  # held in this process
        assert read_run(tmp_path / "b.events.jsonl").status == "running"
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"  # released, no end recorded
    (tmp_path / ".b.lock").write_text("{}")  # a lock file alone means nothing
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"


def test_a_sigkilled_run_reads_killed_not_running_forever(tmp_path, capsys):
    """Bug 4: the lock file a SIGKILLed run leaves behind does not make it look alive in `spyke-lora runs`."""
    write_events(tmp_path / "b.events.jsonl", [TrainStarted(9, "cpu", "no", tmp_path), step(1, 0.5, 9)])
    with held_by_another_process(tmp_path, "b") as holder:
        assert read_run(tmp_path / "b.events.jsonl").status == "running"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".b.lock").exists()
    assert read_run(tmp_path / "b.events.jsonl").status == "killed"
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("b                        killed ")


def test_runs_lists_a_folder_and_its_subfolders_oldest_first(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    write_events(tmp_path / "x" / "late.events.jsonl", [TrainStarted(2, "cpu", "no", tmp_path), step(1, 0.4, 2)], 2000)
    write_events(
        tmp_path / "early.events.jsonl",
        [TrainStarted(2, "cpu", "no", tmp_path), step(1, 0.5, 2), TrainEnded("failed", 1, None)],
        1000,
    )
    (tmp_path / "junk.events.jsonl").write_text("not json\n")
    assert [r.name for r in runs(tmp_path)] == ["early", "late"]
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("early") and " failed " in lines[1] and "1/2" in lines[1]


def test_config_diff_names_each_changed_field(tmp_path, capsys):
    a = TrainConfig(base_model=tmp_path / "m", train_dir=tmp_path / "10_x", output_dir=tmp_path, output_name="a")
    b = a.replace(learning_rate=5e-5, output_name="b", sample_cfg_scales=(7,))
    assert config_diff(a, b) == [
        'output_name: "a" -> "b"',
        "learning_rate: 0.0001 -> 5e-05",
        "sample_cfg_scales: [5.0, 7.0, 9.0] -> [7.0]",
    ]
    assert main(["diff", str(a.to_toml(tmp_path / "a.toml")), str(b.to_toml(tmp_path / "b.toml"))]) == 0
    assert "learning_rate: 0.0001 -> 5e-05" in capsys.readouterr().out


def chart_history():
    """Steps 1 to 10: the loss 1/step, the running average 0.5, and a NaN loss at step 6."""
    history = [StepEnded(i, 10, 1, 1.0 / i, 0.5, 1e-4, None, float(i)) for i in range(1, 11)]
    history[5] = StepEnded(6, 10, 1, float("nan"), 0.5, 1e-4, None, 6.0)
    return history


def near(pixels, xy, colour, *, radius=2, tolerance=60):
    """Whether a pixel within ``radius`` of ``xy`` (column, row) is within ``tolerance`` of ``colour`` (hex)."""
    x, y = xy
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    patch = pixels[y - radius : y + radius + 1, x - radius : x + radius + 1]
    return bool((np.abs(patch - rgb).sum(axis=2) <= tolerance).any())


def legend_texts(figure):
    """The entries of the chart's one legend (the figure's, below the plot)."""
    (legend,) = figure.legends
    return [t.get_text() for t in legend.get_texts()]


def test_loss_chart_draws_both_lines_and_marks_a_nan(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from spyke_lora._records import _BLUE, _GREY, _RED, _loss_figure

    history = chart_history()
    path = loss_chart(history, tmp_path / "loss.png", title="spyke")
    assert path == tmp_path / "loss.png" and not list(tmp_path.glob(".*"))  # written whole, no temporary left
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape == (400, 800, 3)  # the size asked for, in pixels

    # the same figure, drawn through the seam loss_chart saves from: what is on it, and where each step lands
    figure = _loss_figure(history, title="spyke", size=(800, 400))
    FigureCanvasAgg(figure).draw()
    (axes,) = figure.axes
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title()) == ("step", "loss", "spyke")
    assert legend_texts(figure) == ["loss per step", "running average", "non-finite loss"]
    loss, average, marker = axes.get_lines()
    assert math.isnan(loss.get_ydata()[5]) and list(average.get_ydata()) == [0.5] * 10  # a gap at the NaN step
    assert list(marker.get_xdata()) == [6, 6] and marker.get_color() == _RED

    def pixel(step, value):
        x, y = axes.transData.transform((step, value))
        return round(x), round(400 - y)  # matplotlib counts rows from the bottom, the PNG from the top

    assert near(pixels, pixel(3, 1 / 3), _GREY) and near(pixels, pixel(8, 0.5), _BLUE)
    column = pixel(6, 0)[0]
    top, bottom = pixel(6, axes.get_ylim()[1])[1], pixel(6, axes.get_ylim()[0])[1]
    red = [near(pixels, (column, row), _RED, radius=1) for row in range(top + 2, bottom - 1)]
    assert sum(red) / len(red) > 0.95  # the NaN step's marker runs the height of the plot
    elsewhere = pixel(3, 0)[0]
    assert not any(near(pixels, (elsewhere, row), _RED, radius=1) for row in range(top + 2, bottom - 1))


def test_loss_chart_draws_the_held_out_loss_of_each_validation_pass(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from spyke_lora import ValidationEnded
    from spyke_lora._records import _ORANGE, _loss_figure

    history = [StepEnded(i, 6, 1, 1.0 / i, 0.5, 1e-4, None, float(i)) for i in range(1, 7)]
    passes = [ValidationEnded(2, 1, 0.9, 0.4), {"event": "ValidationEnded", "step": 4, "loss": 0.8}]  # as recorded
    figure = _loss_figure(history, title="", size=(800, 400), validations=passes)
    FigureCanvasAgg(figure).draw()
    (axes,) = figure.axes
    assert legend_texts(figure) == ["loss per step", "running average", "held-out loss"]
    held_out = axes.get_lines()[2]
    assert (list(held_out.get_xdata()), list(held_out.get_ydata())) == ([2, 4], [0.9, 0.8])
    assert held_out.get_color() == _ORANGE
    # the callbacks draw it too: LiveLossChart keeps every pass, LossHistory lists them, describe() words one
    chart, losses = callbacks.LiveLossChart(every=100, notebook=False), callbacks.LossHistory()
    for event in [*history[:2], passes[0]]:
        chart(event)
        losses(event)
    assert chart.validations == [passes[0]] and (losses.validation_steps, losses.validation_losses) == ([2], [0.9])
    assert (
        callbacks.describe(passes[0]) == "validation (step 2): held-out loss 0.9000, +0.4000 from the training average"
    )


def test_loss_chart_is_the_size_asked_for_and_writes_to_a_file_object():
    buffer = io.BytesIO()
    assert loss_chart(chart_history(), buffer, size=(333, 201)) is None  # 3.33 in x 100 dpi: not one pixel lost
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert (image.format, image.size) == ("PNG", (333, 201))
    one = io.BytesIO()
    loss_chart([StepEnded(1, 1, 1, 0.2, 0.2, 1e-4, None, 1.0)], one)  # a single step is drawn as a dot
    pixels = np.asarray(Image.open(one).convert("RGB")).astype(int)
    assert (np.abs(pixels - [0x1F, 0x5F, 0xBF]).sum(axis=2) <= 30).sum() > 10


def test_loss_chart_leaves_the_callers_matplotlib_alone():
    """A library must not pick the caller's backend or import pyplot (which would start a GUI event loop)."""
    import sys

    import matplotlib

    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # read without resolving it
    had_pyplot = "matplotlib.pyplot" in sys.modules
    loss_chart(chart_history(), io.BytesIO())
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_loss_chart_draws_the_memory_in_use_on_a_second_axis():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from spyke_lora import ValidationEnded
    from spyke_lora._records import _loss_figure

    gib = 2**30
    memory = [gib, 3 * gib // 2, None, 2 * gib]  # a step that could not read it: a gap
    history = [StepEnded(i, 4, 1, 1.0 / i, 0.5, 1e-4, None, float(i), m) for i, m in enumerate(memory, 1)]
    figure = _loss_figure(history, title="", size=(800, 400), validations=[ValidationEnded(2, 1, 0.9, 0.4)])
    FigureCanvasAgg(figure).draw()
    axes, right = figure.axes
    assert (axes.get_ylabel(), right.get_ylabel()) == ("loss", "memory in use, GiB")
    assert right.get_shared_x_axes().joined(axes, right) and right.get_ylim()[0] == 0
    (line,) = right.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3, 4] and line.get_label() == "memory (GiB)"
    assert np.allclose(line.get_ydata(), [1.0, 1.5, math.nan, 2.0], equal_nan=True)
    assert len(axes.get_lines()) == 3 and axes.get_legend() is right.get_legend() is None  # one legend, the figure's
    assert legend_texts(figure) == ["loss per step", "running average", "held-out loss", "memory (GiB)"]
    # as read back from NAME.events.jsonl: the same line
    recorded = [event_to_json(e) for e in history]
    (again,) = _loss_figure(recorded, title="", size=(800, 400)).axes[1].get_lines()
    assert np.allclose(again.get_ydata(), line.get_ydata(), equal_nan=True)


def test_loss_chart_without_memory_has_one_axis(tmp_path):
    from spyke_lora._records import _loss_figure

    history = chart_history()  # memory_bytes None throughout
    recorded = [event_to_json(e) for e in history]
    old = [{k: v for k, v in record.items() if k != "memory_bytes"} for record in recorded]  # before the field
    for steps in (history, recorded, old):
        figure = _loss_figure(steps, title="", size=(800, 400))
        assert len(figure.axes) == 1
        assert legend_texts(figure) == ["loss per step", "running average", "non-finite loss"]
    assert loss_chart(old, tmp_path / "loss.png") == tmp_path / "loss.png"


def memory_history(peak_gib, steps=8):
    """``steps`` steps whose memory in use climbs to ``peak_gib`` at the last step; the loss falls from 1.0."""
    return [
        StepEnded(i, steps, 1, 1.0 / i, 0.5, 1e-4, None, float(i), int(peak_gib * 2**30 * i / steps))
        for i in range(1, steps + 1)
    ]


def drawn_boxes(figure):
    """The figure drawn on Agg: its renderer, and the window extents (pixels) of the plot and of its legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = figure.legends
    return renderer, figure.axes[0].get_window_extent(renderer), legend.get_window_extent(renderer)


def test_loss_chart_gives_the_memory_line_headroom_and_draws_the_budget_dashed():
    """Issue 24: the memory axis ended at the peak, so the line ran along the top edge, under the legend. Now it
    ends 15 % above the higher of the peak and the budget, the budget is a dashed line at its value, and the legend
    is outside the plot (its box does not meet the plot's)."""
    from spyke_lora._records import _BUDGET, _HEADROOM, _loss_figure

    gib = 2**30
    for peak, budget in ((5.0, 6 * gib), (7.0, 6 * gib)):  # under the budget, and over it (a run that swapped)
        history = memory_history(peak)
        figure = _loss_figure(history, title="spyke", size=(800, 400), memory_budget_bytes=budget)
        renderer, plot, legend = drawn_boxes(figure)
        axes, right = figure.axes
        memory, budget_line = right.get_lines()
        assert memory.get_label() == "memory (GiB)" and np.isclose(max(memory.get_ydata()), peak)
        assert list(budget_line.get_ydata()) == [6.0, 6.0] and budget_line.get_linestyle() == "--"
        assert budget_line.get_color() == _BUDGET and budget_line.get_label() == "memory budget (6.0 GiB)"
        bottom, top = right.get_ylim()
        assert bottom == 0 and np.isclose(top, max(peak, 6.0) * _HEADROOM)  # the higher line is 15 % below the top
        # in pixels: the peak and the budget are well inside the frame, not on it
        top_px = plot.y1
        for value in (peak, 6.0):
            y = right.transData.transform((history[-1].step, value))[1]
            assert top_px - y >= 0.1 * plot.height
        assert not legend.overlaps(plot) and legend.y1 <= plot.y0  # the legend below the plot, covering no line
        assert legend_texts(figure)[-2:] == ["memory (GiB)", "memory budget (6.0 GiB)"]
        assert axes.get_zorder() > right.get_zorder()  # the loss curves over the memory lines


def test_loss_chart_without_a_budget_still_leaves_headroom_and_a_budget_without_memory_is_not_drawn():
    from spyke_lora._records import _HEADROOM, _loss_figure

    figure = _loss_figure(memory_history(5.0), title="", size=(800, 400))  # an older record: no budget
    (memory,) = figure.axes[1].get_lines()
    assert np.isclose(figure.axes[1].get_ylim()[1], 5.0 * _HEADROOM)
    # no memory recorded: no memory axis, and so no budget line on one
    figure = _loss_figure(chart_history(), title="", size=(800, 400), memory_budget_bytes=6 * 2**30)
    assert len(figure.axes) == 1 and "memory budget" not in " ".join(legend_texts(figure))


def test_the_run_records_and_the_live_chart_draw_the_budget_the_run_ends_with(tmp_path):
    """TrainEnded carries plan()'s budget: NAME.loss.png (drawn from the recorded events) and LiveLossChart use it."""
    from spyke_lora._records import RunRecorder, read_events

    gib = 2**30
    cfg = TrainConfig(base_model=tmp_path / "m", train_dir=tmp_path / "1_x", output_dir=tmp_path, output_name="r")
    recorder = RunRecorder(cfg, "true", {})
    live = callbacks.LiveLossChart(every=100, notebook=False)
    ended = TrainEnded("completed", 8, None, 5 * gib, 5 * gib, memory_budget_bytes=6 * gib)
    for event in [TrainStarted(8, "cpu", "no", tmp_path), *memory_history(5.0), ended]:
        recorder(event)
        live(event)
    (recorded_end,) = [e for e in read_events(tmp_path / "r.events.jsonl") if e["event"] == "TrainEnded"]
    assert recorded_end["memory_budget_bytes"] == 6 * gib
    assert (tmp_path / "r.loss.png").stat().st_size > 0 and live.memory_budget == 6 * gib
    with Image.open(io.BytesIO(live.png())) as image:
        assert image.size == (800, 400)
    # what the recorder drew is the figure of those events with the budget: the dashed line's pixels are there
    pixels = np.asarray(Image.open(tmp_path / "r.loss.png").convert("RGB")).astype(int)
    from spyke_lora._records import _BUDGET, _loss_figure

    figure = _loss_figure(memory_history(5.0), title="r", size=(800, 400), memory_budget_bytes=6 * gib)
    drawn_boxes(figure)
    right = figure.axes[1]
    x, y = right.transData.transform((4.5, 6.0))
    dashes = [near(pixels, (round(x) + dx, round(400 - y)), _BUDGET, radius=1) for dx in range(-60, 60)]
    assert 0.3 < sum(dashes) / len(dashes) < 0.95  # a dashed line: drawn, with gaps
