"""What ``plan()`` costs on a Spyke-sized dataset: 23 training images + 100 regularisation images, each captioned.

Issue 22 made the preflight read more of each image (the EXIF orientation, the mode and bit depth, the alpha band of
images that have one) and read every caption through sd-scripts' own code. This times ``plan()`` for one or more
source trees of the library (``--repo``, e.g. this checkout and a ``git worktree`` of an older commit), each in a
child process of its own, alternating the trees run by run so neither gets a warmer machine.

The dataset (built once under ``--folder``, reused): 23 random-noise RGB JPEGs of 1536x1024 (quality 95: noise is
the worst case for file size, so for the container walk), 100 random-noise RGB PNGs of 512x512 (what a
regularisation set generated with SD1.5 looks like), a caption file for each, and a header-only base model. With
``--alpha`` the 23 training images are RGBA PNG cut-outs of 1024x1024 instead (a transparent background: the
images whose alpha band the preflight now reads).

In each child: ``import spyke_lora``, one ``plan()`` (it imports sd-scripts, about 6 s, reported as "first"), then
``--calls`` more ``plan()`` calls timed one by one ("warm": the cost a notebook user pays for each re-plan), then
``--calls`` more with the preflight's image-scan cache emptied before each (every image scanned afresh, as the first
call does, but with sd-scripts already imported; a tree without that cache scans afresh on every call anyway).
Files are read once before timing, so every call reads from the page cache.

    .venv/bin/python benchmarks/plan_time.py --repo . --repo /tmp/plan-before [--runs 3] [--calls 5] [--alpha]

Prints a markdown table per tree: first call, median warm call, and the ratio of medians to the first tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SD_SCRIPTS = HERE.parent / "vendor" / "sd-scripts"
TRAIN, REG = 23, 100


def _write_model(path: Path) -> None:
    """A header-valid SD1.5 safetensors file (plan() reads the header only)."""
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    header = json.dumps({key: {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)


def build(root: Path, alpha: bool) -> Path:
    """The dataset under ``root`` (reused when complete); returns the config's TOML path."""
    rng = np.random.default_rng(0)
    train = root / ("10_spyke_plasma_v1_alpha" if alpha else "10_spyke_plasma_v1")
    reg = root / "reg" / "1_anime_character"
    for folder, count, make in (
        (train, TRAIN, (lambda i: _cutout(rng)) if alpha else (lambda i: _photo(rng))),
        (reg, REG, lambda i: _reg(rng)),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.glob("*.txt"))) == count:
            continue
        for i in range(count):
            image, ext, options = make(i)
            image.save(folder / f"img{i:03d}{ext}", **options)
            (folder / f"img{i:03d}.txt").write_text("spyke_plasma_v1, ginger hair, white cloak, bracer")
    _write_model(root / "model.safetensors")
    config = root / ("spyke-alpha.toml" if alpha else "spyke.toml")
    config.write_text(
        textwrap.dedent(
            f"""\
            base_model = "{root / "model.safetensors"}"
            train_dir = "{train}"
            reg_dir = "{reg}"
            output_dir = "{root / "out"}"
            output_name = "spyke_plasma_v1"
            max_train_epochs = 2
            save_every_n_steps = 200
            device = "cpu"
            sd_scripts_dir = "{SD_SCRIPTS}"
            """
        )
    )
    return config


def _photo(rng: np.random.Generator) -> tuple[Image.Image, str, dict]:
    return Image.fromarray(rng.integers(0, 256, (1024, 1536, 3), np.uint8)), ".jpg", {"quality": 95}


def _reg(rng: np.random.Generator) -> tuple[Image.Image, str, dict]:
    return Image.fromarray(rng.integers(0, 256, (512, 512, 3), np.uint8)), ".png", {}


def _cutout(rng: np.random.Generator) -> tuple[Image.Image, str, dict]:
    pixels = rng.integers(0, 256, (1024, 1024, 4), np.uint8)
    pixels[:, :256, 3] = 0  # a transparent background band
    pixels[:, 256:, 3] = 255
    return Image.fromarray(pixels, "RGBA"), ".png", {}


CHILD = """
import json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
from spyke_lora import TrainConfig, plan
cfg = TrainConfig.from_toml(sys.argv[2])
for p in list(cfg.train_dir.iterdir()) + list(cfg.reg_dir.iterdir()):
    p.read_bytes()
t = time.perf_counter(); plan(cfg); first = time.perf_counter() - t
warm = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); plan(cfg); warm.append(time.perf_counter() - t)
cold = []  # the engine imported, but no image scanned before (a tree without the scan cache: the same as warm)
for _ in range(int(sys.argv[3])):
    try:
        from spyke_lora._preflight import _images
        _images._SCAN_CACHE.clear()
    except (ImportError, AttributeError):
        pass
    t = time.perf_counter(); plan(cfg); cold.append(time.perf_counter() - t)
print(json.dumps({"first": first, "warm": warm, "cold": cold}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", action="append", type=Path, required=True, help="a source tree of spyke-lora")
    parser.add_argument("--runs", type=int, default=3, help="child processes per tree, alternating")
    parser.add_argument("--calls", type=int, default=5, help="warm plan() calls timed per child")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/plan-bench"))
    parser.add_argument("--alpha", action="store_true", help="the training images are RGBA PNG cut-outs")
    args = parser.parse_args()
    config = build(args.folder, args.alpha)
    results: dict[Path, dict[str, list[float]]] = {repo: {"first": [], "warm": [], "cold": []} for repo in args.repo}
    for _ in range(args.runs):
        for repo in args.repo:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(repo.resolve()), str(config), str(args.calls)],
                capture_output=True,
                text=True,
                check=True,
            )
            timing = json.loads(out.stdout.strip().splitlines()[-1])
            results[repo]["first"].append(timing["first"])
            results[repo]["warm"] += timing["warm"]
            results[repo]["cold"] += timing["cold"]
    base = statistics.median(results[args.repo[0]]["warm"])
    dataset = f"{TRAIN} {'RGBA PNG cut-outs' if args.alpha else 'JPEGs'} + {REG} PNGs"
    print(f"plan() on {dataset}, {args.runs} runs x {args.calls} warm calls per tree\n")
    print(
        "| tree | first call (s), median | warm call (s), median | warm / first tree's | re-plan, every image "
        "scanned afresh (s), median |"
    )
    print("|---|---|---|---|---|")
    for repo, timing in results.items():
        warm = statistics.median(timing["warm"])
        first = statistics.median(timing["first"])
        cold = statistics.median(timing["cold"])
        print(f"| {repo} | {first:.2f} | {warm:.3f} | {warm / base:.2f} | {cold:.3f} |")


if __name__ == "__main__":
    main()
