"""The dataset's images: each one opened for its header (format and size) and its container walked, not decoded.

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

import dataclasses
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from ._context import Findings, FolderContext, names

__all__ = [
    "STRUCTURE_CHECKS",
    "ImageScan",
    "check_broken_images",
    "check_exact_size",
    "check_extensions",
    "check_small_images",
    "scan_images",
]

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
STRUCTURE_CHECKS: dict[str, Callable[[Path], str | None]] = {
    "PNG": _png_damage,
    "JPEG": _jpeg_damage,
    "MPO": _jpeg_damage,
    "WEBP": _webp_damage,
}


@dataclasses.dataclass(frozen=True)
class ImageScan:
    """One image as its header and container walk found it: ``damage`` says why it is broken (None: it is not)."""

    path: Path
    format: str | None
    size: tuple[int, int]
    damage: str | None


def _scan(image: Path) -> ImageScan:
    from PIL import Image, UnidentifiedImageError

    fmt, size = None, (0, 0)
    try:
        with Image.open(image) as im:  # the header: format and size
            fmt, size = im.format, im.size
            structure_check = STRUCTURE_CHECKS.get(fmt or "")
            if structure_check is None:
                im.load()  # no cheap check for this format: decode every pixel
        damage = structure_check(image) if structure_check is not None else None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        damage = str(e)
    return ImageScan(image, fmt, size, damage)


def _scan_all(folder: FolderContext) -> list[ImageScan]:
    return [_scan(image) for image in folder.images]


def scan_images(folder: FolderContext) -> list[ImageScan]:
    """Every image of a folder scanned, once (the image checks share the scan).

    Args:
        folder: The folder's context.

    Returns:
        One :class:`ImageScan` per image, in the images' order.
    """
    return folder.once(_scan_all)


def _readable(folder: FolderContext) -> list[ImageScan]:
    return [scan for scan in scan_images(folder) if scan.damage is None]


def check_broken_images(folder: FolderContext, found: Findings) -> None:
    """An image cut short or corrupt fails here, not minutes into the run."""
    broken = [f"{scan.path} ({scan.damage})" for scan in scan_images(folder) if scan.damage is not None]
    if broken:
        found.problem(
            f"{len(broken)} image(s) in {folder.where} cannot be decoded (truncated or corrupt): {names(broken)}"
        )


def check_extensions(folder: FolderContext, found: Findings) -> None:
    """An image whose content is another format than its extension says."""
    mismatched = []
    for scan in _readable(folder):
        allowed = _FORMAT_EXTENSIONS.get(scan.format or "", ())
        if allowed and scan.path.suffix.lower() not in allowed:
            mismatched.append(f"{scan.path} is {scan.format}: rename it to {scan.path.with_suffix(allowed[0]).name}")
    if mismatched:
        found.problem(f"{len(mismatched)} image(s) in {folder.where} do not match their extension: {names(mismatched)}")


def check_exact_size(folder: FolderContext, found: Findings) -> None:
    """With bucketing off, sd-scripts needs every image at resolution x resolution."""
    cfg = folder.cfg
    if cfg.enable_bucket:
        return
    wanted = (cfg.resolution, cfg.resolution)
    off_size = [f"{scan.path} ({scan.size[0]}x{scan.size[1]})" for scan in _readable(folder) if scan.size != wanted]
    if off_size:
        found.problem(
            f"{len(off_size)} image(s) in {folder.where} are not {cfg.resolution}x{cfg.resolution}, which sd-scripts "
            f"needs with bucketing off: {names(off_size)}; set enable_bucket = true or resize them"
        )


def check_small_images(folder: FolderContext, found: Findings) -> None:
    """An image smaller than the resolution is upscaled: a warning."""
    resolution = folder.cfg.resolution
    small = [scan.path for scan in _readable(folder) if min(scan.size) < resolution]
    if small:
        found.warning(
            f"{len(small)} image(s) in {folder.where} are smaller than the resolution {resolution} and will be "
            f"upscaled (blurrier training): {names(small)}"
        )
