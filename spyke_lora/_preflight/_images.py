"""The dataset's images as sd-scripts will read them: each one opened for its header and its container walked, not
decoded (unless it carries transparency).

The list of images is sd-scripts' own (``glob_images``, see :attr:`FolderContext.images`). sd-scripts reads an image
with ``load_image`` (library/train_util.py l.2948): ``Image.open`` then ``convert("RGB")`` (``"RGBA"`` with
``alpha_mask``), nothing more. So, per image, this module reads only what decides what that gives:

- the file itself (one ``stat``): a dangling symlink, a symlink loop, a folder named ``x.png``, an empty or unreadable
  file, each of which sd-scripts lists and fails to open;
- the header (``Image.open``): format, size, mode (bit depth) and the EXIF orientation tag, which sd-scripts never
  applies (a PNG's ``eXIf`` chunk after its image data is picked up by the chunk walk below); Pillow's
  decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) applies here as it does in sd-scripts' ``Image.open``;
- what a file Pillow cannot identify is (its first bytes: an ISO-BMFF ``ftyp`` brand names a HEIC/HEIF photo);
- the alpha band's extrema, only for an image that has an alpha band or a ``transparency`` key (the only decode).

Images are not otherwise decoded. sd-scripts decodes every image again when it caches latents (or loads a batch), so
a full decode (``im.load()``) in the preflight doubled the decoding before the first step: for 123 JPEGs of
1024-2048 px, seconds spent twice. Instead, for the formats a dataset is made of, each container is walked without
decoding a pixel, which still catches a truncated or corrupt file before the run instead of minutes into it:
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
import dataclasses
import errno
import functools
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._context import Findings, FolderContext, names

__all__ = [
    "STRUCTURE_CHECKS",
    "ImageScan",
    "check_broken_images",
    "check_case_extensions",
    "check_exact_size",
    "check_extensions",
    "check_small_images",
    "check_unreadable_images",
    "readable_images",
    "scan_images",
    "wide_mode",
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


def _png_damage(path: Path, seen: dict[str, bytes] | None = None) -> str | None:
    """Why the PNG at ``path`` is broken (a chunk cut short, a CRC that does not match), or None. An ``eXIf`` chunk's
    data goes in ``seen["exif"]`` (Pillow's header read stops at the first IDAT, so it misses one after it)."""
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
            if kind == b"eXIf" and seen is not None:
                seen.setdefault("exif", data)
            if kind == b"IEND":
                return None  # bytes after IEND are ignored by every decoder


# The next JPEG marker: FF, then neither 00 (a stuffed FF in scan data) nor FF (fill bytes before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff]")


def _jpeg_damage(path: Path, seen: dict[str, bytes] | None = None) -> str | None:
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


def _webp_damage(path: Path, seen: dict[str, bytes] | None = None) -> str | None:
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
STRUCTURE_CHECKS: dict[str, Callable[..., str | None]] = {
    "PNG": _png_damage,
    "JPEG": _jpeg_damage,
    "MPO": _jpeg_damage,
    "WEBP": _webp_damage,
}


@dataclasses.dataclass(frozen=True)
class ImageScan:
    """One image as its file, header and container walk found it.

    ``unreadable`` is (kind, description) for a file sd-scripts lists but cannot read at all (a dangling link, a
    folder, an empty file, a HEIC photo, a file Pillow cannot identify, an image past Pillow's size guard); ``damage``
    says why a file that is an image is truncated or corrupt. Both None: sd-scripts reads it, and ``mode`` (Pillow's),
    ``orientation`` (the EXIF tag, 1 when none), ``transparent`` (a pixel of its alpha below 255; only looked at for
    images with alpha) and ``megapixels`` say what it trains as."""

    path: Path
    format: str | None
    size: tuple[int, int]
    damage: str | None
    unreadable: tuple[str, str] | None = None
    mode: str = ""
    orientation: int = 1
    transparent: bool = False

    @property
    def megapixels(self) -> float:
        """Its size in millions of pixels."""
        return self.size[0] * self.size[1] / 1e6


# What Pillow raises for a file it cannot parse or decode (besides OSError): a corrupt header or image data.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, IndexError, TypeError, EOFError, zlib.error)


def _file_problem(path: Path) -> tuple[str, str] | None:
    """(kind, description) of a listed file that is not a readable image file at all (one ``stat``), or None."""
    try:
        info = path.stat()
    except FileNotFoundError:
        target = path.parent / os.readlink(path) if path.is_symlink() else path
        return "link", f"{path} is a symbolic link to {str(target)!r}, which does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "link", f"{path} is a symbolic link loop (it leads back to itself)"
        if e.errno == errno.EACCES:
            return "permission", f"{path} (permission denied)"
        return "unreadable", f"{path} ({e.strerror or e})"
    if stat.S_ISDIR(info.st_mode):
        return "folder", f"{path} is a folder"
    if not stat.S_ISREG(info.st_mode):
        return "unreadable", f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return "permission", f"{path} (permission denied)"
    if info.st_size == 0:
        return "empty", f"{path} is empty (0 bytes)"
    return None


# ISO-BMFF brands (bytes 8-12 after "ftyp") of the formats Pillow cannot read without a plugin.
_FTYP = {
    "heic": "an iPhone HEIC photo",
    "heix": "a HEIC photo (10-bit)",
    "heim": "a HEIC photo",
    "heis": "a HEIC photo",
    "hevc": "a HEIC image sequence (a Live Photo's stills)",
    "hevx": "a HEIC image sequence",
    "mif1": "a HEIF/HEIC image",
    "msf1": "a HEIF/HEIC image sequence",
    "avif": "an AVIF image",
    "avis": "an AVIF image sequence",
}
# The first bytes of files that are not images Pillow reads, and what each is.
_MAGIC = (
    (b"%PDF", "a PDF document"),
    (b"\x00\x05\x16\x07", "a macOS resource fork (AppleDouble)"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1a\x45\xdf\xa3", "a WebM/MKV video"),
)


def _what_it_is(path: Path) -> tuple[str, str]:
    """(kind, description) of a file Pillow cannot identify, from its first bytes."""
    with path.open("rb") as f:
        head = f.read(512)
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1")
        if brand in _FTYP:
            return "format", f"{path} is {_FTYP[brand]} (ftyp brand {brand!r})"
        return "unknown", f"{path} is not an image Pillow can read: it is an MP4/MOV video (ftyp brand {brand!r})"
    what = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if what is None and b"<svg" in head.lower():
        what = "an SVG drawing"
    if what is not None and what.startswith("a JPEG XL"):
        return "format", f"{path} is {what}"
    found = f"it is {what}" if what else f"it starts with {head[:16]!r}"
    return "unknown", f"{path} is not an image Pillow can read ({found})"


def _bomb(path: Path) -> tuple[str, str]:
    """("huge", description) of an image past Pillow's decompression-bomb limit; its size as sd-scripts reads it
    (``imagesize``, l.1482), which does not stop at the limit."""
    try:
        import imagesize

        width, height = imagesize.get(str(path))
    except (ImportError, OSError, ValueError):
        width = height = -1
    if width > 0 and height > 0:
        return "huge", f"{path} is {width}x{height} ({width * height / 1e6:.1f} megapixels)"
    return "huge", f"{path}"


def _alpha_min(im: Any) -> int:
    """The lowest alpha of an image with an alpha band or a ``transparency`` key (this decodes it)."""
    bands = im.getbands()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Palette images with Transparency expressed in bytes" hint
        alpha = im.getchannel("A" if "A" in bands else "a") if {"A", "a"} & set(bands) else None
        if alpha is None:
            alpha = im.convert("RGBA").getchannel("A")
    return int(alpha.getextrema()[0])


def _orientation(im: Any, seen: dict[str, bytes]) -> int:
    """The EXIF orientation tag (0x0112; 1 when none). A PNG's EXIF is taken from the chunk walk, never by decoding
    (Pillow's ``getexif()`` of a PNG without an early ``eXIf`` chunk decodes the image to find a late one)."""
    if im.format == "PNG" and "exif" not in im.info:
        im.info["exif"] = seen.get("exif", b"")
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # EXIF that cannot be parsed: sd-scripts never reads it, so it changes nothing it trains
        return 1


def _scan_open(image: Path, im: Any, alpha_mask: bool) -> ImageScan:
    """The scan of an image Pillow opened: its container walked (or, for other formats, decoded), its EXIF
    orientation, and its alpha's extrema when it has alpha (and ``alpha_mask`` is off)."""
    fmt, size, mode = im.format, im.size, im.mode
    structure_check = STRUCTURE_CHECKS.get(fmt or "")
    seen: dict[str, bytes] = {}
    if structure_check is None:
        im.load()  # no cheap check for this format: decode every pixel
    damage = structure_check(image, seen) if structure_check is not None else None
    if damage is not None:
        return ImageScan(image, fmt, size, damage, mode=mode)
    has_alpha = bool({"A", "a"} & set(im.getbands())) or "transparency" in im.info
    transparent = has_alpha and not alpha_mask and not wide_mode(mode) and _alpha_min(im) < 255
    return ImageScan(image, fmt, size, None, mode=mode, orientation=_orientation(im, seen), transparent=transparent)


def _scan(image: Path, alpha_mask: bool = False) -> ImageScan:
    from PIL import Image, UnidentifiedImageError

    problem = _file_problem(image)
    if problem is not None:
        return ImageScan(image, None, (0, 0), None, problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # reported by check_large_images
            with Image.open(image) as im:
                return _scan_open(image, im, alpha_mask)
    except Image.DecompressionBombError:
        return ImageScan(image, None, (0, 0), None, _bomb(image))
    except UnidentifiedImageError:
        return ImageScan(image, None, (0, 0), None, _what_it_is(image))
    except PermissionError:
        return ImageScan(image, None, (0, 0), None, ("permission", f"{image} (permission denied)"))
    except _DECODE_ERRORS as e:
        return ImageScan(image, None, (0, 0), str(e) or type(e).__name__)


# The scans of files this process has scanned, keyed by what would change the answer: the file's identity and stat
# (a rewrite, a chmod or a replacement changes its size, mtime, ctime or inode), alpha_mask and Pillow's size guard.
# Decoding an alpha band costs about 40 ms for a 1024 px PNG cut-out (PNG has no partial decode), so a notebook's
# plan() after plan(), and the plan() inside train(), would otherwise pay it again for every unchanged image. A cache
# of what a file holds, never of a decision: every rule still runs on every call. Bounded (least recently used out).
_SCAN_CACHE: collections.OrderedDict[tuple[Any, ...], ImageScan] = collections.OrderedDict()
_SCAN_CACHE_SIZE = 4096
_SCAN_CACHE_LOCK = threading.Lock()


def _scan_key(image: Path, alpha_mask: bool) -> tuple[Any, ...] | None:
    """What the scan of ``image`` depends on, or None when its file cannot be stat'ed (scanned afresh)."""
    from PIL import Image

    try:
        st = os.stat(image)
    except OSError:
        return None
    return (str(image), alpha_mask, Image.MAX_IMAGE_PIXELS, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns, st.st_mode)  # fmt: skip


def cached_scan(image: Path, alpha_mask: bool = False) -> ImageScan:
    """:func:`_scan` of ``image``, from this process's cache when the file is unchanged since it was scanned.

    Args:
        image: The image file.
        alpha_mask: Whether the subset trains with ``alpha_mask`` (its alpha is then not read).

    Returns:
        Its :class:`ImageScan`.
    """
    key = _scan_key(image, alpha_mask)
    if key is not None:
        with _SCAN_CACHE_LOCK:
            hit = _SCAN_CACHE.get(key)
            if hit is not None:
                _SCAN_CACHE.move_to_end(key)
                return hit
    scan = _scan(image, alpha_mask)
    if key is not None:
        with _SCAN_CACHE_LOCK:
            _SCAN_CACHE[key] = scan
            while len(_SCAN_CACHE) > _SCAN_CACHE_SIZE:
                _SCAN_CACHE.popitem(last=False)
    return scan


def _scan_all(folder: FolderContext) -> list[ImageScan]:
    return [cached_scan(image, folder.alpha_mask) for image in folder.images]


def scan_images(folder: FolderContext) -> list[ImageScan]:
    """Every image of a folder scanned, once (the image checks share the scan).

    Args:
        folder: The folder's context.

    Returns:
        One :class:`ImageScan` per image, in the images' order.
    """
    return folder.once(_scan_all)


def readable_images(folder: FolderContext) -> list[ImageScan]:
    """The scans of a folder's images that sd-scripts reads (neither unreadable nor damaged).

    Args:
        folder: The folder's context.

    Returns:
        Their :class:`ImageScan`, in the images' order.
    """
    return [scan for scan in scan_images(folder) if scan.damage is None and scan.unreadable is None]


@functools.cache
def wide_mode(mode: str) -> bool:
    """Whether sd-scripts' ``convert("RGB")`` of a Pillow mode goes wrong: bands wider than 8 bits (``I;16``,
    ``I;16B``, ``I``, ``F``), whose values Pillow clips to 0-255 instead of scaling, or a mode it cannot convert.

    Args:
        mode: Pillow's mode name.

    Returns:
        True when the RGB image sd-scripts trains on is not the picture.
    """
    from PIL import Image, ImageMode

    try:
        if ImageMode.getmode(mode).typestr[1:] not in ("u1", "b1"):
            return True
        Image.new(mode, (1, 1)).convert("RGB")
    except (KeyError, ValueError, OSError):
        return True
    return False


# Each kind of unreadable file: what the message says of them, and the fix.
_UNREADABLE = {
    "link": (
        "cannot be opened",
        "point each link at its image or remove it (sd-scripts lists it and fails opening it)",
    ),
    "folder": ("are folders named like images", "rename or move them (sd-scripts lists them as images)"),
    "permission": ("cannot be read", "make them readable (chmod a+r FILE) or remove them"),
    "unreadable": ("cannot be read", "replace or remove them"),
    "empty": ("cannot be decoded", "replace or remove them"),
    "format": (
        "cannot be decoded",
        "sd-scripts cannot read HEIC/HEIF, AVIF or JPEG XL (Pillow has no decoder for them here): convert them to JPEG or "
        "PNG (on a Mac: `sips -s format jpeg FILE --out NEW.jpg`)",
    ),
    "unknown": ("cannot be decoded", "replace them with PNG or JPEG images, or remove them"),
}


def check_unreadable_images(folder: FolderContext, found: Findings) -> None:
    """Files sd-scripts lists as images but cannot read at all, one problem per kind (see :class:`ImageScan`)."""
    scans = [scan for scan in scan_images(folder) if scan.unreadable is not None]
    for kind, (what, fix) in _UNREADABLE.items():
        items = [scan.unreadable[1] for scan in scans if scan.unreadable[0] == kind]
        if items:
            found.problem(f"{len(items)} image(s) in {folder.where} {what}: {names(items)}; {fix}")
    huge = [scan.unreadable[1] for scan in scans if scan.unreadable[0] == "huge"]
    if huge:
        from PIL import Image

        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        found.problem(
            f"{len(huge)} image(s) in {folder.where} are larger than Pillow opens ({limit:.1f} megapixels, twice "
            f"Image.MAX_IMAGE_PIXELS: its decompression-bomb guard), so sd-scripts would fail loading them: "
            f"{names(huge)}; downscale them (sd-scripts resizes every image to its bucket, about "
            f"{folder.cfg.resolution}x{folder.cfg.resolution}, anyway)"
        )


def check_broken_images(folder: FolderContext, found: Findings) -> None:
    """An image cut short or corrupt fails here, not minutes into the run."""
    broken = [f"{scan.path} ({scan.damage})" for scan in scan_images(folder) if scan.damage is not None]
    if broken:
        found.problem(
            f"{len(broken)} image(s) in {folder.where} cannot be decoded (truncated or corrupt): {names(broken)}"
        )


def check_case_extensions(folder: FolderContext, found: Findings) -> None:
    """Files named like images in another case (``a.Png``): sd-scripts' case-sensitive listing skips them, so the
    plan must not count them and the user must hear of them."""
    skipped = [f"{path} (rename it to {path.with_suffix(path.suffix.lower()).name})" for path in folder.skipped]
    if skipped:
        found.problem(
            f"{len(skipped)} image(s) in {folder.where} have an extension in mixed case, which sd-scripts' image "
            f"listing skips (it matches each extension in lower or upper case only), so they would not train: "
            f"{names(skipped)}"
        )


def check_extensions(folder: FolderContext, found: Findings) -> None:
    """An image whose content is another format than its extension says."""
    mismatched = []
    for scan in readable_images(folder):
        allowed = _FORMAT_EXTENSIONS.get(scan.format or "", ())
        if not allowed or scan.path.suffix.lower() in allowed:
            continue
        if allowed[0] in folder.extensions:
            mismatched.append(f"{scan.path} is {scan.format}: rename it to {scan.path.with_suffix(allowed[0]).name}")
        else:  # renamed, sd-scripts' listing would skip it (no .avif without the pillow_avif package, l.107)
            mismatched.append(
                f"{scan.path} is {scan.format}, which sd-scripts does not list: convert it to JPEG or PNG"
            )
    if mismatched:
        found.problem(f"{len(mismatched)} image(s) in {folder.where} do not match their extension: {names(mismatched)}")


def check_exact_size(folder: FolderContext, found: Findings) -> None:
    """With bucketing off, sd-scripts needs every image at resolution x resolution."""
    cfg = folder.cfg
    if cfg.enable_bucket:
        return
    wanted = (cfg.resolution, cfg.resolution)
    off_size = [
        f"{scan.path} ({scan.size[0]}x{scan.size[1]})" for scan in readable_images(folder) if scan.size != wanted
    ]
    if off_size:
        found.problem(
            f"{len(off_size)} image(s) in {folder.where} are not {cfg.resolution}x{cfg.resolution}, which sd-scripts "
            f"needs with bucketing off: {names(off_size)}; set enable_bucket = true or resize them"
        )


def check_small_images(folder: FolderContext, found: Findings) -> None:
    """An image smaller than the resolution is upscaled: a warning."""
    resolution = folder.cfg.resolution
    small = [scan.path for scan in readable_images(folder) if min(scan.size) < resolution]
    if small:
        found.warning(
            f"{len(small)} image(s) in {folder.where} are smaller than the resolution {resolution} and will be "
            f"upscaled (blurrier training): {names(small)}"
        )
