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


def test_trigger_word_ranks_first(testbed):
    for m in [m for m in MEMORIZED if m.kind == "trigger"]:
        r = token_significance(testbed, m.eval_prompts[0])
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
