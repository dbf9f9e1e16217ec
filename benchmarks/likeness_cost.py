"""What scoring a run for likeness costs: time and peak memory of ``likeness()`` on the Spyke recipe's run shape.

    .venv/bin/python benchmarks/likeness_cost.py WORK [--clip b32|l14] [--device cpu|cuda|mps] [--reps N]

The run is synthetic and the size of examples/spyke.toml's: 5 checkpoints (steps 200, 400, 600, 800 and the final
920) x 9 cells (3 prompts x CFG 5, 7, 9), the base model's 9 samples (step 0), 23 training images and 3 held-out
images, every image 512 x 512 (random smooth pictures). The models have the real architectures, randomly
initialised from their configs (nothing downloads): DINO ViT-S/16 (facebook/dino-vits16's config: 12 layers of 384,
224 px, patch 16) and CLIP ViT-B/32 (openai/clip-vit-base-patch32's: CLIPConfig's defaults) or, with ``--clip l14``,
ViT-L/14 (openai/clip-vit-large-patch14's), saved with their processors and loaded by ``likeness()`` itself, as a
user's download would be. Per repetition, in a fresh process each (``_measure.py``'s way: a child per figure): the
wall time of loading the two models, of the whole ``likeness()`` call, and the child's peak resident memory; on
CUDA also torch's peak allocated memory. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = (  # examples/spyke.toml's
    "spyke_plasma_v1, standing in a forest, dramatic lighting, anime style",
    "spyke_plasma_v1, crouching, looking up, urban environment",
    "spyke_plasma_v1, full body, front view, detailed character study",
)
CFGS = (5.0, 7.0, 9.0)
STEPS = (0, 200, 400, 600, 800, 920)  # the base model, then the 5 files
NAME = "spyke_plasma_v1"


def picture(seed: int, size: int = 512):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(0, 1) * x + rng.uniform(0, 1) * y for _ in range(3)], axis=2)
    blocks = np.kron(rng.uniform(0, 1, (16, 16, 3)), np.ones((size // 16, size // 16, 1)))
    return Image.fromarray(((0.5 * base + 0.5 * blocks).clip(0, 1) * 255).astype(np.uint8))


def write_checkpoint(path: Path, step: int) -> None:
    import struct

    text = json.dumps(
        {
            "__metadata__": {"ss_steps": str(step)},
            "lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))


def build_run(work: Path) -> Path:
    run = work / "run"
    if (run / f"{NAME}.samples.jsonl").is_file():
        return run
    for folder in ("sample", "train/10_spyke_plasma_v1", "val/1_spyke_plasma_v1", "reg/1_person"):
        (run / folder).mkdir(parents=True, exist_ok=True)
    for i in range(23):
        picture(1000 + i).save(run / "train/10_spyke_plasma_v1" / f"{i:02d}.png")
    for i in range(3):
        picture(2000 + i).save(run / "val/1_spyke_plasma_v1" / f"{i}.png")
    lines, seed = [], 0
    for step in STEPS:
        file = f"{NAME}.safetensors" if step == STEPS[-1] else f"{NAME}-step{step:08d}.safetensors"
        if step:
            write_checkpoint(run / file, step)
        for p, prompt in enumerate(PROMPTS):
            for c, cfg in enumerate(CFGS):
                seed += 1
                rel = f"sample/{NAME}_{step:06d}_{p * 3 + c:02d}_20261208000000_1234.png"
                picture(seed).save(run / rel)
                lines.append(
                    {"step": step, "prompt": prompt, "cfg_scale": cfg, "seed": 1234, "path": rel,
                     "checkpoint": file if step else None}
                )  # fmt: skip
    (run / f"{NAME}.samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / f"{NAME}.config.toml").write_text(
        'train_dir = "train/10_spyke_plasma_v1"\nreg_dir = "reg/1_person"\nvalidation_dir = "val/1_spyke_plasma_v1"\n'
    )
    return run


def build_models(work: Path, clip_kind: str) -> tuple[Path, Path]:
    """DINO ViT-S/16 and CLIP ViT-B/32 (or L/14), randomly initialised from their configs, with their processors."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from spyke_lora.tiny_world import write_tokenizer

    dino, clip = work / "dino-vits16", work / f"clip-{clip_kind}"
    torch.manual_seed(0)
    if not (dino / "config.json").is_file():
        config = ViTConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16
        )
        ViTModel(config).save_pretrained(dino)
        # facebook/dino-vits16's preprocessor_config.json: 224 px, ImageNet mean and std
        ViTImageProcessor(
            size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
        ).save_pretrained(dino)
    if not (clip / "config.json").is_file():
        if clip_kind == "l14":
            text = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
            vision = {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                "patch_size": 14,
            }
            config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
        else:
            config = CLIPConfig()  # ViT-B/32: openai/clip-vit-base-patch32's architecture
        CLIPModel(config).save_pretrained(clip)
        files = write_tokenizer(work / "tokenizer")  # a byte-level vocabulary (ids below 49408): same cost per token
        tokenizer = CLIPTokenizer.from_pretrained(str(files))
        CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(clip)
    return dino, clip


def child(work: Path, clip_kind: str, device: str) -> None:
    """One measurement, in this (fresh) process: prints one JSON line."""
    import psutil
    import torch

    from spyke_lora import likeness
    from spyke_lora._likeness import LikenessEncoders, load_clip, load_dino

    run = build_run(work)
    dino, clip = build_models(work, clip_kind)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = psutil.Process().memory_info().rss / 2**20  # torch, transformers and spyke_lora imported
    start = time.perf_counter()
    encoders = LikenessEncoders(load_dino(str(dino), device), load_clip(str(clip), device))
    loaded = time.perf_counter()
    found = likeness(run, encoders=encoders, make_base=False)
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    images = sum(r.samples for r in found.rows) + (found.base.samples if found.base else 0)
    print(
        json.dumps(
            {
                "load_s": loaded - start,
                "score_s": end - loaded,
                "total_s": end - start,
                "rss_before_mb": before,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
                "samples": images,
                "train": len(found.train_images),
                "recommended": found.recommended.step if found.recommended else None,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--clip", choices=("b32", "l14"), default="b32")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: the training device)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.device is None:
        from spyke_lora._likeness import scoring_device

        args.device = scoring_device()
    if args.child:
        child(args.work, args.clip, args.device)
        return
    build_run(args.work)
    build_models(args.work, args.clip)
    runs = []
    for _ in range(args.reps):
        command = [sys.executable, __file__, str(args.work), "--clip", args.clip, "--device", args.device, "--child"]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    first = runs[0]
    print(
        f"### Scoring the Spyke recipe's run ({first['samples']} samples: 5 files x 9 cells + the base model's 9; "
        f"{first['train']} training and 3 held-out images, 512 px), DINO ViT-S/16 + CLIP "
        f"{'ViT-L/14' if args.clip == 'l14' else 'ViT-B/32'}, {args.device}, {args.reps} repetition(s)\n"
    )
    print("| | median | min | max |\n|---|---|---|---|")
    rows = [("loading both models (s)", "load_s"), ("scoring (s)", "score_s"), ("likeness() in all (s)", "total_s")]
    rows.append(("resident memory before loading (MB: torch, transformers, spyke_lora imported)", "rss_before_mb"))
    rows.append(("peak resident memory of the process (MB)", "peak_rss_mb"))
    if first["cuda_peak_mb"] is not None:
        rows.append(("peak CUDA memory allocated (MB)", "cuda_peak_mb"))
    for label, key in rows:
        values = [r[key] for r in runs]
        print(f"| {label} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")


if __name__ == "__main__":
    main()
