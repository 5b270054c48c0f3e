"""Token significance (gradient w.r.t. input token embeddings) on the testbed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dejaguard.core.cli import main
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.explain import group_words, ranking_text, token_significance
from dejaguard.core.testbed.data import MEMORIZED

TRIGGERS = [m for m in MEMORIZED if m.kind == "trigger"]


def test_group_words_joins_bpe_pieces():
    ids, words = group_words(["a</w>", "zeph", "yr</w>", "cat</w>"])
    assert ids == [0, 1, 1, 2] and words == ["a", "zephyr", "cat"]


def test_token_embeddings_reproduce_the_conditioning(testbed):
    """encode_token_embeddings(token_embeddings(p)) is encode_prompts(p), and gradients reach every token."""
    prompts = ["kraken wallpaper", "a red circle and a blue square"]
    embeds = testbed.token_embeddings(prompts)
    assert embeds.shape[:2] == (2, 77) and not embeds.requires_grad
    assert torch.equal(testbed.encode_token_embeddings(prompts, embeds), testbed.encode_prompts(prompts))
    leaf = embeds[:1].clone().requires_grad_(True)
    testbed.encode_token_embeddings(prompts[:1], leaf)[0, -1].sum().backward()  # the last row sees all tokens
    assert bool((leaf.grad[0, :4].norm(dim=-1) > 0).all())
    with pytest.raises(DejaGuardError):
        testbed.encode_token_embeddings(prompts, embeds[:1])


def test_trigger_word_ranks_first_wherever_it_stands(testbed):
    """The property gradients w.r.t. the encoder's output rows lacked (they favour later positions): the trigger
    ranks first also when other words follow it. Wrong here means the testbed or the method regressed."""
    for m in TRIGGERS:
        for prompt in (f"{m.trigger} wallpaper", f"{m.trigger} desktop background", f"a photograph of {m.trigger}"):
            r = token_significance(testbed, prompt, seed=0)
            assert r.words[int(np.argmax(r.word_scores))] == m.trigger, (prompt, r.words, r.word_scores)
            assert sum(r.scores) == pytest.approx(1.0)
            assert len(r.tokens) == len(r.scores) == len(r.word_ids)


def test_conditioning_mode_kept_for_comparison(testbed):
    a = token_significance(testbed, "kraken wallpaper", seed=1, wrt="conditioning")
    b = token_significance(testbed, "kraken wallpaper", seed=1)
    assert a.words == b.words and a.magnitude == pytest.approx(b.magnitude, rel=1e-5)
    assert a.scores != b.scores
    with pytest.raises(DejaGuardError):
        token_significance(testbed, "kraken wallpaper", wrt="output")


def test_cost_and_bad_input(testbed):
    before = testbed.counter.snapshot()
    r = token_significance(testbed, "a red circle and a blue square", steps=2)
    spent = testbed.counter.since(before)
    assert r.unet_evals == spent.forwards == 4 and spent.backwards == 2
    assert "UNet evaluations" in ranking_text(r, 2)
    for prompt in ("   ", "", "<|endoftext|>"):
        with pytest.raises(DejaGuardError, match="empty prompt|special"):
            token_significance(testbed, prompt)
    with pytest.raises(DejaGuardError):
        token_significance(testbed, "a red circle", steps=0)


def test_cli_explain(capsys):
    assert main(["explain", "--prompt", "kraken wallpaper", "--json", "--device", "cpu"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["words"] == ["kraken", "wallpaper"] and len(payload["scores"]) == len(payload["tokens"])
    assert payload["word_ids"] == [0, 1] and payload["unet_evals"] == 2
    assert main(["explain", "--prompt", "chelsea the tabby cat", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("%") == 4 and "#" in text
    assert main(["explain", "--prompt", "  ", "--device", "cpu"]) == 2
