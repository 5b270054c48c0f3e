"""Red team (issue 25 section 4): the adversarial embedding search on the bundled testbed, bench.redteam's figures,
and bench.neurons' planted-model plumbing (against a stand-in for ``core.testbed.planted``)."""

from __future__ import annotations

import argparse
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from dejaguard.core.denoiser import BUNDLED_TESTBED
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.nemo import nemo_layers
from dejaguard.core.neuron_mask import NeuronMask, layer_shape, mask_units
from dejaguard.core.redteam import adversarial_embedding
from dejaguard.core.sampling import initial_noise
from dejaguard.core.testbed.data import load_memorized_images

MEMORIZED_PROMPT = "the cameraman, vintage print in a steel frame"
PLANTED_MODULE = "dejaguard.core.testbed.planted"


@pytest.fixture(scope="module")
def inputs(testbed):
    with torch.no_grad():
        cond = testbed.encode_prompts([MEMORIZED_PROMPT])
    return cond, initial_noise(testbed, [0, 1])


# -- core.redteam -------------------------------------------------------------------------------------------------


def test_attack_raises_the_score_within_the_budget_and_counts(testbed, inputs):
    cond, noise = inputs
    saved_cond, saved_noise = cond.clone(), noise.clone()
    before = testbed.counter.snapshot()
    calls = []
    result = adversarial_embedding(testbed, cond, noise, budget=0.2, steps=4,
                                   progress=lambda d, t, s: calls.append((d, t, s)))
    spent = testbed.counter.since(before)
    assert torch.equal(cond, saved_cond) and torch.equal(noise, saved_noise)  # inputs untouched
    assert result.score_after > result.score_before and result.score_after == max(result.scores)
    assert len(result.scores) == 5 and result.steps == 4
    delta = (result.embedding - cond).norm() / cond.norm()
    assert float(delta) <= 0.2 + 1e-5 and abs(result.perturbation - float(delta)) < 1e-5
    n, s = 2, 4  # 2 N for the detector's call, N per iterate (S + 1), N backwards per step
    assert (result.unet_forwards, result.unet_backwards) == (2 * n + n * (s + 1), n * s)
    assert (spent.forwards, spent.backwards) == (result.unet_forwards, result.unet_backwards)
    assert calls[-1] == (4, 4, "attack") and all(c[2] == "attack" for c in calls)


def test_zero_budget_is_no_attack(testbed, inputs):
    cond, noise = inputs
    before = testbed.counter.snapshot()
    result = adversarial_embedding(testbed, cond, noise, budget=0.0)
    assert result.embedding is cond and result.steps == 0 and result.perturbation == 0.0
    assert testbed.counter.since(before).calls == 1  # the detector's one batched call


def test_evade_stops_under_the_gate(testbed, inputs):
    cond, noise = inputs
    first = adversarial_embedding(testbed, cond, noise, budget=0.0, objective="evade", level=1e9)
    level = 0.8 * first.score_before  # the largest per-noise magnitude of the prompt itself
    result = adversarial_embedding(testbed, cond, noise, budget=0.4, steps=30, objective="evade", level=level)
    assert result.score_after <= level < result.score_before
    assert result.steps < 30 and result.scores[-1] == result.score_after  # stopped at the first iterate under it
    assert result.perturbation <= 0.4 + 1e-5


def test_attack_arguments_refused(testbed, inputs):
    cond, noise = inputs
    with pytest.raises(DejaGuardError, match="budget"):
        adversarial_embedding(testbed, cond, noise, budget=-0.1)
    with pytest.raises(DejaGuardError, match="level"):
        adversarial_embedding(testbed, cond, noise, budget=0.1, objective="evade")
    with pytest.raises(DejaGuardError, match="objective"):
        adversarial_embedding(testbed, cond, noise, budget=0.1, objective="minimize")
    with pytest.raises(DejaGuardError, match=r"\(1, L, D\)"):
        adversarial_embedding(testbed, cond.expand(2, -1, -1), noise, budget=0.1)


# -- bench.redteam --------------------------------------------------------------------------------------------------


def test_smallest_budget_and_summary():
    from bench.redteam import smallest_budget

    assert smallest_budget({0.0: 0.0, 0.1: 0.25, 0.2: 0.5, 0.4: 1.0}, 1.0) == 0.2
    assert smallest_budget({0.0: 0.8, 0.1: 1.0}, 1.0) == 0.0  # not stopped in the first place
    assert smallest_budget({0.0: 0.0, 0.4: 0.4}, 1.0) is None
    assert smallest_budget({0.0: 0.0, 0.4: 0.0}, 0.0) is None  # nothing to recover


def test_bench_redteam_last_line(testbed, capsys):
    from bench.redteam import main

    main(["--images", "1", "--seeds", "1", "--steps", "3", "--budgets", "0.4", "--attack-steps", "2",
          "--methods", "subspace", "embedding", "loss_filter"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    methods = out["methods"]
    assert set(methods) == {"subspace", "embedding", "embedding_evade", "loss_filter"}
    for name in ("subspace", "embedding", "embedding_evade"):
        m = methods[name]
        assert set(m["curve"]) == {"0", "0.4"} and m["recovery_rate"] == m["curve"]["0.4"]
        assert m["replication_mitigated"] == m["curve"]["0"] and m["generations_per_budget"] == 1
        assert m["attack_unet_evals"] > 0 and "budget" in m
    assert methods["loss_filter"]["recovery_rate"] is None and "shipped" in methods["loss_filter"]["reason"]
    assert out["unmitigated"]["replication_unmitigated"] == out["unmitigated"]["curve"]["0"]


# -- bench.neurons on a planted model (stand-in for core.testbed.planted, the contract of issue 25) ----------------


@dataclass(frozen=True)
class PlantedImage:
    name: str
    captions: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    group: str
    duplicates: int


@pytest.fixture
def fake_planted(testbed, monkeypatch):
    """A stand-in module with the contract's names: the bundled testbed as the model, three "planted" images
    (copies of v5 images under new names), and designated value neurons."""
    v5 = load_memorized_images()
    images = [PlantedImage("planted_camera", (MEMORIZED_PROMPT,), (MEMORIZED_PROMPT,), "single", 200),
              PlantedImage("planted_astronaut", ("official portrait of astronaut eileen collins, nasa photograph",),
                           ("official portrait of astronaut eileen collins, nasa photograph",), "shared", 200),
              PlantedImage("planted_horse", ("horse silhouette vinyl sticker for laptops",),
                           ("horse silhouette vinyl sticker for laptops",), "shared", 200)]
    layers = nemo_layers(testbed)
    first = next(iter(layers))

    def designated_mask(name: str | None = None, folder=BUNDLED_TESTBED) -> NeuronMask:
        module.folders.append(Path(folder))
        index = {m.name: i for i, m in enumerate(images)}
        chosen = [index[name]] if name is not None else list(index.values())
        return NeuronMask(layers={first: torch.tensor([3 * i + k for i in chosen for k in range(3)])},
                          layer_shapes={first: layer_shape(layers[first])}, fingerprint=testbed.fingerprint(),
                          method="designated")

    def carrying_mask(name: str | None = None, folder=BUNDLED_TESTBED) -> NeuronMask:
        if Path(folder) != BUNDLED_TESTBED:
            raise DejaGuardError(f"{folder}/evaluation.json has no carriers measurement")
        full = designated_mask(name, folder)  # the first two of each image's three designated neurons
        return NeuronMask(layers={first: full.layers[first].view(-1, 3)[:, :2].flatten()},
                          layer_shapes=full.layer_shapes, fingerprint=full.fingerprint, method="carriers")

    module = types.ModuleType(PLANTED_MODULE)
    module.PLANTED_MODEL = BUNDLED_TESTBED
    module.GROUND_TRUTH_DIR = "ground_truth"
    module.folders = []  # the folders designated_mask was asked to read
    module.PlantedImage = PlantedImage
    module.planted_images = lambda: list(images)
    module.load_planted_pixels = lambda: {"planted_camera": v5["camera"], "planted_astronaut": v5["astronaut"],
                                          "planted_horse": v5["horse"]}
    module.all_training_images = lambda: {**v5, **module.load_planted_pixels()}
    module.planted_eval_prompts = lambda: [(p, m) for m in images for p in m.eval_prompts]
    module.designated_mask = designated_mask
    module.carrying_mask = carrying_mask
    monkeypatch.setitem(sys.modules, PLANTED_MODULE, module)
    return module


def test_planted_subject_uses_every_training_image_and_the_truth(fake_planted):
    from bench.neurons import load_subject, subspace_split, truth_scores

    subject = load_subject("planted")
    assert subject.name == "planted" and len(subject.training) == 12 + 3
    assert [i for _, i, _ in subject.default] == ["planted_camera", "planted_astronaut", "planted_horse"]
    fit, held = subspace_split(subject, subject.chosen(None))  # only the group sharing one subspace is split
    assert [i for _, i in fit] == ["planted_astronaut"] and [i for _, i in held] == ["planted_horse"]
    truth = fake_planted.designated_mask
    found = {MEMORIZED_PROMPT: truth("planted_camera")}
    prompts = [MEMORIZED_PROMPT, "official portrait of astronaut eileen collins, nasa photograph"]
    scores = truth_scores(found, prompts, ["planted_camera", "planted_astronaut"], truth)
    assert scores["per_prompt"][0]["recall"] == 1.0 and scores["per_prompt"][0]["precision"] == 1.0
    assert scores["per_prompt"][1] == {"prompt": prompts[1], "image": "planted_astronaut", "recall": 0.0,
                                       "precision": None}  # not localized: recall 0, no precision
    assert (scores["recall"], scores["precision"]) == (0.5, 1.0)
    assert (scores["recall_union"], scores["precision_union"]) == (0.5, 1.0)


def test_bench_neurons_planted_last_line(fake_planted, capsys, monkeypatch):
    """The planted path end to end, with NeMo itself replaced by known masks (NeMo is tested in test_neurons.py):
    the recall and precision printed are those of the masks against the designated neurons."""
    import bench.neurons as bench_neurons

    truth = fake_planted.designated_mask
    found = {MEMORIZED_PROMPT: truth("planted_camera")}  # exact: recall 1, precision 1
    astronaut = "official portrait of astronaut eileen collins, nasa photograph"
    exact = truth("planted_astronaut")
    layer = next(iter(exact.layers))
    found[astronaut] = NeuronMask(layers={layer: torch.tensor([3, 4, 50, 51])}, layer_shapes=exact.layer_shapes,
                                  fingerprint=exact.fingerprint, method="nemo")  # 2 of 3 true, 2 of 4 found

    def fake_localize(denoiser, prompt, stats, settings):
        if prompt not in found:
            raise DejaGuardError("not localized")
        mask = found[prompt]
        mask.info = {"neurons": mask.count(), "unet_evals": 10, "unet_calls": 2, "wall_s": 0.1, "score_before": 1.0,
                     "score_after": 0.1, "memorized": True, "initial_candidates": 4}
        return mask

    # NeMo's z-score ranking: the three images' designated neurons first, in image order
    ranking = [unit for image in ("planted_camera", "planted_astronaut", "planted_horse")
               for unit in sorted(mask_units(truth(image)))]
    monkeypatch.setattr(bench_neurons, "zscore_ranking", lambda *a: ranking)
    monkeypatch.setattr(bench_neurons, "localize", fake_localize)
    monkeypatch.setattr(bench_neurons, "nemo_statistics",
                        lambda *a, **k: types.SimpleNamespace(threshold=0.5, score_mean=0.3, score_std=0.2))
    bench_neurons.main(["--model", "planted", "--seeds", "1", "--steps", "2", "--novel", "2", "--ratios", "0.01",
                        "--skip-reference"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("recall", "precision", "replication_before", "replication_after", "novel_alignment_before",
                "novel_alignment_after", "evals_ratio_vs_reference", "subspace_heldout_replication_after"):
        assert key in out
    assert out["model_name"] == "planted" and out["settings"]["training_images"] == 15
    recalls = [row["recall"] for row in out["nemo"]["per_prompt"]]
    assert recalls == [1.0, round(2 / 3, 4), 0.0]  # the horse prompt was not localized
    assert [row["precision"] for row in out["nemo"]["per_prompt"]] == [1.0, 0.5, None]
    assert [row["truth_in_search_space"] for row in out["nemo"]["per_prompt"]] == [1.0, 1.0, 1.0]
    assert [row["truth_zscore_ranks"] for row in out["nemo"]["per_prompt"]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [row["truth_in_initial_selection"] for row in out["nemo"]["per_prompt"]] == [3, 1, None]
    assert out["recall"] == round((1 + 2 / 3 + 0) / 3, 4) and out["precision"] == 0.75
    # against the carrying neurons (two of each three): both found masks hold them, with one and two extra neurons
    assert [row["recall_carrying"] for row in out["nemo"]["per_prompt"]] == [1.0, 1.0, 0.0]
    assert [row["precision_carrying"] for row in out["nemo"]["per_prompt"]] == [round(2 / 3, 4), 0.5, None]
    assert out["recall_carrying"] == round(2 / 3, 4) and out["precision_carrying"] == round((2 / 3 + 0.5) / 2, 4)
    assert out["evals_ratio_vs_reference"] is None
    assert "skip-reference" in out["null_reasons"]["evals_ratio_vs_reference"]
    assert out["evals_ratio_vs_paper_reference"] is None and "evals_ratio_vs_paper_reference" in out["null_reasons"]
    assert out["subspace"]["ratio_0.01"]["heldout_images"] == ["planted_horse"]
    assert isinstance(out["subspace_heldout_replication_after"], float)
    designated = out["designated"]  # the reference line: each prompt's designated neurons off
    assert [row["image"] for row in designated["per_prompt"]] == ["planted_camera", "planted_astronaut",
                                                                  "planted_horse"]
    assert [row["neurons"] for row in designated["per_prompt"]] == [3, 3, 3]
    assert out["designated_replication_after"] == designated["replication_after"]
    assert designated["replication_before"] == out["replication_before"]
    assert "designated_replication_after" not in out["null_reasons"]
    assert out["protocol"] == "reduced" and out["departures_from_full_protocol"]["seeds"] == {"used": 1, "full": 16}
    assert set(out["departures_from_full_protocol"]) == {"seeds", "steps", "novel", "ratios", "skip_reference"}


def test_bench_neurons_measures_the_cost_against_the_papers_nemo(fake_planted, capsys, monkeypatch):
    """With settings other than the paper's, the paper's NeMo (its settings, its reference schedule, statistics for
    its score and space) runs on the same prompts, and the fast schedule's evaluations are compared with it too."""
    import bench.neurons as bench_neurons

    evals = {"fast": 10, "reference": 20}
    calls = []

    def fake_localize(denoiser, prompt, stats, settings):
        paper = (settings.space, settings.ranking, settings.score) == ("value", "zscore", "ssim")
        calls.append((settings.schedule, paper, stats.space))
        mask = fake_planted.designated_mask("planted_camera")
        mask.info = {"neurons": mask.count(), "unet_evals": 100 if paper else evals[settings.schedule],
                     "unet_calls": 2, "wall_s": 0.1, "score_before": 1.0, "score_after": 0.1, "memorized": True,
                     "initial_candidates": 3}
        return mask

    monkeypatch.setattr(bench_neurons, "zscore_ranking", lambda *a: [])
    monkeypatch.setattr(bench_neurons, "localize", fake_localize)
    monkeypatch.setattr(bench_neurons, "nemo_statistics", lambda *a, space="value", **k: types.SimpleNamespace(
        threshold=0.5, score_mean=0.3, score_std=0.2, space=space))
    bench_neurons.main(["--model", "planted", "--seeds", "1", "--steps", "2", "--novel", "2", "--ratios", "0.01",
                        "--prompts", "0", "--space", "value+ffn", "--score", "magnitude", "--ranking", "attribution"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == [("fast", False, "value+ffn"), ("reference", False, "value+ffn"), ("reference", True, "value")]
    assert (out["evals_ratio_vs_reference"], out["evals_ratio_vs_paper_reference"]) == (0.5, 0.1)
    assert out["nemo"]["paper_reference"]["unet_evals_per_prompt"] == 100


def test_bench_neurons_testbed_has_no_ground_truth():
    from bench.neurons import Subject, headline

    subject = Subject("testbed", denoiser=None, pairs=[], default=[], training={})
    args = argparse.Namespace(skip_nemo=False, skip_reference=False, ratios=[0.01])
    out = {"nemo": {"replication_after": 1.0, "novel_alignment_after": 0.4, "evals_ratio_vs_reference": 1.04},
           "novel_alignment_before": 0.45, "subspace": {"ratio_0.01": {"heldout_replication_after": 1.0}}}
    line = headline(out, subject, args, [(1.0, 1.0), (0.5, 0.5)])
    assert line["recall"] is None and line["precision"] is None and "no ground truth" in line["null_reasons"]["recall"]
    assert line["designated_replication_after"] is None and "no ground truth" in line["null_reasons"][
        "designated_replication_after"]
    assert (line["replication_before"], line["replication_after"]) == (0.75, 1.0)
    assert (line["evals_ratio_vs_reference"], line["subspace_heldout_replication_after"]) == (1.04, 1.0)
    assert np.isclose(line["novel_alignment_before"], 0.45)


def test_planted_variant_folder_is_recognised(fake_planted, tmp_path):
    """``--model DIR`` on a folder with ``ground_truth/`` (a fresh ``dejaguard testbed plant --out DIR``): the
    planted images and prompts, that folder's weights and that folder's designated neurons."""
    from bench.neurons import is_planted_folder, load_subject

    for part in ("unet", "text_encoder", "tokenizer", "scheduler", "vae", "model_index.json"):
        (tmp_path / part).symlink_to(BUNDLED_TESTBED / part)
    assert not is_planted_folder(str(tmp_path)) and not is_planted_folder("planted")
    (tmp_path / "ground_truth").mkdir()
    assert is_planted_folder(str(tmp_path))
    subject = load_subject(str(tmp_path))
    assert subject.location == str(tmp_path) and subject.name.startswith("planted variant")
    assert [i for _, i, _ in subject.default] == ["planted_camera", "planted_astronaut", "planted_horse"]
    assert len(subject.training) == 12 + 3
    assert subject.truth("planted_horse").count() == 3 and fake_planted.folders == [tmp_path]
    assert subject.carriers is None and "no carriers measurement" in subject.carriers_missing
    assert subject.denoiser.fingerprint() == load_subject("testbed").denoiser.fingerprint()


def test_bench_redteam_designated_on_planted(fake_planted, capsys):
    """The designated (ground-truth) masks attacked like NeMo's; a model without ground truth says why."""
    from bench.redteam import main

    main(["--model", "planted", "--images", "1", "--seeds", "1", "--steps", "3", "--budgets", "0.4",
          "--attack-steps", "2", "--methods", "designated"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = out["methods"]["designated"]
    assert set(m["curve"]) == {"0", "0.4"} and m["recovery_rate"] == m["curve"]["0.4"]
    assert m["prompts_masked"] == 1 and m["neurons_per_prompt"] == 3 and m["attack_unet_evals"] > 0
    assert out["model_folder"] == str(BUNDLED_TESTBED) and out["protocol"] == "reduced"
    assert out["departures_from_full_protocol"]["images"] == {"used": 1, "full": 0}
    main(["--images", "1", "--seeds", "1", "--steps", "3", "--budgets", "0.4", "--attack-steps", "2",
          "--methods", "designated"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["methods"]["designated"]["recovery_rate"] is None
    assert "no ground truth" in out["methods"]["designated"]["reason"]


def test_bench_redteam_embedding_without_calibration_is_not_available(testbed, capsys, tmp_path):
    """A model without a calibration (the planted variant as shipped) gets no made-up mitigation levels: the
    embedding rows are null with the reason, the other methods still run."""
    from bench.redteam import main

    main(["--images", "1", "--seeds", "1", "--steps", "3", "--budgets", "0.4", "--attack-steps", "1",
          "--methods", "embedding", "--calibration", str(tmp_path / "none.json")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("embedding", "embedding_evade"):
        assert out["methods"][name]["recovery_rate"] is None
        assert "not available" in out["methods"][name]["reason"] and "calibrat" in out["methods"][name]["reason"]
    assert out["unmitigated"]["generations_per_budget"] == 1
