"""Audit output: where scored rows go, durable batch by batch, resumable, deduplicated by ``row``.

Layouts (:class:`ResultSink`), one object per scored row with its ``row``:

- ``--out scores.jsonl``: one JSONL file, appended one batch at a time;
- ``--out scores.parquet``: one Parquet file, written at the end; until then the rows go to a
  journal ``scores.parquet.journal.jsonl`` beside it;
- ``--out DIR`` (any path without those suffixes): a folder of shards ``part-00000.jsonl`` (or
  ``.parquet`` with ``--format parquet``), each of at most ``shard_rows`` rows; Parquet shards are
  written whole (write then rename) from the journal ``DIR/_journal.jsonl``.

Rejected rows go to ``<out>.rejected.jsonl`` (file output) or ``DIR/rejected.jsonl``.

Resume: the rows already in the output (shards, Parquet file and journal) are skipped, after
checking that their prompts match the input and that the output was written with the same **run key**:
every parameter that changes a row (for a prompt audit the job kind, the model's fingerprint, seed,
guidance scale, schedule, steps, generations and threshold). The key is written beside the rows before
the first one (``<out>.run.json``, or ``DIR/_run.json``); a resume with another key is refused with one
line naming what differs. Why a file of its own: rows do not carry every setting (the base seed, the
model), and an output must never mix rows of two runs. Every batch is on disk as soon as the
driver receives it, so an interrupted audit loses nothing and repeats at most the batches in
flight, one per worker. Rows are deduplicated by ``row`` when written, so a batch that Ray
retries after a worker died is never written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..errors import DejaGuardError
from .inputs import Rejected, pyarrow_modules


def read_jsonl(path: Path) -> Iterator[dict]:
    """Complete JSON lines of ``path``; a torn last line (the process was killed) is skipped."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _row_number(row: object, where: Path) -> int:
    """The ``row`` of a row read back from an output; a one-line error if it is not an audit row."""
    value = row.get("row") if isinstance(row, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DejaGuardError(f"{where} is not a DejaGuard audit output (a row without an integer 'row': "
                             f"{json.dumps(row)[:80]})")
    return value


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _truncate_torn_line(path: Path) -> None:
    """Cut a partly written last line so that appending continues on a line boundary."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class ResultSink:
    """Where scored rows go (see the module doc for the layouts). Rows are deduplicated by ``row``.

    ``key``: the run key (JSON-able ``{name: value}``), written beside the rows; on resume an output
    holding rows must have been written with an equal key. None: no key is written or checked (a sink
    used on its own). On resume, :meth:`check_input` checks the rows' ``key_fields`` (e.g.
    ``("prompt",)``) against the input.
    """

    def __init__(self, out: str | Path, fmt: str | None = None, shard_rows: int = 100_000,
                 resume: bool = False, key: dict | None = None) -> None:
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
        self.out, self.fmt, self.shard_rows = out, fmt, shard_rows
        if self.single_file:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.rejected_path = out.with_name(out.name + ".rejected.jsonl")
            self.journal = out.with_name(out.name + ".journal.jsonl") if fmt == "parquet" else out
            self.key_path = out.with_name(out.name + ".run.json")
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.rejected_path = out / "rejected.jsonl"
            self.journal = out / "_journal.jsonl"
            self.key_path = out / "_run.json"
        if not resume:
            self._clear()
        self.done: dict[int, dict] = {}  # row -> the row as written (resume check, dedupe)
        self._in_shards: set[int] = set()  # Parquet: rows already in a shard (the journal may repeat some)
        for r in self._existing_rows():
            self.done.setdefault(_row_number(r, self.out), r)
        self.resumed = len(self.done)
        self.key = None if key is None else json.loads(json.dumps(key))  # as it reads back from the file
        if self.key is not None:
            if self.done:
                self._check_key()
            else:
                self._write_key()
        self._handle = None
        self._journal_rows = 0
        self._shard_rows_written = 0
        self._next_shard = 1 + max((self._shard_index(p) for p in self._shards()), default=-1)
        if self.fmt == "parquet" and self.journal.exists():
            _truncate_torn_line(self.journal)
            self._journal_rows = sum(1 for _ in read_jsonl(self.journal))
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
        files = [self.rejected_path, self.journal, self.key_path]
        if self.single_file:
            files.append(self.out)
        else:
            files += list(self.out.glob("part-*.jsonl")) + list(self.out.glob("part-*.parquet"))
        for p in files:
            p.unlink(missing_ok=True)

    def _existing_rows(self) -> Iterator[dict]:
        for shard in self._shards():
            if shard.suffix == ".parquet":
                _, pq = pyarrow_modules()
                try:
                    rows = pq.read_table(shard).to_pylist()
                except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError), OSError, ...
                    raise DejaGuardError(f"cannot resume {self.out}: {shard} is not a readable Parquet file "
                                         f"({_first_line(err)})") from err
                self._in_shards.update(_row_number(r, shard) for r in rows)
                yield from rows
            else:
                yield from read_jsonl(shard)
        if self.fmt == "parquet" and self.journal.exists():
            yield from read_jsonl(self.journal)

    def _write_key(self) -> None:
        tmp = self.key_path.with_name(self.key_path.name + ".tmp")
        tmp.write_text(json.dumps(self.key, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.key_path)  # whole or not at all, before the first row

    def _check_key(self) -> None:
        """An output with rows resumes only with the run key it was written with."""
        try:
            old = json.loads(self.key_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DejaGuardError(f"cannot resume {self.out}: it has no record of the settings it was written with "
                                 f"({self.key_path.name} is missing); write to a new output") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DejaGuardError(f"cannot resume {self.out}: {self.key_path.name} is unreadable ({err})") from err
        if not isinstance(old, dict):
            raise DejaGuardError(f"cannot resume {self.out}: {self.key_path.name} is not a run key")
        names = list(self.key) + [k for k in old if k not in self.key]
        differs = [k for k in names if old.get(k) != self.key.get(k)]
        if differs:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in differs)
            now = ", ".join(f"{k}={self.key.get(k)!r}" for k in differs)
            raise DejaGuardError(f"cannot resume {self.out}: it was written with {was}, this run has {now} "
                                 "(write to a new output or use the same settings)")

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
        pa, pq = pyarrow_modules()
        self._close_handle()
        rows: list[dict] = []
        for r in read_jsonl(self.journal) if self.journal.exists() else []:
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
