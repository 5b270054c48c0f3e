"""One static mask for many memorized prompts: a shared FFN subspace (Chavhan et al.), Wanda-style.

Implemented from the paper's description. Layers: the output projection ``ff.net.2`` of every
transformer block (down, mid and up). For a layer with weight ``W (out, in)`` and input ``X`` (the
feed-forward hidden activations, ``in`` channels), Wanda scores a weight by ``|W_ij| * ||X_j||``.
Here the input norms come from the first ``steps`` steps of guided sampling (the conditional branch,
over ``seeds`` initial noises and all spatial positions; root mean square, so that prompt sets of
different sizes compare):

- ``n_mem_j``: over the memorized prompts;
- ``n_neu_j``: over the neutral prompt(s) (default: the empty prompt).

The pruning score is the *difference* of the two Wanda scores, ``|W_ij| * (n_mem_j - n_neu_j)``:
weights that matter more for the memorized prompts than for a neutral one. (A ratio
``n_mem / n_neu`` would single out channels that are nearly silent on the neutral prompt however
small their contribution; the difference keeps Wanda's scale, where large contributions count.)
In each output row the ``ratio`` highest-scoring weights with a positive score are pruned (Wanda
compares weights within a row); the result is one :class:`~core.neuron_mask.NeuronMask` of weight
indices, applied like any mask (:func:`core.neuron_mask.apply_mask`, the ComfyUI Apply node).

Shapes: ``P`` prompts, ``S`` seeds, ``T`` tokens (spatial positions) of a block, ``in``/``out`` the
layer's input and output widths.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .denoiser import Denoiser
from .errors import DejaGuardError
from .neuron_mask import NeuronMask, layer_shape
from .progress import Progress, report, scaled
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, guided_denoise, initial_noise


def ffn_layers(denoiser: Denoiser) -> dict[str, torch.nn.Module]:
    """``ff.net.2`` of every transformer block, in model order."""
    layers = {name: m for name, m in denoiser.named_modules()
              if name.endswith("ff.net.2") and isinstance(getattr(m, "weight", None), torch.Tensor)}
    if not layers:
        raise DejaGuardError("this UNet has no transformer feed-forward layers (ff.net.2): subspace pruning "
                             "cannot run on it")
    return layers


@torch.no_grad()
def ffn_input_norms(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0, 1),
    steps: int = 5,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Root mean square of each input channel of every ``ff.net.2``: ``{layer: (in,)}`` float64 on the CPU.

    Over the conditional half of the first ``steps`` guided sampling steps of every (prompt, seed)
    pair. ``progress(done, total, "FFN activations")`` counts (prompt, seed) pairs.
    """
    if not prompts:
        raise DejaGuardError("no prompts given")
    layers = ffn_layers(denoiser)
    sums = {k: torch.zeros(layer_shape(m)[1], dtype=torch.float64) for k, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            cond = x[x.shape[0] // 2:].detach().double()  # guided_denoise stacks [uncond, cond]
            sums[name] += (cond**2).reshape(-1, cond.shape[-1]).sum(0).cpu()
            counts[name] += cond[..., 0].numel()
        return pre_hook

    jobs = [(p, s) for p in prompts for s in seeds]
    uncond = denoiser.encode_prompts([""])
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            noise = initial_noise(denoiser, [s for _, s in chunk])
            guided_denoise(denoiser, noise, denoiser.encode_prompts([p for p, _ in chunk]), uncond,
                           num_inference_steps, guidance_scale, stop_after=steps)
            report(progress, start + len(chunk), len(jobs), "FFN activations")
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / max(1, counts[k])).sqrt() for k in layers}


def subspace_mask(
    denoiser: Denoiser,
    memorized_prompts: Sequence[str],
    neutral_prompts: Sequence[str] = ("",),
    ratio: float = 0.01,
    seeds: Sequence[int] = (0, 1),
    steps: int = 5,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    progress: Progress | None = None,
) -> NeuronMask:
    """The shared-subspace pruning mask (see module doc): ``ratio`` of the weights of every output row
    of every ``ff.net.2``, chosen by ``|W_ij| * (n_mem_j - n_neu_j)``. ``mask.info`` records the UNet
    evaluations and the wall time. ``progress(done, total, "FFN activations")`` counts the (prompt, seed)
    pairs of the memorized and the neutral prompts together."""
    if not 0.0 < ratio < 1.0:
        raise DejaGuardError(f"the pruning ratio must lie in (0, 1), got {ratio}")
    if len(seeds) < 1 or not 1 <= steps <= num_inference_steps:
        raise DejaGuardError(f"the subspace needs at least one seed and 1..{num_inference_steps} steps, "
                             f"got {len(seeds)} seeds and {steps} steps")
    memorized_prompts = [p for p in memorized_prompts if p.strip()]
    if not memorized_prompts:
        raise DejaGuardError("no memorized prompts given")
    start_time = time.perf_counter()
    before = denoiser.counter.snapshot()
    total = (len(memorized_prompts) + len(neutral_prompts)) * len(seeds)
    offset = len(memorized_prompts) * len(seeds)
    stage = "FFN activations"
    kwargs: dict[str, Any] = {"seeds": seeds, "steps": steps, "num_inference_steps": num_inference_steps,
                              "guidance_scale": guidance_scale}
    mem = ffn_input_norms(denoiser, memorized_prompts, progress=scaled(progress, stage, 0, offset, total), **kwargs)
    neu = ffn_input_norms(denoiser, list(neutral_prompts), progress=scaled(progress, stage, offset, total, total),
                          **kwargs)
    layers = ffn_layers(denoiser)
    chosen: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        weight = module.weight.detach().double().cpu()
        score = weight.abs() * (mem[name] - neu[name])[None, :]  # (out, in)
        k = max(1, round(ratio * weight.shape[1]))
        values, cols = torch.topk(score, k, dim=1)
        rows = torch.arange(weight.shape[0])[:, None].expand_as(cols)
        keep = values > 0  # never prune a weight that matters less for memorized prompts than for neutral ones
        chosen[name] = torch.stack([rows[keep], cols[keep]], dim=1)
    spent = denoiser.counter.since(before)
    return NeuronMask(
        layers=chosen, layer_shapes={k: layer_shape(m) for k, m in layers.items()},
        fingerprint=denoiser.fingerprint(), method="subspace", prompts=list(memorized_prompts),
        settings={"ratio": ratio, "neutral_prompts": list(neutral_prompts), "seeds": list(seeds), "steps": steps,
                  "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                  "score": "|W_ij| * (rms_mem_j - rms_neutral_j), top ratio per output row, positive only"},
        info={"unet_evals": spent.forwards, "unet_calls": spent.calls,
              "wall_s": round(time.perf_counter() - start_time, 3), "weights": sum(len(v) for v in chosen.values())},
    )
