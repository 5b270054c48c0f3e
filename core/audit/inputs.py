"""Audit input: prompts or (caption, image) training pairs, with every malformed row accounted for.

Readers (:func:`read_captions`, :func:`read_pairs`):

- a text file, one prompt per line (``row`` = line number);
- a CSV file with a header (``row`` = line number in the file, the header being line 1);
- a Parquet file (``row`` = 1-based row number);
- for training pairs also a folder of images with ``.txt`` caption side files (``row`` = 1-based
  position in name order).

A malformed row (empty or whitespace-only caption, null/NaN, a value that is not a string, a line
that is not UTF-8, a missing image) is skipped, reported with its row number and written to the
``rejected`` file; it is never silently lost. Over-long prompts are scored as the core scores
them: truncated to the text encoder's length, with a warning. Why row numbers: a dataset of
millions of captions is fixed at its source, so a report must say where each skipped row is.

:func:`load_image` turns one image file into the ``(3, H, W)`` tensor the training filter scores.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DejaGuardError

CAPTION_COLUMNS = ("caption", "text", "prompt")  # autodetected, case-insensitive, in this order
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "file_name", "filename")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Rejected:
    """A malformed input row: where it is, why it was skipped, and (the start of) its value."""

    row: int
    reason: str
    value: str = ""

    def describe(self, unit: str) -> str:
        return f"{unit} {self.row}: {self.reason}"


@dataclass
class InputRows:
    """Rows read from an input: ``items`` to score (dicts with ``row``) and ``rejected`` ones."""

    source: Path
    unit: str  # how ``row`` is counted: "line" or "row"
    items: list[dict] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def _clip(value: Any, n: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[:n] + "..."


def pyarrow_modules() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a one-line error saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        raise DejaGuardError("Parquet input/output needs pyarrow: pip install pyarrow") from err
    return pyarrow, pyarrow.parquet


def _check_caption(value: Any) -> str | None:
    """The reason a caption value is malformed, or None if it can be scored."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing caption (null/NaN)"
    if not isinstance(value, str):
        return f"caption is not a string ({type(value).__name__})"
    if not value.strip():
        return "empty caption"
    return None


def _table_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
                 path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DejaGuardError(f"{path} has no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise DejaGuardError(f"{path} has no {what} column ({' / '.join(candidates)}); name it with "
                         f"--{what}-column (columns: {', '.join(columns)})")


def _iter_table(path: Path, wanted: dict[str, tuple[str | None, Sequence[str]]]) -> tuple[str, Iterator[tuple]]:
    """Rows of a CSV or Parquet file: ``(unit, iterator of (row, {name: value}))``.

    ``wanted`` maps a field name to (explicit column or None, autodetect candidates).
    """
    if _table_kind(path) == "parquet":
        _, pq = pyarrow_modules()
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several kinds for a broken file
            raise DejaGuardError(f"cannot read Parquet file {path}: {err}") from err
        cols = {k: _pick_column(pf.schema_arrow.names, w, c, k, path) for k, (w, c) in wanted.items()}

        def rows() -> Iterator[tuple]:
            n = 0
            batches = pf.iter_batches(columns=sorted(set(cols.values())), batch_size=65536)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except Exception as err:  # ArrowInvalid (a ValueError), OSError, ... for a damaged file
                    raise DejaGuardError(f"{path}: unreadable Parquet data after row {n}: {err}") from err
                data = {k: batch.column(col).to_pylist() for k, col in cols.items()}
                for i in range(batch.num_rows):
                    n += 1
                    yield n, {k: v[i] for k, v in data.items()}

        return "row", rows()

    csv.field_size_limit(sys.maxsize)  # an over-long caption is truncated by the tokenizer, not here
    f = path.open(encoding="utf-8", newline="")
    reader = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        raise DejaGuardError(f"{path} is empty (a CSV file needs a header line)") from None
    except (UnicodeDecodeError, csv.Error) as err:
        f.close()
        raise DejaGuardError(f"cannot read the header of {path}: {err}") from err
    cols = {k: _pick_column(header, w, c, k, path) for k, (w, c) in wanted.items()}
    index = {k: header.index(col) for k, col in cols.items()}

    def rows() -> Iterator[tuple]:
        with f:
            line = reader.line_num
            while True:
                start = line + 1  # a quoted field may span lines: report where the record starts
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except (UnicodeDecodeError, csv.Error) as err:
                    raise DejaGuardError(f"{path}: unreadable CSV at line {start}: {err}") from err
                line = reader.line_num
                if not record:
                    continue  # a blank line is no record
                yield start, {k: (record[i] if i < len(record) else None) for k, i in index.items()}

    return "line", rows()


def read_captions(path: str | Path, caption_column: str | None = None) -> InputRows:
    """Prompts to audit from a text file (one per line), a CSV or a Parquet file.

    Items: ``{"row": int, "prompt": str}`` (prompt stripped of surrounding whitespace).
    """
    path = Path(path)
    if not path.is_file():
        raise DejaGuardError(f"prompt file not found: {path}")
    if _table_kind(path) == "text":
        out = InputRows(path, "line")
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    out.rejected.append(Rejected(n, "line is not UTF-8 text", _clip(raw)))
                    continue
                reason = _check_caption(text)
                if reason:
                    if text.strip("\r\n"):  # whitespace only: reported; a bare blank line separates
                        out.rejected.append(Rejected(n, reason, _clip(text.rstrip("\r\n"))))
                    continue
                out.items.append({"row": n, "prompt": text.strip()})
    else:
        unit, rows = _iter_table(path, {"caption": (caption_column, CAPTION_COLUMNS)})
        out = InputRows(path, unit)
        for n, rec in rows:
            reason = _check_caption(rec["caption"])
            if reason:
                out.rejected.append(Rejected(n, reason, _clip(rec["caption"])))
            else:
                out.items.append({"row": n, "prompt": rec["caption"].strip()})
    if not out.items:
        extra = f" ({len(out.rejected)} malformed rows skipped)" if out.rejected else ""
        raise DejaGuardError(f"prompt file {path} has no prompts{extra}")
    return out


def read_pairs(path: str | Path, caption_column: str | None = None, image_column: str | None = None) -> InputRows:
    """(caption, image) training pairs from a CSV/Parquet file (caption and image path columns;
    relative paths are relative to the file's folder) or from a folder of images with ``.txt``
    caption side files (``cat.png`` + ``cat.txt``).

    Items: ``{"row": int, "caption": str, "image": str, "path": str}``: ``image`` as written in the
    input (it names the sample in the output and seeds its noise), ``path`` the absolute file to open.
    Missing image files are rejected here; unreadable ones by the worker that opens them.
    """
    path = Path(path)
    if path.is_dir():
        out = InputRows(path, "file")
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for n, img in enumerate(images, 1):
            side = img.with_suffix(".txt")
            if not side.is_file():
                out.rejected.append(Rejected(n, f"no caption file {side.name}", img.name))
                continue
            try:
                caption = side.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                out.rejected.append(Rejected(n, f"{side.name} is not UTF-8 text", img.name))
                continue
            reason = _check_caption(caption)
            if reason:
                out.rejected.append(Rejected(n, reason, img.name))
            else:
                out.items.append({"row": n, "caption": caption, "image": img.name, "path": str(img.resolve())})
    elif path.is_file():
        unit, rows = _iter_table(path, {"caption": (caption_column, CAPTION_COLUMNS),
                                        "image": (image_column, IMAGE_COLUMNS)})
        out = InputRows(path, unit)
        for n, rec in rows:
            reason = _check_caption(rec["caption"])
            image = rec["image"]
            if reason is None and (not isinstance(image, str) or not image.strip()):
                reason = "missing image path"
            if reason is None:
                try:
                    image_path = (path.parent / image.strip()).resolve()
                    found = image_path.is_file()
                except (ValueError, OSError):  # a NUL byte, a name too long for the file system
                    found = False
                if not found:
                    reason = f"image not found: {_clip(image.strip())}"
            if reason:
                out.rejected.append(Rejected(n, reason, _clip(rec["caption"])))
            else:
                out.items.append({"row": n, "caption": rec["caption"].strip(), "image": image.strip(),
                                  "path": str(image_path)})
    else:
        raise DejaGuardError(f"training pairs not found: {path}")
    if not out.items:
        extra = f" ({len(out.rejected)} malformed rows skipped)" if out.rejected else ""
        raise DejaGuardError(f"{path} has no usable (caption, image) pairs{extra}")
    return out


def load_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file -> ``(3, H, W)`` float32 RGB in [-1, 1] at ``shape``'s size: centre-cropped
    to its aspect ratio, then resized (bicubic), as training pipelines usually prepare images."""
    from PIL import Image

    _, h, w = shape
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = min(img.width / w, img.height / h)
        cw, ch = round(w * scale), round(h * scale)
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
