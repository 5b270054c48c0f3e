"""Shared fixtures: the bundled testbed, loaded once per session on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(2)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def testbed():
    from dejaguard.core.denoiser import load_denoiser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_denoiser(device="cpu")


@pytest.fixture(scope="session")
def testbed_prompts():
    """(memorized, novel): one prompt per planted image, and 24 held-out compositional prompts."""
    from dejaguard.core.testbed.data import MEMORIZED, heldout_specs

    return [m.eval_prompts[0] for m in MEMORIZED], [s.caption() for s in heldout_specs()[:24]]
