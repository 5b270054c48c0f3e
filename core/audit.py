"""Audits at dataset scale: one process, or a pool of model-holding actors on Ray.

Both engines run the **same** core scoring function on the same batches:
:func:`core.detect.first_step_scores` for prompt audits, :func:`training_pair_magnitude` for the
training-set filter. Seeds are derived from the prompt text (:func:`core.sampling.prompt_seed`),
so a prompt's score does not depend on the engine, the worker or the batch it landed in.

Input (:func:`read_captions`, :func:`read_pairs`):

- a text file, one prompt per line (``row`` = line number);
- a CSV file with a header (``row`` = line number in the file, the header being line 1);
- a Parquet file (``row`` = 1-based row number);
- for training pairs also a folder of images with ``.txt`` caption side files (``row`` = 1-based
  position in name order).

A malformed row (empty or whitespace-only caption, null/NaN, a value that is not a string, a line
that is not UTF-8, a missing image) is skipped, reported with its row number and written to the
``rejected`` file; it is never silently lost. Over-long prompts are scored as the core scores
them: truncated to the text encoder's length, with a warning.

Output (:class:`ResultSink`), one object per scored row with its ``row``:

- ``--out scores.jsonl``: one JSONL file, appended one batch at a time;
- ``--out scores.parquet``: one Parquet file, written at the end; until then the rows go to a
  journal ``scores.parquet.journal.jsonl`` beside it;
- ``--out DIR`` (any path without those suffixes): a folder of shards ``part-00000.jsonl`` (or
  ``.parquet`` with ``--format parquet``), each of at most ``shard_rows`` rows; Parquet shards are
  written whole (write then rename) from the journal ``DIR/_journal.jsonl``.

Rejected rows go to ``<out>.rejected.jsonl`` (file output) or ``DIR/rejected.jsonl``.

Resume: the rows already in the output (shards, Parquet file and journal) are skipped, after
checking that their prompts and settings match the input. Every batch is on disk as soon as the
driver receives it, so an interrupted audit loses nothing and repeats at most the batches in
flight, one per worker. Rows are deduplicated by ``row`` when written, so a batch that Ray
retries after a worker died is never written twice.

Ray engine: Ray Data ``map_batches`` with a fixed pool of actors (``concurrency=workers``), each
holding one model (``num_gpus=1`` per actor when the cluster has GPUs, else ``num_cpus=1`` and one
torch thread). Actors that die are restarted and their batches retried (Ray Data's actor-pool
defaults, ``max_restarts=-1`` and ``max_task_retries=-1``). With no address a local Ray instance
is started and stopped; an already initialized Ray (a test, a notebook) is used as it is and left
running.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .denoiser import BUNDLED_TESTBED, Denoiser, load_denoiser
from .detect import ScoreSettings, first_step_scores, load_threshold
from .errors import DejaGuardError
from .sampling import initial_noise, prompt_seed, text_conditional_magnitude

CAPTION_COLUMNS = ("caption", "text", "prompt")  # autodetected, case-insensitive, in this order
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "file_name", "filename")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FAULT_ENV = "DEJAGUARD_FAULT_INJECT"  # test hook: "N:/path/marker" -> one actor exits on its Nth batch, once
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "RAY_DISABLE_USAGE_STATS": "1"}


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------


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


def _pyarrow() -> tuple[Any, Any]:
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
        _, pq = _pyarrow()
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several kinds for a broken file
            raise DejaGuardError(f"cannot read Parquet file {path}: {err}") from err
        cols = {k: _pick_column(pf.schema_arrow.names, w, c, k, path) for k, (w, c) in wanted.items()}

        def rows() -> Iterator[tuple]:
            n = 0
            for batch in pf.iter_batches(columns=sorted(set(cols.values())), batch_size=65536):
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
                image_path = (path.parent / image.strip()).resolve()
                if not image_path.is_file():
                    reason = f"image not found: {image.strip()}"
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


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict]:
    """Complete JSON lines of ``path``; a torn last line (the process was killed) is skipped."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _truncate_torn_line(path: Path) -> None:
    """Cut a partly written last line so that appending continues on a line boundary."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class ResultSink:
    """Where scored rows go (see the module doc for the layouts). Rows are deduplicated by ``row``.

    ``params``: values every row must carry (e.g. ``steps``); on resume, existing rows are
    checked against them, and ``key_fields`` (e.g. ``("prompt",)``) against the input.
    """

    def __init__(self, out: str | Path, fmt: str | None = None, shard_rows: int = 100_000,
                 resume: bool = False, params: dict | None = None) -> None:
        out = Path(out)
        suffix = out.suffix.lower()
        self.single_file = suffix in (".jsonl", ".parquet") and not out.is_dir()
        if self.single_file:
            inferred = suffix.lstrip(".")
            if fmt is not None and fmt != inferred:
                raise DejaGuardError(f"--format {fmt} does not match the output file {out.name}")
            fmt = inferred
        fmt = fmt or "jsonl"
        if fmt not in ("jsonl", "parquet"):
            raise DejaGuardError(f"unknown output format {fmt!r} (jsonl or parquet)")
        if shard_rows < 1:
            raise DejaGuardError("shard rows must be at least 1")
        self.out, self.fmt, self.shard_rows, self.params = out, fmt, shard_rows, dict(params or {})
        if self.single_file:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.rejected_path = out.with_name(out.name + ".rejected.jsonl")
            self.journal = out.with_name(out.name + ".journal.jsonl") if fmt == "parquet" else out
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.rejected_path = out / "rejected.jsonl"
            self.journal = out / "_journal.jsonl"
        if not resume:
            self._clear()
        self.done: dict[int, dict] = {}  # row -> the row as written (resume check, dedupe)
        self._in_shards: set[int] = set()  # Parquet: rows already in a shard (the journal may repeat some)
        for r in self._existing_rows():
            self.done.setdefault(int(r["row"]), r)
        self.resumed = len(self.done)
        self._check_params()
        self._handle = None
        self._journal_rows = 0
        self._shard_rows_written = 0
        self._next_shard = 1 + max((self._shard_index(p) for p in self._shards()), default=-1)
        if self.fmt == "parquet" and self.journal.exists():
            _truncate_torn_line(self.journal)
            self._journal_rows = sum(1 for _ in _read_jsonl(self.journal))
        if self.single_file and self.fmt == "jsonl" and self.out.exists():
            _truncate_torn_line(self.out)

    # -- layout ---------------------------------------------------------------------------

    def _shards(self) -> list[Path]:
        if self.single_file:
            return [self.out] if self.out.exists() else []
        return sorted(self.out.glob(f"part-*.{self.fmt}"))

    @staticmethod
    def _shard_index(path: Path) -> int:
        try:
            return int(path.stem.split("-", 1)[1])
        except (IndexError, ValueError):
            return -1

    def _clear(self) -> None:
        """A fresh audit: remove this sink's files (only names this class writes)."""
        files = [self.rejected_path, self.journal]
        if self.single_file:
            files.append(self.out)
        else:
            files += list(self.out.glob("part-*.jsonl")) + list(self.out.glob("part-*.parquet"))
        for p in files:
            p.unlink(missing_ok=True)

    def _existing_rows(self) -> Iterator[dict]:
        for shard in self._shards():
            if shard.suffix == ".parquet":
                _, pq = _pyarrow()
                rows = pq.read_table(shard).to_pylist()
                self._in_shards.update(int(r["row"]) for r in rows)
                yield from rows
            else:
                yield from _read_jsonl(shard)
        if self.fmt == "parquet" and self.journal.exists():
            yield from _read_jsonl(self.journal)

    def _check_params(self) -> None:
        if not self.done:
            return
        first = next(iter(self.done.values()))
        for k, v in self.params.items():
            if k in first and first[k] != v:
                raise DejaGuardError(f"cannot resume {self.out}: it was written with {k}={first[k]!r}, "
                                     f"this run has {k}={v!r} (write to a new output or use the same settings)")

    def check_input(self, items: Sequence[dict], key_fields: Sequence[str]) -> None:
        """On resume: every already scored row must hold the same prompt (the input did not change)."""
        for it in items:
            old = self.done.get(it["row"])
            if old is not None and any(old.get(k) != it[k] for k in key_fields):
                raise DejaGuardError(f"cannot resume {self.out}: row {it['row']} of the input differs from the row "
                                     "already scored (the input changed since; write to a new output)")

    # -- writing ----------------------------------------------------------------------------

    def write_rejected(self, rejected: Iterable[Rejected], append: bool = False) -> None:
        with self.rejected_path.open("a" if append else "w", encoding="utf-8") as f:
            for r in rejected:
                f.write(json.dumps({"row": r.row, "reason": r.reason, "value": r.value}) + "\n")

    def write(self, rows: Sequence[dict]) -> int:
        """Append scored rows (durable when this returns; duplicates of written rows are dropped).
        Returns how many were new."""
        new: list[dict] = []
        for r in rows:
            if int(r["row"]) not in self.done:
                self.done[int(r["row"])] = r
                new.append(r)
        count = len(new)
        if not new:
            return 0
        if self.fmt == "jsonl" and self.single_file:
            self._append(self.out, new)
        elif self.fmt == "jsonl":
            while new:
                if self._handle is None or self._shard_rows_written >= self.shard_rows:
                    self._open_shard()
                take = new[: self.shard_rows - self._shard_rows_written]
                new = new[len(take):]
                self._append(None, take)
                self._shard_rows_written += len(take)
        else:
            self._append(self.journal, new)
            self._journal_rows += len(new)
            if not self.single_file and self._journal_rows >= self.shard_rows:
                self._flush_journal()
        return count

    def _append(self, path: Path | None, rows: Sequence[dict]) -> None:
        if path is not None and (self._handle is None or self._handle.name != str(path)):
            self._close_handle()
            self._handle = path.open("a", encoding="utf-8")
        self._handle.write("".join(json.dumps(r) + "\n" for r in rows))
        self._handle.flush()  # every batch is on disk before the next one is waited for

    def _open_shard(self) -> None:
        self._close_handle()
        path = self.out / f"part-{self._next_shard:05d}.jsonl"
        self._next_shard += 1
        self._handle = path.open("a", encoding="utf-8")
        self._shard_rows_written = 0

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _flush_journal(self) -> None:
        """Parquet: move the journal into whole shards (write, rename, then empty the journal)."""
        pa, pq = _pyarrow()
        self._close_handle()
        rows: list[dict] = []
        for r in _read_jsonl(self.journal) if self.journal.exists() else []:
            if int(r["row"]) not in self._in_shards:  # deduplicate: a crash may have left a flushed journal
                self._in_shards.add(int(r["row"]))
                rows.append(r)
        if self.single_file:
            if self.out.exists():
                rows = pq.read_table(self.out).to_pylist() + rows
            if rows:
                tmp = self.out.with_name(self.out.name + ".tmp")
                pq.write_table(pa.Table.from_pylist(rows), tmp)
                os.replace(tmp, self.out)
        else:
            for i in range(0, len(rows), self.shard_rows):
                path = self.out / f"part-{self._next_shard:05d}.parquet"
                self._next_shard += 1
                tmp = path.with_name(path.name + ".tmp")
                pq.write_table(pa.Table.from_pylist(rows[i : i + self.shard_rows]), tmp)
                os.replace(tmp, path)  # a shard exists whole or not at all
        self.journal.unlink(missing_ok=True)  # a crash before this line only leaves duplicates, deduped on read
        self._journal_rows = 0

    def close(self) -> None:
        if self.fmt == "parquet":
            self._flush_journal()
        self._close_handle()

    def rows(self) -> list[dict]:
        """Every scored row in the output, sorted by ``row``."""
        return sorted(self.done.values(), key=lambda r: int(r["row"]))

    def describe(self) -> str:
        return str(self.out) if self.single_file else f"{self.out}/part-*.{self.fmt}"


# ---------------------------------------------------------------------------------------------
# Jobs: what a worker does with one batch (the same in both engines)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptJob:
    """Score prompts with :func:`first_step_scores`; one call per batch."""

    settings: ScoreSettings
    threshold: float | None
    seed: int | None = None
    batch_size: int = 32
    key_fields: tuple[str, ...] = ("prompt",)

    def params(self) -> dict:
        return {"steps": self.settings.steps, "generations": self.settings.generations, "threshold": self.threshold}

    def score(self, denoiser: Denoiser, items: Sequence[dict]) -> list[dict]:
        results = first_step_scores(denoiser, [it["prompt"] for it in items], self.settings, seed=self.seed,
                                    batch_size=self.batch_size, threshold=self.threshold)
        return [{
            "row": int(it["row"]), "prompt": r.prompt, "score": r.score, "flagged": r.flagged,
            "threshold": r.threshold, "unet_evals": r.unet_evals, "unet_calls": round(r.unet_calls, 4),
            "generation_scores": r.generation_scores, "seeds": r.seeds,
            "steps": self.settings.steps, "generations": self.settings.generations,
        } for it, r in zip(items, results)]


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


@dataclass(frozen=True)
class PairJob:
    """Score (caption, image) training pairs with :func:`training_pair_magnitude`, averaged over
    ``timesteps``; ``drop`` = magnitude above ``threshold``."""

    threshold: float
    timesteps: tuple[int, ...] = (999,)
    batch_size: int = 32
    key_fields: tuple[str, ...] = ("caption", "image")

    def params(self) -> dict:
        return {"threshold": self.threshold, "timesteps": list(self.timesteps)}

    def score(self, denoiser: Denoiser, items: Sequence[dict]) -> list[dict]:
        shape = _image_shape(denoiser)
        good, images, out = [], [], []
        for it in items:
            try:
                images.append(load_image(it["path"], shape))
                good.append(it)
            except Exception as err:  # PIL raises many kinds for a broken file
                out.append({"row": int(it["row"]), "error": f"unreadable image {it['image']}: {err}"})
        for start in range(0, len(good), self.batch_size):
            chunk = good[start : start + self.batch_size]
            batch = torch.stack(images[start : start + len(chunk)])
            caps = [it["caption"] for it in chunk]
            per_t, seeds = [], []
            for k, t in enumerate(self.timesteps):  # noise seeded by the caption, as in prompt audits
                s = [prompt_seed(it["caption"], k) for it in chunk]
                seeds.append(s)
                per_t.append(training_pair_magnitude(denoiser, batch, caps, s, t))
            mags = torch.stack(per_t, dim=1).mean(dim=1).double().cpu().numpy()
            for i, (it, m) in enumerate(zip(chunk, mags)):
                out.append({"row": int(it["row"]), "caption": it["caption"], "image": it["image"],
                            "magnitude": float(m), "drop": bool(m > self.threshold), "threshold": self.threshold,
                            "timesteps": list(self.timesteps), "seeds": [s[i] for s in seeds],
                            "unet_evals": 2 * len(self.timesteps)})
        return out


def _image_shape(denoiser: Denoiser) -> tuple[int, int, int]:
    shape = getattr(denoiser, "image_shape", None)
    if shape is None or not hasattr(denoiser, "encode_images"):
        raise DejaGuardError(f"{type(denoiser).__name__} cannot encode images (no encode_images): the training "
                             "filter needs a diffusers-format model")
    return tuple(shape)


@torch.no_grad()
def training_pair_magnitude(denoiser: Denoiser, images: torch.Tensor, captions: Sequence[str],
                            seeds: Sequence[int], timesteps: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
    """Text-conditional magnitude of each training pair at its noised image: the loss filter's
    per-sample criterion (Wen et al.: drop a sample from the loss when this exceeds a threshold).

    ``images``: ``(B, 3, H, W)`` RGB in [-1, 1] (resized to the model's image size if needed);
    encoded through the model's VAE (``denoiser.encode_images``) into ``x_0 (B, C, h, w)``, noised
    by the training forward process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with ``eps`` drawn
    from each sample's seed and ``a_t`` the scheduler's ``alphas_cumprod`` at the sample's timestep
    (one int for all, or ``B`` ints). Returns ``||eps(x_t, c) - eps(x_t, "")||_2``, shape ``(B,)``.
    One batched UNet call (cond + uncond) per distinct timestep. The same quantity that
    ``core.mitigate.conditional_magnitudes`` reads inside a training step (the loss filter), here
    through the Denoiser seam from stored pairs.
    """
    if len(captions) != images.shape[0] or len(seeds) != images.shape[0]:
        raise ValueError("one caption and one seed per image")
    _image_shape(denoiser)
    x0 = denoiser.encode_images(images.to(denoiser.device, denoiser.dtype))
    noise = initial_noise(denoiser, seeds)
    if noise.shape != x0.shape:
        raise DejaGuardError(f"encoded images {tuple(x0.shape)} do not match the model's samples {tuple(noise.shape)}")
    t = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).expand(images.shape[0])
    alphas = denoiser.new_scheduler().alphas_cumprod.to(torch.float64)
    a = alphas[t].to(x0.dtype).to(x0.device).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    uncond = denoiser.encode_prompts([""])
    mags = torch.empty(images.shape[0], dtype=torch.float32, device=x0.device)
    for value in torch.unique(t).tolist():  # the protocol's predict_noise takes one timestep per call
        idx = (t == value).nonzero().flatten().to(x0.device)
        cond = denoiser.encode_prompts([captions[i] for i in idx.tolist()])
        x = x_t[idx]
        eps_uncond, eps_cond = denoiser.predict_noise(
            torch.cat([x, x]), int(value), torch.cat([uncond.expand(len(idx), -1, -1), cond])).chunk(2)
        mags[idx] = text_conditional_magnitude(eps_cond, eps_uncond).float()
    return mags


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    engine: str
    workers: int
    scored: int  # rows scored in this run (new rows in the output)
    errors: int  # rows a worker could not score (written to the rejected file)
    wall_s: float
    first_result_s: float = 0.0  # until the first batch was written (Ray: actors started, models loaded)
    first_rows: int = 0  # rows in that first batch
    cpu_s: float | None = None  # this process's CPU time (single engine; all its threads)


def _batches(items: Sequence[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _write_results(sink: ResultSink, results: Sequence[dict]) -> tuple[int, int]:
    errors = [Rejected(int(r["row"]), r["error"]) for r in results if "error" in r]
    if errors:
        sink.write_rejected(errors, append=True)
    return sink.write([r for r in results if "error" not in r]), len(errors)


def run_single(items: Sequence[dict], job: PromptJob | PairJob, sink: ResultSink, denoiser: Denoiser,
               progress: bool = True) -> RunStats:
    """Score ``items`` in this process, one batch of ``job.batch_size`` at a time."""
    from tqdm.auto import tqdm

    start, cpu, scored, errors, first = time.perf_counter(), time.process_time(), 0, 0, None
    with tqdm(total=len(items), desc="auditing", unit="row", disable=not progress) as bar:
        for batch in _batches(items, job.batch_size):
            s, e = _write_results(sink, job.score(denoiser, batch))
            scored, errors = scored + s, errors + e
            first = first or (time.perf_counter() - start, len(batch))
            bar.update(len(batch))
    return RunStats("single", 1, scored, errors, time.perf_counter() - start, *(first or (0.0, 0)),
                    cpu_s=time.process_time() - cpu)


class ScoringActor:
    """A Ray Data worker holding one model; called with one batch of rows at a time."""

    def __init__(self, model: str | None, device: str | None, job: PromptJob | PairJob,
                 fault: str | None = None) -> None:
        if device is None and not torch.cuda.is_available():
            device = "cpu"
        if device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(1)  # one actor per CPU: threads would only fight each other
        _quiet()
        self.denoiser = load_denoiser(model, device=device)
        self.job = job
        self.fault = fault
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self._maybe_die()
        names = list(batch)
        items = [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(names, values)}
                 for values in zip(*(batch[k] for k in names))]
        results = self.job.score(self.denoiser, items)
        return {"row": np.array([r["row"] for r in results], dtype=np.int64),
                "result": np.array([json.dumps(r) for r in results], dtype=object)}

    def _maybe_die(self) -> None:
        """Test hook (``DEJAGUARD_FAULT_INJECT=N:/path/marker``): the first actor to reach its Nth
        batch exits the process abruptly, once (the marker file records that it happened)."""
        if not self.fault:
            return
        n, marker = self.fault.split(":", 1)
        if self.calls == int(n):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def init_ray(address: str | None = None, workers: int | None = None) -> bool:
    """Connect to the Ray cluster at ``address``, or start a local Ray with ``workers`` CPUs; does
    nothing if Ray is already initialized. Returns whether the caller started it (and must shut it down)."""
    for k, v in WORKER_ENV.items():
        if k == "RAY_DISABLE_USAGE_STATS":
            os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError as err:
        raise DejaGuardError("--engine ray needs Ray: pip install 'ray[data]'") from err
    if ray.is_initialized():
        return False
    common = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "logging_level": logging.ERROR}
    if address:
        try:
            ray.init(address=address, **common)
        except Exception as err:  # ConnectionError, ValueError, ... for a wrong address
            raise DejaGuardError(f"cannot connect to the Ray cluster at {address}: {err}") from err
    else:
        for attempt in range(2):  # Ray gives its own processes 30 s to start: a busy machine can miss that once
            try:
                # A busy machine can also take minutes to start a worker: wait rather than kill it at 60 s.
                ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                         _system_config={"worker_register_timeout_seconds": 600}, **common)
                break
            except Exception as err:  # Ray raises a bare Exception for "node timed out during startup"
                ray.shutdown()
                if attempt or "timed out during startup" not in str(err):
                    raise DejaGuardError(f"could not start a local Ray: {err}") from err
    return True


def _user_error(err: BaseException) -> DejaGuardError | None:
    """The DejaGuardError a worker raised, unwrapped from Ray's exception wrappers, if any."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(cause, DejaGuardError):
            return type(cause)(*cause.args)
        if isinstance(e, DejaGuardError) and type(e).__module__.startswith("dejaguard"):
            return e
        e = e.__cause__ or e.__context__
    return None


def run_ray(items: Sequence[dict], job: PromptJob | PairJob, sink: ResultSink, model: str | Path | None = None,
            device: str | None = None, address: str | None = None, workers: int | None = None,
            progress: bool = True) -> RunStats:
    """Score ``items`` with Ray Data ``map_batches`` on a pool of ``workers`` model-holding actors.

    One block per batch, so a task is one batch: a worker that dies costs the retry of one batch,
    and the driver writes each batch as it arrives (in completion order; rows carry ``row``).
    """
    if not items:
        return RunStats("ray", workers or 0, 0, 0, 0.0)
    try:
        import pyarrow as pa
        import ray
        import ray.data
    except ImportError as err:
        raise DejaGuardError(f"--engine ray needs Ray Data: pip install 'ray[data]' ({err})") from err
    owned = init_ray(address, workers)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")  # Ray's own, not ours
            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = (device is None and gpus > 0) or (device is not None and device.startswith("cuda"))
            if use_gpu and gpus == 0:
                raise DejaGuardError(f"--device {device}: the Ray cluster has no GPU")
            if workers is None:
                workers = gpus if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)))
            if workers < 1:
                raise DejaGuardError("--workers must be at least 1")
            resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = progress
            ctx.print_on_execution_start = False
            ctx.execution_options.preserve_order = False  # a slow batch must not hold finished ones back
            logging.getLogger("ray.data").setLevel(logging.WARNING if progress else logging.ERROR)
            fields = list(items[0])
            tables = [pa.table({k: [it[k] for it in batch] for k in fields})
                      for batch in _batches(items, job.batch_size)]
            start, scored, errors, first = time.perf_counter(), 0, 0, None
            # Ray Data gives actor pools max_restarts=-1 and max_task_retries=-1 by default: a dead
            # actor is restarted (reloading the model) and its unfinished batches are retried.
            ds = ray.data.from_arrow(tables).map_batches(
                ScoringActor, batch_size=job.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                fn_constructor_kwargs={"model": None if model is None else str(model),
                                       "device": "cuda" if use_gpu else "cpu", "job": job,
                                       "fault": os.environ.get(FAULT_ENV)},
                **resources)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    s, e = _write_results(sink, [json.loads(r) for r in batch["result"]])
                    scored, errors = scored + s, errors + e
                    first = first or (time.perf_counter() - start, len(batch["result"]))
            except Exception as err:
                user = _user_error(err)
                if user is not None:
                    raise user from None
                raise
            return RunStats("ray", workers, scored, errors, time.perf_counter() - start, *(first or (0.0, 0)))
    finally:
        if owned:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Audits: input -> engine -> output
# ---------------------------------------------------------------------------------------------


@dataclass
class AuditSummary:
    """What an audit did. ``rows``: every scored row in the output, sorted by ``row``."""

    input_rows: int  # rows that could be scored
    rejected: list[Rejected]  # malformed rows (input and worker errors)
    unit: str
    resumed: int  # rows already in the output at start (skipped)
    stats: RunStats
    threshold: float | None
    out: str
    rejected_path: Path
    rows: list[dict] = field(default_factory=list)

    @property
    def flagged(self) -> int:
        return sum(bool(r.get("flagged") or r.get("drop")) for r in self.rows)


def resolve_threshold(threshold: float | None, model: str | Path | None, calibration: str | Path | None,
                      settings: ScoreSettings, denoiser: Denoiser | None) -> float:
    """The explicit threshold, else the calibrated one for this model and these settings."""
    if threshold is not None:
        return threshold
    if denoiser is None:
        denoiser = load_denoiser(model, device="cpu")  # only its fingerprint is needed here
    return load_threshold(calibration or model or BUNDLED_TESTBED, settings, denoiser.fingerprint())


def _run(inputs: InputRows, job: PromptJob | PairJob, out: str | Path, *, model, device, engine, address, workers,
         resume, fmt, shard_rows, progress, denoiser: Denoiser | None,
         load: Callable[[], Denoiser] | None) -> AuditSummary:
    if engine not in ("single", "ray"):
        raise DejaGuardError(f"unknown engine {engine!r} (single or ray)")
    sink = ResultSink(out, fmt, shard_rows, resume=resume, params=job.params())
    try:
        sink.check_input(inputs.items, job.key_fields)
        sink.write_rejected(inputs.rejected)
        todo = [it for it in inputs.items if it["row"] not in sink.done]
        if engine == "single":
            denoiser = denoiser or load()
            stats = run_single(todo, job, sink, denoiser, progress=progress)
        else:
            stats = run_ray(todo, job, sink, model=model, device=device, address=address, workers=workers,
                            progress=progress)
    finally:
        sink.close()
    rejected = list(inputs.rejected)
    if stats.errors:
        rejected = [Rejected(int(r["row"]), r["reason"], r.get("value", ""))
                    for r in _read_jsonl(sink.rejected_path)]
    return AuditSummary(input_rows=len(inputs.items), rejected=rejected, unit=inputs.unit, resumed=sink.resumed,
                        stats=stats, threshold=job.threshold, out=sink.describe(), rejected_path=sink.rejected_path,
                        rows=sink.rows())


def audit_prompts(prompts: str | Path, out: str | Path, *, model: str | Path | None = None, device: str | None = None,
                  settings: ScoreSettings | None = None, seed: int | None = None, threshold: float | None = None,
                  calibration: str | Path | None = None, batch_size: int = 32, engine: str = "single",
                  address: str | None = None, workers: int | None = None, resume: bool = False,
                  caption_column: str | None = None, fmt: str | None = None, shard_rows: int = 100_000,
                  progress: bool = True, denoiser: Denoiser | None = None) -> AuditSummary:
    """Score every prompt of a text/CSV/Parquet file for memorization and write the results.

    ``denoiser``: an already loaded model for the single engine (else it is loaded from ``model``).
    """
    settings = settings or ScoreSettings()
    inputs = read_captions(prompts, caption_column)
    if engine == "single" and denoiser is None:
        denoiser = load_denoiser(model, device=device)
    elif engine == "ray" and model is not None and not Path(model).is_dir():
        raise DejaGuardError(f"model folder not found: {model}")
    threshold = resolve_threshold(threshold, model, calibration, settings, denoiser)
    job = PromptJob(settings, threshold, seed, batch_size)
    return _run(inputs, job, out, model=model, device=device, engine=engine, address=address, workers=workers,
                resume=resume, fmt=fmt, shard_rows=shard_rows, progress=progress, denoiser=denoiser,
                load=lambda: load_denoiser(model, device=device))


def audit_training_pairs(pairs: str | Path, out: str | Path, threshold: float, *, scores: str | Path | None = None,
                         model: str | Path | None = None, device: str | None = None,
                         timesteps: Sequence[int] = (999,), batch_size: int = 32, engine: str = "single",
                         address: str | None = None, workers: int | None = None, resume: bool = False,
                         caption_column: str | None = None, image_column: str | None = None,
                         progress: bool = True, denoiser: Denoiser | None = None) -> AuditSummary:
    """The training-time filter at scale: score every (caption, image) pair with
    :func:`training_pair_magnitude` and write the pairs to drop (``magnitude > threshold``) to
    ``out`` (JSONL). Every pair's magnitude goes to ``scores`` (default ``<out>.scores.jsonl``),
    which ``resume`` continues and which helps choose a threshold.
    """
    out = Path(out)
    scores = Path(scores) if scores is not None else out.with_name(out.name + ".scores.jsonl")
    if not timesteps or any(not 0 <= t < 1000 for t in timesteps):
        raise DejaGuardError("timesteps must lie in [0, 999]")
    inputs = read_pairs(pairs, caption_column, image_column)
    if engine == "single" and denoiser is None:
        denoiser = load_denoiser(model, device=device)
    elif engine == "ray" and model is not None and not Path(model).is_dir():
        raise DejaGuardError(f"model folder not found: {model}")
    job = PairJob(float(threshold), tuple(int(t) for t in timesteps), batch_size)
    summary = _run(inputs, job, scores, model=model, device=device, engine=engine, address=address, workers=workers,
                   resume=resume, fmt="jsonl", shard_rows=100_000, progress=progress, denoiser=denoiser,
                   load=lambda: load_denoiser(model, device=device))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in summary.rows:
            if r["drop"]:
                f.write(json.dumps({"row": r["row"], "caption": r["caption"], "image": r["image"],
                                    "magnitude": r["magnitude"]}) + "\n")
    return summary


def warn_rejected(summary: AuditSummary, show: int = 5) -> None:
    """One ``dejaguard: warning:`` line on stderr naming the first malformed rows and where the full
    list is (printed, not ``warnings.warn``: a skipped row must be visible in every setting)."""
    if not summary.rejected:
        return
    first = "; ".join(r.describe(summary.unit) for r in summary.rejected[:show])
    more = f"; ... ({len(summary.rejected) - show} more)" if len(summary.rejected) > show else ""
    print(f"dejaguard: warning: {len(summary.rejected)} malformed rows skipped ({first}{more}); listed in "
          f"{summary.rejected_path}", file=sys.stderr)
