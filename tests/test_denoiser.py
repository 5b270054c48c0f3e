"""Loading models through the denoiser seam: folders, pipeline objects, pixel space, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dejaguard.core.denoiser import BUNDLED_TESTBED, DiffusersDenoiser, load_denoiser
from dejaguard.core.detect import first_step_scores
from dejaguard.core.errors import DejaGuardError


def _tiny_pixel_model(folder, with_cross_attention: bool = True):
    from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if with_cross_attention:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    else:
        unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                           down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    unet.save_pretrained(folder / "unet")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77)).save_pretrained(
        folder / "text_encoder")
    shutil.copytree(BUNDLED_TESTBED / "tokenizer", folder / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler")
    return folder


def test_bundled_testbed_is_a_latent_model(testbed):
    assert testbed.sample_shape == (4, 32, 32)
    assert testbed.vae is not None
    images = testbed.decode(torch.zeros(1, 4, 32, 32))
    assert images.shape == (1, 3, 256, 256)
    attn2 = [n for n, _ in testbed.named_modules() if n.endswith("attn2.to_v")]
    ff = [n for n, _ in testbed.named_modules() if n.endswith("ff.net.2")]
    assert any(n.startswith("down_blocks") for n in attn2) and any(n.startswith("mid_block") for n in attn2)
    assert any(n.startswith("up_blocks") for n in attn2) and len(ff) == len(attn2)


def test_folder_without_vae_is_pixel_space(tmp_path):
    d = DiffusersDenoiser.from_folder(_tiny_pixel_model(tmp_path / "pix"))
    assert d.vae is None and d.sample_shape == (3, 16, 16)
    x = torch.linspace(-2, 2, 3 * 16 * 16).reshape(1, 3, 16, 16)
    assert torch.equal(d.decode(x), x.clamp(-1, 1))
    r = first_step_scores(d, ["a red circle and a blue square", "a cat"])
    assert all(s.score > 0 for s in r)


def test_pipeline_object_gives_same_scores_as_folder(testbed, testbed_prompts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=testbed.vae, text_encoder=testbed.text_encoder, tokenizer=testbed.tokenizer, unet=testbed.unet,
        scheduler=testbed.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    from_pipe = DiffusersDenoiser.from_pipeline(pipe, device="cpu")
    prompts = testbed_prompts[0][:2]
    assert [r.score for r in first_step_scores(from_pipe, prompts)] == pytest.approx(
        [r.score for r in first_step_scores(testbed, prompts)], rel=1e-6)
    # diffusers itself runs the testbed end to end
    image = pipe(prompts[0], num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 256, 256, 3)


def test_missing_and_malformed_folders(tmp_path):
    with pytest.raises(DejaGuardError, match="not found"):
        load_denoiser(tmp_path / "nowhere")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(DejaGuardError, match="lacks text_encoder/, tokenizer/, scheduler/"):
        load_denoiser(tmp_path / "half")
    broken = _tiny_pixel_model(tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DejaGuardError, match="malformed model folder"):
        load_denoiser(broken)
    (broken / "unet" / "config.json").write_text("{")
    with pytest.raises(DejaGuardError, match="unknown model"):
        load_denoiser(broken)


def test_model_without_cross_attention_is_refused(tmp_path):
    folder = _tiny_pixel_model(tmp_path / "uncond", with_cross_attention=False)
    assert json.loads((folder / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    with pytest.raises(DejaGuardError, match="no cross-attention"):
        load_denoiser(folder)


def test_fingerprint_is_stable_and_weight_sensitive(tmp_path):
    d = DiffusersDenoiser.from_folder(_tiny_pixel_model(tmp_path / "fp"))
    before = d.fingerprint()
    d2 = DiffusersDenoiser.from_folder(tmp_path / "fp")
    assert d2.fingerprint() == before
    with torch.no_grad():
        next(d2.unet.parameters()).add_(1.0)
    d2._fingerprint = None
    assert d2.fingerprint() != before


def test_state_fingerprint_of_bundled_testbed_equals_its_calibration(testbed):
    """Calibrations and masks store fingerprints: the bundled calibration must still name the bundled UNet."""
    from dejaguard.core.denoiser import state_fingerprint

    stored = {e["fingerprint"] for e in json.loads((BUNDLED_TESTBED / "dejaguard_calibration.json").read_text())
              .values() if isinstance(e, dict) and "fingerprint" in e}
    assert stored == {testbed.fingerprint()} == {state_fingerprint(testbed.unet.state_dict())}
    shuffled = dict(reversed(list(testbed.unet.state_dict().items())))  # order of the mapping does not matter
    assert state_fingerprint(shuffled) == testbed.fingerprint()


def test_pickled_weights_refused_with_one_line(tmp_path):
    """Defect 6 of issue 23: a folder whose weights are only pickled .bin files is refused, never unpickled."""
    folder = _tiny_pixel_model(tmp_path / "pickled")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)  # diffusion_pytorch_model.bin
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(DejaGuardError, match=r"no \.safetensors weights \(found only pickled "
                                             r"diffusion_pytorch_model\.bin\)") as err:
        load_denoiser(folder)
    assert "\n" not in str(err.value)


def test_backwards_are_counted_when_a_gradient_flows(testbed):
    """UNetCounter counts a backward when a gradient reaches a prediction, not when a forward runs with grad on:
    a grad-enabled forward nobody back-propagates costs no backward (on main it counted one per sample)."""
    x = torch.randn(2, *testbed.sample_shape)
    cond = testbed.encode_prompts(["kraken wallpaper"]).expand(2, -1, -1).clone().requires_grad_(True)
    before = testbed.counter.snapshot()
    with torch.enable_grad():
        unused = testbed.predict_noise(x, 999, cond)
        assert unused.requires_grad
        spent = testbed.counter.since(before)
        assert (spent.calls, spent.forwards, spent.backwards) == (1, 2, 0)
        eps = testbed.predict_noise(x, 999, cond)
        (grad,) = torch.autograd.grad(eps[:1].square().sum(), cond)  # any gradient through the call counts it
    assert grad.abs().sum() > 0
    spent = testbed.counter.since(before)
    assert (spent.calls, spent.forwards, spent.backwards) == (2, 4, 2)
    with torch.no_grad():
        testbed.predict_noise(x, 999, cond)
    assert testbed.counter.since(before).backwards == 2
