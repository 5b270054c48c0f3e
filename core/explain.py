"""Which prompt tokens drive memorization: token significance (Wen et al., ICLR 2024).

Significance of token ``i`` = norm of the gradient of the text-conditional magnitude
``||eps(x_t, c) - eps(x_t, 0)||`` with respect to that token's conditioning embedding ``c_i``
(row ``i`` of the ``(77, D)`` text embedding), averaged over the first sampling steps. BOS, EOS
and padding positions are excluded. Pieces are grouped back into the prompt's words.

Known limitation: these rows are the causal text encoder's contextualized outputs, so later
positions also carry earlier tokens; on the testbed a trigger word ranks first when it ends the
prompt but not when another word follows it. Gradients w.r.t. the input token embeddings (as in
Wen et al.) avoid that and need the encoder in the Denoiser protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .errors import DejaGuardError, NonFiniteError
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, initial_noise, prompt_seed, text_conditional_magnitude


@dataclass
class TokenSignificance:
    """Per-token significance of one prompt.

    ``tokens[i]`` is the BPE piece at embedding position ``i + 1``; ``word_ids[i]`` the index of
    the word it belongs to in ``words``; ``scores[i]`` its significance, normalized to sum to 1;
    ``word_scores[w]`` the sum over the word's pieces.
    """

    prompt: str
    tokens: list[str]
    word_ids: list[int]
    words: list[str]
    scores: list[float]
    word_scores: list[float]
    magnitude: float
    unet_evals: int
    seed: int


def group_words(tokens: list[str]) -> tuple[list[int], list[str]]:
    """Word index of every BPE piece (a piece ending in ``</w>`` closes a word), and the words."""
    word_ids, words, current = [], [], ""
    for piece in tokens:
        word_ids.append(len(words))
        current += piece.removesuffix("</w>")
        if piece.endswith("</w>"):
            words.append(current)
            current = ""
    if current:
        words.append(current)
    return word_ids, words


def token_significance(
    denoiser: Denoiser,
    prompt: str,
    steps: int = 1,
    seed: int | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inference_steps: int = DEFAULT_STEPS,
) -> TokenSignificance:
    """Significance of each token of ``prompt`` (see module doc). Costs ``steps`` batched UNet
    calls forward (cond + uncond) and ``steps`` conditional backward passes."""
    if not prompt.strip():
        raise DejaGuardError("empty prompt: there are no tokens to explain")
    tokens = denoiser.prompt_tokens(prompt)
    if not tokens:
        raise DejaGuardError(f"prompt {prompt!r} has no tokens besides BOS/EOS")
    seed = prompt_seed(prompt) if seed is None else seed
    before = denoiser.counter.snapshot()
    with torch.no_grad():
        cond = denoiser.encode_prompts([prompt])
        uncond = denoiser.encode_prompts([""])
    scheduler = denoiser.new_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    x = initial_noise(denoiser, [seed]) * scheduler.init_noise_sigma
    grad_norms = torch.zeros(len(tokens), dtype=torch.float64)
    magnitude = 0.0
    for t in scheduler.timesteps[:steps]:
        model_in = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            eps_uncond = denoiser.predict_noise(model_in, t, uncond)
        with torch.enable_grad():
            c = cond.detach().clone().requires_grad_(True)
            eps_cond = denoiser.predict_noise(model_in, t, c)
            mag = text_conditional_magnitude(eps_cond, eps_uncond).sum()
            (grad,) = torch.autograd.grad(mag, c)
        if not torch.isfinite(grad).all():
            raise NonFiniteError("token gradients are NaN or infinite")
        grad_norms += grad[0, 1 : 1 + len(tokens)].norm(dim=-1).double().cpu()
        magnitude += float(mag.detach())
        with torch.no_grad():
            guided = eps_uncond + guidance_scale * (eps_cond.detach() - eps_uncond)
            x = scheduler.step(guided, t, x).prev_sample
    spent = denoiser.counter.since(before)
    total = float(grad_norms.sum())
    scores = (grad_norms / total).tolist() if total > 0 else [0.0] * len(tokens)
    word_ids, words = group_words(tokens)
    word_scores = [0.0] * len(words)
    for w, s in zip(word_ids, scores):
        word_scores[w] += s
    return TokenSignificance(prompt=prompt, tokens=tokens, word_ids=word_ids, words=words, scores=scores,
                             word_scores=word_scores, magnitude=magnitude / steps,
                             unet_evals=spent.forwards, seed=seed)
