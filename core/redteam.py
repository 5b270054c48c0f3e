"""Red team: an adversarial search on the prompt embedding that tries to bring a mitigated memorization back.

Why: a mitigation that only cuts the path from one prompt to one memorized image (a NeMo neuron mask, a pruned
FFN subspace, an optimized embedding) may leave the image in the model, reachable from nearby conditionings.
Kowalczuk, Hintersdorf, Struppek et al. ("Finding Dori", arXiv 2507.16880) show on Stable Diffusion 1.4 that
small perturbations of the text embedding re-trigger replication after NeMo or Wanda pruning. This module is our
own search in that spirit; ``bench/redteam.py`` runs it against every mitigation the project offers.

Method (:func:`adversarial_embedding`): start from the prompt's conditioning ``c0`` ``(1, L, D)`` and optimize an
additive perturbation ``delta`` with Adam for ``steps`` steps (default 50), **maximizing** the first-step
text-conditional magnitude ``||eps(x_T, c0 + delta) - eps(x_T, "")||`` (mean over the ``N`` seeded noises the
generations will start from), under the budget ``||delta|| <= budget * ||c0||`` (Frobenius norms over the whole
``(L, D)`` conditioning; after every Adam step ``delta`` is projected back onto that ball). The returned
embedding is the iterate with the highest score (always within the budget).

Second objective, ``objective="evade"`` (for gated inference-time mitigations, :mod:`core.mitigate`): the
embedding mitigation only touches a conditioning whose first-step magnitude exceeds its threshold, and lowering
that magnitude does not by itself stop replication (measured in :mod:`core.mitigate`'s notes: pushed to the
non-memorized median, 79% of generations still replicated). So the attacker *minimizes* the magnitude (mean over
the noises) and stops at the first iterate whose magnitude on **every** noise is at or below ``level`` (the
mitigation's threshold): the smallest move that slips under the gate, keeping as much of the prompt as possible.
Returned: that iterate, or the one with the lowest score if none gets there. ``score_after`` is then the
largest per-noise magnitude (what the gate compares).

Why this objective: it is read from the one denoiser seam with the project's own guided step
(:func:`core.sampling.guided_step`), it is the quantity the detector and the embedding mitigation use (the
exact reverse of :func:`core.mitigate.mitigate_embedding`, which lowers it), it is high exactly where a prompt
pulls every seed towards one memorized image, and it needs **no training image**: the attacker has the model,
the prompt and the seeds, not the image they hope to extract, which makes the attack weaker than one that
regresses onto the image, so a recovery it achieves is a conservative figure. The search runs on whatever model
the caller hands it: inside :func:`core.neuron_mask.apply_mask` it attacks the masked model, so the gradient
flows through the masked UNet.

Step size: Adam moves each element by about ``lr`` per step, so ``lr = step_fraction * radius / sqrt(L D)``
moves ``delta`` by about ``step_fraction`` of the budget's radius per step (default 0.1: the boundary is reached
in about ten steps and the rest of the steps search along it); one setting serves every budget.

Counting: the unconditional prediction does not depend on the embedding and is computed once (in the first
batched call, the detector's); every iterate costs ``N`` conditional forwards with gradient, every step ``N``
backwards. Total for ``S`` steps: ``2 N + N (S + 1)`` forwards, ``N S`` backwards (``UNetCounter``; fewer when
``"evade"`` stops early).

Shapes: ``L`` text tokens, ``D`` text embedding width, ``N`` initial noises, ``C, H, W`` the sample shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .denoiser import Denoiser
from .errors import DejaGuardError, NonFiniteError
from .mitigate import detached_embeddings
from .progress import Progress, report
from .sampling import DEFAULT_STEPS, guided_step, new_schedule

DEFAULT_ATTACK_STEPS = 50
DEFAULT_STEP_FRACTION = 0.1
OBJECTIVES = ("maximize", "evade")
STAGE = "attack"  # the progress stage name of adversarial_embedding


@dataclass
class AttackResult:
    """What :func:`adversarial_embedding` found.

    ``embedding``: the best iterate ``(1, L, D)`` (the input tensor itself when ``budget`` or ``steps`` is 0);
    ``steps``: Adam steps taken (fewer than asked when ``"evade"`` got under its level); ``score_before`` /
    ``score_after``: the first-step magnitude (mean over the noises; ``"evade"``: the largest per-noise magnitude)
    of the input and of ``embedding``; ``scores``: every evaluated iterate's score (``scores[0]`` the input's);
    ``perturbation``: ``||embedding - c0|| / ||c0||`` (at most ``budget``); ``unet_forwards`` /
    ``unet_backwards``: noise predictions and back-propagated samples this search spent.
    """

    embedding: torch.Tensor
    budget: float
    steps: int
    score_before: float
    score_after: float
    perturbation: float
    scores: list[float] = field(default_factory=list)
    unet_forwards: int = 0
    unet_backwards: int = 0

    def summary(self) -> dict:
        """JSON-safe figures (no tensors)."""
        return {"budget": self.budget, "steps": self.steps, "score_before": self.score_before,
                "score_after": self.score_after, "perturbation": self.perturbation,
                "unet_forwards": self.unet_forwards, "unet_backwards": self.unet_backwards}


def adversarial_embedding(
    denoiser: Denoiser,
    cond: torch.Tensor,
    noise: torch.Tensor,
    budget: float,
    steps: int = DEFAULT_ATTACK_STEPS,
    step_fraction: float = DEFAULT_STEP_FRACTION,
    uncond: torch.Tensor | None = None,
    num_inference_steps: int = DEFAULT_STEPS,
    progress: Progress | None = None,
    objective: str = "maximize",
    level: float | None = None,
) -> AttackResult:
    """Search ``||delta|| <= budget * ||cond||`` maximizing the first-step magnitude of ``cond + delta`` on
    ``noise`` (see the module doc); ``objective="evade"``: minimizing it until every noise's magnitude is at or
    below ``level`` (required then).

    ``cond``: ``(1, L, D)``; ``noise``: ``(N, C, H, W)`` unscaled x_T (:func:`core.sampling.initial_noise`);
    ``uncond``: ``(1, L', D)`` (default: the empty prompt's). ``budget`` 0 or ``steps`` 0: no search, ``cond``
    itself returned (one batched call for its score). ``cond`` and ``noise`` are never modified; runs outside
    inference mode with grad enabled (also inside ComfyUI's graph execution). ``progress(i, steps, "attack")``
    after each iterate. Raises :class:`NonFiniteError` if a score or gradient becomes NaN or infinite.
    """
    if cond.dim() != 3 or cond.shape[0] != 1:
        raise DejaGuardError(f"expected one conditional embedding (1, L, D), got {tuple(cond.shape)}")
    if noise.dim() != 4 or noise.shape[0] < 1:
        raise DejaGuardError(f"expected initial noise (N, C, H, W), got {tuple(noise.shape)}")
    if not (budget >= 0) or not math.isfinite(budget):
        raise DejaGuardError(f"the perturbation budget must be a finite number >= 0, got {budget}")
    if steps < 0 or not (step_fraction > 0):
        raise DejaGuardError("steps must be >= 0 and step_fraction > 0")
    if objective not in OBJECTIVES:
        raise DejaGuardError(f"unknown attack objective {objective!r} (one of {', '.join(OBJECTIVES)})")
    evade = objective == "evade"
    if evade and (level is None or not math.isfinite(level)):
        raise DejaGuardError("the 'evade' objective needs the gate's level (a finite number)")
    n = noise.shape[0]
    before = denoiser.counter.snapshot()
    with torch.inference_mode(False):
        with torch.no_grad():
            c0, u = detached_embeddings(denoiser, cond, uncond, n)
            scheduler = new_schedule(denoiser, num_inference_steps)
            x = noise.detach().clone().to(denoiser.device, denoiser.dtype) * scheduler.init_noise_sigma
        t = scheduler.timesteps[0]
        first = guided_step(denoiser, scheduler, x, t, c0.expand(n, -1, -1), u, advance=False)  # the detector's
        score_before = _finite(float(first.magnitude.max() if evade else first.magnitude.mean()), 0)
        scores = [score_before]
        if budget == 0 or steps == 0 or (evade and score_before <= level):
            report(progress, steps, steps, STAGE)
            spent = denoiser.counter.since(before)
            return AttackResult(cond, float(budget), 0, score_before, score_before, 0.0, scores, spent.forwards,
                                spent.backwards)
        base = c0.float()
        radius = float(budget) * float(base.norm())
        delta = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=step_fraction * radius / math.sqrt(base.numel()))
        best, best_score = delta.detach().clone(), score_before
        for i in range(steps + 1):
            emb = (base + delta).to(denoiser.dtype)
            step = guided_step(denoiser, scheduler, x, t, emb.expand(n, -1, -1), u, cond_grad=True,
                               eps_uncond=first.eps_uncond, advance=False)
            mean = step.magnitude.mean()
            if i > 0:  # iterate 0 is the input, scored above
                score = _finite(float(step.magnitude.detach().max() if evade else mean.detach()), i)
                scores.append(score)
                if (score < best_score) if evade else (score > best_score):
                    best, best_score = delta.detach().clone(), score
                report(progress, i, steps, STAGE)
                if evade and score <= level:
                    break  # under the gate: the smallest move that gets there
            if i == steps:
                break  # the last iterate is only scored: no backward is counted for it
            opt.zero_grad(set_to_none=True)
            (mean if evade else -mean).backward()
            if not torch.isfinite(delta.grad).all():
                raise NonFiniteError("adversarial embedding search: the gradient became NaN or infinite at step "
                                     f"{i + 1}")
            opt.step()
            with torch.no_grad():
                norm = float(delta.norm())
                if norm > radius:
                    delta.mul_(radius / norm)
    spent = denoiser.counter.since(before)
    out = (base + best).to(cond.dtype).to(cond.device)
    if evade and best_score <= level:
        report(progress, steps, steps, STAGE)
    return AttackResult(out, float(budget), len(scores) - 1, score_before, best_score,
                        float(best.norm()) / max(float(base.norm()), 1e-12), scores, spent.forwards, spent.backwards)


def _finite(score: float, step: int) -> float:
    if not math.isfinite(score):
        raise NonFiniteError(f"adversarial embedding search: the score is NaN or infinite at step {step}")
    return score
