"""Calibrated thresholds: made once per model and score setting, found again by every front end.

A first-step score means nothing without a threshold, and a threshold means nothing outside the model and
score setting it was measured for. :func:`calibrate` scores prompts known not to be memorized and places the
threshold at their ``1 - target_fpr`` quantile (flagged means ``score > threshold``, so at most
``target_fpr`` of such prompts are flagged). The result is stored per setting (:meth:`ScoreSettings.key`)
in a JSON file (``dejaguard_calibration.json`` beside a diffusers model, or any file the user names), with
the fingerprint of the UNet it was measured on. Each score option (``ScoreSettings.score``: magnitude,
anisotropy) has its own entries, since the scores live on different scales: a setting's key names its option
when it is not the default magnitude (so files made before the option existed keep working), and a front end
asking for one option's threshold never gets the other's.

Everything that needs a threshold goes through this module: the command line, the ComfyUI nodes, the audit
engines and the benches.

- :func:`find_calibration`: the entry for a model (by fingerprint) and a setting; every way a file can be
  wrong (missing, not JSON, not an object, an entry without its fields, another model, another setting)
  is a one-line :class:`DejaGuardError`.
- :func:`resolve_threshold`: an explicit threshold wins, else the calibrated one, with where it came from.
- :func:`size_note`: the score is an L2 norm over the latent, so it grows with the image area; a calibration
  records the latent shape it scored (``sample_shape``, ``(C, H, W)``; absent in files made before it existed,
  which then load as before and warn of nothing), and a front end whose run has another size says so ("calibrated
  at 512x512, this run 512x768: threshold may not apply"). No rescaling rule: none is measured yet.
- :func:`mitigation_levels` / :func:`resolve_levels`: the two levels of embedding mitigation
  (``core.mitigate``): the *threshold* above which a prompt is touched (the detection threshold: the
  calibrated FPR of non-memorized prompts stay bit-identical) and the *target* it is pushed to
  (:data:`TARGET_FRACTION_OF_MEDIAN` of the non-memorized median; why: ``core/mitigate.py``'s module doc).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .denoiser import BUNDLED_TESTBED, Denoiser
from .detect import MAGNITUDE, ScoreSettings, first_step_scores
from .errors import DejaGuardError
from .progress import Progress
from .sampling import EMPTY_PROMPT

CALIBRATION_FILE = "dejaguard_calibration.json"
# Single-file model weights: their calibration is a file beside them, never the weights file itself.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The default mitigation target, as a fraction of the non-memorized calibration prompts' median score.
TARGET_FRACTION_OF_MEDIAN = 0.5
_REQUIRED_FIELDS = ("threshold", "fingerprint")
LATENT_PIXELS = 8  # image pixels per latent pixel of every supported family's VAE (for messages)


@dataclass
class Calibration:
    """A threshold calibrated on non-memorized prompts for one model and one score setting."""

    threshold: float
    target_fpr: float
    settings: dict
    fingerprint: str
    n_prompts: int
    prompts_source: str
    nonmemorized_quantiles: dict = field(default_factory=dict)
    created: str = ""
    memorized_tpr: float | None = None  # on memorized prompts, if some were given
    sample_shape: list[int] | None = None  # (C, H, W) of the latents scored; None in files made before it existed


@dataclass(frozen=True)
class CalibrationEntry:
    """One stored calibration (the JSON object of one setting) and the file it was read from."""

    entry: dict[str, Any]
    file: Path

    @property
    def threshold(self) -> float:
        return float(self.entry["threshold"])

    @property
    def source(self) -> str:
        """How a front end names it: "testbed calibration" for the bundled one, else the file."""
        return "testbed calibration" if self.file.parent == BUNDLED_TESTBED else f"calibration {self.file}"

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """The latent shape ``(C, H, W)`` it was calibrated at; None when the entry does not say (older files) or
        says something that is not a list of positive integers."""
        shape = self.entry.get("sample_shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(v, int) and v > 0 for v in shape):
            return None
        return tuple(shape)


def size_note(calibrated: Sequence[int] | None, shape: Sequence[int]) -> str | None:
    """"calibrated at 512x512, this run 512x768: threshold may not apply" when the spatial size (the last two
    dimensions) of a run's latent ``shape`` (``(B, C, H, W)`` or ``(C, H, W)``) differs from the calibration's
    ``(C, H, W)``; None when they agree or the calibration does not record its size. Sizes in image pixels, width x
    height (:data:`LATENT_PIXELS` per latent pixel)."""
    if not calibrated or len(calibrated) < 2 or tuple(calibrated[-2:]) == tuple(shape[-2:]):
        return None

    def px(hw: Sequence[int]) -> str:
        return f"{hw[-1] * LATENT_PIXELS}x{hw[-2] * LATENT_PIXELS}"

    return f"calibrated at {px(calibrated)}, this run {px(shape)}: threshold may not apply"


class Levels(NamedTuple):
    """Embedding-mitigation levels: touch prompts scoring above ``threshold``, push them to ``target``."""

    threshold: float
    target: float
    source: str


def calibration_from_scores(scores: Sequence[float], target_fpr: float, settings: ScoreSettings, fingerprint: str,
                            prompts_source: str, n_prompts: int | None = None,
                            memorized_tpr: float | None = None,
                            sample_shape: Sequence[int] | None = None) -> Calibration:
    """The calibration rule, for any front end that scored non-memorized prompts itself (the CLI through
    :func:`calibrate`, ComfyUI's Calibrate node from its sampler's predictions): the threshold is the
    ``1 - target_fpr`` quantile of ``scores`` (``method="higher"``: flagged means ``score > threshold``, so at most
    ``target_fpr`` of them are flagged), with the median, 90th and 99th percentiles kept for the mitigation levels.
    ``sample_shape``: the latent shape ``(C, H, W)`` the scores were taken at (recorded for :func:`size_note`).
    """
    if not 0 < target_fpr < 1:
        raise DejaGuardError("target FPR must lie in (0, 1)")
    values = np.asarray(scores, dtype=float)
    if values.size == 0 or not np.isfinite(values).all():
        raise DejaGuardError("calibration needs finite scores of at least one prompt")
    return Calibration(
        threshold=float(np.quantile(values, 1 - target_fpr, method="higher")), target_fpr=target_fpr,
        settings=asdict(settings), fingerprint=fingerprint,
        n_prompts=int(values.size if n_prompts is None else n_prompts), prompts_source=prompts_source,
        nonmemorized_quantiles={q: float(np.quantile(values, float(q))) for q in ("0.5", "0.9", "0.99")},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), memorized_tpr=memorized_tpr,
        sample_shape=None if sample_shape is None else [int(v) for v in sample_shape],
    )


def calibrate(
    denoiser: Denoiser,
    nonmemorized_prompts: Sequence[str],
    settings: ScoreSettings | None = None,
    target_fpr: float = 0.01,
    prompts_source: str = "",
    memorized_prompts: Sequence[str] = (),
    progress: Progress | None = None,
) -> Calibration:
    """Score prompts known not to be memorized and place the threshold at their ``1 - target_fpr`` quantile.

    Needs at least ``1 / target_fpr`` prompts. ``memorized_prompts``, if given, are scored too and the share
    flagged is recorded (``memorized_tpr``).
    """
    settings = settings or ScoreSettings()
    if not 0 < target_fpr < 1:
        raise DejaGuardError("target FPR must lie in (0, 1)")
    needed = math.ceil(1 / target_fpr)
    if len(nonmemorized_prompts) < needed:
        raise DejaGuardError(
            f"calibrating for FPR {target_fpr:g} needs at least {needed} non-memorized prompts, "
            f"got {len(nonmemorized_prompts)}")
    scores = np.array([r.score for r in first_step_scores(denoiser, nonmemorized_prompts, settings,
                                                          progress=progress)])
    calibration = calibration_from_scores(scores, target_fpr, settings, denoiser.fingerprint(), prompts_source,
                                          sample_shape=denoiser.sample_shape)
    if memorized_prompts:
        mem = first_step_scores(denoiser, memorized_prompts, settings, progress=progress)
        calibration.memorized_tpr = float(np.mean([r.score > calibration.threshold for r in mem]))
    return calibration


def calibration_file(location: str | Path | None) -> Path:
    """The calibration file meant by ``location``: a JSON file, a model folder holding
    ``dejaguard_calibration.json``, a single-file checkpoint (``model.safetensors`` ->
    ``model.dejaguard_calibration.json`` beside it: one file per checkpoint, since an entry is keyed by its score
    setting only), or None for the bundled testbed's."""
    path = BUNDLED_TESTBED if location is None or str(location).strip() == "" else Path(location).expanduser()
    if path.is_dir():
        return path / CALIBRATION_FILE
    if path.suffix.lower() in MODEL_FILE_SUFFIXES:
        return path.with_name(f"{path.stem}.{CALIBRATION_FILE}")
    return path


def read_calibrations(file: Path) -> dict[str, dict[str, Any]]:
    """Every entry of a calibration file, by setting key. A file that is not a JSON object of objects is a
    one-line :class:`DejaGuardError` (never a ``JSONDecodeError`` traceback)."""
    try:
        data = json.loads(file.read_text())
    except OSError as err:
        raise DejaGuardError(f"cannot read calibration file {file}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DejaGuardError(f"malformed calibration file {file}: not JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DejaGuardError(f"malformed calibration file {file}: expected a JSON object of calibration entries")
    return data


def find_calibration(location: str | Path | None, settings: ScoreSettings, fingerprint: str) -> CalibrationEntry:
    """The calibration of the model with ``fingerprint`` for ``settings`` at ``location`` (see
    :func:`calibration_file`). One-line :class:`DejaGuardError` when there is none or the file is broken."""
    file = calibration_file(location)
    if not file.is_file():
        raise DejaGuardError(f"no calibrated threshold for this model ({file} missing): run `dejaguard calibrate` "
                             "or pass a threshold")
    entry = read_calibrations(file).get(settings.key())
    if entry is None:
        raise DejaGuardError(f"no calibration for {settings.key()} in {file}: run `dejaguard calibrate` with these "
                             "settings or pass a threshold")
    missing = [k for k in _REQUIRED_FIELDS if k not in entry]
    if missing:
        raise DejaGuardError(f"malformed calibration file {file}: the entry for {settings.key()} lacks "
                             f"{', '.join(missing)}; recalibrate")
    try:
        threshold = float(entry["threshold"])
    except (TypeError, ValueError):
        threshold = math.nan
    if not math.isfinite(threshold):
        raise DejaGuardError(f"malformed calibration file {file}: threshold {entry['threshold']!r} for "
                             f"{settings.key()} is not a finite number; recalibrate")
    stored = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
    for name, default in (("score", MAGNITUDE), ("unconditional", EMPTY_PROMPT)):
        made_with, wanted = stored.get(name, default), getattr(settings, name)
        if made_with != wanted:  # a hand-edited file: a threshold of one score never serves another
            raise DejaGuardError(f"malformed calibration file {file}: the entry for {settings.key()} was calibrated "
                                 f"with the {made_with} {name}, not {wanted}; recalibrate")
    if entry["fingerprint"] != fingerprint:
        raise DejaGuardError(f"calibration in {file} was made for another model (fingerprint {entry['fingerprint']}, "
                             f"this model {fingerprint}): recalibrate")
    return CalibrationEntry(entry, file)


def save_calibration(calibration: Calibration, location: str | Path) -> Path:
    """Add (or replace) ``calibration`` in the calibration file at ``location`` (a file or model folder).
    The other settings' entries are kept; a malformed existing file is an error, not overwritten."""
    file = calibration_file(location)
    data = read_calibrations(file) if file.exists() else {}
    data[ScoreSettings(**calibration.settings).key()] = asdict(calibration)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return file


def resolve_threshold(threshold: float | None, location: str | Path | None, settings: ScoreSettings,
                      fingerprint: str) -> tuple[float, str]:
    """``(threshold, where it came from)``: ``threshold`` if given (not None), else the calibrated one."""
    if threshold is not None:
        if not math.isfinite(threshold):
            raise DejaGuardError(f"threshold must be a finite number, got {threshold}")
        return float(threshold), "given"
    found = find_calibration(location, settings, fingerprint)
    return found.threshold, found.source


def mitigation_levels(found: CalibrationEntry) -> tuple[float, float]:
    """``(threshold, target)`` of one calibration: the detection threshold, and
    :data:`TARGET_FRACTION_OF_MEDIAN` of the non-memorized median (never above the threshold)."""
    median = (found.entry.get("nonmemorized_quantiles") or {}).get("0.5")
    if median is None:
        raise DejaGuardError(f"the calibration in {found.file} has no non-memorized median: recalibrate or give a "
                             "target")
    return found.threshold, min(TARGET_FRACTION_OF_MEDIAN * float(median), found.threshold)


def resolve_levels(threshold: float | None, target: float | None, location: str | Path | None,
                   fingerprint: str, settings: ScoreSettings | None = None) -> Levels:
    """The mitigation levels: given values win, the calibration (``location``, for ``settings``, default the
    first-step setting embedding mitigation scores with) fills in the rest.

    Only ``threshold`` given: the calibrated target, lowered to the threshold if above it. Only ``target``
    given: the calibrated threshold, raised to the target if below it. Both given: ``threshold >= target``.
    """
    if threshold is not None and target is not None:
        if threshold < target:
            raise DejaGuardError(f"threshold ({threshold}) must be >= target ({target})")
        return Levels(float(threshold), float(target), "given")
    found = find_calibration(location, settings or ScoreSettings(), fingerprint)
    calibrated_threshold, calibrated_target = mitigation_levels(found)
    if threshold is not None:
        return Levels(float(threshold), min(calibrated_target, float(threshold)), found.source)
    if target is not None:
        return Levels(max(calibrated_threshold, float(target)), float(target), found.source)
    return Levels(calibrated_threshold, calibrated_target, found.source)
