"""What the preflight's image check costs: a full decode of every image against the header + container walk.

sd-scripts decodes every image itself (caching latents, loading batches), so a preflight that decodes them too
(``im.load()``, what ``_preflight.check_folder`` did) doubles the decoding before the first step. ``check_folder``
now reads each header (``Image.open``: format, size, mode, EXIF orientation, all from the header) and walks the
PNG chunks / JPEG segments / WEBP RIFF size instead; only images with alpha have their alpha band decoded (these
noise images have none).

The folders (built once, reused): 123 random-noise RGB JPEGs of 1536x1024 (quality 95) and 123 random-noise PNGs of
1024x1024 under /tmp/pfbench (noise: the worst case for file size, so for the walk). Each repetition times, in one
process and alternating, ``check_folder`` on both folders three ways:

- full decode: ``check_folder`` with no container walk registered, so every format takes the ``im.load()`` path
  (exactly the check as it was before);
- header + walk: ``check_folder`` as it is;
- header only: ``Image.open`` of every image and nothing more (the floor: what the walk adds on top of it).

Files are read once before timing, so every repetition reads from the page cache.

    .venv/bin/python benchmarks/preflight_images.py [--repeats 3] [--folder /tmp/pfbench]

Prints a markdown table: the seconds of each repetition, their median, and full decode / header + walk.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from spyke_lora import TrainConfig, _preflight
from spyke_lora._engine import Folder

COUNT = 123
SETS = {"1_jpeg": ("JPEG", ".jpg", (1024, 1536), {"quality": 95}), "1_png": ("PNG", ".png", (1024, 1024), {})}
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def build(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folders = []
    for name, (fmt, ext, shape, save) in SETS.items():
        folder = root / name
        folders.append(folder)
        if len(list(folder.glob(f"*{ext}"))) == COUNT:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(COUNT):
            pixels = rng.integers(0, 256, (*shape, 3), np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}{ext}", format=fmt, **save)
            (folder / f"img{i:03d}.txt").write_text("spyke_plasma_v1, noise")
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/pfbench"))
    args = parser.parse_args()
    folders = build(args.folder)
    for path in (p for folder in folders for p in folder.iterdir()):
        path.read_bytes()  # into the page cache: every way reads warm files
    cfg = TrainConfig(
        base_model=args.folder / "none.safetensors",
        train_dir=folders[0],
        output_dir=args.folder / "out",
        output_name="bench",
        resolution=1024,
        enable_bucket=True,
    )
    subsets = [Folder(f, 1, False, ".txt", None, "`train_dir`") for f in folders]

    def check() -> None:
        for subset in subsets:
            problems, _ = _preflight.check_folder(subset, cfg, EXTENSIONS)
            assert not problems, problems

    def full_decode() -> None:
        with mock.patch.dict(_preflight.STRUCTURE_CHECKS, clear=True):
            check()

    def header_only() -> None:
        for path in sorted(p for f in folders for p in f.iterdir() if p.suffix in (".jpg", ".png")):
            with Image.open(path) as im:
                im.size  # noqa: B018

    ways = {"full decode (before)": full_decode, "header + walk (now)": check, "header only (floor)": header_only}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)

    images = sum(1 for f in folders for p in f.iterdir() if p.suffix in (".jpg", ".png"))
    megabytes = sum(p.stat().st_size for f in folders for p in f.iterdir()) / 1e6
    print(f"{images} images ({megabytes:.0f} MB): {COUNT} JPEG 1536x1024 q95 + {COUNT} PNG 1024x1024, random noise\n")
    print("| check | " + " | ".join(f"rep {i + 1} (s)" for i in range(args.repeats)) + " | median (s) |")
    print("|---|" + "---:|" * (args.repeats + 1))
    for name, seconds in times.items():
        print(f"| {name} | " + " | ".join(f"{s:.3f}" for s in seconds) + f" | {statistics.median(seconds):.3f} |")
    ratio = statistics.median(times["full decode (before)"]) / statistics.median(times["header + walk (now)"])
    print(f"\nfull decode / header + walk (medians): {ratio:.1f}x")


if __name__ == "__main__":
    main()
