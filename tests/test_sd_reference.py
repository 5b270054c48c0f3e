"""bench.sd_reference, the published detection table on a user's SD1.x checkpoint, run as a user runs it.

The end-to-end test runs ``python -m bench.sd_reference`` as a subprocess on the random-weight, full-size SD1.5
single-file checkpoint of ``tests/checkpoint_fixtures.py`` (2.1 GB, written by ComfyUI's own classes and saver,
cached in ``$DEJAGUARD_TEST_CACHE``), with ``--limit 3`` (the first three prompts of each list: two verbatim and
one template memorized prompt, three non-memorized ones) and ``--latent 8`` (a 64 px image: the full 64x64
latent of a full-size UNet costs seconds per call on a 2-core CPU). With random weights the figures it measures
are meaningless (nothing is memorized by a random UNet, and the latent is not the published one): the test
checks the path, not the numbers: every key of the JSON last line, finite values in range, the UNet evaluations
per prompt of each setting, the split counts, the table with the published figures beside, progress on stderr.
A GPU machine with a real SD1.4 / SD1.5 checkpoint gets the real figures from the same command without
``--limit`` and ``--latent``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from dejaguard.bench.sd_reference import REFERENCES, SETTINGS, detection_figures
from dejaguard.core.prompt_sets import memorized_reference

sys.path.insert(0, str(Path(__file__).parent))
from checkpoint_fixtures import (  # noqa: E402
    FIXTURE_VERSION,
    REPO,
    _is_current,
    builder_available,
    cache_dir,
    checkpoint_file,
)

FIGURES = ("auroc", "tpr_at_1pct_fpr", "auroc_verbatim", "tpr_at_1pct_fpr_verbatim", "auroc_template",
           "tpr_at_1pct_fpr_template")
SETTING_KEYS = {*FIGURES, "seconds_per_10_prompts", "unet_evals_per_prompt", "unet_calls_per_prompt", "steps",
                "generations"}
TOP_KEYS = {"settings", "memorized_prompts", "memorized_verbatim", "memorized_template", "nonmemorized_prompts",
            "device", "checkpoint", "family", "dtype", "latent", "batch_size", "guidance_scale", "schedule_steps",
            "torch_threads"}


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.sd_reference", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_figures_per_kind_against_all_nonmemorized():
    """Each kind is compared with every non-memorized prompt (the overall threshold); an empty kind has None."""
    kinds = ["verbatim", "template", "verbatim", None, None, None, None]
    scores = [5.0, 0.5, 3.0, 1.0, 2.0, 0.4, 0.3]
    figures = detection_figures(scores, kinds)
    assert figures["auroc"] == round(10 / 12, 4)  # template's 0.5 beats two of four
    assert figures["auroc_verbatim"] == 1.0 and figures["auroc_template"] == 0.5
    assert figures["tpr_at_1pct_fpr"] == round(2 / 3, 4)  # above the highest non-memorized score
    assert figures["tpr_at_1pct_fpr_verbatim"] == 1.0 and figures["tpr_at_1pct_fpr_template"] == 0.0
    only_verbatim = detection_figures([2.0, 1.0], ["verbatim", None])
    assert only_verbatim["auroc_template"] is None and only_verbatim["tpr_at_1pct_fpr_template"] is None
    assert set(figures) == set(FIGURES)


@pytest.mark.parametrize(("args", "message"), [
    (["--checkpoint", "model.ckpt", "--limit", "1"], "refused"),
    (["--checkpoint", "model.safetensors", "--limit", "0"], "--limit must be at least 1"),
    (["--checkpoint", "model.safetensors", "--latent", "12"], "--latent must be a multiple of 8"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / args[1]).write_bytes(b"\x80\x02")  # the start of a pickle; refused by its name before reading
    proc = bench(args[0], str(tmp_path / args[1]), *args[2:], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_bench_end_to_end_on_a_full_size_checkpoint(tmp_path):
    if not builder_available() and not _is_current(cache_dir() / f"sd15-v{FIXTURE_VERSION}.safetensors"):
        pytest.skip("ComfyUI not set up (tests/comfy/setup_comfy.sh): it writes the SD1.5 fixture checkpoint")
    path = checkpoint_file("sd15")
    out_file = tmp_path / "sd_reference.json"
    proc = bench("--checkpoint", str(path), "--device", "cpu", "--limit", "3", "--latent", "8", "--batch-size", "32",
                 "--json", str(out_file))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == json.loads(out_file.read_text(encoding="utf-8"))

    assert set(out) == TOP_KEYS and list(out["settings"]) == list(SETTINGS)
    first = memorized_reference()[:3]
    assert out["memorized_prompts"] == 3 and out["nonmemorized_prompts"] == 3
    assert out["memorized_verbatim"] == sum(m.kind == "verbatim" for m in first) == 2
    assert out["memorized_template"] == sum(m.kind == "template" for m in first) == 1
    assert (out["device"], out["checkpoint"], out["family"]) == ("cpu", str(path), "sd1")
    assert out["latent"] == [4, 8, 8] and out["batch_size"] == 32
    for name, settings in SETTINGS.items():
        fig = out["settings"][name]
        assert set(fig) == SETTING_KEYS, name
        assert (fig["steps"], fig["generations"]) == (settings.steps, settings.generations)
        for key in FIGURES:
            assert isinstance(fig[key], float) and 0.0 <= fig[key] <= 1.0, (name, key, fig[key])
        assert math.isfinite(fig["seconds_per_10_prompts"]) and fig["seconds_per_10_prompts"] > 0
        assert fig["unet_evals_per_prompt"] == 2 * settings.steps * settings.generations  # cond + uncond per step
        # 6 prompts, <= 32 (prompt, noise) pairs a call: one call per step
        assert fig["unet_calls_per_prompt"] == round(settings.steps / 6, 4)

    table = proc.stdout.strip().splitlines()[:-1]
    for name in SETTINGS:
        assert any(line.startswith(name) for line in table), name
    for _, figures in REFERENCES.values():
        for auc, tpr in figures.values():
            assert f"{auc:.3f} / {tpr:.3f}" in proc.stdout
    assert "steps5_n4" in proc.stderr  # progress bars go to stderr, the table and JSON to stdout
