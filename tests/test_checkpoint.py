"""core.checkpoint: single-file SD1.x / SD2.x / SDXL checkpoints, offline, with one-line refusals.

Fast tests use small hand-written safetensors files (only the keys family detection reads). The full-size
tests load random-weight SD1.5 (2.1 GB) and SD2.1-768-v (2.6 GB) files written by ComfyUI's own classes and
saver (``tests/checkpoint_fixtures.py``, cached in ``$DEJAGUARD_TEST_CACHE``), with every socket connection
refused, and compare with the same file loaded by ComfyUI (``tests/comfy/check_checkpoint.py``: what
CheckpointLoaderSimple calls, through DejaGuard's ComfyUI adapter): same family, same fingerprint, same
first-step scores to 1e-4 relative. The UNet runs at an 8x8 latent: a full-size UNet costs about 15 s a call
on two busy CPU cores even there.

The full-size SDXL file (6.9 GB, ``checkpoint_file("sdxl")``) is loaded once, alone (``test_full_size_sdxl``): family,
shapes, finite first-step scores, then ``dejaguard calibrate --checkpoint`` writing the calibration beside the file.
Run it by itself (``flock /tmp/bigmem.lock .venv/bin/python -m pytest -m slow -k sdxl tests/test_checkpoint.py``):
measured here under ``/usr/bin/time -v``, peak RSS 14.0 GiB (float32 models: UNet 2.57 G parameters, text encoders
0.82 G), 7 min in all on two busy cores (each load about 2.5 min; two prompts' first-step scores at an 8x8 latent
about 1.5 min). Checked once by hand against the same file loaded by ComfyUI (March 2024; SDXL conditioning from
its own CLIP ``encode_from_tokens(return_pooled=True)`` and ``encode_adm`` at an 8x8 latent, scored by
``first_step_scores``): scores equal to 1.2e-6 relative (5.893353 / 5.893348, 3.953747 / 3.953748).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dejaguard.core.checkpoint import (
    ATTN2_K,
    CONV_IN,
    FAMILIES,
    V_MARKER,
    XL_ADM,
    XL_ATTN2_K,
    detect_family,
    load_checkpoint,
    read_family,
)
from dejaguard.core.denoiser import DiffusersDenoiser
from dejaguard.core.detect import first_step_scores
from dejaguard.core.errors import DejaGuardError
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from checkpoint_fixtures import (  # noqa: E402
    COMFY_PYTHON,
    FIXTURE_VERSION,
    REPO,
    _is_current,
    builder_available,
    checkpoint_file,
)

PROMPTS = ["a photograph of an astronaut riding a horse", "an oil painting of a lighthouse at dusk"]
CLIP_L_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
VAE_KEY = "first_stage_model.decoder.conv_out.weight"


def _one_line_error(match: str, func, *args) -> str:
    with pytest.raises(DejaGuardError, match=match) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


def _small(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape, dtype=torch.float16) for k, shape in keys.items()}


def _sd_keys(width: int, text_key: str, in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    return {ATTN2_K: (320, width), CONV_IN: (320, in_channels, 3, 3), text_key: (49408, 1), VAE_KEY: (3, 128, 3, 3),
            V_MARKER: (320,)}


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails, and the Hugging Face libraries are told they are offline."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- refusals, before or instead of a load ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickled_files_refused_before_any_read(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    monkeypatch.setattr("dejaguard.core.checkpoint._open", lambda *_: pytest.fail("the file was opened"))
    message = _one_line_error("pickle", load_checkpoint, path)
    assert "runs code" in message
    _one_line_error("pickle", load_checkpoint, tmp_path / f"absent{suffix}")  # refused by name, not looked at


def test_missing_file(tmp_path):
    _one_line_error("not found", load_checkpoint, tmp_path / "absent.safetensors")


def test_pickle_under_a_safetensors_name(tmp_path):
    path = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.zeros(1)}, path)
    _one_line_error("pickled PyTorch file despite its name", load_checkpoint, path)


def test_random_bytes_are_not_safetensors(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    _one_line_error("is not a safetensors file", load_checkpoint, path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(_small(_sd_keys(768, CLIP_L_KEY)), str(path))
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[: 8 + header + 1000])  # header intact, tensors cut short
    message = _one_line_error("is truncated", load_checkpoint, path)
    assert f"{8 + header + 1000} bytes" in message


@pytest.mark.parametrize(("keys", "match"), [
    ({"conditioner.embedders.0.model.token_embedding.weight": (49408, 1)}, "SDXL refiner"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (1, 1),
      "text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.weight": (1, 1)}, "SD3"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (1, 1),
      "model.diffusion_model.guidance_in.in_layer.weight": (1, 1)}, "Flux"),
])
def test_other_families_refused_by_name(tmp_path, keys, match):
    """An SDXL-refiner-shaped (SD3-, Flux-shaped) key set, written as a small safetensors file with only the keys
    detection reads: a one-line refusal naming the family and why it is not loaded."""
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in keys.items()}, str(path))
    message = _one_line_error(match, load_checkpoint, path)
    assert "because" in message


def test_unknown_files_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.zeros(1)}, str(path))
    _one_line_error("unknown model family", load_checkpoint, path)
    mixed = _sd_keys(768, OPEN_CLIP_KEY)  # SD1 UNet with an SD2 text encoder
    _one_line_error("unknown model family: 768-wide cross-attention with OpenCLIP", detect_family, mixed)


def test_family_detection_by_keys_and_shapes():
    assert detect_family(_sd_keys(768, CLIP_L_KEY)).name == "sd1"
    flat = torch.zeros(320)
    spread = torch.randn(320, generator=torch.Generator().manual_seed(0)) * 0.2
    assert detect_family(_sd_keys(1024, OPEN_CLIP_KEY), flat).name == "sd2"
    sd2_v = detect_family(_sd_keys(1024, OPEN_CLIP_KEY), spread)
    assert (sd2_v.name, sd2_v.v_prediction, sd2_v.sample_size) == ("sd2-v", True, 96)
    assert detect_family(_sd_keys(1024, OPEN_CLIP_KEY), torch.full((320,), 0.05) * torch.tensor([1.0, -1.0] * 160)
                         ).name == "sd2"  # std 0.05: at most 0.09 is epsilon, as in ComfyUI
    _one_line_error("inpainting", detect_family, _sd_keys(768, CLIP_L_KEY, in_channels=9))
    no_vae = {k: v for k, v in _sd_keys(768, CLIP_L_KEY).items() if k != VAE_KEY}
    _one_line_error("no VAE", detect_family, no_vae)


def _sdxl_keys(width: int = 2048, adm: int = 2816, in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    return {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 1),
            "conditioner.embedders.1.model.token_embedding.weight": (49408, 1), XL_ATTN2_K: (640, width),
            XL_ADM: (1280, adm), CONV_IN: (320, in_channels, 3, 3), VAE_KEY: (3, 128, 3, 3)}


def test_sdxl_detected_by_keys_and_shapes(tmp_path):
    """SDXL base (and fine-tunes, same keys): both encoders, 2048-wide cross-attention, 2816-wide added embedding.
    Half an SDXL file, an SDXL inpainting model or an unknown variant is a one-line refusal."""
    family = detect_family(_sdxl_keys())
    assert family is FAMILIES["sdxl"] and family.two_encoders and family.sample_size == 128
    path = tmp_path / "sdxl.safetensors"
    save_file(_small(_sdxl_keys()), str(path))
    assert read_family(path).name == "sdxl"
    no_clip_g = {k: v for k, v in _sdxl_keys().items() if not k.startswith("conditioner.embedders.1.")}
    _one_line_error("SDXL checkpoint without its OpenCLIP-G text encoder", detect_family, no_clip_g)
    _one_line_error("inpainting", detect_family, _sdxl_keys(in_channels=9))
    _one_line_error("unknown SDXL-like model: cross-attention width 1280", detect_family, _sdxl_keys(width=1280))
    _one_line_error("no VAE", detect_family, {k: v for k, v in _sdxl_keys().items() if k != VAE_KEY})


def test_read_family_of_a_small_file(tmp_path):
    path = tmp_path / "sd2v.safetensors"
    tensors = _small(_sd_keys(1024, OPEN_CLIP_KEY))
    tensors[V_MARKER] = (torch.randn(320, generator=torch.Generator().manual_seed(1)) * 0.2).half()
    save_file(tensors, str(path))
    assert read_family(path).name == "sd2-v"


def test_v_prediction_returns_epsilon(testbed):
    """A v-prediction DiffusersDenoiser: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, v the UNet's raw output;
    its schedulers step with eps."""
    den = DiffusersDenoiser(testbed.unet, testbed.text_encoder, testbed.tokenizer, testbed.scheduler,
                            vae=testbed.vae, device="cpu", prediction_type="v_prediction")
    assert den.new_scheduler().config.prediction_type == "epsilon"
    x = torch.randn(2, *testbed.sample_shape, generator=torch.Generator().manual_seed(0))
    emb = testbed.encode_prompts(["a red circle", ""])
    with torch.no_grad():
        for t in (999, 500):
            v = testbed.predict_noise(x, t, emb)
            abar = float(testbed.scheduler.alphas_cumprod[t])
            expected = math.sqrt(abar) * v + math.sqrt(1.0 - abar) * x
            torch.testing.assert_close(den.predict_noise(x, t, emb), expected, rtol=1e-5, atol=1e-6)
    assert den.counter.calls == 2


# -- full-size random-weight files ------------------------------------------------------------------------

needs_builder = pytest.mark.skipif(not builder_available(),
                                   reason="ComfyUI not set up (tests/comfy/setup_comfy.sh): it writes the fixtures")


def test_fixture_cache_rebuilds_stale_files(tmp_path):
    """A cached fixture counts only with the current FIXTURE_VERSION in its metadata (and a readable file)."""
    for version, current in ((FIXTURE_VERSION, True), ("0", False)):
        path = tmp_path / f"v{version}.safetensors"
        save_file({"w": torch.zeros(1)}, str(path), metadata={"dejaguard_fixture": version})
        assert _is_current(path) is current
    path.write_bytes(path.read_bytes()[:-2])
    assert not _is_current(path)


@functools.cache
def _in_comfy(path: Path) -> dict:
    """tests/comfy/check_checkpoint.py on ``path``: the file as CheckpointLoaderSimple loads it (once per session)."""
    proc = subprocess.run([str(COMFY_PYTHON), str(REPO / "tests" / "comfy" / "check_checkpoint.py"), str(path),
                           *PROMPTS], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_builder
@pytest.mark.parametrize(("fixture", "family", "comfy_type", "shape"), [
    ("sd15", "sd1", "EPS", (4, 64, 64)),
    ("sd21_768_v", "sd2-v", "V_PREDICTION", (4, 96, 96)),
    ("sdxl", "sdxl", "EPS", (4, 128, 128)),
])
def test_full_size_checkpoint_as_in_comfy(no_network, fixture, family, comfy_type, shape):
    path = checkpoint_file(fixture)
    comfy = _in_comfy(path)  # first, in its own process: the two loads are not held at once
    assert comfy["model_type"] == comfy_type

    den = load_checkpoint(path, device="cpu")
    assert isinstance(den, DiffusersDenoiser) and den.family == family
    assert den.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert den.sample_shape == shape
    if family == "sdxl":  # two encoders: CLIP-L + OpenCLIP-G hidden states, the pooled row packed last
        assert den.pooled_width == 1280 and den.encode_prompts(PROMPTS[:1]).shape == (1, 78, 2048)
    assert den.fingerprint() == comfy["fingerprint"]  # a calibration made with the CLI is found in a graph
    den.sample_shape = (4, 8, 8)
    scores = [s.score for s in first_step_scores(den, PROMPTS, seed=0)]
    assert all(math.isfinite(s) and s > 0 for s in scores) and scores[0] != scores[1]
    for ours, theirs in zip(scores, comfy["scores"]):
        assert abs(ours - theirs) <= 1e-4 * abs(theirs), (scores, comfy["scores"])
    del den
    gc.collect()


@pytest.mark.slow
@needs_builder
def test_full_size_sdxl_cli_calibration_found_in_comfy(no_network, tmp_path, monkeypatch):
    """`dejaguard calibrate --checkpoint` on the full-size random SDXL file (one model held at a time; the family's
    latent shrunk to 8x8, three prompts at target FPR 0.5) writes my-sdxl.dejaguard_calibration.json beside the
    file the user named, under the fingerprint ComfyUI's adapter computes for the same file: a calibration made
    with the CLI is found in a graph."""
    from dataclasses import replace

    from dejaguard.core.calibration import read_calibrations
    from dejaguard.core.cli import main

    path = checkpoint_file("sdxl")
    fingerprint = _in_comfy(path)["fingerprint"]  # cached from test_full_size_checkpoint_as_in_comfy[sdxl]
    link = tmp_path / "my-sdxl.safetensors"  # the sidecar goes beside the file the user named
    link.symlink_to(path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a watercolor of a fox\na bowl of ramen, studio photo\na castle on a hill at dawn\n")
    monkeypatch.setitem(FAMILIES, "sdxl", replace(FAMILIES["sdxl"], sample_size=8))
    assert main(["calibrate", "--checkpoint", str(link), "--prompts", str(prompts), "--target-fpr", "0.5",
                 "--device", "cpu"]) == 0
    sidecar = tmp_path / "my-sdxl.dejaguard_calibration.json"
    (entry,) = read_calibrations(sidecar).values()
    assert entry["fingerprint"] == fingerprint and entry["n_prompts"] == 3 and math.isfinite(entry["threshold"])
    gc.collect()
