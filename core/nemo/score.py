"""NeMo's memorization score, and what it is computed from: the search space, value activations, seed features.

- *Search space* (:func:`nemo_layers`): the ``attn2.to_v`` layers of the down and mid blocks (the paper's,
  ``"down_mid"``) or of every block (``"all"``).
- *Activation* (:func:`value_activations`): of neuron ``i`` for a prompt, ``mean over the L tokens of
  |to_v(text embedding)|_i``; from the text embedding alone (no UNet call).
- *Memorization score* (:data:`SCORES`): NeMo's seed consistency (``"ssim"``): for ``S`` fixed initial noises
  ``x_T`` the first-step text-conditional noise difference ``delta_s = eps(x_T^s, c) - eps(x_T^s, "")``, and
  the **maximum SSIM over all pairs of seeds** (:func:`seed_consistency`; the SSIM is
  :func:`core.metrics.ssim_batch`, each pair with its own data range): a memorized prompt pulls every seed
  toward the same image, so the differences look alike. ``"magnitude"``: the mean over seeds of
  ``||delta_s||`` (our detector's quantity). ``"generation"`` (not in the paper): short guided generations of
  the masked model, decoded, compared with the unmasked model's generations of the *other* seeds
  (:func:`cross_seed_similarity`). Why the first-step difference uses ``eps(., "")`` and not ``x_T``:
  measured on the testbed, ``x_T - eps(x_T, c)`` barely separates memorized from non-memorized prompts.

A :class:`ScoreContext` holds what stays fixed while one prompt's candidate masks are scored (noise,
embeddings, timestep); :func:`seed_features` evaluates ``B`` candidate masks (per-sample
:class:`~core.neuron_mask.OutputGates`) in batched UNet calls, :func:`score_features` turns the features into
scores. Counting: every UNet evaluation goes through ``denoiser.predict_noise`` and its counter; a candidate
costs ``2 S`` noise predictions (``"generation"``: ``generation_steps`` times that).

Shapes: ``S`` seeds, ``B`` candidate masks, ``C, H, W`` the sample shape, ``L`` tokens, ``D`` text width,
``N`` neurons of a layer (its output channels), ``P`` prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..errors import DejaGuardError
from ..metrics import ssim_batch
from ..neuron_mask import Neuron, OutputGates, layer_shape
from ..sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, guided_denoise, initial_noise, text_conditional_magnitude

NEMO_BLOCKS = {"down_mid": ("down_blocks.", "mid_block."), "all": ("down_blocks.", "mid_block.", "up_blocks.")}
VALUE_LAYER, FFN_LAYER = "attn2.to_v", "ff.net.0.proj"
NEMO_SPACES = {"value": (VALUE_LAYER,), "value+ffn": (VALUE_LAYER, FFN_LAYER)}
RANKINGS = {"zscore": "activation z-scores against non-memorized prompts (NeMo)",
            "attribution": "first-order effect of switching the neuron off on the first-step magnitude "
                           "(gate_attributions)",
            "both": "each of the two searches, keeping the smaller mask"}


def is_ffn_layer(name: str) -> bool:
    """Is ``name`` a GEGLU input projection, whose neurons are its hidden units (output channels ``< out / 2``)?"""
    return name.endswith(FFN_LAYER)


def neuron_count(name: str, module: torch.nn.Module) -> int:
    """Neurons of a search-space layer: a value layer's output channels, a GEGLU projection's hidden half."""
    out = layer_shape(module)[0]
    return out // 2 if is_ffn_layer(name) else out


def nemo_layers(denoiser: Denoiser, blocks: str = "down_mid", space: str = "value") -> dict[str, torch.nn.Module]:
    """The search space in model order: ``attn2.to_v`` layers (NeMo's), and with ``space="value+ffn"`` the GEGLU
    input projections ``ff.net.0.proj`` of the same blocks (not in the paper; their neurons are the hidden units),
    each after its block's value layer.

    ``blocks``: ``"down_mid"`` (the paper's: down and mid blocks) or ``"all"`` (up blocks too).
    """
    if blocks not in NEMO_BLOCKS:
        raise DejaGuardError(f"unknown NeMo blocks {blocks!r} (one of {', '.join(NEMO_BLOCKS)})")
    if space not in NEMO_SPACES:
        raise DejaGuardError(f"unknown NeMo search space {space!r} (one of {', '.join(NEMO_SPACES)})")
    if getattr(denoiser, "pooled_width", None):  # library, CLI and nodes alike
        raise DejaGuardError("NeMo localization is not supported for SDXL: its neuron statistics read every row of "
                             "the text conditioning as a token, and SDXL's carries a pooled row besides its tokens")
    modules = dict(denoiser.named_modules())
    layers = {name: m for name, m in modules.items()
              if name.endswith(VALUE_LAYER) and name.startswith(NEMO_BLOCKS[blocks])}
    if not layers:
        raise DejaGuardError(f"this UNet has no cross-attention value layers (attn2.to_v) in its {blocks} blocks "
                             "under diffusers names: NeMo cannot run on it")
    if FFN_LAYER in NEMO_SPACES[space]:
        ffn = {name: m for name, m in modules.items() if is_ffn_layer(name) and name.startswith(NEMO_BLOCKS[blocks])}
        if not ffn or any(name[: -len(".proj")] not in modules for name in ffn):
            raise DejaGuardError(f"this UNet has no GEGLU feed-forward layers (ff.net.0.proj under ff.net.0) in its "
                                 f"{blocks} blocks under diffusers names: search space {space!r} is not available")
        # one order in every adapter (ComfyUI defines ff before attn2): each block's value layer, then its FFN
        ordered = {}
        for name, module in layers.items():
            ordered[name] = module
            twin = name[: -len(VALUE_LAYER)] + FFN_LAYER
            if twin in ffn:
                ordered[twin] = ffn.pop(twin)
        layers = {**ordered, **ffn}
    return layers


@torch.no_grad()
def value_activations(layers: dict[str, torch.nn.Module], embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """NeMo's activation: ``mean over the L tokens of |to_v(embedding)|``, per neuron.

    ``embeddings (P, L, D)`` -> ``{layer: (P, N)}`` float32 on the CPU. Calls each layer's own
    ``forward`` (so ComfyUI's casting linear layers work), no UNet evaluation.
    """
    out = {}
    for name, module in layers.items():
        weight = module.weight
        values = module(embeddings.to(weight.device, weight.dtype))
        out[name] = values.float().abs().mean(dim=1).cpu()
    return out


@torch.no_grad()
def neuron_activations(denoiser: Denoiser, layers: dict[str, torch.nn.Module], embeddings: torch.Tensor,
                       noise: torch.Tensor, timestep: Any, max_batch: int = 64) -> dict[str, torch.Tensor]:
    """Activations of every search-space neuron: ``embeddings (P, L, D)`` -> ``{layer: (P, N)}`` float32, CPU.

    Value layers: :func:`value_activations` (text only). FFN layers (``space="value+ffn"``): the hidden unit's
    output ``|h_j * gelu(g_j)|`` (the GEGLU module's output) averaged over positions and over the ``S`` fixed first-
    step noises ``noise (S, C, H, W)`` at ``timestep``, conditional prediction only: unlike a value neuron it
    depends on the image, so it is read at the first sampling step, where NeMo's score is. Costs ``P * S`` noise
    predictions when the layers include FFN ones, none otherwise.
    """
    out = value_activations({k: m for k, m in layers.items() if not is_ffn_layer(k)}, embeddings)
    ffn = [k for k in layers if is_ffn_layer(k)]
    if not ffn:
        return out
    modules = dict(denoiser.named_modules())
    s = noise.shape[0]
    sums: dict[str, list[torch.Tensor]] = {k: [] for k in ffn}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            sums[name].append(output.float().abs().flatten(1, -2).mean(dim=1).cpu())  # (n, inner)
        return hook

    handles = [modules[k[: -len(".proj")]].register_forward_hook(record(k)) for k in ffn]
    try:
        per_call = max(1, max_batch // s)
        for start in range(0, embeddings.shape[0], per_call):
            emb = embeddings[start:start + per_call]
            denoiser.predict_noise(noise.repeat(emb.shape[0], 1, 1, 1), timestep, emb.repeat_interleave(s, dim=0))
    finally:
        for h in handles:
            h.remove()
    for k in ffn:
        out[k] = torch.cat(sums[k]).view(embeddings.shape[0], s, -1).mean(dim=1)
    return {k: out[k] for k in layers}


def gate_attributions(ctx: ScoreContext, layers: dict[str, torch.nn.Module],
                      off: Iterable[Neuron] = ()) -> dict[str, torch.Tensor]:
    """First-order effect of switching each neuron off on the prompt's first-step magnitude: ``{layer: (N,)}``.

    The gradient of ``mean over seeds of ||eps(x_T, c) - eps(x_T, "")||`` (:data:`SCORES` ``"magnitude"``) with
    respect to a gate on every neuron of ``layers``, at gate 1 for every neuron except those of ``off`` (``(layer,
    index)`` pairs, gate 0: already switched off); switching a further neuron ``j`` off changes the score by about
    ``-attribution_j``, so the highest attributions are the neurons whose loss lowers the score most ("attribution
    patching"). Not in the paper: NeMo ranks by activation z-scores, which rank feed-forward carriers low (the
    README's planted-variant measurements). One batched UNet call over the ``S`` seeds (uncond and cond, ``2 S``
    noise predictions) and its backward pass; ``ctx.gates`` must hook ``layers``. Float32 on the CPU.
    """
    ones = {name: torch.ones(1, layer_shape(m)[0]) for name, m in layers.items()}
    for name, i in off:
        ones[name][0, i] = 0.0
    try:
        with torch.enable_grad():  # also under the no_grad of a graph's node
            gates = {name: g.requires_grad_(True) for name, g in ones.items()}
            ctx.gates.set({name: g.repeat(2 * ctx.seeds, 1) for name, g in gates.items()})
            eps_uncond, eps_cond = first_step_pair(ctx, ctx.noise)
            score = text_conditional_magnitude(eps_cond, eps_uncond).mean()
            grads = torch.autograd.grad(score, list(gates.values()))
    finally:
        ctx.gates.set({})
    return {name: g[0, :neuron_count(name, module)].detach().float().cpu()
            for (name, module), g in zip(layers.items(), grads)}


def seed_consistency(differences: torch.Tensor) -> torch.Tensor:
    """NeMo's memorization score: ``(B, S, C, H, W)`` noise differences -> ``(B,)`` max SSIM over seed pairs."""
    b, s = differences.shape[:2]
    if s < 2:
        raise DejaGuardError("the memorization score compares seeds: at least 2 seeds are needed")
    pairs = list(itertools.combinations(range(s), 2))
    first = differences[:, [i for i, _ in pairs]].flatten(0, 1)
    second = differences[:, [j for _, j in pairs]].flatten(0, 1)
    return ssim_batch(first, second).view(b, len(pairs)).max(dim=1).values


SCORES = {"ssim": "max pairwise SSIM of first-step eps(c) - eps('') over seeds (NeMo)",
          "magnitude": "mean over seeds of ||eps(c) - eps('')||_2 at the first step (Wen et al., core.detect)",
          "generation": "max SSIM between the masked model's short guided generation (decoded image) from one "
                        "seed and the unmasked model's from another seed"}
GENERATION_STEPS = 10  # schedule of the "generation" score's short generations

EARLY_STOP_SCORES = ("ssim", "generation")  # maxima over seed pairs: two seeds can already prove a failure


def cross_seed_similarity(generations: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The "generation" score: ``(B, S, C, H, W)`` masked generations and ``(S, C, H, W)`` unmasked ones ->
    ``(B,)``, the max over seed pairs ``i != j`` of SSIM(generations[b, i], reference[j]).

    Different seeds, because the same seed with no mask is trivially identical: for the unmasked model the
    score is the seed consistency of its generations (NeMo's idea, on the final sample), which calibrates the
    threshold on non-memorized prompts. A masked model that still replicates draws every seed to the image the
    unmasked model draws from every other seed; one that collapses to some other common image does not count.
    """
    b, s = generations.shape[:2]
    if s < 2:
        raise DejaGuardError("the memorization score compares seeds: at least 2 seeds are needed")
    pairs = [(i, j) for i in range(s) for j in range(s) if i != j]
    first = generations[:, [i for i, _ in pairs]].flatten(0, 1)
    second = reference[[j for _, j in pairs]].repeat(b, 1, 1, 1)
    return ssim_batch(first, second).view(b, len(pairs)).max(dim=1).values


def check_score_kind(kind: str) -> str:
    """``kind`` if it names one of :data:`SCORES`; DejaGuardError otherwise."""
    if kind not in SCORES:
        raise DejaGuardError(f"unknown memorization score {kind!r} (one of {', '.join(SCORES)})")
    return kind


@dataclass
class ScoreContext:
    """What stays fixed while one prompt's candidate masks are scored: noise, embeddings, timestep."""

    denoiser: Denoiser
    gates: OutputGates
    cond: torch.Tensor  # (1, L, D)
    uncond: torch.Tensor  # (1, L, D)
    noise: torch.Tensor  # (S, C, H, W), already scaled by the scheduler's init sigma
    timestep: Any
    max_batch: int = 64  # samples per UNet call (uncond + cond); more candidates are split into calls
    kind: str = "ssim"  # SCORES: "ssim" (NeMo's), "magnitude" (our detector's quantity) or "generation"
    generation_steps: int = GENERATION_STEPS  # "generation": steps of its short guided generations
    guidance_scale: float = DEFAULT_GUIDANCE  # "generation": their CFG scale
    reference: torch.Tensor | None = None  # "generation": the unmasked model's images (S, 3, h, w), lazily

    @property
    def seeds(self) -> int:
        return int(self.noise.shape[0])


def first_step_context(denoiser: Denoiser, prompt: str | torch.Tensor, seeds: Sequence[int],
                       gates: OutputGates, num_inference_steps: int = DEFAULT_STEPS,
                       max_batch: int = 64, kind: str = "ssim",
                       generation_steps: int = GENERATION_STEPS) -> ScoreContext:
    """Fixed noise for ``seeds`` and the first timestep of the sampling schedule (trailing spacing: t = 999)."""
    if generation_steps < 1:
        raise DejaGuardError(f"generation_steps must be at least 1, got {generation_steps}")
    noise, timestep = first_step_noise(denoiser, seeds, num_inference_steps)
    cond = denoiser.encode_prompts([prompt]) if isinstance(prompt, str) else prompt
    return ScoreContext(denoiser, gates, cond, denoiser.encode_prompts([""]), noise, timestep,
                        max_batch=max_batch, kind=check_score_kind(kind), generation_steps=int(generation_steps))


def first_step_noise(denoiser: Denoiser, seeds: Sequence[int],
                     num_inference_steps: int = DEFAULT_STEPS) -> tuple[torch.Tensor, Any]:
    """The fixed initial noises of ``seeds`` ``(S, C, H, W)``, scaled by the scheduler's init sigma, and the first
    timestep of the ``num_inference_steps`` schedule."""
    scheduler = denoiser.new_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    return initial_noise(denoiser, list(seeds)) * scheduler.init_noise_sigma, scheduler.timesteps[0]


GENERATION_SIZE = 64  # the "generation" score compares decoded images at most this many pixels wide


def _short_generations(ctx: ScoreContext, x: torch.Tensor) -> torch.Tensor:
    """``ctx.generation_steps``-step guided generations from the scaled noise ``x`` ``(n, C, H, W)``, with
    whatever gates are set (guided_denoise's batch layout, [uncond, cond], is the gates'), decoded: images
    ``(n, 3, h, w)``, area-downsampled to at most :data:`GENERATION_SIZE` pixels.

    Images, not latents: measured on the testbed ("chelsea", 93 neurons off, 10 steps), the masked generations
    still replicated (image SSIM to the training image 0.60-0.64, to the unmasked ones 0.66-0.68) while their
    latents' SSIM to the unmasked latents had fallen to 0.42-0.48, below the latent threshold.
    """
    scheduler = ctx.denoiser.new_scheduler()
    samples, _ = guided_denoise(ctx.denoiser, x / scheduler.init_noise_sigma, ctx.cond.expand(x.shape[0], -1, -1),
                                ctx.uncond, ctx.generation_steps, ctx.guidance_scale)
    images = ctx.denoiser.decode(samples).float()
    if max(images.shape[-2:]) > GENERATION_SIZE:
        factor = max(images.shape[-2:]) / GENERATION_SIZE
        size = (max(1, round(images.shape[-2] / factor)), max(1, round(images.shape[-1] / factor)))
        images = F.interpolate(images, size=size, mode="area")
    return images


def first_step_pair(ctx: ScoreContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps_uncond, eps_cond)`` float32 ``(n, C, H, W)`` of the prompt at ``ctx``'s first timestep from the scaled
    noises ``x (n, C, H, W)``, in one call laid out ``[uncond x n, cond x n]`` (the layout of the gates set on
    ``ctx.gates``)."""
    n = x.shape[0]
    context = torch.cat([ctx.uncond.expand(n, -1, -1), ctx.cond.expand(n, -1, -1)])
    eps = ctx.denoiser.predict_noise(torch.cat([x, x]), ctx.timestep, context)
    return eps.float().chunk(2)


def seed_features(ctx: ScoreContext, masks: Sequence[dict[str, torch.Tensor] | None],
                  seeds: Sequence[int] | None = None) -> torch.Tensor:
    """What the memorization score compares, per candidate mask and seed: ``(B, s, ...)`` for ``B`` masks and the
    ``s`` seeds ``seeds`` (indices into ``ctx.noise``; default all): the first-step noise differences
    ``eps(x_T, c) - eps(x_T, "")`` ``(C, H, W)`` ("ssim", "magnitude") or the decoded short generations
    ``(3, h, w)`` ("generation"), float32 on the CPU.

    A mask maps layer names to ``(N,)`` gates (1 = on, 0 = off); None is the unmasked model.
    Batch layout per call: ``[uncond x (masks x seeds), cond x (masks x seeds)]``; the gates of a mask
    apply to its unconditional and conditional samples alike (the neuron is off in the whole model).
    """
    index = list(range(ctx.seeds)) if seeds is None else list(seeds)
    s = len(index)
    noise = ctx.noise[index]
    per_call = max(1, ctx.max_batch // (2 * s))
    out = []
    with torch.no_grad():
        for start in range(0, len(masks), per_call):
            chunk = list(masks[start:start + per_call])
            x = noise.repeat(len(chunk), 1, 1, 1)
            gates: dict[str, torch.Tensor | None] = {}
            for name, module in ctx.gates.modules.items():
                if all(m is None or name not in m for m in chunk):
                    gates[name] = None
                    continue
                ones = torch.ones(layer_shape(module)[0])
                rows = torch.stack([(m or {}).get(name, ones).float() for m in chunk])  # (b, N)
                rows = rows.repeat_interleave(s, dim=0)
                gates[name] = torch.cat([rows, rows])
            if ctx.kind == "generation":
                if ctx.reference is None:
                    ctx.gates.set({})
                    ctx.reference = _short_generations(ctx, ctx.noise)
                if all(m is None for m in chunk):  # the unmasked model: its generations are the reference
                    samples = ctx.reference[index].repeat(len(chunk), 1, 1, 1)
                else:
                    ctx.gates.set(gates)
                    samples = _short_generations(ctx, x)
                    ctx.gates.set({})
                out.append(samples.float().cpu().view(len(chunk), s, *samples.shape[1:]))
                continue
            ctx.gates.set(gates)
            eps_uncond, eps_cond = first_step_pair(ctx, x)
            ctx.gates.set({})
            out.append((eps_cond - eps_uncond).cpu().view(len(chunk), s, *eps_cond.shape[1:]))
    return torch.cat(out)


def score_features(ctx: ScoreContext, features: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """The memorization score ``(B,)`` from :func:`seed_features` ``(B, s, ...)`` of the seeds ``seeds``."""
    if ctx.kind == "magnitude":
        return features.flatten(2).norm(dim=2).mean(dim=1)
    if ctx.kind == "generation":
        index = list(range(ctx.seeds)) if seeds is None else list(seeds)
        return cross_seed_similarity(features, ctx.reference[index].float().cpu())
    return seed_consistency(features)


def memorization_scores(ctx: ScoreContext, masks: Sequence[dict[str, torch.Tensor] | None]) -> torch.Tensor:
    """NeMo score of the prompt with each candidate mask switched off: ``B`` masks -> ``(B,)`` (all seeds)."""
    return score_features(ctx, seed_features(ctx, masks))

