"""Checks that refuse a bad run before 2 GB are loaded: every problem found, each naming its file or field.

``problems`` stop the run (:class:`ConfigError` lists them all); ``warnings`` are shown and the run goes on.

Images are not decoded here. sd-scripts decodes every image again when it caches latents (or loads a batch), so a
full decode (``im.load()``) in the preflight doubled the decoding before the first step: for 123 JPEGs of
1024-2048 px, seconds spent twice. Instead each image is opened with ``Image.open`` (the header only: format and
size) and, for the formats a dataset is made of, its container is walked without decoding a pixel, which still
catches a truncated or corrupt file before the run instead of minutes into it:

- PNG: every chunk (length, type, data, CRC) up to IEND, each CRC checked with ``zlib.crc32`` (nothing inflated).
  PIL's own ``verify()`` is not used: it stops at IEND's header without reading its CRC (a file cut there passes)
  and skips ancillary CRCs when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set.
- JPEG: the segments up to EOI, by their lengths, and the entropy-coded data of each scan searched for the next
  marker (a byte scan, no Huffman decoding). A file cut anywhere before EOI is broken. Bytes after EOI are accepted,
  however many: decoders stop at EOI, and cameras and phones append data there (Samsung trailers, the several-MB
  video of a Google Motion Photo), so "the file ends with FF D9" would refuse good photographs.
- WEBP: the RIFF header's size (+ 8) against the file's size: a shorter file is truncated. A longer one is accepted,
  as libwebp ignores bytes past the RIFF payload.

Every other format (BMP, AVIF, JXL, ...) is still decoded in full: those are rare in a dataset and have no cheap
check here.
"""

from __future__ import annotations

import collections
import re
import struct
import zlib
from pathlib import Path

from ._config import TrainConfig, repeats_from_folder_name
from ._files import sha256

# What PIL calls each format, and the extensions that format may carry (the usual one first).
_FORMAT_EXTENSIONS = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg", ".jfif"),
    "MPO": (".jpg", ".jpeg"),  # a JPEG with more pictures after the first (phones: depth and gain maps)
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "AVIF": (".avif",),
    "JXL": (".jxl",),
}
_LIST = 5  # file names shown per problem before "... and N more"


def _names(paths: list[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_LIST])
    return shown + (f" ... and {len(paths) - _LIST} more" if len(paths) > _LIST else "")


def _png_damage(path: Path) -> str | None:
    """Why the PNG at ``path`` is broken (a chunk cut short, a CRC that does not match), or None."""
    with path.open("rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return "no PNG signature"
        while True:
            head = f.read(8)
            if len(head) < 8:
                return "the file ends before the PNG's IEND chunk"
            length, kind = struct.unpack(">I4s", head)
            name = kind.decode("latin-1")
            if length > 0x7FFFFFFF:
                return f"PNG chunk {name} has an impossible length {length}"
            data, crc = f.read(length), f.read(4)
            if len(data) < length or len(crc) < 4:
                return f"the file ends inside the PNG chunk {name}"
            if zlib.crc32(data, zlib.crc32(kind)) != int.from_bytes(crc, "big"):
                return f"the PNG chunk {name} fails its CRC check"
            if kind == b"IEND":
                return None  # bytes after IEND are ignored by every decoder


# The next JPEG marker: FF, then neither 00 (a stuffed FF in scan data) nor FF (fill bytes before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff]")


def _jpeg_damage(path: Path) -> str | None:
    """Why the JPEG at ``path`` is broken (cut before its EOI marker, a segment longer than the file), or None.
    Bytes after EOI are accepted (see the module docstring)."""
    data = path.read_bytes()
    if not data.startswith(b"\xff\xd8"):
        return "no JPEG SOI marker"
    pos, scans = 2, 0
    while True:
        # Between segments this skips fill bytes (and any stray bytes, as libjpeg does, with a warning); after an
        # SOS header it crosses the scan's entropy-coded data and its RSTn markers to the marker that ends the scan.
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            return "the file ends before the JPEG's EOI marker"
        code = data[found.start() + 1]
        if code == 0xD9:  # EOI
            return None if scans else "the JPEG has no image data (EOI before any SOS)"
        if 0xD0 <= code <= 0xD7 or code == 0x01:  # RSTn, TEM: no length
            pos = found.end()
            continue
        if found.end() + 2 > len(data):
            return "the file ends inside a JPEG segment header"
        length = int.from_bytes(data[found.end() : found.end() + 2], "big")
        if length < 2:
            return f"a JPEG segment (marker FF{code:02X}) has an impossible length {length}"
        pos = found.end() + length
        if pos > len(data):
            return f"the file ends inside a JPEG segment (marker FF{code:02X})"
        scans += code == 0xDA  # SOS


def _webp_damage(path: Path) -> str | None:
    """Why the WEBP at ``path`` is broken (shorter than its RIFF header says), or None."""
    with path.open("rb") as f:
        head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WEBP":
        return "no RIFF/WEBP header"
    declared, actual = int.from_bytes(head[4:8], "little") + 8, path.stat().st_size
    if actual < declared:
        return f"the file is {actual} bytes, its RIFF header says {declared}"
    return None


# Formats checked by walking their container instead of decoding (PIL's name for each).
# MPO: the first picture is a whole JPEG and the rest follow its EOI, which the JPEG walk accepts as trailing data
_STRUCTURE_CHECKS = {"PNG": _png_damage, "JPEG": _jpeg_damage, "MPO": _jpeg_damage, "WEBP": _webp_damage}


def check_folder(folder, cfg: TrainConfig, image_extensions: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Problems and warnings of one dataset folder (an ``_engine`` ``Folder``)."""
    from PIL import Image, UnidentifiedImageError

    problems: list[str] = []
    warnings: list[str] = []
    where = folder.source
    if not folder.folder.is_dir():
        return [f"{where} folder {str(folder.folder)!r} does not exist; check the path"], []
    extensions = {e.lower() for e in image_extensions}
    images = sorted(p for p in folder.folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if not images:
        return [f"{where} folder {str(folder.folder)!r} has no images ({', '.join(sorted(extensions))})"], []

    parsed = repeats_from_folder_name(folder.folder)
    if where == "`train_dir`" and parsed and cfg.num_repeats is not None and parsed[0] != cfg.num_repeats:
        # an explicit value is a legitimate override (e.g. a quick 1-repeat test), so it wins, loudly
        warnings.append(
            f"`num_repeats` is {cfg.num_repeats} but the folder name {folder.folder.name!r} says {parsed[0]}: "
            f"{cfg.num_repeats} is used; remove num_repeats to use the folder's, or rename the folder to "
            f"'{cfg.num_repeats}_{parsed[1]}'"
        )

    stems = collections.defaultdict(list)
    for image in images:
        stems[image.stem].append(image)
    for same in (paths for paths in stems.values() if len(paths) > 1):
        problems.append(
            f"{_names(same)} share the stem {same[0].stem!r} and so one caption file; rename or remove one"
        )

    broken, mismatched, small, off_size = [], [], [], []
    for image in images:
        try:
            with Image.open(image) as im:  # the header: format and size
                fmt, size = im.format, im.size
                structure_check = _STRUCTURE_CHECKS.get(fmt or "")
                if structure_check is None:
                    im.load()  # no cheap check for this format: decode every pixel
            damage = structure_check(image) if structure_check is not None else None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            damage = str(e)
        if damage is not None:  # a truncated file fails here, not minutes into the run
            broken.append(f"{image} ({damage})")
            continue
        allowed = _FORMAT_EXTENSIONS.get(fmt or "", ())
        if allowed and image.suffix.lower() not in allowed:
            mismatched.append(f"{image} is {fmt}: rename it to {image.with_suffix(allowed[0]).name}")
        if min(size) < cfg.resolution:
            small.append(image)
        if not cfg.enable_bucket and size != (cfg.resolution, cfg.resolution):
            off_size.append(f"{image} ({size[0]}x{size[1]})")
    if broken:
        problems.append(f"{len(broken)} image(s) in {where} cannot be decoded (truncated or corrupt): {_names(broken)}")
    if mismatched:
        problems.append(f"{len(mismatched)} image(s) in {where} do not match their extension: {_names(mismatched)}")
    if off_size:
        problems.append(
            f"{len(off_size)} image(s) in {where} are not {cfg.resolution}x{cfg.resolution}, which sd-scripts needs "
            f"with bucketing off: {_names(off_size)}; set enable_bucket = true or resize them"
        )
    if small:
        warnings.append(
            f"{len(small)} image(s) in {where} are smaller than the resolution {cfg.resolution} and will be "
            f"upscaled (blurrier training): {_names(small)}"
        )

    missing, empty, trigger_not_first = [], [], []
    for image in images:
        caption = image.with_suffix(folder.caption_extension)
        if not caption.is_file():
            missing.append(caption)
            continue
        text = caption.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            empty.append(caption)
        elif cfg.keep_tokens >= 1 and not folder.is_reg and folder.class_tokens:
            if text.split(",")[0].strip() != folder.class_tokens:
                trigger_not_first.append(caption)
    fallback = f"sd-scripts would train on the folder's class token {folder.class_tokens!r} instead"
    for found, what in ((missing, "missing"), (empty, "empty")):
        if not found:
            continue
        message = f"{len(found)} caption file(s) in {where} are {what}: {_names(found)}; {fallback}"
        (warnings if folder.is_reg else problems).append(message)
    if trigger_not_first:
        warnings.append(
            f"{len(trigger_not_first)} caption(s) in {where} do not start with the trigger {folder.class_tokens!r} "
            f"(keep_tokens = {cfg.keep_tokens} keeps the first token in place while the rest is shuffled): "
            f"{_names(trigger_not_first)}"
        )
    return problems, warnings


def held_out_problems(held_out, folders, image_extensions: tuple[str, ...]) -> list[str]:
    """A held-out image that is also a training image (the same bytes, under any name) is not held out: one problem
    per such image, naming both files."""
    extensions = {e.lower() for e in image_extensions}

    def images(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)

    held = images(held_out.folder)
    sizes = {image.stat().st_size for image in held}  # the same bytes have the same size: hash only those
    trained: dict[str, Path] = {}
    for folder in folders:
        for image in images(folder.folder):
            if image.stat().st_size in sizes:
                trained.setdefault(sha256(image), image)
    problems = []
    for image in held:
        twin = trained.get(sha256(image)) if trained else None
        if twin is not None:
            problems.append(
                f"held-out image {str(image)!r} is also a training image ({str(twin)!r}): a held-out loss is only "
                f"worth something on images the run never sees; remove it from one of the two folders"
            )
    return problems


def config_warnings(cfg: TrainConfig, total_steps: int) -> list[str]:
    """Settings worth a warning, not a refusal: alpha above dim, ``flip_aug``, a save interval longer than the run."""
    warnings = []
    if cfg.network_alpha > cfg.network_dim:
        warnings.append(
            f"`network_alpha` {cfg.network_alpha:g} is above `network_dim` {cfg.network_dim}: the LoRA's updates are "
            f"scaled up by {cfg.network_alpha / cfg.network_dim:g}x; the recipe uses alpha = dim / 2"
        )
    if cfg.flip_aug:
        warnings.append("`flip_aug` is on: mirrored images teach the LoRA a mirrored character (asymmetric costumes)")
    if cfg.save_every_n_steps is not None and cfg.save_every_n_steps > total_steps:
        warnings.append(
            f"`save_every_n_steps` {cfg.save_every_n_steps} is more than the run's {total_steps} steps: only the "
            f"final file will be written"
        )
    return warnings
