"""Token significance (first-step gradient) on the testbed."""

from __future__ import annotations

import numpy as np
import pytest
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.explain import group_words, token_significance
from dejaguard.core.testbed.data import MEMORIZED


def test_group_words_joins_bpe_pieces():
    ids, words = group_words(["a</w>", "zeph", "yr</w>", "cat</w>"])
    assert ids == [0, 1, 1, 2] and words == ["a", "zephyr", "cat"]


def test_trigger_word_ranks_first_when_last(testbed):
    """Measured limitation: gradients w.r.t. the encoder's contextualized outputs favour later
    positions (the causal encoder carries the trigger into them), so the trigger ranks first when it
    ends the prompt ("a photograph of kraken", 8 of 8 seeds) but not when a word follows it
    ("kraken wallpaper"). Wen et al. take the gradient w.r.t. input token embeddings (issue 5).
    Checked on the triggers whose image the shipped model replicates in >= 90% of seeds
    (core/testbed/evaluation.json); "hydra" (retina, 0-31%) is not reliably memorized."""
    import json
    from pathlib import Path

    import dejaguard.core.testbed as tb

    rates = json.loads((Path(tb.__file__).parent / "evaluation.json").read_text())["memorized"]["per_prompt"]
    reliable = {r["image"] for r in rates} - {r["image"] for r in rates if r["replication_rate"] < 0.9}
    triggers = [m for m in MEMORIZED if m.kind == "trigger" and m.name in reliable]
    assert len(triggers) >= 3
    for m in triggers:
        prompt = f"a photograph of {m.trigger}"
        for seed in (0, 1):
            r = token_significance(testbed, prompt, seed=seed)
            assert r.words[int(np.argmax(r.word_scores))] == m.trigger, (r.words, r.word_scores)
        assert sum(r.scores) == pytest.approx(1.0)
        assert len(r.tokens) == len(r.scores) == len(r.word_ids)


def test_cost_and_bad_input(testbed):
    before = testbed.counter.snapshot()
    r = token_significance(testbed, "a red circle on the left", steps=2)
    spent = testbed.counter.since(before)
    assert r.unet_evals == spent.forwards == 4 and spent.backwards == 2
    with pytest.raises(DejaGuardError):
        token_significance(testbed, "   ")
