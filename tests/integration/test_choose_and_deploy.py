"""Issue 4 on the real engine: a run's files and their samples (2 prompts x 2 CFG scales), its contact sheet,
deploying a file into a ComfyUI folder, and the LoRA read by another consumer (diffusers, through peft).

The run is the suite's sampled run (shared_runs.py): 5 steps, files at steps 2 and 4 and the final file at step 5,
each sampled, and the base model sampled before the first step (step 0); a held-out pass at each file.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from spyke_lora import DeployError, SampleSaved, TrainConfig, contact_sheet, deploy, diffusers_pipeline, review
from spyke_lora._compare import sheet_layout

from .helpers import NAME, PROMPTS, read_lora

STEPS = (0, 2, 4, 5)  # the sheet's rows: the base model, then each saved file


@pytest.fixture(scope="module")
def run(sampled_run):
    return SimpleNamespace(
        cfg=sampled_run.cfg,
        result=sampled_run.result,
        samples=[e for e in sampled_run.events if isinstance(e, SampleSaved)],
    )


def test_every_saved_file_and_the_base_model_give_a_sample_per_prompt_and_cfg(run):
    """Every saved file (steps 2, 4 and the final file, 5) and the base model give a sample per prompt and CFG
    scale (the final file at a saved step's weights is sampled once: test_notebook.py, test_processes.py)."""
    assert [(c.step, c.final) for c in run.result.checkpoints] == [(2, False), (4, False), (5, True)]
    assert [(s.step, s.prompt, s.cfg_scale) for s in run.samples] == [
        (step, prompt, scale) for step in STEPS for prompt in PROMPTS for scale in (5.0, 9.0)
    ]
    assert all(s.path.is_file() for s in run.samples)


def test_contact_sheet_has_a_row_per_file_and_a_column_per_prompt_and_cfg(run):
    sheet = contact_sheet(run.cfg.output_dir, cell=96)
    assert sheet == run.cfg.output_dir / f"{NAME}.contact-sheet.png"
    rows = len(STEPS)
    layout = sheet_layout(rows=rows, cols=4, cell=96)
    with Image.open(sheet) as image:
        assert image.size == (layout.width, layout.height)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    cells = []
    for row in range(rows):
        for col in range(4):
            left, top, right, bottom = layout.cell_box(row, col)
            cells.append(pixels[top:bottom, left:right])
    # 12 different images: the base model's and the files' of steps 2 and 4 (the final file's samples of the first
    # prompt come out NaN, drawn black, on this random model: the row of step 5 is left out)
    distinct = cells[: 3 * 4]
    assert all(np.abs(a - b).max() > 0 for i, a in enumerate(distinct) for b in distinct[i + 1 :])
    for row in range(rows):  # the step labels are drawn
        left, top, right, bottom = layout.label_box(row)
        assert len(np.unique(pixels[top:bottom, left:right].reshape(-1, 3), axis=0)) > 1
    found = review(run.cfg.output_dir)
    assert [s.step for s in found.steps] == list(STEPS)
    assert [c.path for c in found.cells] == [s.path for s in run.samples]
    assert found.columns == tuple((p, s) for p in PROMPTS for s in (5.0, 9.0))
    assert not [c for c in found.cells if any(w.kind == "near-duplicate" for w in c.warnings)]


def test_deploy_installs_refuses_a_clobber_and_keeps_a_backup(run, tmp_path):
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "models" / "checkpoints").mkdir(parents=True)
    (comfyui / "main.py").write_text("# ComfyUI\n")
    step2, final = run.result.checkpoints[0].path, run.result.final_path
    installed = deploy(step2, comfyui)
    target = comfyui / "models" / "loras" / f"{NAME}.safetensors"
    assert installed.status == "installed" and installed.path == target and installed.step == 2
    assert target.read_bytes() == step2.read_bytes()
    sidecar = json.loads((comfyui / "models" / "loras" / f"{NAME}.spyke-lora.json").read_text())
    assert sidecar["source"] == str(step2) and sidecar["step"] == 2
    # the run's NAME.config.toml, found by its name ("auto" as the run resolved it)
    assert TrainConfig.from_dict(sidecar["config"]) == run.cfg.replace(
        gradient_checkpointing=run.result.memory.gradient_checkpointing
    )
    assert sidecar["config_path"] == str(run.cfg.output_dir / f"{NAME}.config.toml")
    assert sidecar["base_model"]["name"] == run.cfg.base_model.name
    with pytest.raises(DeployError, match="overwrite"):
        deploy(final, comfyui)
    assert target.read_bytes() == step2.read_bytes()
    replaced = deploy(final, comfyui, overwrite=True)
    assert replaced.status == "replaced" and replaced.step == 5 and target.read_bytes() == final.read_bytes()
    assert replaced.backup.read_bytes() == step2.read_bytes()
    assert deploy(final, comfyui).status == "unchanged"
    assert sorted(p.name for p in target.parent.iterdir()) == [
        ".spyke-lora-backup",
        f"{NAME}.safetensors",
        f"{NAME}.spyke-lora.json",
    ]  # no temporary file left


def test_the_lora_loads_into_diffusers_and_changes_its_images(run):
    """A consumer other than sd-scripts: diffusers' StableDiffusionPipeline on the same tiny base, built offline,
    loads the kohya-format file (through peft), applies every module of it, and its images change."""
    pipe = diffusers_pipeline(run.cfg)
    pipe.set_progress_bar_config(disable=True)

    def image():
        out = pipe(
            PROMPTS[0],
            num_inference_steps=1,
            guidance_scale=7.0,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(1234),
        )
        return out.images[0]

    before = image()
    final = run.result.final_path
    pipe.load_lora_weights(str(final.parent), weight_name=final.name, adapter_name="spyke")
    tensors, _ = read_lora(final)
    pairs = {k.split(".")[0] for k in tensors if k.endswith(".lora_down.weight")}
    wrapped = [
        n
        for model in (pipe.unet, pipe.text_encoder)
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "spyke" in getattr(m, "lora_A", {})
    ]
    assert len(wrapped) == len(pairs)  # every LoRA module of the file found its layer
    with_lora = image()
    assert np.isfinite(with_lora).all() and np.abs(with_lora - before).max() > 0
    pipe.unload_lora_weights()
    assert np.array_equal(image(), before)  # unloaded: the base model's image again, bit for bit
