"""Neuron masks (format, checks, exact restore) and NeMo localization on the bundled testbed."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.metrics import ssim_batch
from dejaguard.core.nemo import (
    ActivationStats,
    LocalizeSettings,
    cross_seed_similarity,
    default_statistics_prompts,
    first_step_context,
    localize,
    memorization_scores,
    nemo_layers,
    nemo_statistics,
    value_activations,
    zscore_ranking,
)
from dejaguard.core.neuron_mask import (
    NeuronMask,
    OutputGates,
    apply_mask,
    layer_shape,
    neurons_mask,
    recall_precision,
)

# Among the testbed's most reliably replicated prompts (model card); tests assert properties, not figures.
MEMORIZED_PROMPT = "the cameraman, vintage print in a steel frame"
SEEDS = 3


def _mask(testbed, fingerprint: str | None = None) -> NeuronMask:
    """A hand-made mask with both index kinds: two to_v neurons and three ff.net.2 weights."""
    modules = dict(testbed.named_modules())
    to_v = next(n for n in modules if n.endswith("attn2.to_v"))
    ff = next(n for n in modules if n.endswith("ff.net.2"))
    return NeuronMask(
        layers={to_v: torch.tensor([5, 1, 5]), ff: torch.tensor([[0, 3], [2, 7], [0, 3], [1, 0]])},
        layer_shapes={n: tuple(modules[n].weight.shape) for n in (to_v, ff)},
        fingerprint=fingerprint or testbed.fingerprint(), method="test", prompts=["p"],
        thresholds={"t": 0.5}, settings={"s": 1}, info={"i": [1, 2]})


def _params(testbed) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in testbed.unet.named_parameters()}


@pytest.fixture(scope="module")
def stats(testbed, tmp_path_factory) -> ActivationStats:
    return nemo_statistics(testbed, default_statistics_prompts()[:32], seeds=SEEDS, score_prompts=12,
                           cache=tmp_path_factory.mktemp("cache"))


# -- masks as data -----------------------------------------------------------------------------------


def test_mask_round_trip(testbed, tmp_path):
    mask = _mask(testbed)
    assert mask.count() == 2 + 3  # duplicates removed
    path = mask.save(tmp_path / "m.safetensors")
    loaded = NeuronMask.load(path)
    assert loaded.layers.keys() == mask.layers.keys()
    for name in mask.layers:
        assert torch.equal(loaded.layers[name], mask.layers[name])
    assert loaded.layer_shapes == mask.layer_shapes
    assert (loaded.fingerprint, loaded.method, loaded.prompts) == (mask.fingerprint, "test", ["p"])
    assert (loaded.thresholds, loaded.settings, loaded.info) == ({"t": 0.5}, {"s": 1}, {"i": [1, 2]})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the header is plain JSON in the safetensors metadata
        header = json.loads(f.metadata()["dejaguard"])
    assert header["format"] == "dejaguard.neuron_mask" and set(header["layers"].values()) == {"neurons", "weights"}
    empty = NeuronMask(layers={}, layer_shapes={}, fingerprint="x", method="nemo")
    assert NeuronMask.load(empty.save(tmp_path / "empty.safetensors")).count() == 0


def test_fingerprint_refused_unless_allowed(testbed):
    mask = _mask(testbed, fingerprint="0123456789abcdef")
    with pytest.raises(DejaGuardError, match="another model"):
        mask.check(testbed)
    with pytest.raises(DejaGuardError, match="another model"), apply_mask(testbed, mask):
        pass
    assert set(mask.check(testbed, allow_other_model=True)) == set(mask.layers)


def test_shape_and_layer_refused_always(testbed):
    mask = _mask(testbed)
    name = next(iter(mask.layers))
    wrong = NeuronMask(layers=mask.layers, fingerprint=mask.fingerprint, method="test",
                       layer_shapes={**mask.layer_shapes, name: (mask.layer_shapes[name][0] + 1,
                                                                 mask.layer_shapes[name][1])})
    with pytest.raises(DejaGuardError, match="weight shape"):
        wrong.check(testbed, allow_other_model=True)
    missing = NeuronMask(layers={"down_blocks.9.nothing": torch.tensor([0])}, fingerprint=mask.fingerprint,
                         layer_shapes={"down_blocks.9.nothing": (4, 4)}, method="test")
    with pytest.raises(DejaGuardError, match="no layer"):
        missing.check(testbed, allow_other_model=True)


def test_malformed_masks_refused(testbed, tmp_path):
    from safetensors.torch import save_file

    pickled = tmp_path / "pickled.safetensors"
    torch.save({"layers": {"a": torch.tensor([1])}}, pickled)
    with pytest.raises(DejaGuardError, match="not a safetensors file"):
        NeuronMask.load(pickled)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(DejaGuardError, match="not a safetensors file"):
        NeuronMask.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(DejaGuardError, match="no header"):
        NeuronMask.load(tmp_path / "lora.safetensors")
    good = _mask(testbed).save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 5])
    with pytest.raises(DejaGuardError):
        NeuronMask.load(tmp_path / "cut.safetensors")
    name = next(n for n in dict(testbed.named_modules()) if n.endswith("attn2.to_v"))
    header = {"format": "dejaguard.neuron_mask", "version": 1, "fingerprint": "x", "method": "m",
              "layer_shapes": {name: [4, 4]}, "layers": {name: "neurons"}}
    meta = {"dejaguard": json.dumps(header)}
    save_file({name: torch.tensor([9])}, str(tmp_path / "range.safetensors"), metadata=meta)
    with pytest.raises(DejaGuardError, match="out of range"):
        NeuronMask.load(tmp_path / "range.safetensors")
    save_file({name: torch.tensor([0.5])}, str(tmp_path / "float.safetensors"), metadata=meta)
    with pytest.raises(DejaGuardError, match="not integers"):
        NeuronMask.load(tmp_path / "float.safetensors")
    with pytest.raises(DejaGuardError, match="not found"):
        NeuronMask.load(tmp_path / "absent.safetensors")


# -- applying ---------------------------------------------------------------------------------------


def test_apply_mask_restores_every_parameter_exactly(testbed):
    mask = _mask(testbed)
    original = _params(testbed)
    modules = dict(testbed.named_modules())
    to_v, ff = list(mask.layers)
    with apply_mask(testbed, mask, strength=0.7):
        w = modules[to_v].weight
        assert torch.allclose(w[[1, 5]], 0.3 * original[f"{to_v}.weight"][[1, 5]])
        assert torch.equal(w[[0, 2, 3]], original[f"{to_v}.weight"][[0, 2, 3]])
        assert torch.allclose(modules[ff].weight[0, 3], 0.3 * original[f"{ff}.weight"][0, 3])
        assert torch.equal(modules[ff].weight[0, 4], original[f"{ff}.weight"][0, 4])
    after = _params(testbed)
    assert all(torch.equal(after[n], original[n]) for n in original)
    with pytest.raises(RuntimeError, match="boom"), apply_mask(testbed, mask, strength=1.0):
        assert float(modules[to_v].weight[5].abs().sum()) == 0.0
        raise RuntimeError("boom")
    after = _params(testbed)
    assert all(torch.equal(after[n], original[n]) for n in original)


def test_strength_zero_changes_nothing(testbed):
    original = _params(testbed)
    with apply_mask(testbed, _mask(testbed), strength=0.0):
        inside = _params(testbed)
    assert all(torch.equal(inside[n], original[n]) for n in original)
    with pytest.raises(DejaGuardError, match="strength"), apply_mask(testbed, _mask(testbed), strength=1.5):
        pass


def test_weight_mask_equals_output_gates(testbed):
    """Switching neurons off by weight patch (apply_mask) and by per-sample output gates (the batched search)
    give the same noise prediction; the gates only touch the samples they are given for."""
    layers = nemo_layers(testbed)
    name = list(layers)[-1]
    rows = torch.tensor([0, 3, 7])
    mask = NeuronMask(layers={name: rows}, layer_shapes={name: tuple(layers[name].weight.shape)},
                      fingerprint=testbed.fingerprint(), method="test")
    x = torch.randn(2, *testbed.sample_shape, generator=torch.Generator().manual_seed(0))
    emb = testbed.encode_prompts([MEMORIZED_PROMPT] * 2)
    with torch.no_grad():
        plain = testbed.predict_noise(x, 999, emb)
        with apply_mask(testbed, mask):
            patched = testbed.predict_noise(x, 999, emb)
        gate = torch.ones(2, layers[name].weight.shape[0])
        gate[0, rows] = 0.0  # sample 0 masked, sample 1 not
        with OutputGates(layers) as gates:
            gates.set({name: gate})
            gated = testbed.predict_noise(x, 999, emb)
    assert not torch.allclose(plain[0], patched[0])
    torch.testing.assert_close(gated[0], patched[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gated[1], plain[1], rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for _, m in testbed.named_modules())


def test_pairwise_ssim_basic():
    """NeMo's SSIM (core.metrics.ssim_batch, each pair's own data range): 1 for identical pairs, near 0 for noise."""
    a = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim_batch(a, a), torch.ones(3), atol=1e-5)
    b = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    assert float(ssim_batch(a, b).abs().max()) < 0.2


# -- NeMo on the testbed -------------------------------------------------------------------------------


def test_statistics_cached_per_model(testbed, stats, tmp_path):
    prompts = default_statistics_prompts()[:8]
    calls = []
    first = nemo_statistics(testbed, prompts, seeds=2, score_prompts=4, cache=tmp_path,
                            progress=lambda *args: calls.append(args))
    assert calls == [(1, 1, "activation statistics")] + [(k, 4, "score threshold") for k in range(1, 5)]
    files = list(tmp_path.glob(f"nemo-{testbed.fingerprint()}-*.safetensors"))
    assert len(files) == 1
    before = testbed.counter.snapshot()
    again = nemo_statistics(testbed, prompts, seeds=2, score_prompts=4, cache=tmp_path)
    assert testbed.counter.since(before).forwards == 0  # from the cache: no UNet call
    assert again.threshold == first.threshold
    assert all(torch.equal(again.mean[k], first.mean[k]) for k in first.mean)
    assert 0 < stats.threshold < 1 and set(stats.mean) == set(nemo_layers(testbed))


def _rewrite_statistics(path, header_change=None, drop_tensor=None, raw=None):
    """Rewrite a cached statistics file: change its JSON header, drop a tensor, or replace it by ``raw`` bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if raw is not None:
        path.write_bytes(raw(path.read_bytes()))
        return
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["dejaguard"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if header_change:
        header_change(header)
    if drop_tensor:
        tensors.pop(next(k for k in tensors if k.startswith(drop_tensor)))
    save_file(tensors, str(path), metadata={"dejaguard": json.dumps(header)})


@pytest.mark.parametrize("damage", [
    {"header_change": lambda h: h.pop("score_mean")},  # defect 3: a missing field raised KeyError
    {"header_change": lambda h: h.update(threshold="high")},
    {"header_change": lambda h: h.update(fingerprint="0123456789abcdef")},
    {"header_change": lambda h: h["settings"].update(blocks="all")},
    {"header_change": lambda h: h.update(version="one")},
    {"drop_tensor": "std/"},
    {"raw": lambda data: data[: len(data) // 2]},
    {"raw": lambda data: b"\x00" * 16},
], ids=["missing-field", "bad-field", "other-model", "other-settings", "bad-version", "missing-tensor", "truncated",
        "garbage"])
def test_unusable_statistics_cache_entry_is_recomputed(testbed, tmp_path, damage):
    """An unreadable, incomplete or mismatched statistics cache entry is recomputed with a warning, never an error,
    and replaced by a complete one."""
    prompts = default_statistics_prompts()[:4]
    first = nemo_statistics(testbed, prompts, seeds=2, score_prompts=2, cache=tmp_path)
    (path,) = tmp_path.glob("nemo-*.safetensors")
    _rewrite_statistics(path, **damage)
    before = testbed.counter.snapshot()
    with pytest.warns(UserWarning, match="recomputing the NeMo statistics"):
        again = nemo_statistics(testbed, prompts, seeds=2, score_prompts=2, cache=tmp_path)
    assert testbed.counter.since(before).forwards == 2 * 2 * 2  # recomputed: the score prompts' predictions
    assert again.threshold == pytest.approx(first.threshold) and again.fingerprint == testbed.fingerprint()
    assert all(torch.equal(again.mean[k], first.mean[k]) for k in first.mean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten entry is complete: read without a warning or a UNet call
        before = testbed.counter.snapshot()
        nemo_statistics(testbed, prompts, seeds=2, score_prompts=2, cache=tmp_path)
        assert testbed.counter.since(before).forwards == 0


def test_zscore_ranking_orders_every_neuron_once(testbed, stats):
    """bench.localization's ranking: every down/mid value neuron exactly once, by NeMo's z-score, descending; the
    mask of a prefix switches off exactly those neurons, layers in model order."""
    layers = nemo_layers(testbed)
    order = zscore_ranking(testbed, MEMORIZED_PROMPT, stats, layers)
    every = {(k, i) for k, m in layers.items() for i in range(m.weight.shape[0])}
    assert len(order) == len(every) and set(order) == every
    z = stats.zscores(value_activations(layers, testbed.encode_prompts([MEMORIZED_PROMPT])))
    values = [float(z[k][i]) for k, i in order]
    assert values == sorted(values, reverse=True)
    mask = neurons_mask(testbed, layers, order[:40], method="ablation")
    assert mask.count() == 40 and list(mask.layers) == [k for k in layers if k in mask.layers]
    assert {(k, int(i)) for k, v in mask.layers.items() for i in v} == set(order[:40])
    mask.check(testbed)
    with pytest.raises(DejaGuardError, match="other layers"):
        zscore_ranking(testbed, MEMORIZED_PROMPT, stats, nemo_layers(testbed, "all"))


@pytest.mark.slow
def test_nemo_localizes_a_memorized_prompt(testbed, stats):
    before = testbed.counter.snapshot()
    mask = localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(seeds=SEEDS))
    spent = testbed.counter.since(before)
    info = mask.info
    assert info["memorized"], "the test prompt must score above NeMo's threshold on the testbed"
    assert 0 < mask.count() <= info["initial_candidates"]
    assert info["score_after"] < info["threshold"] <= info["score_before"]
    # early stop: a candidate that fails on two seeds costs 2 x 2 noise predictions instead of 2 x SEEDS
    assert info["unet_evals"] == spent.forwards <= 2 * SEEDS * info["candidate_evaluations"]
    assert mask.fingerprint == testbed.fingerprint() and mask.method == "nemo"
    assert all(name.endswith("attn2.to_v") and not name.startswith("up_blocks") for name in mask.layers)
    assert all(not m._forward_hooks for _, m in testbed.named_modules())  # no hook left behind
    # Independently of the search's hooks: with the mask patched into the weights the score is below threshold.
    with OutputGates(nemo_layers(testbed)) as gates, apply_mask(testbed, mask):
        ctx = first_step_context(testbed, MEMORIZED_PROMPT, range(SEEDS), gates)
        (patched,) = memorization_scores(ctx, [None]).tolist()
    assert patched < info["threshold"] <= info["score_before"]


def test_early_stop_changes_no_decision(testbed, stats):
    """Scoring on two seeds first and on the rest only where the candidate still passes gives the same neurons and
    the same reported scores, for fewer noise predictions (every candidate scored in full costs 2 x SEEDS)."""
    full = localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(seeds=SEEDS, early_stop=False))
    calls = []
    early = localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(seeds=SEEDS),
                     progress=lambda *args: calls.append(args))
    # core.progress: each stage in order, on its own scale, ending at done == total
    stages = list(dict.fromkeys(stage for _, _, stage in calls))
    assert stages == ["score", "initial selection", "layer refinement", "neuron refinement"]
    assert all(0 <= done <= total for done, total, _ in calls)
    assert all(next(c for c in reversed(calls) if c[2] == s)[0] == next(c for c in reversed(calls) if c[2] == s)[1]
               for s in stages)
    assert full.info["unet_evals"] == 2 * SEEDS * full.info["candidate_evaluations"]
    assert {k: v.tolist() for k, v in early.layers.items()} == {k: v.tolist() for k, v in full.layers.items()}
    assert early.info["candidate_evaluations"] == full.info["candidate_evaluations"]
    assert early.info["unet_evals"] < full.info["unet_evals"]
    assert early.info["score_before"] == pytest.approx(full.info["score_before"], rel=1e-5)
    assert early.info["score_after"] == pytest.approx(full.info["score_after"], rel=1e-5)


@pytest.mark.slow
def test_reference_schedule_satisfies_the_same_criterion(testbed, stats):
    fast = localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(seeds=SEEDS))
    ref = localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(seeds=SEEDS, schedule="reference"))
    assert ref.info["score_after"] < ref.info["threshold"] and ref.count() > 0
    assert ref.info["unet_calls"] == ref.info["candidate_evaluations"]  # one candidate per UNet call
    assert fast.info["unet_calls"] < ref.info["unet_calls"]
    assert ref.info["initial_candidates"] == fast.info["initial_candidates"]  # same initial selection


def test_not_memorized_gives_an_empty_mask(testbed, stats):
    calls = []
    mask = localize(testbed, "a red circle and a blue square", stats, LocalizeSettings(seeds=SEEDS), threshold=1.01,
                    progress=lambda *args: calls.append(args))
    assert mask.count() == 0 and mask.info["memorized"] is False
    assert mask.info["unet_evals"] == 2 * SEEDS  # the unmasked score only
    assert calls == [(0, 1, "score"), (1, 1, "score")]  # core.progress: (done, total, stage)


@pytest.mark.slow
def test_cli_localize(tmp_path):
    out = tmp_path / "mask.safetensors"
    cmd = [sys.executable, "-m", "dejaguard", "localize", "--prompt", "a red circle and a blue square", "--out",
           str(out), "--seeds", "2", "--score-prompts", "2", "--threshold", "1.01", "--cache", str(tmp_path),
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not memorized" in proc.stdout and NeuronMask.load(out).count() == 0
    bad = subprocess.run([sys.executable, "-m", "dejaguard", "localize", "--prompt", "p", "--out",
                          str(tmp_path / "x.safetensors"), "--stats-prompts", str(tmp_path / "absent.txt")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "dejaguard: error: prompt file not found" in bad.stderr


def test_empty_prompt_refused(testbed, stats):
    with pytest.raises(DejaGuardError, match="empty"):
        localize(testbed, "  ", stats)


def test_statistics_of_another_model_refused(testbed, stats):
    other = ActivationStats(mean=stats.mean, std=stats.std, fingerprint="ffff", threshold=0.2, score_mean=0.1,
                            score_std=0.1, settings={}, prompts_sha="", n_prompts=2)
    with pytest.raises(DejaGuardError, match="statistics"):
        localize(testbed, MEMORIZED_PROMPT, other)


def test_blocks_option_searches_the_up_blocks_too(testbed, stats):
    """The paper's space is down + mid; "all" adds the up blocks. Statistics of one space are refused for the other."""
    paper, everything = nemo_layers(testbed), nemo_layers(testbed, "all")
    assert set(paper) < set(everything)
    assert {n for n in everything if n not in paper} == {n for n in everything if n.startswith("up_blocks.")}
    with pytest.raises(DejaGuardError, match="blocks"):
        nemo_layers(testbed, "up")
    with pytest.raises(DejaGuardError, match="other layers"):
        localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(blocks="all"))


class _FakeSearch:
    """A score that is monotone in the set of switched-off neurons: passes iff their weights sum to >= k."""

    def __init__(self, weights: dict, k: float) -> None:
        self.weights, self.k, self.calls, self.trials = weights, k, 0, set()

    def passes(self, sets):
        self.calls += 1
        self.trials.update(sets)
        return [sum(self.weights[n] for n in s) >= self.k for s in sets]


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_fast_refinement_makes_the_sequential_scans_decisions(batch):
    """On monotone scores the batched refinement keeps exactly the neurons the one-by-one scan keeps, in fewer
    UNet calls (sparse and dense keeps alike)."""
    import random

    from dejaguard.core.nemo.search import refine_neurons

    rng = random.Random(batch)
    calls = {"fast": 0, "reference": 0}
    for _ in range(60):
        n = rng.randint(1, 80)
        skew = rng.choice([1, 3, 8])  # few to many neurons needed
        weights = {("layer", i): rng.random() ** skew for i in range(n)}
        queue = sorted(weights, key=weights.get)
        k = sum(weights.values()) * rng.uniform(0.3, 0.95)
        ref, fast = _FakeSearch(weights, k), _FakeSearch(weights, k)
        assert refine_neurons(queue, fast, batch, True) == refine_neurons(queue, ref, 1, False)
        calls["fast"] += fast.calls
        calls["reference"] += ref.calls
    assert calls["fast"] <= calls["reference"]
    if batch > 1:
        assert calls["fast"] < 0.5 * calls["reference"]


def test_first_true_search():
    import random

    from dejaguard.core.nemo.search import first_true

    rng = random.Random(0)
    for _ in range(500):
        n, batch = rng.randint(1, 60), rng.randint(1, 6)
        answer = rng.randint(0, n)  # n: no true index
        known = rng.randint(answer, n - 1) if answer < n and rng.random() < 0.5 else None
        got = first_true(n, lambda ps, a=answer: [p >= a for p in ps], batch, known_true=known)
        assert got == (None if answer == n else answer)


def test_first_true_search_never_misses_a_passing_index():
    """Non-monotone predicates (a score that rises again as more neurons go off): a true index among those the
    gallop skipped is still found, and None means no index is true (measured case: 'kraken wallpaper')."""
    import random

    from dejaguard.core.nemo.search import first_true

    rng = random.Random(1)
    for _ in range(500):
        n, batch = rng.randint(1, 40), rng.randint(1, 6)
        truth = [rng.random() < 0.15 for _ in range(n)]
        got = first_true(n, lambda ps, t=truth: [t[p] for p in ps], batch)
        assert (got is None) == (not any(truth)) and (got is None or truth[got])


def test_magnitude_score_option(testbed, tmp_path):
    """The detector's magnitude as the search criterion: its own statistics; mixing them up is refused."""
    prompts = default_statistics_prompts()[:6]
    mag = nemo_statistics(testbed, prompts, seeds=2, score_prompts=3, cache=tmp_path, score="magnitude")
    from dejaguard.core.detect import first_step_scores

    memorized, novel = (r.score for r in first_step_scores(testbed, [MEMORIZED_PROMPT, prompts[0]]))
    assert mag.settings["score"] == "magnitude" and novel < mag.threshold < memorized  # a norm, not an SSIM
    mask = localize(testbed, "a red circle and a blue square", mag, LocalizeSettings(seeds=2, score="magnitude"),
                    threshold=1e9)
    assert mask.count() == 0 and "||eps(c)" in mask.thresholds["score"]
    with pytest.raises(DejaGuardError, match="statistics calibrate"):
        localize(testbed, "a red circle and a blue square", mag, LocalizeSettings(seeds=2))
    with pytest.raises(DejaGuardError, match="unknown memorization score"):
        LocalizeSettings(score="sscd")


def test_cross_seed_similarity_compares_different_seeds_only():
    """The generation score: identical seeds never count; a masked model drawing every seed to the reference image
    scores high, one collapsing to another common image scores low."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 4, 16, 16, generator=g)
    same = reference[None]  # masked = unmasked, per seed: only cross-seed pairs are compared
    copy_of_seed0 = reference[[0, 0, 0]][None]  # every seed reproduces the reference's seed-0 image
    collapsed = torch.randn(1, 4, 16, 16, generator=g).expand(3, -1, -1, -1)[None]
    scores = cross_seed_similarity(torch.cat([same, copy_of_seed0, collapsed]), reference)
    assert scores.shape == (3,)
    assert scores[0] < 0.2 and scores[1] > 0.99 and scores[2] < 0.2
    with pytest.raises(DejaGuardError, match="at least 2 seeds"):
        cross_seed_similarity(reference[None, :1], reference[:1])


def test_generation_score_and_its_statistics(testbed, tmp_path):
    """score="generation": the unmasked model scores the seed consistency of its own short generations, switching
    off every value neuron (no text left) scores lower, statistics record their generation steps and statistics
    for other steps are refused."""
    prompts = default_statistics_prompts()[:6]
    stats = nemo_statistics(testbed, prompts, seeds=2, score_prompts=3, cache=tmp_path, score="generation",
                            blocks="all", generation_steps=3)
    assert stats.settings["generation_steps"] == 3 and 0 < stats.threshold < 1
    layers = nemo_layers(testbed, "all")
    with OutputGates(layers) as gates:
        ctx = first_step_context(testbed, MEMORIZED_PROMPT, range(2), gates, kind="generation", generation_steps=3)
        all_off = {name: torch.zeros(layer_shape(m)[0]) for name, m in layers.items()}
        counter = testbed.counter.snapshot()
        unmasked, masked = memorization_scores(ctx, [None, all_off]).tolist()
        assert testbed.counter.since(counter).forwards == 3 * 2 * 2 + 3 * 2 * 4  # the reference, then both masks
    # the unmasked row was generated in a batch with the all-off mask (all-ones gates): same values up to the
    # float rounding of another batch size
    assert unmasked == pytest.approx(float(cross_seed_similarity(ctx.reference[None], ctx.reference)[0]), rel=1e-5)
    assert masked < unmasked
    with pytest.raises(DejaGuardError, match="3-step generations"):
        localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(seeds=2, score="generation", blocks="all"))


def test_verification_rounds_check_unseen_seeds(testbed, stats):
    """verify_rounds: each mask is scored on the next `seeds` unseen seeds; a failing set joins the search, so the
    returned mask passes on every seed set it was searched on, and the record says whether it passed the last."""
    mask = localize(testbed, MEMORIZED_PROMPT, stats, LocalizeSettings(seeds=SEEDS, verify_rounds=2))
    info = mask.info
    rounds = info["verification"]
    assert 1 <= len(rounds) <= 2 and info["verified"] == rounds[-1]["passed"]
    assert rounds[0]["seeds"] == list(range(SEEDS, 2 * SEEDS))
    assert all(r["passed"] == (r["score_masked"] < info["threshold"]) for r in rounds)
    assert rounds[-1]["neurons"] == mask.count() and info["score_after"] < info["threshold"]
    if len(rounds) == 2:  # the first mask failed on seeds 3..5: they were searched on, the next set checked
        assert not rounds[0]["passed"] and rounds[1]["seeds"] == list(range(2 * SEEDS, 3 * SEEDS))
    with pytest.raises(DejaGuardError, match="verify_rounds"):
        LocalizeSettings(verify_rounds=-1)


# -- recall and precision against a ground truth (issue 25) ---------------------------------------------------------


def _truth_mask(layers: dict[str, list], shapes: dict[str, tuple[int, int]] | None = None) -> NeuronMask:
    shapes = shapes or {"a.attn2.to_v": (8, 4), "b.ff.net.2": (6, 10)}
    return NeuronMask(layers={k: torch.tensor(v, dtype=torch.int64) for k, v in layers.items()},
                      layer_shapes={k: shapes[k] for k in layers}, fingerprint="f", method="t")


def test_recall_precision_counts_neurons():
    truth = _truth_mask({"a.attn2.to_v": [1, 2, 3], "b.ff.net.2": [0]})
    found = _truth_mask({"a.attn2.to_v": [2, 3, 5, 6]})
    assert recall_precision(found, truth) == (0.5, 0.5)  # 2 of 4 true neurons; 2 of 4 found ones
    assert recall_precision(truth, truth) == (1.0, 1.0)
    other_layer = _truth_mask({"b.ff.net.2": [1]})
    assert recall_precision(other_layer, truth) == (0.0, 0.0)  # the same index in another layer is another neuron


def test_recall_precision_counts_weight_entries_by_output_row():
    shape = {"b.attn2.to_out.0": (6, 10)}
    truth = _truth_mask({"b.attn2.to_out.0": [0, 4]}, shape)
    weights = _truth_mask({"b.attn2.to_out.0": [[0, 1], [0, 7], [3, 2]]}, shape)  # rows 0 (twice) and 3
    assert recall_precision(weights, truth) == (0.5, 0.5)


def test_recall_precision_counts_ffn_output_weights_by_hidden_unit():
    """A subspace mask prunes entries (row, j) of ff.net.2: they belong to FFN hidden unit j, the neuron a planted
    ground truth names as row j of ff.net.0.proj (counted by output row, they matched nothing)."""
    truth = _truth_mask({"b.ff.net.0.proj": [1, 7]}, {"b.ff.net.0.proj": (16, 4)})
    weights = _truth_mask({"b.ff.net.2": [[0, 1], [3, 1], [2, 5]]}, {"b.ff.net.2": (4, 8)})  # hidden units 1 and 5
    assert recall_precision(weights, truth) == (0.5, 0.5)


def test_recall_precision_undefined_and_refused():
    truth = _truth_mask({"a.attn2.to_v": [1]})
    empty = _truth_mask({})
    recall, precision = recall_precision(empty, truth)
    assert recall == 0.0 and precision != precision  # nothing found: no precision (NaN)
    recall, precision = recall_precision(truth, empty)
    assert recall != recall and precision == 0.0
    wrong = _truth_mask({"a.attn2.to_v": [1]}, {"a.attn2.to_v": (9, 4)})
    with pytest.raises(DejaGuardError, match="shape"):
        recall_precision(wrong, truth)


def test_value_and_ffn_search_space(testbed, tmp_path):
    """space="value+ffn" adds the GEGLU hidden units: activations read at the first step (counted UNet calls), one
    statistic per hidden unit, and statistics of one space refused for the other (the search itself:
    ``tests/test_planted.py``, on the model whose memorization sits in a known FFN neuron)."""
    from dejaguard.core.nemo import NEMO_SPACES, neuron_activations, prompt_zscores
    from dejaguard.core.nemo.score import first_step_noise, neuron_count

    assert set(NEMO_SPACES) == {"value", "value+ffn"}
    value, both = nemo_layers(testbed), nemo_layers(testbed, space="value+ffn")
    ffn = [k for k in both if k not in value]
    assert ffn and all(k.endswith("ff.net.0.proj") for k in ffn) and set(value) < set(both)
    with pytest.raises(DejaGuardError, match="search space"):
        nemo_layers(testbed, space="ffn")
    with pytest.raises(DejaGuardError, match="search space"):
        LocalizeSettings(space="ffn")
    noise, t = first_step_noise(testbed, range(2))
    emb = testbed.encode_prompts([MEMORIZED_PROMPT, "a red circle on the left"])
    before = testbed.counter.snapshot()
    acts = neuron_activations(testbed, both, emb, noise, t)
    assert testbed.counter.since(before).forwards == 4  # 2 prompts x 2 noises, conditional only
    for k, m in both.items():
        assert acts[k].shape == (2, neuron_count(k, m)) and bool((acts[k] >= 0).all())
    assert neuron_count(ffn[0], both[ffn[0]]) == layer_shape(both[ffn[0]])[0] // 2
    for k in value:  # value neurons: text only, as before
        torch.testing.assert_close(acts[k], value_activations({k: both[k]}, emb)[k])
    # the hidden unit's activation is what the GEGLU hands to ff.net.2
    modules = dict(testbed.named_modules())
    seen = {}
    handle = modules[ffn[0][: -len(".proj")]].register_forward_hook(
        lambda mod, inp, out: seen.setdefault("out", out.detach()))
    try:
        testbed.predict_noise(noise[:1], t, emb[:1])
    finally:
        handle.remove()
    assert torch.allclose(seen["out"].abs().mean(dim=1)[0], neuron_activations(
        testbed, {ffn[0]: both[ffn[0]]}, emb[:1], noise[:1], t)[ffn[0]][0], atol=1e-6)

    prompts = default_statistics_prompts()[:8]
    stats_both = nemo_statistics(testbed, prompts, seeds=2, score_prompts=4, cache=tmp_path, space="value+ffn",
                                 score="magnitude")
    assert set(stats_both.mean) == set(both) and stats_both.settings["space"] == "value+ffn"
    z = prompt_zscores(testbed, MEMORIZED_PROMPT, stats_both, both)
    assert all(z[k].shape == (neuron_count(k, m),) for k, m in both.items())
    with pytest.raises(DejaGuardError, match="search space"):
        localize(testbed, MEMORIZED_PROMPT, stats_both, LocalizeSettings(score="magnitude", seeds=2))
    paper = nemo_statistics(testbed, prompts, seeds=2, score_prompts=4, cache=tmp_path, score="magnitude")
    assert "space" not in paper.settings  # the paper's space keeps the cache keys it always had


def test_gate_attributions_are_the_gradient_of_the_first_step_magnitude(testbed):
    """The attribution of a neuron is d(magnitude)/d(gate) at gate 1: a finite difference of the magnitude with the
    gate at 1 - h agrees; one batched call over the seeds, counted with its backward pass; with neurons already off
    their gates are 0 and the gradient is taken there."""
    from dejaguard.core.nemo import RANKINGS, gate_attributions

    assert set(RANKINGS) == {"zscore", "attribution", "both"}
    with pytest.raises(DejaGuardError, match="ranking"):
        LocalizeSettings(ranking="gradient")
    layers = nemo_layers(testbed, space="value+ffn")
    with OutputGates(layers) as gates:
        ctx = first_step_context(testbed, MEMORIZED_PROMPT, range(2), gates, kind="magnitude")
        before = testbed.counter.snapshot()
        attr = gate_attributions(ctx, layers)
        spent = testbed.counter.since(before)
        assert (spent.forwards, spent.backwards) == (4, 4)
        with torch.no_grad():  # as a graph's node calls it
            again = gate_attributions(ctx, layers)
        assert all(torch.allclose(again[k], attr[k]) for k in attr)
        name = max(attr, key=lambda k: float(attr[k].max()))
        j = int(attr[name].argmax())
        h = 1e-2
        gate = torch.ones(layer_shape(layers[name])[0])
        gate[j] = 1 - h
        on, off = memorization_scores(ctx, [None, {name: gate}]).tolist()
        assert attr[name][j] > 0
        assert abs((on - off) / h - float(attr[name][j])) < 0.05 * float(attr[name][j])

        other = next(k for k in attr if k != name)
        i = int(attr[other].argmax())
        after = gate_attributions(ctx, layers, [(name, j)])
        gate[j], gate_other = 0.0, torch.ones(layer_shape(layers[other])[0])
        gate_other[i] = 1 - h
        base, moved = memorization_scores(ctx, [{name: gate}, {name: gate, other: gate_other}]).tolist()
    assert abs((base - moved) / h - float(after[other][i])) < 0.05 * abs(float(after[other][i])) + 1e-3
    assert not torch.allclose(after[other], attr[other])


def test_attribution_selection_adds_the_top_neuron_given_those_already_off(testbed):
    """Greedy re-attribution: round r adds the neuron with the highest attribution taken with the first r - 1 off;
    it stops at the first set under the threshold, and answers None where even every neuron off stays above it."""
    from dejaguard.core.nemo import gate_attributions
    from dejaguard.core.nemo.search import CandidateSearch
    from dejaguard.core.nemo.stages import attribution_selection

    layers = nemo_layers(testbed, space="value+ffn")

    def top(attributions: dict[str, torch.Tensor], taken: list) -> tuple[str, int]:
        return max(((k, i) for k, v in attributions.items() for i in range(v.shape[0]) if (k, i) not in taken),
                   key=lambda n: float(attributions[n[0]][n[1]]))

    with OutputGates(layers) as gates:
        ctx = first_step_context(testbed, MEMORIZED_PROMPT, range(2), gates, kind="magnitude")
        first = top(gate_attributions(ctx, layers), [])
        second = top(gate_attributions(ctx, layers, [first]), [first])
        probe = CandidateSearch(ctx, threshold=0.0)
        one, two = probe.scores([frozenset({first}), frozenset({first, second})])
        assert two < one
        search = CandidateSearch(ctx, threshold=(one + two) / 2)
        found = attribution_selection(search, ctx, layers)
        assert found is not None and found.order == [first, second] and found.rounds == 2
        assert found.neurons == frozenset({first, second}) and found.ascending([first, second]) == [second, first]
        assert attribution_selection(CandidateSearch(ctx, threshold=0.0), ctx, layers) is None
