"""SDXL in the library: two text encoders and pooled conditioning through the one Denoiser seam.

A reduced-width SDXL-type diffusers model is built here (a ``UNet2DConditionModel`` with
``addition_embed_type="text_time"``, a small CLIP-L-like ``CLIPTextModel`` and a small OpenCLIP-G-like
``CLIPTextModelWithProjection``, the real SD1 BPE tokenizer twice, the second padding with ``"!"``, a tiny VAE with
SD's 8x downsampling), so every denoiser path runs in seconds: packing, the equality of
``encode_token_embeddings(token_embeddings(p))`` and ``encode_prompts(p)``, what the UNet receives, token
significance with gradients through both encoders, embedding mitigation, first-step scores, folders and pipeline
objects. The full-size SDXL file is tested in ``tests/test_checkpoint.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from dejaguard.core.checkpoint import CONFIGS, SD1_TOKENIZER
from dejaguard.core.conditioning import unpack_pooled
from dejaguard.core.denoiser import DiffusersDenoiser
from dejaguard.core.detect import first_step_scores
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.explain import token_significance
from dejaguard.core.mitigate import mitigate_prompt

L_WIDTH, G_WIDTH, POOLED = 32, 48, 40  # CLIP-L-like, OpenCLIP-G-like, projection (SDXL: 768, 1280, 1280)
TIME_DIM = 8  # SDXL: 256
PROMPT = "a photograph of an astronaut riding a horse"


def _parts(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, cross_attention_dim=L_WIDTH + G_WIDTH, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
    with torch.no_grad():  # diffusers zero-initialises the output conv: cond and uncond would predict alike
        unet.conv_out.weight.normal_(0, 0.2)
    small = {"vocab_size": 49408, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=L_WIDTH, hidden_act="quick_gelu", pad_token_id=49407, **small))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=G_WIDTH, projection_dim=POOLED, hidden_act="gelu",
                                                        pad_token_id=0, **small))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.13025)
    scheduler = DDIMScheduler.from_pretrained(CONFIGS / "scheduler")
    return {"unet": unet, "text_encoder": clip_l, "tokenizer": CLIPTokenizer.from_pretrained(SD1_TOKENIZER),
            "scheduler": scheduler, "vae": vae, "text_encoder_2": clip_g,
            "tokenizer_2": CLIPTokenizer.from_pretrained(SD1_TOKENIZER, pad_token="!")}


@pytest.fixture(scope="module")
def sdxl() -> DiffusersDenoiser:
    return DiffusersDenoiser(**_parts(), device="cpu")


def test_conditioning_is_sdxl_s_packed(sdxl):
    """Penultimate hidden states of both encoders side by side, CLIP-G's pooled projection as the last row; the
    empty prompt is encoded (diffusers' force_zeros_for_empty_prompt is not applied), as ComfyUI encodes it."""
    cond = sdxl.encode_prompts([PROMPT, ""])
    assert sdxl.pooled_width == POOLED and cond.shape == (2, 78, L_WIDTH + G_WIDTH)
    hidden, pooled = unpack_pooled(cond, POOLED)
    ids_l = sdxl.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_g = sdxl.tokenizer_2([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids_l[1, -1] == 49407 and ids_g[1, -1] == 0  # CLIP-L pads with the end token, CLIP-G with "!"
    with torch.no_grad():
        out_g = sdxl.text_encoder_2(ids_g, output_hidden_states=True)
        expected = torch.cat([sdxl.text_encoder(ids_l, output_hidden_states=True).hidden_states[-2],
                              out_g.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    torch.testing.assert_close(pooled, out_g.text_embeds, rtol=0, atol=0)
    assert torch.equal(cond[:, -1, POOLED:], torch.zeros(2, L_WIDTH + G_WIDTH - POOLED))
    assert pooled[1].abs().sum() > 0 and hidden[1].abs().sum() > 0  # "" encoded, not zeroed


def test_token_embeddings_reencode_to_the_prompt_embeddings(sdxl):
    rows = sdxl.token_embeddings([PROMPT, "kraken wallpaper"])
    assert rows.shape == (2, 77, L_WIDTH + G_WIDTH)
    torch.testing.assert_close(rows[..., :L_WIDTH], sdxl.text_encoder.get_input_embeddings()(sdxl.tokenize(
        [PROMPT, "kraken wallpaper"])))
    torch.testing.assert_close(sdxl.encode_token_embeddings([PROMPT, "kraken wallpaper"], rows),
                               sdxl.encode_prompts([PROMPT, "kraken wallpaper"]), rtol=0, atol=0)
    with pytest.raises(DejaGuardError, match="width 80"):
        sdxl.encode_token_embeddings([PROMPT], rows[:1, :, :L_WIDTH])


def test_predict_noise_unpacks_pooled_and_size_conditioning(sdxl):
    """The UNet gets the hidden rows as context and, as added conditioning, the pooled row and time_ids
    [8H, 8W, 0, 0, 8H, 8W] (ComfyUI's default for an H x W latent)."""
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    cond = sdxl.encode_prompts([PROMPT, ""])
    hidden, pooled = unpack_pooled(cond, POOLED)
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 2)
    with torch.no_grad():
        direct = sdxl.unet(x, 999, encoder_hidden_states=hidden,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        eps = sdxl.predict_noise(x, 999, cond)
        torch.testing.assert_close(eps, direct, rtol=0, atol=0)
        other_pooled = cond.clone()
        other_pooled[:, -1, :POOLED] += 1.0
        assert not torch.allclose(sdxl.predict_noise(x, 999, other_pooled), eps)  # the pooled row is used
    with pytest.raises(DejaGuardError, match="does not carry a pooled vector"):
        sdxl.predict_noise(x, 999, torch.zeros(2, 77, 2))


def test_gradient_reaches_both_encoders_and_explain_names_words(sdxl):
    leaf = sdxl.token_embeddings([PROMPT]).clone().requires_grad_(True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        eps = sdxl.predict_noise(x, 999, sdxl.encode_token_embeddings([PROMPT], leaf))
        (grad,) = torch.autograd.grad(eps.square().sum(), leaf)
    n = len(sdxl.prompt_tokens(PROMPT))
    assert (grad[0, 1:1 + n, :L_WIDTH].norm(dim=-1) > 0).all()  # through CLIP-L's hidden states
    assert (grad[0, 1:1 + n, L_WIDTH:].norm(dim=-1) > 0).all()  # through CLIP-G's hidden states and pooled output
    sig = token_significance(sdxl, PROMPT, seed=0)
    assert sig.words == PROMPT.split() and len(sig.word_scores) == len(sig.words)
    assert math.isclose(sum(sig.scores), 1.0, rel_tol=1e-6) and all(s > 0 for s in sig.word_scores)
    assert sig.unet_evals == 2


def test_mitigation_lowers_the_magnitude_and_steers_the_pooled_row(sdxl):
    before = sdxl.encode_prompts([PROMPT])
    first = first_step_scores(sdxl, [PROMPT], seed=0)[0].score
    result = mitigate_prompt(sdxl, PROMPT, seeds=[0], target=0.5 * first, max_iterations=10, lr=0.05)
    assert result.iterations > 0 and result.score_after < result.score_before
    assert result.score_before == pytest.approx(first, rel=1e-5)
    assert result.embedding.shape == before.shape
    assert not torch.equal(result.embedding[0, -1, :POOLED], before[0, -1, :POOLED])
    assert torch.equal(result.embedding[0, -1, POOLED:], before[0, -1, POOLED:])  # padding never moves


def test_first_step_scores(sdxl):
    results = first_step_scores(sdxl, [PROMPT, "kraken wallpaper"], seed=0)
    scores = [r.score for r in results]
    assert all(math.isfinite(s) and s > 0 for s in scores) and scores[0] != scores[1]
    assert sdxl.image_shape == (3, 64, 64)


def test_folder_and_pipeline_object_give_the_same_scores(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    parts = _parts()
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(tmp_path / "sdxl", safe_serialization=True)
    expected = [r.score for r in first_step_scores(sdxl, [PROMPT], seed=3)]
    for den in (DiffusersDenoiser.from_pipeline(pipe, device="cpu"), DiffusersDenoiser.from_folder(tmp_path / "sdxl")):
        assert den.pooled_width == POOLED and den.tokenizer_2.pad_token == "!"
        assert [r.score for r in first_step_scores(den, [PROMPT], seed=3)] == pytest.approx(expected, rel=1e-6)


def test_mismatched_parts_are_one_line_errors():
    parts = _parts()
    with pytest.raises(DejaGuardError, match="needs its second text encoder"):
        DiffusersDenoiser(**{**parts, "text_encoder_2": None})
    clip_l = parts["text_encoder"]
    with pytest.raises(DejaGuardError, match="do not fit the UNet"):
        DiffusersDenoiser(**{**parts, "text_encoder_2": clip_l.__class__(clip_l.config)})  # no projection_dim 40


def test_cli_on_an_sdxl_folder(tmp_path, capsys):
    """The commands a user runs on SDXL, on a reduced SDXL diffusers folder: calibrate, audit (finding that
    calibration), explain (words of both encoders), generate with embedding mitigation, subspace (FFN masks);
    localize (NeMo) refuses with one line, since its statistics would read the pooled row as a token."""
    import json

    from dejaguard.core.cli import main
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "sdxl"
    StableDiffusionXLPipeline(**_parts()).save_pretrained(folder, safe_serialization=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a watercolor of a fox\na bowl of ramen\na castle on a hill\na red bicycle\n")
    model = ["--model", str(folder), "--device", "cpu"]
    assert main(["calibrate", *model, "--prompts", str(prompts), "--target-fpr", "0.5"]) == 0
    assert (folder / "dejaguard_calibration.json").is_file()
    assert main(["audit", *model, "--prompts", str(prompts), "--out", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and sum(r["flagged"] for r in rows) <= 2
    capsys.readouterr()
    assert main(["explain", *model, "--prompt", PROMPT, "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert PROMPT.split()[-1] in json.dumps(explained)
    assert main(["generate", *model, "--prompt", PROMPT, "--out", str(tmp_path / "x.png"), "--steps", "2",
                 "--mitigate", "embedding", "--threshold", "0", "--max-iterations", "2"]) == 0
    assert "mitigation (embedding)" in capsys.readouterr().out and (tmp_path / "x.png").is_file()
    assert main(["subspace", *model, "--prompts", str(prompts), "--out", str(tmp_path / "s.safetensors"), "--steps",
                 "1", "--seeds", "1"]) == 0  # FFN masks read image tokens only: the pooled row is never among them
    assert (tmp_path / "s.safetensors").is_file()
    assert main(["localize", *model, "--prompt", PROMPT, "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dejaguard: error: NeMo localization is not supported for SDXL")


def test_nemo_refuses_sdxl_in_the_library(sdxl):
    """The refusal lives in core (nemo_layers), so a library call refuses like the CLI, before any statistics."""
    from dejaguard.core.nemo.score import nemo_layers

    with pytest.raises(DejaGuardError, match="NeMo localization is not supported for SDXL"):
        nemo_layers(sdxl)
