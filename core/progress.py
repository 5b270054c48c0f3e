"""The one progress convention of DejaGuard's long-running methods.

Every method that takes a while (scoring prompt lists, calibration, sampling, NeMo localization, subspace
scoring, embedding mitigation) accepts ``progress: Progress | None`` and calls it as
``progress(done, total, stage)``: ``done`` of ``total`` units of work finished (``total`` fixed for one
``stage``; a method with several stages reports each stage from 0 to its own total), ``stage`` a short name
of what runs now ("scoring", "statistics", "refine", ...). ``None`` reports nothing.

Front ends turn it into what they show: :func:`tqdm_progress` for the command line and benches, ComfyUI's
``ProgressBar`` in ``nodes/`` (which may also raise ComfyUI's interruption from inside the callback).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    """``progress(done, total, stage)``: ``done`` of ``total`` units of ``stage`` are finished."""

    def __call__(self, done: float, total: float, stage: str = "") -> None: ...


def report(progress: Progress | None, done: float, total: float, stage: str = "") -> None:
    """Call ``progress`` if there is one (the call every method makes)."""
    if progress is not None:
        progress(done, total, stage)


class TqdmProgress:
    """A :class:`Progress` drawing one tqdm bar per stage (a new stage closes the previous bar).

    Use as a context manager, or call :meth:`close` when done.
    """

    def __init__(self, desc: str = "", unit: str = "it", disable: bool = False) -> None:
        self.desc = desc
        self.unit = unit
        self.disable = disable
        self._bar = None
        self._stage: str | None = None

    def __call__(self, done: float, total: float, stage: str = "") -> None:
        from tqdm.auto import tqdm

        if self._bar is None or stage != self._stage or total != self._bar.total:
            self.close()
            label = f"{self.desc}: {stage}" if self.desc and stage else (self.desc or stage)
            self._bar = tqdm(total=total, desc=label, unit=self.unit, disable=self.disable)
            self._stage = stage
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tqdm_progress(desc: str = "", unit: str = "it", enabled: bool = True) -> TqdmProgress | None:
    """A tqdm-drawing :class:`Progress`, or None when ``enabled`` is False (library callers' quiet default)."""
    return TqdmProgress(desc, unit) if enabled else None


def scaled(progress: Progress | None, stage: str, start: float, end: float, total: float = 1.0) -> Callable[
        [float, float, str], None] | None:
    """A :class:`Progress` for a sub-task that maps its own ``done / total`` onto ``start..end`` of ``total``
    units of the parent's ``stage`` (a sub-search inside a NeMo stage, one prompt of many)."""
    if progress is None:
        return None

    def sub(done: float, sub_total: float, _stage: str = "") -> None:
        fraction = done / sub_total if sub_total else 1.0
        progress(start + (end - start) * min(1.0, fraction), total, stage)

    return sub
