"""Which prompt tokens drive memorization: token significance (Wen et al., ICLR 2024).

Significance of token ``i`` = norm of the gradient of the text-conditional magnitude
``||eps(x_t, c) - eps(x_t, 0)||`` with respect to that token's *input* embedding ``e_i`` (its row
of the text encoder's token-embedding table, before position embeddings), averaged over the first
sampling steps. BOS, EOS and padding positions are excluded. Pieces are grouped back into the
prompt's words.

Why input embeddings: the conditioning rows ``c_i`` the UNet sees are the causal text encoder's
contextualized outputs, so later rows also carry earlier tokens. Gradients w.r.t. them (``wrt=
"conditioning"``, kept for comparison) favour the last words: on the first testbed model the
trigger word ranked first in 8 of 8 seeds for "a photograph of kraken" and in 0 of 8 for
"kraken wallpaper". The gradient w.r.t. ``e_i`` collects every path by which token ``i`` reaches
the conditioning, as in Wen et al.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .errors import DejaGuardError, NonFiniteError
from .progress import Progress, report
from .sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    EMPTY_PROMPT,
    guided_step,
    initial_noise,
    new_schedule,
    prompt_seed,
    unconditional_embedding,
)

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


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
    unet_evals: int  # noise predictions spent (UNetCounter.forwards)
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


def content_tokens(denoiser: Denoiser, prompt: str) -> list[str]:
    """The prompt's BPE pieces; a clear error when there are none besides special tokens."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DejaGuardError("empty prompt: nothing to mitigate or explain (the unconditional prediction is "
                             "the empty prompt itself)")
    tokens = denoiser.prompt_tokens(prompt)
    if not [t for t in tokens if t.removesuffix("</w>") not in SPECIAL_TOKENS]:
        raise DejaGuardError(f"prompt {prompt!r} has no tokens besides the special BOS/EOS tokens")
    return tokens


def token_significance(
    denoiser: Denoiser,
    prompt: str,
    steps: int = 1,
    seed: int | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inference_steps: int = DEFAULT_STEPS,
    wrt: str = "input",
    progress: Progress | None = None,
    unconditional: str = EMPTY_PROMPT,
) -> TokenSignificance:
    """Significance of each token of ``prompt`` (see module doc).

    ``wrt="input"`` (default): gradients w.r.t. the input token embeddings ``(1, L, E)``;
    ``"conditioning"``: w.r.t. the text encoder's output rows ``(1, L, D)`` (positionally biased).
    Follows the guided DDIM trajectory of ``seed`` (default: derived from the prompt) for ``steps``
    steps, each one :func:`core.sampling.guided_step` with ``cond_grad``: per step **two** UNet calls, the
    unconditional prediction without gradient and the conditional one with gradient (not one batched call:
    batched, the unconditional half would sit in the autograd graph and be back-propagated for a zero
    gradient). Cost: ``2 steps`` noise predictions (``unet_evals``) in ``2 steps`` calls, ``steps``
    conditional backward passes, plus one text-encoder forward and ``steps`` cheap text-encoder backwards.
    ``progress(done, steps, "explain")`` after every step. ``unconditional``: what the unconditional prediction is
    conditioned on (:func:`core.sampling.unconditional_embedding`; ``"zeros"`` as the WebUIs condition SDXL).
    """
    if wrt not in ("input", "conditioning"):
        raise DejaGuardError(f"wrt must be 'input' or 'conditioning', not {wrt!r}")
    tokens = content_tokens(denoiser, prompt)
    if steps < 1 or steps > num_inference_steps:
        raise DejaGuardError(f"steps must lie in 1..{num_inference_steps}, got {steps}")
    seed = prompt_seed(prompt) if seed is None else seed
    before = denoiser.counter.snapshot()
    with torch.no_grad():
        uncond = unconditional_embedding(denoiser, unconditional)
    with torch.enable_grad():
        if wrt == "input":
            # One text-encoder forward with a graph; each step back-propagates through it.
            leaf = denoiser.token_embeddings([prompt]).detach().clone().requires_grad_(True)
            cond = denoiser.encode_token_embeddings([prompt], leaf)
        else:
            cond = denoiser.encode_prompts([prompt]).detach().clone().requires_grad_(True)
            leaf = cond
    scheduler = new_schedule(denoiser, num_inference_steps)
    x = initial_noise(denoiser, [seed]) * scheduler.init_noise_sigma
    grad_norms = torch.zeros(len(tokens), dtype=torch.float64)
    magnitude = 0.0
    for i, t in enumerate(scheduler.timesteps[:steps]):
        c = cond.detach().clone().requires_grad_(True)
        step = guided_step(denoiser, scheduler, x, t, c, uncond, guidance_scale, cond_grad=True)
        with torch.enable_grad():
            mag = step.magnitude.sum()
            (grad,) = torch.autograd.grad(mag, c)
            if leaf is not cond:
                (grad,) = torch.autograd.grad(cond, leaf, grad_outputs=grad, retain_graph=True)
        if not torch.isfinite(grad).all():
            raise NonFiniteError("token gradients are NaN or infinite")
        grad_norms += grad[0, 1 : 1 + len(tokens)].norm(dim=-1).double().cpu()
        magnitude += float(mag.detach())
        x = step.sample
        report(progress, i + 1, steps, "explain")
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


def ranking_text(result: TokenSignificance, steps: int, width: int = 40) -> str:
    """A plain-text ranking of the words, most significant first (one line each, with a bar)."""
    lines = [f"DejaGuard token significance: {result.prompt!r}",
             f"first {steps} step(s), seed {result.seed}, text-conditional magnitude {result.magnitude:.4f}, "
             f"{result.unet_evals} UNet evaluations"]
    order = sorted(range(len(result.words)), key=lambda w: -result.word_scores[w])
    name_width = max(len(w) for w in result.words)
    for rank, w in enumerate(order, 1):
        score = result.word_scores[w]
        pieces = [result.tokens[i] for i, wid in enumerate(result.word_ids) if wid == w]
        split = f"  ({' + '.join(p.removesuffix('</w>') for p in pieces)})" if len(pieces) > 1 else ""
        lines.append(f"{rank:2d}. {result.words[w]:<{name_width}}  {100 * score:5.1f}%  "
                     f"{'#' * round(width * score)}{split}")
    return "\n".join(lines)


def to_json(result: TokenSignificance, steps: int) -> dict:
    """JSON-safe payload (lists parallel to ``tokens`` and to ``words``)."""
    return {"prompt": result.prompt, "tokens": result.tokens, "word_ids": result.word_ids, "scores": result.scores,
            "words": result.words, "word_scores": result.word_scores, "magnitude": result.magnitude,
            "steps": steps, "seed": result.seed, "unet_evals": result.unet_evals}
