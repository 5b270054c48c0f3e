"""The bundled prompt sets: general prompts for calibration, and NeMo's memorized LAION prompts for reference.

Why they are bundled. The first-step score (Wen et al.) has no universal threshold: its scale depends on the
checkpoint, the resolution and the score setting. A threshold is therefore calibrated on each model as the
``1 - target_fpr`` quantile of the scores of prompts known *not* to be memorized, and a user should not have to
write a hundred such prompts first. The memorized reference set is what detection figures on a real Stable
Diffusion checkpoint are measured against (memorized vs. not memorized, split into verbatim and template
memorization as in the published work).

The data (files in the package's ``data/`` folder, each with its licence notice and a provenance note in
``data/README.md``):

- :func:`calibration_prompts` reads ``data/calibration_prompts.txt``: 500 general prompts, one per line, UTF-8:
  short descriptions of scenes, places, subjects and events (at most 26 CLIP tokens), a few naming a medium
  ("A detailed illustration of ...") and hardly any style modifiers. It is the non-memorized group of the MemAttn code
  (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through Cross
  Attention", ECCV 2024; repository ``renjie3/MemAttn``, file ``prompt/group_nomem500.txt``), MIT licence,
  Copyright (c) 2024 Jie Ren; copied unchanged.
- :func:`memorized_reference` reads ``data/memorized_laion_prompts.csv``: the 500 memorized LAION captions for
  Stable Diffusion v1 used by NeMo (Hintersdorf et al., "Finding NeMo: Localizing Neurons Responsible For
  Memorization in Diffusion Models", NeurIPS 2024; repository
  ``ml-research/localizing_memorization_in_diffusion_models``, file ``prompts/memorized_laion_prompts.csv``),
  MIT licence, Copyright (c) 2024 ml-research@TUDarmstadt; copied unchanged. 112 are labelled verbatim
  memorization (``VM``: the model reproduces one training image) and 388 template memorization (``TM``: the
  model reproduces a layout shared by many training images with variations), each with the SSCD figures the
  source gives (columns ``mean_sscd`` and ``max_sscd``; blank for 13 template prompts, read as ``None``).

The files are found relative to this module (``<package>/data``), which is where they lie in a git checkout, in
a ComfyUI ``custom_nodes`` folder and in an installed wheel (``pyproject.toml`` ships ``data/*`` as package
data). A missing or malformed file raises :class:`~dejaguard.core.errors.DejaGuardError` naming the file.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import DejaGuardError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CALIBRATION_FILE = "calibration_prompts.txt"
MEMORIZED_FILE = "memorized_laion_prompts.csv"

# The source's labels, VM / TM, in the words the rest of DejaGuard uses (as in the testbed's MEMORIZED set).
_KINDS: dict[str, Literal["verbatim", "template"]] = {"VM": "verbatim", "TM": "template"}
_MEMORIZED_COLUMNS = ("Caption", "URL", "type", "mean_sscd", "max_sscd", "Index")


@dataclass(frozen=True)
class MemorizedPrompt:
    """One prompt of the memorized reference set, as its source gives it.

    ``kind``: "verbatim" (the prompt reproduces one training image) or "template" (a shared layout).
    ``mean_sscd`` / ``max_sscd``: the source's SSCD similarity figures for the prompt (``None`` where the
    source leaves them blank). ``url``: the LAION image the caption belongs to (a link, not shipped).
    ``laion_index``: the source's ``Index`` column.
    """

    prompt: str
    kind: Literal["verbatim", "template"]
    mean_sscd: float | None
    max_sscd: float | None
    url: str
    laion_index: int


def data_file(name: str) -> Path:
    """The path of a bundled data file; a :class:`DejaGuardError` naming it if it is not there."""
    path = DATA_DIR / name
    if not path.is_file():
        raise DejaGuardError(
            f"bundled data file {path} is missing: the package was installed without its data/ folder "
            "(reinstall DejaGuard, or check out the whole repository)"
        )
    return path


def calibration_prompts() -> list[str]:
    """The 500 bundled prompts known not to be memorized (MemAttn's non-memorized group, MIT), file order."""
    return list(_read_calibration())


def memorized_reference() -> list[MemorizedPrompt]:
    """NeMo's 500 memorized LAION prompts (112 verbatim, 388 template) with their SSCD figures, file order (MIT)."""
    return list(_read_memorized())


@functools.lru_cache(maxsize=1)
def _read_calibration() -> tuple[str, ...]:
    path = data_file(CALIBRATION_FILE)
    prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not prompts:
        raise DejaGuardError(f"bundled data file {path} holds no prompts")
    return prompts


@functools.lru_cache(maxsize=1)
def _read_memorized() -> tuple[MemorizedPrompt, ...]:
    path = data_file(MEMORIZED_FILE)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=";")
        missing = [c for c in _MEMORIZED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DejaGuardError(f"bundled data file {path} lacks the column(s) {', '.join(missing)}")
        rows = list(reader)
    prompts = []
    for number, row in enumerate(rows, start=1):
        if row["type"] not in _KINDS:
            raise DejaGuardError(f"{path}, data row {number}: memorization type {row['type']!r} is neither VM nor TM")
        try:
            prompts.append(MemorizedPrompt(
                prompt=row["Caption"].strip(),
                kind=_KINDS[row["type"]],
                mean_sscd=_optional_float(row["mean_sscd"]),
                max_sscd=_optional_float(row["max_sscd"]),
                url=row["URL"],
                laion_index=int(row["Index"]),
            ))
        except ValueError as err:
            raise DejaGuardError(f"{path}, data row {number}: {err}") from None
    return tuple(prompts)


def _optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None
