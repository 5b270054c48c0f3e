"""The bundled prompt sets: what the files hold, that they fit CLIP, and that an installed package carries them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from dejaguard.core import prompt_sets
from dejaguard.core.denoiser import BUNDLED_TESTBED
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.prompt_sets import MemorizedPrompt, calibration_prompts, memorized_reference

REPO = Path(prompt_sets.__file__).resolve().parents[1]
DATA_FILES = ("calibration_prompts.txt", "memorized_laion_prompts.csv", "LICENSE-MemAttn.txt",
              "LICENSE-NeMo.txt", "README.md")


def test_calibration_prompts_count_and_no_empty_or_duplicate():
    prompts = calibration_prompts()
    assert len(prompts) == 500
    assert all(p and p == p.strip() for p in prompts)
    assert len({p.casefold() for p in prompts}) == len(prompts)
    assert prompts[0] == "A serene beach at sunrise"


def test_memorized_reference_counts_kinds_and_figures():
    ref = memorized_reference()
    assert len(ref) == 500 and all(isinstance(m, MemorizedPrompt) for m in ref)
    assert sum(m.kind == "verbatim" for m in ref) == 112
    assert sum(m.kind == "template" for m in ref) == 388
    assert all(m.prompt and m.prompt == m.prompt.strip() for m in ref)
    assert len({m.prompt.casefold() for m in ref}) == 500
    assert len({m.laion_index for m in ref}) == 500
    assert all(m.url.startswith("http") for m in ref)
    # Every verbatim prompt has its SSCD figures; the source leaves them blank for 13 template prompts.
    blank = [m for m in ref if m.mean_sscd is None or m.max_sscd is None]
    assert len(blank) == 13 and all(m.kind == "template" and m.mean_sscd is m.max_sscd is None for m in blank)
    assert all(m.mean_sscd <= m.max_sscd for m in ref if m not in blank)
    first = ref[0]
    assert (first.prompt, first.kind, first.laion_index) == ("The No Limits Business Woman Podcast", "verbatim",
                                                               1030727993)
    assert first.mean_sscd == pytest.approx(0.8392826318740845) and first.max_sscd == pytest.approx(0.8467365503311157)
    assert ref[3].prompt == '"Watch: Passion Pit\'s New Video, ""Lifted Up (1985)"""'  # CSV quoting undone once


def test_no_overlap_between_calibration_and_memorized():
    calibration = {p.casefold() for p in calibration_prompts()}
    memorized = {m.prompt.casefold() for m in memorized_reference()}
    assert not calibration & memorized


def test_every_prompt_fits_clip_context():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_TESTBED / "tokenizer")
    assert tokenizer.model_max_length == 77
    prompts = calibration_prompts() + [m.prompt for m in memorized_reference()]
    lengths = [len(ids) for ids in tokenizer(prompts).input_ids]  # with the start and end tokens
    assert max(lengths) <= 77  # none truncated (today: 26 calibration, 44 memorized at most)


def test_returned_lists_are_copies():
    calibration_prompts().clear()
    memorized_reference().clear()
    assert len(calibration_prompts()) == 500 and len(memorized_reference()) == 500


def test_missing_or_malformed_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(prompt_sets, "DATA_DIR", tmp_path)
    for reader in (prompt_sets._read_calibration, prompt_sets._read_memorized):
        reader.cache_clear()
    try:
        with pytest.raises(DejaGuardError, match=r"calibration_prompts\.txt is missing.*reinstall"):
            calibration_prompts()
        with pytest.raises(DejaGuardError, match=r"memorized_laion_prompts\.csv is missing"):
            memorized_reference()
        (tmp_path / "memorized_laion_prompts.csv").write_text(";Caption;URL;type;mean_sscd;max_sscd;Index\n"
                                                              "0;a prompt;http://x;XM;0.5;0.6;7\n", encoding="utf-8")
        with pytest.raises(DejaGuardError, match=r"data row 1: memorization type 'XM' is neither VM nor TM"):
            memorized_reference()
        (tmp_path / "memorized_laion_prompts.csv").write_text(";Caption;type\n0;a prompt;VM\n", encoding="utf-8")
        with pytest.raises(DejaGuardError, match=r"lacks the column\(s\) URL, mean_sscd, max_sscd, Index"):
            memorized_reference()
    finally:
        for reader in (prompt_sets._read_calibration, prompt_sets._read_memorized):
            reader.cache_clear()


def test_wheel_ships_the_data_and_the_installed_package_reads_it(tmp_path):
    """Build a wheel from a copy of the tree with setuptools' PEP 517 backend, unpack it as an installation
    would, and read both sets through the installed package (not this checkout)."""
    source = tmp_path / "src"
    # Hidden folders hold environments and the fixture-checkpoint cache (.cache: about 10 GB), never sources.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "out", "*.egg-info", "__pycache__"))
    wheels = tmp_path / "wheels"
    build = "from setuptools import build_meta; import sys; print(build_meta.build_wheel(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", build, str(wheels)], cwd=source, check=True, capture_output=True)
    (wheel,) = wheels.glob("dejaguard-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {f"dejaguard/data/{name}" for name in DATA_FILES} <= names
        assert "dejaguard/core/prompt_sets.py" in names
        site = tmp_path / "site"
        archive.extractall(site)

    check = ("import dejaguard.core.prompt_sets as p; r = p.memorized_reference(); "
             "print(p.__file__, len(p.calibration_prompts()), len(r), sum(m.kind == 'verbatim' for m in r))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert Path(out[0]).is_relative_to(site) and out[1:] == ["500", "500", "112"]
