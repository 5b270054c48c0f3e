"""The `dejaguard` command line, run as a user would (a subprocess), bad input included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dejaguard", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("dejaguard: error:") and pattern in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_audit_writes_one_object_per_prompt(tmp_path, testbed_prompts):
    memorized, novel = testbed_prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(memorized[:2] + ["", novel[0]]) + "\n")
    out, report = tmp_path / "audit.jsonl", tmp_path / "audit.html"
    proc = run("audit", "--prompts", str(prompts), "--out", str(out), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == memorized[:2] + [novel[0]]
    assert all({"prompt", "score", "flagged", "unet_evals"} <= r.keys() for r in rows)
    assert all(r["flagged"] == (r["score"] > r["threshold"]) for r in rows)
    assert rows[1]["flagged"] and not rows[2]["flagged"]  # coffee (verbatim) vs a held-out scene
    assert all(r["unet_evals"] == 2 for r in rows)
    assert "<img" in report.read_text() and "DejaGuard audit" in report.read_text()


def test_audit_options_and_long_prompt(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle and a blue square\n" + "a blue square " * 40 + "\n")
    out = tmp_path / "a.jsonl"
    proc = run("audit", "--prompts", str(prompts), "--out", str(out), "--generations", "2", "--seed", "3",
               "--threshold", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "dejaguard: warning: prompt has" in proc.stderr and "truncated to 77" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["seeds"] == [3, 4] and rows[0]["unet_evals"] == 4 and rows[0]["threshold"] == 0.5


def test_audit_resume_with_another_seed_is_one_line_error(tmp_path):
    """Issue 23, defect 1: `audit --resume` with another --seed appended rows of that seed to the output."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\na blue square on the right\n")
    out = tmp_path / "o.jsonl"
    proc = run("audit", "--prompts", str(prompts), "--out", str(out), "--threshold", "1", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    with prompts.open("a") as f:
        f.write("a green triangle at the top\n")
    proc = run("audit", "--prompts", str(prompts), "--out", str(out), "--threshold", "1", "--seed", "999", "--resume")
    _one_line_error(proc, "it was written with seed=1, this run has seed=999")
    assert [json.loads(line)["seeds"] for line in out.read_text().splitlines()] == [[1], [1]]


@pytest.mark.parametrize("case", ["missing_model", "not_a_model", "empty_prompts", "missing_prompts",
                                  "no_calibration", "unknown_device", "absent_gpu"])
def test_bad_input_is_one_line_error(tmp_path, case):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle and a blue square\n")
    args = ["audit", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    if case == "missing_model":
        _one_line_error(run(*args, "--model", str(tmp_path / "nope")), "model folder not found")
    elif case == "not_a_model":
        (tmp_path / "m").mkdir()
        _one_line_error(run(*args, "--model", str(tmp_path / "m")), "not a diffusers model folder")
    elif case == "empty_prompts":
        prompts.write_text("\n  \n")
        _one_line_error(run(*args), "has no prompts")
    elif case == "missing_prompts":
        prompts.unlink()
        _one_line_error(run(*args), "prompt file not found")
    elif case == "unknown_device":
        _one_line_error(run(*args, "--device", "gpu"), "unknown device 'gpu'")
    elif case == "absent_gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
        _one_line_error(run(*args, "--device", "cuda"), "has no CUDA GPU")
    else:
        _one_line_error(run(*args, "--steps", "3"), "no calibration for steps=3")


@pytest.mark.parametrize(("extra", "pattern"), [
    (["--steps", "0"], "sampling steps must be a whole number of at least 1"),
    (["--steps", "0", "--mitigate", "embedding"], "sampling steps must be a whole number of at least 1"),
    (["--cfg", "nan"], "guidance scale (CFG) must be a finite number"),
    (["--prompt", "  "], "empty prompt"),
])
def test_generate_bad_settings_are_one_line_errors(tmp_path, extra, pattern):
    out = tmp_path / "x.png"
    _one_line_error(run("generate", "--prompt", "a red circle", "--out", str(out), *extra), pattern)
    assert not out.exists()


def test_localize_bad_generation_steps_fail_before_any_work(tmp_path):
    out = tmp_path / "m.safetensors"
    proc = run("localize", "--prompt", "a red circle", "--out", str(out), "--score", "generation",
               "--generation-steps", "0")
    _one_line_error(proc, "generation_steps must be at least 1, got 0")
    assert "statistics" not in proc.stderr and not out.exists()


def test_model_without_cross_attention_exits_cleanly(tmp_path):
    from test_denoiser import _tiny_pixel_model

    folder = _tiny_pixel_model(tmp_path / "uncond", with_cross_attention=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    proc = run("audit", "--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"))
    _one_line_error(proc, "no cross-attention")


def test_demo_writes_report(tmp_path):
    proc = run("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "ROC curve" in html and "Score histogram" in html and html.count("class='card") >= 12
    assert "report:" in proc.stdout


# -- --score (issue 26 section 2): the anisotropy option through audit and calibrate


def test_audit_and_calibrate_with_the_anisotropy_score(tmp_path, testbed, testbed_prompts):
    """`calibrate --score anisotropy` stores an entry of its own (the magnitude one is not touched), `audit --score
    anisotropy` finds exactly that threshold and scores as core's first_step_scores does with the option; a run
    with the other score does not resume the output; a bad option is a one-line error before the model loads."""
    from dejaguard.core.detect import ScoreSettings, first_step_scores

    memorized, novel = testbed_prompts
    nonmem, audited = tmp_path / "nonmem.txt", tmp_path / "audit.txt"
    nonmem.write_text("\n".join(novel[:4]) + "\n")
    audited.write_text("\n".join([memorized[0], novel[5]]) + "\n")
    cal = tmp_path / "cal.json"
    proc = run("calibrate", "--score", "anisotropy", "--prompts", str(nonmem), "--target-fpr", "0.25",
               "--out", str(cal))
    assert proc.returncode == 0, proc.stderr
    assert "score=anisotropy" in proc.stdout
    entries = json.loads(cal.read_text())
    aniso = ScoreSettings(score="anisotropy")
    assert list(entries) == [aniso.key()] and entries[aniso.key()]["settings"]["score"] == "anisotropy"
    expected = first_step_scores(testbed, novel[:4], aniso)
    assert entries[aniso.key()]["threshold"] == pytest.approx(max(r.score for r in expected), rel=1e-5)

    out = tmp_path / "a.jsonl"
    proc = run("audit", "--score", "anisotropy", "--prompts", str(audited), "--out", str(out),
               "--calibration", str(cal))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = first_step_scores(testbed, [memorized[0], novel[5]], aniso)
    assert [r["score"] for r in rows] == pytest.approx([r.score for r in want], rel=1e-5)
    assert all(r["threshold"] == entries[aniso.key()]["threshold"] and r["unet_evals"] == 2 for r in rows)
    proc = run("audit", "--prompts", str(audited), "--out", str(out), "--calibration", str(cal), "--resume")
    _one_line_error(proc, "no calibration for steps=1,generations=1,cfg=7.5,schedule=50 in")  # never the other's
    threshold = repr(entries[aniso.key()]["threshold"])
    proc = run("audit", "--prompts", str(audited), "--out", str(out), "--threshold", threshold, "--resume")
    _one_line_error(proc, "it was written with score='anisotropy'")
    _one_line_error(run("calibrate", "--score", "sharpness", "--model", str(tmp_path / "absent")),
                    "unknown score 'sharpness'")


def test_calibrate_with_the_zero_unconditional(tmp_path, testbed, testbed_prompts):
    """`calibrate --unconditional zeros` (a threshold for the WebUIs' empty SDXL negative prompt) stores an entry
    of its own whose threshold is core's scores against zeros; a bad value is a one-line error before loading."""
    from dejaguard.core.detect import ScoreSettings, first_step_scores

    _, novel = testbed_prompts
    nonmem = tmp_path / "nonmem.txt"
    nonmem.write_text("\n".join(novel[:4]) + "\n")
    cal = tmp_path / "cal.json"
    proc = run("calibrate", "--unconditional", "zeros", "--prompts", str(nonmem), "--target-fpr", "0.25",
               "--out", str(cal))
    assert proc.returncode == 0, proc.stderr
    zeros = ScoreSettings(unconditional="zeros")
    entries = json.loads(cal.read_text())
    assert list(entries) == [zeros.key()] and entries[zeros.key()]["settings"]["unconditional"] == "zeros"
    expected = first_step_scores(testbed, novel[:4], zeros)
    assert entries[zeros.key()]["threshold"] == pytest.approx(max(r.score for r in expected), rel=1e-5)
    _one_line_error(run("calibrate", "--unconditional", "none", "--model", str(tmp_path / "absent")),
                    "unknown unconditional 'none'")
