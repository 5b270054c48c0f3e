"""NeMo (Hintersdorf et al., NeurIPS 2024): the cross-attention value neurons that carry a memorized prompt.

Implemented from the paper's description, in four modules:

- :mod:`.score`: the search space (``attn2.to_v`` of the down and mid blocks, or of all blocks), value
  activations, and the memorization score: NeMo's seed consistency (max SSIM over seed pairs of the first-step
  noise differences ``eps(x_T, c) - eps(x_T, "")``), our detector's magnitude, or short generations compared
  across seeds.
- :mod:`.statistics`: per-neuron activation mean and std over non-memorized prompts and the score threshold
  (NeMo's mean + 1 std), cached per model fingerprint.
- :mod:`.search`: batched searches over candidate sets of switched-off neurons (memoized, counted, early stop).
- :mod:`.stages`: :func:`localize` as stages: score -> initial selection -> layer and neuron refinement ->
  verification on unseen seeds.

The result is a :class:`~core.neuron_mask.NeuronMask` (the format all mask methods share; :mod:`core.prune`
makes the other kind without importing NeMo).

Why the paper's seed-consistency score and not our detector's magnitude: it is the paper's criterion, it is
self-calibrating per model (no calibration file needed for a ComfyUI checkpoint), and on the testbed it
separates memorized from non-memorized prompts as well as the magnitude does (``bench/neurons.py`` prints both
before and after masking). *Option* ``score="generation"`` (not in the paper): for each seed a short guided
generation (``generation_steps``, default 10, CFG 7.5) of the masked model, decoded, is compared by SSIM with
the unmasked model's generations of the *other* seeds; the score is the maximum. Why: on the testbed the
first-step criteria are met while the image re-forms later in sampling (see the README's measurements), and a
10-step generation predicts the 50-step one (measured: an astronaut mask, 8 held-out seeds, the same seeds
replicate at 10 and at 50 steps). Cost: ``generation_steps`` x the first-step scores per candidate.

*Search space* (``LocalizeSettings.blocks``): the paper's ``attn2.to_v`` of the down and mid blocks
(``"down_mid"``, the default), or every ``attn2.to_v`` (``"all"``, the up blocks too). Measured on the
testbed (4 seeds, 20 DDIM steps): switching off every down/mid value neuron stops the astronaut and
cameraman prompts from replicating but not "chelsea the tabby cat looking at the camera" (SSIM to its
training image 0.67 -> 0.80); that image is carried by the up blocks. ``LocalizeSettings.space``
``"value+ffn"`` (not in the paper) adds the GEGLU hidden units of the same blocks' feed-forwards (``ff.net.0.proj``
output channels ``< out / 2``); their activation is read at the first sampling step on the score's fixed noises
(:func:`~core.nemo.score.neuron_activations`). Why: memorization that lives in the feed-forward (Chavhan et al.'s
subspace; the planted variant's shared group) is out of reach of value neurons.

*Ranking* (``LocalizeSettings.ranking``): the paper's activation z-scores (``"zscore"``), or ``"attribution"`` (not
in the paper): the gradient of the first-step magnitude with respect to a gate on each neuron, at every gate 1
(:func:`~core.nemo.score.gate_attributions`, one batched backward pass), i.e. the first-order effect of switching it
off, taken again after each round of the selection with the neurons chosen so far off (greedy re-attribution,
:func:`~core.nemo.stages.attribution_selection`): one neuron per round up to 16, then the set doubles.
Why: on the previously shipped planted variant (run C2 of the model card) z-scores rank the feed-forward carrier 15th to
158th of 1,600, and the large candidate sets that reach it switch off other FFN units that raise the score again;
attribution ranks it first (README measures both rankings on the variant shipped now). Why again after each round:
the score is not monotone in the set; for C2's rings prompt that unit ranks last with every neuron on and first once
its two top value neurons are off. ``"both"`` (not in the paper) runs the selection and refinement once per ranking
and keeps the smaller mask (NeMo's aim is the smallest set that stops the memorization). Why: each ranking has a
blind spot the other covers. Where several neurons each carry an image alone (redundant memorization, planted runs
F6 and F7 of the model card), switching one off changes little, so attribution ranks the carriers low and ends on
other neurons under which the generations still copy; the z-score search starts from a large nested set that holds
them all, and its neuron-by-neuron refinement keeps each of them (re-enabling any one alone brings the score back). A
value neuron whose activation is ordinary for the prompt (the image stored in what reads it) the z-score's sets can
pass without, and attribution finds. Cost: the two searches, which share one memo of scored sets.

Two schedules compute the stages; both score each distinct candidate set once (memoized). ``"reference"``
is the straightforward one: one candidate set per UNet call (its ``S`` seeds, conditional and
unconditional, in that call), sequential scans as in the paper. ``"fast"`` evaluates up to ``batch``
candidate sets in one batched UNet call (a forward hook on each ``to_v`` multiplies its output by a
per-sample gate, so ``B`` masks x ``S`` seeds x {uncond, cond} are one batch), reuses the fixed noise,
stops early on candidates that fail on two seeds, and replaces the linear scans by batched searches
(:mod:`.search`); on a monotone score it makes the same decisions, and its result is always verified (the
reference and fast results are compared side by side in ``bench/neurons.py``).

Counting: every UNet evaluation goes through ``denoiser.predict_noise`` and its counter; a candidate
evaluation costs ``2 S`` noise predictions (``2 x 2`` when it stops early).

Shapes: ``S`` seeds, ``B`` candidate masks, ``C, H, W`` the sample shape, ``L`` tokens, ``D`` text
width, ``N`` neurons of a layer (its output channels).
"""

from .score import (
    GENERATION_STEPS,
    NEMO_BLOCKS,
    NEMO_SPACES,
    RANKINGS,
    SCORES,
    ScoreContext,
    cross_seed_similarity,
    first_step_context,
    gate_attributions,
    memorization_scores,
    nemo_layers,
    neuron_activations,
    seed_consistency,
    value_activations,
)
from .stages import LocalizeSettings, localize
from .statistics import (
    ActivationStats,
    cache_dir,
    default_statistics_prompts,
    nemo_statistics,
    prompt_zscores,
    zscore_ranking,
)

__all__ = [
    "GENERATION_STEPS", "NEMO_BLOCKS", "NEMO_SPACES", "RANKINGS", "SCORES", "ActivationStats", "LocalizeSettings",
    "ScoreContext", "cache_dir", "cross_seed_similarity", "default_statistics_prompts", "first_step_context",
    "gate_attributions", "localize", "memorization_scores", "nemo_layers", "nemo_statistics", "neuron_activations",
    "prompt_zscores", "seed_consistency", "value_activations", "zscore_ranking",
]
