"""examples/train_spyke.ipynb, executed headless as a new user would run it, on the tiny model."""

import html
import re
from pathlib import Path

import nbformat
import PIL.Image
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[2] / "examples" / "train_spyke.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"


def texts(cell, kind):
    out = []
    for output in cell.outputs:
        if output.output_type == "stream":
            out.append(("stream", output.text))
        elif output.output_type in ("display_data", "execute_result"):
            out += [(mime, value) for mime, value in output.data.items()]
    return [value for mime, value in out if mime == kind]


def widgets(cell):
    return [o for o in cell.outputs if o.output_type == "display_data" and WIDGET in o.data]


def tqdm_bar(nb, output):
    """tqdm's notebook bar (a box of a description, a progress and a text widget) as the kernel left it: the cell
    holds only a reference to the widget; nbclient saves every widget's last state in the notebook's metadata."""
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    box = state[output.data[WIDGET]["model_id"]]["state"]
    left, progress, right = (state[child.removeprefix("IPY_MODEL_")]["state"] for child in box["children"])
    text = html.unescape(f"{left['value']}|{right['value']}").replace("\u2007", " ")  # tqdm pads with figure spaces
    return progress["value"], progress["max"], progress["bar_style"], text


def test_the_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = {i: c for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert not [o for c in cells.values() for o in c.outputs if o.output_type == "error"]
    doctor, plan_cell, train_cell, figures_cell, samples_cell, sheet_cell, likeness_cell, deploy_cell, runs_cell = (
        cells[i] for i in sorted(cells)[1:]
    )

    assert re.search(r"device\s+cpu", "".join(texts(doctor, "stream")))
    shown = "".join(texts(plan_cell, "stream"))
    assert "\r" not in shown and "IProgress" not in shown
    assert "checkpoints     3, 6, final" in shown and "samples         2 prompts x CFG 5, 9" in shown
    assert "validation      2 held-out images in" in shown and "a pass at steps 3, 6" in shown

    # the train cell: tqdm's widget bar (Progress) at the last step, the live loss chart, a line for the start, each
    # file and the end, the result line, and no carriage-return progress bars from sd-scripts (they went to the
    # run's engine log)
    bars = widgets(train_cell)
    assert len(bars) == 1, [bar.data["text/plain"] for bar in bars]  # one bar, updated in place
    assert bars[0].data["text/plain"] == "  0%|          | 0/6 [00:00<?, ?step/s]"  # its text when first displayed
    value, total, style, text = tqdm_bar(nb, bars[0])
    assert (value, total, style) == (6, 6, "success")
    assert re.fullmatch(
        r"100%\| 6/6 \[\d\d:\d\d<00:00, +[\d.]+(s/step|step/s), loss=\d+\.\d{4}, "
        r"avg=\d+\.\d{4}, val=\d+\.\d{4}, lr=\d\.\d\de-\d\d, mem=\d+\.\d\d GiB\]",
        text,
    ), text
    assert not texts(train_cell, "text/html")
    assert len(texts(train_cell, "image/png")) == 1  # one chart, redrawn in place
    printed = "".join(texts(train_cell, "stream"))
    assert "\r" not in printed and "IProgress" not in printed
    run = tmp_path / "notebook-output" / "run"
    final = run.resolve() / "spyke_plasma_v1.safetensors"
    lines = "".join(o.text for o in train_cell.outputs if o.output_type == "stream" and o.name == "stdout").splitlines()
    assert lines[0].startswith("started: 6 steps on cpu (") and lines[0].endswith(f"writing to {run.resolve()}")
    assert f"checkpoint (step 3): {run.resolve() / 'spyke_plasma_v1-step00000003.safetensors'}" in lines
    assert lines[-3] == f"final (step 6): {final}" and lines[-1] == f"completed 6 steps on cpu -> {final}"
    # the end line carries the run's measured peak memory and plan()'s prediction of it
    assert re.fullmatch(
        rf"ended: completed after 6 steps; final LoRA {re.escape(str(final))}; peak memory "
        r"\d+\.\d\d GiB \(predicted \d+\.\d\d\)",
        lines[-2],
    ), lines[-2]
    # a held-out pass after the file of each step (the final file is step 6's weights: not measured twice)
    assert [line.split(":")[0] for line in lines if line.startswith("validation")] == [
        "validation (step 3)",
        "validation (step 6)",
    ]
    assert not [line for line in lines if line.startswith(("step ", "sample "))]  # steps are the bar's
    assert "steps:" in (run / "spyke_plasma_v1.engine.log").read_text()  # sd-scripts' own bar, kept in the log

    # the figures: a row per validated step, both curves in one figure
    table = "".join(
        o.text for o in figures_cell.outputs if o.output_type == "stream" and o.name == "stdout"
    ).splitlines()
    assert not [o for o in figures_cell.outputs if o.output_type == "stream" and o.name == "stderr"]  # no warning
    assert table[0].split() == ["step", "held-out", "loss", "class", "drift"]
    assert [row.split()[0] for row in table[1:]] == ["3", "6"]
    assert all(re.fullmatch(r"\s*\d+\s+\d+\.\d{4}\s+[+-]\d+\.\d{4}", row) for row in table[1:]), table
    assert len(texts(figures_cell, "image/png")) == 1

    # samples: 2 prompts x 2 CFG scales for the files of steps 3 and 6 (the final file is step 6's weights); the base
    # model's (step 0) are made by likeness() below, once
    assert len(texts(samples_cell, "image/png")) == 8
    printed = "".join(texts(samples_cell, "stream"))
    assert "step 3: spyke_plasma_v1, standing in a forest @ CFG 5" in printed
    assert len(texts(sheet_cell, "image/png")) == 1  # the contact sheet
    # the sheet's checks of what the samples show: the tiny model is random, and after 3 steps its samples can come
    # out black (they do in MKL's strict mode on an AVX-512 CPU: tests/conftest.py), which the sheet rightly says;
    # any other warning (a missing file, a copy, a manifest problem) fails the test
    summary, *warned = "".join(texts(sheet_cell, "stream")).splitlines()
    assert re.fullmatch(r"8 samples, \d+ warning\(s\)", summary), summary
    content = ("all black", "flat", "every sample is black, flat or NaN")
    assert all(any(word in line for word in content) for line in warned), warned

    # likeness (issue 24): the table with the base and ceiling rows, the chart, the sheet with the figures
    table = "".join(o.text for o in likeness_cell.outputs if o.output_type == "stream" and o.name == "stdout")
    rows = table.splitlines()
    assert rows[0].split()[:7] == ["step", "held-out", "drift", "DINO", "CLIP-I", "CLIP-T", "copies"], rows
    steps = [row.lstrip("* ").split()[0] for row in rows[1:-1]]
    assert steps == ["base", "3", "6", "own"], rows  # "own images": the ceiling
    assert rows[-1].startswith("recommended: step ") and ".safetensors" in rows[-1]
    assert len(texts(likeness_cell, "image/png")) == 2  # the chart and the sheet
    with PIL.Image.open(run / "spyke_plasma_v1.likeness.png") as chart:
        assert chart.size == (800, 600)
    assert (run / "spyke_plasma_v1.likeness-sheet.png").is_file()
    installed = "".join(texts(deploy_cell, "stream"))
    assert installed.startswith("installed spyke_plasma_v1.safetensors (step 6, sha256 ")
    assert (tmp_path / "notebook-output" / "ComfyUI" / "models" / "loras" / "spyke_plasma_v1.safetensors").is_file()
    assert re.search(r"spyke_plasma_v1\s+completed\s+6/6", "".join(texts(runs_cell, "stream")))
