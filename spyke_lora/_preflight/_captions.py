"""The dataset's captions, as sd-scripts reads and trains them: one per training image, readable, its text on its
first line, the trigger first when ``keep_tokens`` keeps it.

Every caption is read once per folder (:func:`read_captions`), by sd-scripts' own ``read_caption``
(``_engine.caption_reader``: ``library/train_util.py`` l.1946-1970), so what the checks compare is what sd-scripts
will train. What it does with a file, and what the checks say:

- no caption file: the image trains on the subset's class token (l.2069-2080): a problem for training images, a
  warning for regularisation images (kohya means them to train on their class token);
- not UTF-8 (UTF-16 or UTF-32 from a Windows editor, Latin-1/cp1252 bytes): ``UnicodeDecodeError`` (l.1960): a
  problem naming the encoding found, or the byte that fails;
- 0 bytes: ``AssertionError: caption file is empty`` (l.1964): a problem;
- only whitespace or blank lines: it trains on ``""`` (``lines[0].strip()``), not the class token: a problem for
  training images, a warning for regularisation images;
- a blank first line before the text: it trains on ``""`` too (without ``enable_wildcard``): a problem;
- several non-empty lines (a tag per line): only the first is trained (``process_caption`` l.861): a problem;
  with ``enable_wildcard`` one line is trained per step, chosen at random (l.840-843): a warning when a line is a
  single tag;
- ``\\r\\n`` line ends: harmless (text mode's universal newlines, then ``strip()``). A UTF-8 byte-order mark is kept
  by sd-scripts (``str.strip()`` keeps U+FEFF) but dropped by its CLIP tokenizer (ftfy's ``fix_text``, or
  ``BasicTokenizer``'s control-character cleaning: the token ids are the same, measured): harmless, so the trigger
  check compares the caption without it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import _engine
from .._config import TrainConfig
from ._context import Findings, FolderContext, names

__all__ = [
    "Caption",
    "caption_example",
    "check_caption_files",
    "check_caption_lines",
    "check_trigger_first",
    "count_captions",
    "read_captions",
]

_BOM = "\ufeff"  # sd-scripts' CLIP tokenizer drops it (tests/unit/test_preflight_caption_reading.py)
_BOMS = (  # longest first: a UTF-32 LE mark starts with UTF-16 LE's
    (b"\xff\xfe\x00\x00", "UTF-32 LE, with a byte-order mark"),
    (b"\x00\x00\xfe\xff", "UTF-32 BE, with a byte-order mark"),
    (b"\xff\xfe", "UTF-16 LE, with a byte-order mark"),
    (b"\xfe\xff", "UTF-16 BE, with a byte-order mark"),
)


@dataclasses.dataclass(frozen=True)
class Caption:
    """The caption of one image as sd-scripts reads it.

    ``text`` is what it reads (None: no caption file, or one it cannot read: then ``unreadable`` says why);
    ``lines`` are the file's non-empty lines, stripped."""

    path: Path  # the caption file (where it would be, when there is none)
    text: str | None
    image: Path | None = None
    lines: tuple[str, ...] = ()
    unreadable: str = ""  # e.g. "UTF-16 LE, with a byte-order mark", "0 bytes"

    @property
    def missing(self) -> bool:
        """No caption file: the image trains on the class token."""
        return self.text is None and not self.unreadable

    @property
    def blank(self) -> bool:
        """Read, but it trains on ``""`` (its first line has no text)."""
        return self.text is not None and not self.text.replace(_BOM, "").strip()


@dataclasses.dataclass
class _Read:
    """A folder's captions and the reader that read them (what one caption trains as comes from it)."""

    captions: list[Caption]
    reader: _engine.CaptionReader


def _diagnose(path: Path, error: str) -> str:
    """Why sd-scripts could not read ``path``: the encoding found, the byte that is not UTF-8, or the error."""
    try:
        data = path.read_bytes()  # only for a file sd-scripts failed on
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if not data:
        return "0 bytes"
    found = next((what for mark, what in _BOMS if data.startswith(mark)), None)
    if found is None and len(data) >= 2 and data.count(0) * 3 >= len(data):  # ASCII text in UTF-16: every 2nd is 0
        zeros_odd = data[1::2].count(0) > data[0::2].count(0)
        found = f"UTF-16 {'LE' if zeros_odd else 'BE'}, without a byte-order mark"
    if found is not None:
        why = (
            "sd-scripts stops with UnicodeDecodeError"
            if error
            else "read as UTF-8 it has a NUL byte after every letter"
        )
        return f"{found}; {why}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return (
            f"byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8; Latin-1 or Windows-1252 (cp1252)?; "
            f"sd-scripts stops with UnicodeDecodeError"
        )
    return f"sd-scripts stops with {error}"


def _read_all(folder: FolderContext) -> _Read:
    reader = _engine.caption_reader(folder.cfg, folder.folder)
    captions = []
    for read in reader.read(folder.images):
        path = read.path or read.image.with_suffix(reader.extension)
        nul = read.text is not None and "\x00" in "".join(read.lines)  # UTF-16 without a BOM reads as UTF-8
        unreadable = _diagnose(path, read.error) if read.error or nul else ""
        lines = tuple(x for x in read.lines if x.replace(_BOM, "").strip())  # a BOM alone is no text
        captions.append(Caption(path, None if unreadable else read.text, read.image, lines, unreadable))
    return _Read(captions, reader)


def read_captions(folder: FolderContext) -> list[Caption]:
    """The caption of every image of a folder, read once by sd-scripts' own code (the caption checks share them).

    Args:
        folder: The folder's context.

    Returns:
        One :class:`Caption` per image, in the images' order.
    """
    return folder.once(_read_all).captions


def _class_token(folder: FolderContext) -> str:
    tokens = folder.folder.class_tokens
    return f"the folder's class token {tokens!r}" if tokens else "an empty caption '' (the subset has no class_tokens)"


def _once_each(items: Iterable[Any]) -> list[Any]:
    """Each item once, in its first place (two images of one stem, ``a.png`` and ``a.jpg``, share ``a.txt``)."""
    return list(dict.fromkeys(items))


def _tokens(count: int) -> str:
    return "token" if count == 1 else f"{count} tokens"


def check_caption_files(folder: FolderContext, found: Findings) -> None:
    """Captions that are missing (the class token is trained), that sd-scripts cannot read (not UTF-8, 0 bytes:
    it stops), or that have no text (``""`` is trained)."""
    captions, reg = read_captions(folder), folder.folder.is_reg
    add = found.warning if reg else found.problem
    missing = _once_each(c.path for c in captions if c.missing)  # images of one stem share it
    if missing:
        add(
            f"{len(missing)} caption file(s) in {folder.where} are missing: {names(missing)}; sd-scripts would train "
            f"on {_class_token(folder)} instead"
        )
    empty = _once_each(c.path for c in captions if c.unreadable == "0 bytes")
    if empty:
        found.problem(
            f"{len(empty)} caption file(s) in {folder.where} are empty (0 bytes), which stops sd-scripts "
            f"(AssertionError: caption file is empty): {names(empty)}; fix: write the caption, or delete the file to "
            f"train the image on {_class_token(folder)}"
        )
    bad = _once_each(f"{c.path} ({c.unreadable})" for c in captions if c.unreadable and c.unreadable != "0 bytes")
    if bad:
        found.problem(
            f"{len(bad)} caption file(s) in {folder.where} are not UTF-8, the only encoding sd-scripts reads "
            f"captions in: {names(bad)}; fix: save them as UTF-8 (in Notepad: Save as, Encoding UTF-8)"
        )
    blank = _once_each(c.path for c in captions if c.blank and not c.lines)
    if blank:
        add(
            f"{len(blank)} caption file(s) in {folder.where} have no text (only whitespace or blank lines): "
            f"{names(blank)}; sd-scripts trains these images on an empty caption '', not on "
            f"{_class_token(folder)}; fix: write the caption, or delete the file to train on the class token"
        )


def _wildcard_fix(folder: FolderContext) -> str:
    if folder.where in ("`train_dir`", "`reg_dir`"):
        return "set `extra_args.enable_wildcard = true`"
    return f"set enable_wildcard = true in {folder.where}"


def check_caption_lines(folder: FolderContext, found: Findings) -> None:
    """Captions whose lines do not train as written: a blank first line (``""`` is trained), several lines (only
    the first is trained; with ``enable_wildcard`` one line per step)."""
    captions, reader = read_captions(folder), folder.once(_read_all).reader
    readable = [c for c in captions if c.text is not None and c.lines]
    if reader.enable_wildcard:
        tags = [c for c in readable if _tag_lines(c, reader)]
        if tags:
            shown = " or ".join(repr(x) for x in tags[0].lines[:3])
            found.warning(
                f"{len(tags)} caption(s) in {folder.where} have several lines and enable_wildcard is on: each step "
                f"trains one line chosen at random ({shown} for {tags[0].path.name}), not all of them: "
                f"{names([c.path for c in tags])}; if each line is a tag, put them on one line separated by commas"
            )
        return
    first_blank = [c for c in readable if c.blank]
    if first_blank:
        found.problem(
            f"{len(first_blank)} caption(s) in {folder.where} start with a blank line: "
            f"{names([c.path for c in first_blank])}; sd-scripts trains only a caption's first line, so they train "
            f"on an empty caption '' instead of {first_blank[0].lines[0]!r}; fix: remove the blank line(s) at the start"
        )
    several = [c for c in readable if not c.blank and len(c.lines) > 1]
    if several:
        one = f"{reader.caption_separator} ".join(several[0].lines)
        found.problem(
            f"{len(several)} caption(s) in {folder.where} have several lines (a tag per line?): "
            f"{names([c.path for c in several])}; sd-scripts trains only the first line ({several[0].lines[0]!r} for "
            f"{several[0].path.name}), never the others; fix: put the tags on one line separated by commas "
            f"({one!r}), or {_wildcard_fix(folder)} to train one line, chosen at random, per step"
        )


def _first_tag(trained: str, separator: str) -> str:
    """The first tag of a trained caption (process_caption joins shuffled tags with ", "); U+FEFF dropped."""
    return re.split(rf"\s*(?:,|{re.escape(separator)})\s*", trained.replace(_BOM, "").strip(), maxsplit=1)[0]


def _trigger_missing(caption: Caption, reader: _engine.CaptionReader, trigger: str) -> bool:
    """Whether a caption that trains as written (the other checks report the rest) trains without the trigger
    first; with ``enable_wildcard``, on any of its lines (one is trained per step)."""
    if caption.text is None or caption.blank or (len(caption.lines) > 1 and not reader.enable_wildcard):
        return False
    if reader.enable_wildcard and _tag_lines(caption, reader):
        return False  # check_caption_lines warns about it
    texts = caption.lines if reader.enable_wildcard else (caption.text,)
    return any(_first_tag(reader.trains_as(text), reader.caption_separator) != trigger for text in texts)


def _tag_lines(caption: Caption, reader: _engine.CaptionReader) -> bool:
    """Several lines, one of them a single tag (with enable_wildcard, a step trains that tag alone)."""
    return len(caption.lines) > 1 and any(reader.caption_separator not in line for line in caption.lines)


def check_trigger_first(folder: FolderContext, found: Findings) -> None:
    """With ``keep_tokens >= 1`` the first tags stay in place while the rest is shuffled: the first should be the
    trigger (the training folder's class token). Compared on what is trained (``caption_prefix`` included)."""
    read = folder.once(_read_all)
    reader, trigger = read.reader, folder.folder.class_tokens
    if reader.keep_tokens < 1 or folder.folder.is_reg or not trigger:
        return
    off = [c.path for c in read.captions if _trigger_missing(c, reader, trigger)]
    if off:
        found.warning(
            f"{len(off)} caption(s) in {folder.where} do not start with the trigger {trigger!r} (keep_tokens = "
            f"{reader.keep_tokens} keeps the first {_tokens(reader.keep_tokens)} in place while the rest is shuffled): "
            f"{names(off)}"
        )


def _context(folder: _engine.Folder, cfg: TrainConfig | None) -> FolderContext:
    if cfg is None:  # sd-scripts' defaults for everything a config would set
        path = folder.folder
        cfg = TrainConfig(base_model=path, output_dir=path, output_name="captions", train_dir=path, num_repeats=1)
    return FolderContext(folder, cfg, _engine.image_extensions(cfg))


def count_captions(folder: _engine.Folder | FolderContext, cfg: TrainConfig | None = None) -> int:
    """The captions a plan shows for a folder: of the images sd-scripts sees, those whose caption file it reads as
    text (not the missing, unreadable or blank ones).

    Args:
        folder: The folder (its context, or as the engine names it).
        cfg: The run's config (for an engine folder; default: sd-scripts' own defaults).

    Returns:
        How many of its images train on a caption of their own.
    """
    context = folder if isinstance(folder, FolderContext) else _context(folder, cfg)
    if not context.folder.folder.is_dir():
        return 0
    return sum(1 for c in read_captions(context) if c.text is not None and not c.blank)


def caption_example(folder: _engine.Folder | FolderContext, cfg: TrainConfig | None = None) -> str:
    """What the folder's first caption trains as, the plan's line under the folder (sd-scripts' ``process_caption``:
    prefix, suffix, one line, a fixed shuffle).

    Args:
        folder: The folder (its context, or as the engine names it).
        cfg: The run's config (for an engine folder).

    Returns:
        e.g. ``caption  img000.txt trains as 'spyke_plasma_v1, white cloak'``; "" for a folder without images.
    """
    context = folder if isinstance(folder, FolderContext) else _context(folder, cfg)
    if not context.folder.folder.is_dir() or not context.images:
        return ""
    read = context.once(_read_all)
    first, reader = read.captions[0], read.reader
    if first.unreadable:
        return f"caption  {first.path.name} cannot be read ({first.unreadable})"
    if first.text is None:
        trained = reader.trains_as(context.folder.class_tokens or "")
        image = first.image.name if first.image else first.path.name
        return f"caption  {image} has no caption file: trains as {trained!r}"
    trained = reader.trains_as(first.text)
    line = f"caption  {first.path.name} trains as {trained!r}"
    if reader.shuffle_caption and len(trained.split(reader.caption_separator)) - reader.keep_tokens > 1:
        line += f" (one step's order: the tags after the first {reader.keep_tokens} are shuffled at every step)"
    if reader.enable_wildcard and len(first.lines) > 1:
        line += f" (one of its {len(first.lines)} lines, chosen at every step)"
    return line
