"""examples/train_spyke.ipynb, executed headless as a new user would run it, on the tiny model."""

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[2] / "examples" / "train_spyke.ipynb"


def texts(cell, kind):
    out = []
    for output in cell.outputs:
        if output.output_type == "stream":
            out.append(("stream", output.text))
        elif output.output_type in ("display_data", "execute_result"):
            out += [(mime, value) for mime, value in output.data.items()]
    return [value for mime, value in out if mime == kind]


def test_the_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = {i: c for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert not [o for c in cells.values() for o in c.outputs if o.output_type == "error"]
    doctor, plan_cell, train_cell, samples_cell, sheet_cell, deploy_cell, runs_cell = (
        cells[i] for i in sorted(cells)[1:]
    )

    assert re.search(r"device\s+cpu", "".join(texts(doctor, "stream")))
    shown = "".join(texts(plan_cell, "stream"))
    assert "\r" not in shown and "IProgress" not in shown
    assert "checkpoints     3, 6, final" in shown and "samples         2 prompts x CFG 5, 9" in shown

    # the train cell: an HTML bar updated in place to the last step, the live loss chart, the result line, and no
    # carriage-return progress bars from sd-scripts (they went to the run's engine log)
    bars = texts(train_cell, "text/html")
    assert len(bars) == 1 and 'value="6" max="6"' in bars[0]
    assert len(texts(train_cell, "image/png")) == 1  # one chart, redrawn in place
    printed = "".join(texts(train_cell, "stream"))
    assert "completed 6 steps on cpu" in printed and "\r" not in printed
    assert "checkpoint (step 3)" in printed and "final (step 6)" in printed
    run = tmp_path / "notebook-output" / "run"
    assert "steps:" in (run / "spyke_plasma_v1.engine.log").read_text()  # sd-scripts' own bar, kept in the log

    # samples: 2 prompts x 2 CFG scales for the files of steps 3 and 6 (the final file is step 6's weights)
    assert len(texts(samples_cell, "image/png")) == 8
    assert "step 3: spyke_plasma_v1, standing in a forest @ CFG 5" in "".join(texts(samples_cell, "stream"))
    assert len(texts(sheet_cell, "image/png")) == 1  # the contact sheet
    assert "8 samples, 0 warning(s)" in "".join(texts(sheet_cell, "stream"))
    installed = "".join(texts(deploy_cell, "stream"))
    assert installed.startswith("installed spyke_plasma_v1.safetensors (step 6, sha256 ")
    assert (tmp_path / "notebook-output" / "ComfyUI" / "models" / "loras" / "spyke_plasma_v1.safetensors").is_file()
    assert re.search(r"spyke_plasma_v1\s+completed\s+6/6", "".join(texts(runs_cell, "stream")))
