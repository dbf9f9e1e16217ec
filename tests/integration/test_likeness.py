"""Issue 24 on the real engine: likeness() on the suite's sampled run (shared_runs.py: files at steps 2, 4 and the
final file at 5, each sampled for 2 prompts x 2 CFG scales, the base model at step 0, a held-out pass at each file),
its base model's samples made once by sample(base_only=True) when the run has none. The DINO and CLIP models are
small random ones (tests/likeness_models.py): nothing downloads."""

import json
import shutil

import numpy as np
from PIL import Image

from spyke_lora import likeness

from ..likeness_models import build_likeness_models
from .helpers import NAME


def test_likeness_makes_the_base_samples_once_and_scores_every_file(sampled_run, tmp_path):
    original = sampled_run.cfg.output_dir
    run = tmp_path / "out"
    shutil.copytree(original, run)
    manifest = run / f"{NAME}.samples.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    base_before = {(x["prompt"], x["cfg_scale"]): x["path"] for x in lines if x["step"] == 0}
    assert len(base_before) == 4
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines if x["step"] != 0))  # a run without step 0
    dino, clip = build_likeness_models(tmp_path / "models")

    found = likeness(run, dino=str(dino), clip=str(clip))

    assert [(r.step, r.samples) for r in found.rows] == [(2, 4), (4, 4), (5, 4)]
    assert found.rows[-1].checkpoint == run / f"{NAME}.safetensors"
    assert found.base is not None and found.base.samples == 4 and found.base.step == 0
    made = {(c.prompt, c.cfg_scale): c.sample for c in found.base.cells}
    assert sorted(made) == sorted(base_before)
    for key, path in made.items():  # the same prompts and seeds with no LoRA: the images the run made at step 0
        assert path.parent == run / "sample"
        before = original / "sample" / (base_before[key].rsplit("/", 1)[-1])
        with Image.open(path) as a, Image.open(before) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), key
    assert found.ceiling.note.endswith("held-out images against the 3 training images")
    assert found.recommended is not None and found.recommended.checkpoint.is_file()
    assert found.reason.startswith(f"step {found.recommended.step}: DINO ")

    stamps = {p: p.stat().st_mtime_ns for p in made.values()}
    again = likeness(run, dino=str(dino), clip=str(clip))  # made once: cached as the run's step-0 samples
    assert {p: p.stat().st_mtime_ns for p in made.values()} == stamps
    assert again == found
