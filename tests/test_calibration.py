"""core.calibration: the one lookup of calibrated thresholds and mitigation levels (CLI, nodes, benches)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from dejaguard.core.calibration import (
    CALIBRATION_FILE,
    Calibration,
    calibrate,
    calibration_file,
    calibration_from_scores,
    find_calibration,
    read_calibrations,
    resolve_levels,
    resolve_threshold,
    save_calibration,
    size_note,
)
from dejaguard.core.denoiser import BUNDLED_TESTBED
from dejaguard.core.detect import ScoreSettings
from dejaguard.core.errors import DejaGuardError

FP = "0123456789abcdef"


def _write(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps(entries))
    return path


def _entry(threshold: float = 2.0, median: float | None = 1.25, fingerprint: str = FP) -> dict:
    entry: dict = {"threshold": threshold, "fingerprint": fingerprint}
    if median is not None:
        entry["nonmemorized_quantiles"] = {"0.5": median}
    return entry


def test_bundled_testbed_calibration_is_found_by_its_fingerprint(testbed):
    found = find_calibration(None, ScoreSettings(), testbed.fingerprint())
    assert found.file == BUNDLED_TESTBED / CALIBRATION_FILE and found.source == "testbed calibration"
    assert 0 < found.threshold < 10
    assert calibration_file(BUNDLED_TESTBED) == calibration_file(None) == calibration_file("")


@pytest.mark.parametrize(("content", "pattern"), [
    ("{not json", "malformed calibration file .*not JSON"),
    ("[1, 2]", "malformed calibration file .*JSON object"),
    ('{"steps=1,generations=1,cfg=7.5,schedule=50": 3}', "malformed calibration file .*JSON object"),
    ('{"steps=1,generations=1,cfg=7.5,schedule=50": {"threshold": 1.0}}', "lacks fingerprint"),
    ('{"steps=1,generations=1,cfg=7.5,schedule=50": {"threshold": "x", "fingerprint": "0123456789abcdef"}}',
     "not a finite number"),
    (b"\xff\xfe\x00".decode("latin-1"), "malformed calibration file"),
])
def test_broken_files_are_one_line_errors(tmp_path, content, pattern):
    path = tmp_path / "cal.json"
    path.write_text(content, encoding="latin-1")
    with pytest.raises(DejaGuardError, match=pattern):
        find_calibration(path, ScoreSettings(), FP)


def test_missing_setting_model_and_file(tmp_path):
    path = _write(tmp_path / "cal.json", {ScoreSettings().key(): _entry()})
    with pytest.raises(DejaGuardError, match="missing"):
        find_calibration(tmp_path / "nope.json", ScoreSettings(), FP)
    with pytest.raises(DejaGuardError, match="no calibration for steps=5"):
        find_calibration(path, ScoreSettings(steps=5), FP)
    with pytest.raises(DejaGuardError, match="another model"):
        find_calibration(path, ScoreSettings(), "ffffffffffffffff")
    assert resolve_threshold(None, path, ScoreSettings(), FP) == (2.0, f"calibration {path}")
    assert resolve_threshold(0.5, path, ScoreSettings(), "other") == (0.5, "given")
    with pytest.raises(DejaGuardError, match="finite"):
        resolve_threshold(float("nan"), path, ScoreSettings(), FP)


def test_save_keeps_other_settings_and_refuses_a_broken_file(tmp_path):
    first = Calibration(1.0, 0.01, {"steps": 1, "generations": 1, "guidance_scale": 7.5, "num_inference_steps": 50},
                        FP, 100, "a")
    second = Calibration(2.0, 0.01, {"steps": 1, "generations": 4, "guidance_scale": 7.5, "num_inference_steps": 50},
                         FP, 100, "b")
    path = save_calibration(first, tmp_path)
    assert path == tmp_path / CALIBRATION_FILE
    save_calibration(second, path)
    assert set(read_calibrations(path)) == {ScoreSettings().key(), ScoreSettings(generations=4).key()}
    assert find_calibration(tmp_path, ScoreSettings(generations=4), FP).threshold == 2.0
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    with pytest.raises(DejaGuardError, match="malformed"):
        save_calibration(first, broken)
    assert broken.read_text() == "{oops"  # nothing lost


def test_mitigation_levels_rule(tmp_path):
    """One rule for the CLI and the node: given values win, the calibration fills in the rest."""
    path = _write(tmp_path / "cal.json", {ScoreSettings().key(): _entry(2.0, 1.25)})
    assert resolve_levels(None, None, path, FP)[:2] == (2.0, 0.625)
    assert resolve_levels(0.5, None, path, FP)[:2] == (0.5, 0.5)  # target lowered to a lower threshold
    assert resolve_levels(3.0, None, path, FP)[:2] == (3.0, 0.625)
    assert resolve_levels(None, 2.5, path, FP)[:2] == (2.5, 2.5)  # threshold raised to a higher target
    assert resolve_levels(None, 0.1, path, FP)[:2] == (2.0, 0.1)
    assert resolve_levels(1.0, 0.2, tmp_path / "absent.json", "any") == (1.0, 0.2, "given")
    with pytest.raises(DejaGuardError, match="must be >= target"):
        resolve_levels(0.1, 0.2, None, FP)
    capped = _write(tmp_path / "capped.json", {ScoreSettings().key(): _entry(1.0, 3.0)})
    assert resolve_levels(None, None, capped, FP)[:2] == (1.0, 1.0)
    no_median = _write(tmp_path / "nomedian.json", {ScoreSettings().key(): _entry(1.0, None)})
    with pytest.raises(DejaGuardError, match="median"):
        resolve_levels(None, None, no_median, FP)
    trajectory = ScoreSettings(steps=4, num_inference_steps=10)
    both = _write(tmp_path / "both.json", {trajectory.key(): _entry(4.0, 2.0)})
    assert resolve_levels(None, None, both, FP, trajectory)[:2] == (4.0, 1.0)
    with pytest.raises(DejaGuardError, match="no calibration for"):
        resolve_levels(None, None, both, FP)


@pytest.mark.parametrize("command", [
    ["audit", "--prompts", "{prompts}", "--out", "{out}"],
    ["generate", "--prompt", "a red circle", "--out", "{png}", "--mitigate", "embedding", "--steps", "2"],
])
def test_malformed_calibration_file_is_a_one_line_cli_error(tmp_path, command):
    """Defect 2 of issue 23: `--calibration bad.json` used to end in a JSONDecodeError traceback (exit 1)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    bad = tmp_path / "bad.json"
    bad.write_text("{this is not json")
    args = [a.format(prompts=prompts, out=tmp_path / "o.jsonl", png=tmp_path / "x.png") for a in command]
    proc = subprocess.run([sys.executable, "-m", "dejaguard", *args, "--calibration", str(bad)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dejaguard: error:")]
    assert len(lines) == 1 and "malformed calibration file" in lines[0], proc.stderr[-2000:]


def test_calibration_round_trip_and_fpr(testbed, testbed_prompts, tmp_path):
    from dejaguard.core.testbed.data import calibration_specs

    prompts = [s.caption() for s in calibration_specs()[:40]]
    memorized = testbed_prompts[0][:4]
    cal = calibrate(testbed, prompts, ScoreSettings(), target_fpr=0.05, memorized_prompts=memorized)
    from dejaguard.core.detect import first_step_scores

    scores = [r.score for r in first_step_scores(testbed, prompts)]
    assert np.mean(np.array(scores) > cal.threshold) <= 0.05
    mem_scores = [r.score for r in first_step_scores(testbed, memorized)]
    assert cal.memorized_tpr == np.mean(np.array(mem_scores) > cal.threshold) > 0
    path = save_calibration(cal, tmp_path)
    assert find_calibration(tmp_path, ScoreSettings(), testbed.fingerprint()).threshold == cal.threshold
    assert find_calibration(tmp_path, ScoreSettings(), testbed.fingerprint()).sample_shape == testbed.sample_shape
    with pytest.raises(DejaGuardError, match="another model"):
        find_calibration(path, ScoreSettings(), "0000000000000000")
    with pytest.raises(DejaGuardError, match="no calibration for steps=5"):
        find_calibration(path, ScoreSettings(steps=5), testbed.fingerprint())
    assert json.loads(path.read_text())  # plain JSON, never pickle
    with pytest.raises(DejaGuardError, match="at least 20"):
        calibrate(testbed, prompts[:10], target_fpr=0.05)


def test_a_checkpoint_file_has_its_calibration_beside_it(tmp_path):
    """A single-file checkpoint is never taken for the calibration file itself (it would be overwritten)."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not json")
    assert calibration_file(weights) == tmp_path / f"model.{CALIBRATION_FILE}"
    assert calibration_file(tmp_path / "other.ckpt") == tmp_path / f"other.{CALIBRATION_FILE}"
    assert calibration_file(tmp_path / "cal.json") == tmp_path / "cal.json"
    cal = Calibration(1.0, 0.01, {"steps": 1, "generations": 1, "guidance_scale": 7.5, "num_inference_steps": 50},
                      FP, 100, "a")
    assert save_calibration(cal, weights) == tmp_path / f"model.{CALIBRATION_FILE}"
    assert weights.read_bytes() == b"not json"
    assert find_calibration(weights, ScoreSettings(), FP).threshold == 1.0


def test_calibration_from_scores_is_the_quantile_rule():
    scores = list(range(1, 101))  # 1..100
    cal = calibration_from_scores(scores, 0.01, ScoreSettings(), FP, "test")
    assert cal.threshold == 100.0 and cal.n_prompts == 100 and cal.fingerprint == FP
    assert sum(s > cal.threshold for s in scores) <= 1
    assert calibration_from_scores(scores, 0.1, ScoreSettings(), FP, "test", n_prompts=50).threshold == 91.0
    assert cal.nonmemorized_quantiles["0.5"] == pytest.approx(50.5)
    with pytest.raises(DejaGuardError, match="target FPR"):
        calibration_from_scores(scores, 0.0, ScoreSettings(), FP, "test")
    with pytest.raises(DejaGuardError, match="finite"):
        calibration_from_scores([1.0, float("nan")], 0.5, ScoreSettings(), FP, "test")


@pytest.mark.parametrize("command", ["audit", "calibrate", "explain", "generate"])
def test_checkpoint_option_refuses_pickles_in_one_line(tmp_path, command):
    """`--checkpoint` on every model-loading command; a pickled file is refused before it is read."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    extra = {"audit": ["--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--threshold", "1"],
             "calibrate": ["--prompts", str(prompts)], "explain": ["--prompt", "a red circle"],
             "generate": ["--prompt", "a red circle", "--out", str(tmp_path / "x.png")]}[command]
    proc = subprocess.run([sys.executable, "-m", "dejaguard", command, "--checkpoint", str(ckpt), *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "pickle" in proc.stderr and proc.stderr.count("dejaguard: error:") == 1
    both = subprocess.run([sys.executable, "-m", "dejaguard", command, "--checkpoint", str(ckpt), "--model",
                           str(tmp_path), *extra], capture_output=True, text=True, timeout=600)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_each_score_option_has_its_own_threshold(tmp_path):
    """Calibrations of the two score options live side by side in one file; a lookup for one option finds only
    its own entry, and an entry (hand-edited) whose settings name the other option is refused, never used."""
    magnitude = Calibration(1.0, 0.01, asdict(ScoreSettings()), FP, 100, "a")
    aniso = Calibration(3.0, 0.01, asdict(ScoreSettings(score="anisotropy")), FP, 100, "a")
    path = save_calibration(magnitude, tmp_path)
    with pytest.raises(DejaGuardError, match="no calibration for .*score=anisotropy"):
        find_calibration(path, ScoreSettings(score="anisotropy"), FP)
    save_calibration(aniso, path)
    assert set(read_calibrations(path)) == {ScoreSettings().key(), ScoreSettings(score="anisotropy").key()}
    assert find_calibration(path, ScoreSettings(), FP).threshold == 1.0
    assert find_calibration(path, ScoreSettings(score="anisotropy"), FP).threshold == 3.0
    swapped = _write(tmp_path / "swapped.json", {ScoreSettings().key(): {**_entry(3.0),
                                                                        "settings": aniso.settings}})
    with pytest.raises(DejaGuardError, match="calibrated with the anisotropy score, not magnitude"):
        find_calibration(swapped, ScoreSettings(), FP)
    zeros = Calibration(4.0, 0.01, asdict(ScoreSettings(unconditional="zeros")), FP, 100, "a")
    save_calibration(zeros, path)
    assert find_calibration(path, ScoreSettings(unconditional="zeros"), FP).threshold == 4.0
    assert find_calibration(path, ScoreSettings(), FP).threshold == 1.0
    hand_edited = _write(tmp_path / "zeros.json", {ScoreSettings().key(): {**_entry(3.0), "settings": zeros.settings}})
    with pytest.raises(DejaGuardError, match="calibrated with the zeros unconditional, not empty"):
        find_calibration(hand_edited, ScoreSettings(), FP)
    # Entries written before the option existed (no "score" in their settings) are magnitude entries.
    old = _write(tmp_path / "old.json", {ScoreSettings().key(): {**_entry(), "settings": {"steps": 1}}})
    assert find_calibration(old, ScoreSettings(), FP).threshold == 2.0


def test_sample_shape_recorded_and_older_files_load(tmp_path):
    """A calibration records the latent shape it scored; a file without it (made before) still loads and warns of
    nothing; a run of another spatial size gets the one-line note, in image pixels, width x height."""
    cal = calibration_from_scores([1.0, 2.0, 3.0], 0.5, ScoreSettings(), FP, "test", sample_shape=(4, 64, 64))
    save_calibration(cal, tmp_path)
    found = find_calibration(tmp_path, ScoreSettings(), FP)
    assert found.sample_shape == (4, 64, 64) and json.loads((tmp_path / CALIBRATION_FILE).read_text())
    old = _write(tmp_path / "old.json", {ScoreSettings().key(): _entry()})
    assert find_calibration(old, ScoreSettings(), FP).sample_shape is None
    bad = _write(tmp_path / "bad.json", {ScoreSettings().key(): {**_entry(), "sample_shape": "512x512"}})
    assert find_calibration(bad, ScoreSettings(), FP).sample_shape is None
    assert Calibration(**{k: v for k, v in asdict(cal).items() if k != "sample_shape"}).sample_shape is None
    assert size_note((4, 64, 64), (2, 4, 64, 96)) == "calibrated at 512x512, this run 768x512: threshold may not apply"
    assert size_note((4, 64, 64), (1, 4, 64, 64)) is None and size_note(None, (1, 4, 8, 8)) is None
