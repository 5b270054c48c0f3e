"""Numerical proof that the DejaGuard Testbed Loader gives ComfyUI the same model as the core library.

Run with the .comfy venv (after ``bash tests/comfy/setup_comfy.sh``):

    .comfy/venv/bin/python tests/comfy/check_testbed_equivalence.py [--model DIR] [--json OUT] [--no-server]

``--model`` defaults to the bundled ``core/testbed/model``, or the folder ``$DEJAGUARD_TEST_MODEL`` names
(``comfy_server.model_folder``); without either it exits saying so. Checks, each with a tolerance, exit
code 1 if any fails:

1. Tokens and conditioning: ComfyUI ``CLIPTextEncode`` (``(1, 77, D)``) == our text encoder's
   ``last_hidden_state`` on the same prompt.
2. Raw UNet: ``model.model.diffusion_model(x, timesteps=t, context=c)`` == diffusers UNet(x, t, c).
3. Through ComfyUI's k-diffusion wrapper: ``apply_model(x * sqrt(1 + sigma^2), sigma, c_crossattn=c)``
   returns ``denoised = x_in - sigma * eps``; ``eps = (x_in - denoised) / sigma`` == diffusers eps at
   ``t = timestep(sigma)``.
4. First sampling step as KSampler runs it (normal scheduler, 20 steps, seed 1): sigma, timestep,
   input scaling, and the first-step score ``||eps_c - eps_u||`` read in a post-CFG hook, compared
   with diffusers at the same t and with the core library's DDIM first step.
5. The API graph ``workflows/testbed_generate_api.json`` on a real server (POST /prompt): PNG 256x256.

Shapes: latents ``(B, 4, 32, 32)``, conditioning ``(B, 77, 96)``, images ``(B, 256, 256, 3)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from comfy_server import COMFY_DIR, NO_MODEL, REPO, model_folder  # noqa: E402

PROMPT = "chelsea the tabby cat looking at the camera"
TOL = 1e-4

sys.path.insert(0, str(COMFY_DIR))
sys.path.insert(0, str(COMFY_DIR / "custom_nodes"))  # the pack is importable as `DejaGuard`, as ComfyUI loads it

import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management is imported: no CUDA device here

import comfy.model_management  # noqa: E402, F401
import comfy.samplers  # noqa: E402
from DejaGuard.core.denoiser import BUNDLED_TESTBED, DiffusersDenoiser  # noqa: E402
from DejaGuard.core.sampling import guided_denoise, initial_noise  # noqa: E402
from DejaGuard.nodes.testbed import DejaGuardTestbedLoader  # noqa: E402

import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py)

RESULTS: dict[str, Any] = {}
FAILURES: list[str] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` over all elements."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(name: str, value: float, tol: float = TOL) -> None:
    ok = value <= tol
    RESULTS[name] = value
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3e} (tolerance {tol:g})")
    if not ok:
        FAILURES.append(name)


def check_text(clip: Any, den: DiffusersDenoiser) -> torch.Tensor:
    """CLIPTextEncode == core encode_prompts; returns the ComfyUI conditioning ``(2, 77, D)`` (cond, uncond)."""
    conds = []
    for prompt in (PROMPT, ""):
        tokens = clip.tokenize(prompt)
        comfy_ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
        core_ids = den.tokenize([prompt])
        RESULTS.setdefault("token_ids_equal", True)
        RESULTS["token_ids_equal"] &= bool(torch.equal(comfy_ids, core_ids))
        (cond, _), = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        core = den.encode_prompts([prompt])
        check(f"conditioning rel err [{prompt or 'empty'}]", rel_err(cond, core))
        check(f"conditioning max abs err [{prompt or 'empty'}]", float((cond - core).abs().max()))
        conds.append(cond)
    if not RESULTS["token_ids_equal"]:
        FAILURES.append("token ids differ")
    print("token ids equal:", RESULTS["token_ids_equal"], "| conditioning shape", tuple(conds[0].shape))
    return torch.cat(conds)


def check_unet(model: Any, den: DiffusersDenoiser, context: torch.Tensor) -> None:
    """Raw diffusion model and apply_model (k-diffusion parametrization) against the diffusers UNet."""
    base = model.model
    ms = base.model_sampling
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    for t_int in (999, 500, 20):
        t = torch.full((2,), float(t_int))
        with torch.no_grad():
            ours = den.unet(x, t, encoder_hidden_states=context).sample
            raw = base.diffusion_model(x, timesteps=t, context=context)
            check(f"raw diffusion_model rel err t={t_int}", rel_err(raw, ours))
            # k-diffusion: x_k = x_t / sqrt(alphabar) = x_t * sqrt(1 + sigma^2); the wrapper divides it back.
            sigma = ms.sigma(t)
            x_k = x * (1.0 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
            denoised = base.apply_model(x_k, sigma, c_crossattn=context)
            eps = (x_k - denoised) / sigma.view(-1, 1, 1, 1)
            check(f"apply_model eps rel err t={t_int} (sigma={float(sigma[0]):.4f})", rel_err(eps, ours))
            if not torch.equal(ms.timestep(sigma).float(), t):
                FAILURES.append(f"timestep(sigma(t)) != t at {t_int}")


def first_step(model: Any, clip: Any, den: DiffusersDenoiser, steps: int = 20, seed: int = 1,
               cfg: float = 7.5) -> None:
    """What ComfyUI's KSampler does at step 1, read through a post-CFG hook, vs diffusers / core DDIM."""
    ms = model.model.model_sampling
    if hasattr(comfy.samplers, "calculate_sigmas_scheduler"):  # March 2024
        sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "normal", steps)
    else:
        sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps)
    sigma0 = sigmas[0]
    t0 = float(ms.timestep(sigma0))
    seen: list[dict[str, torch.Tensor]] = []

    def hook(a: dict[str, Any]) -> torch.Tensor:
        if not seen:
            seen.append({k: a[k].detach().clone() for k in ("cond_denoised", "uncond_denoised", "sigma", "input")})
        return a["denoised"]

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(hook)
    pos = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(256, 256, 1)[0]
    out = comfy_nodes.common_ksampler(patched, seed, steps, cfg, "euler", "normal", pos, neg, latent)[0]
    rec = seen[0]
    sigma = rec["sigma"].view(-1, 1, 1, 1)
    x_in = rec["input"]
    diff = (rec["uncond_denoised"] - rec["cond_denoised"]) / sigma  # = eps_cond - eps_uncond
    score_comfy = float(diff.flatten(1).norm(dim=1)[0])
    noise = initial_noise(den, [seed])  # same generator as comfy.sample.prepare_noise for batch 1
    unet_in = x_in / (sigma ** 2 + 1).sqrt()  # what the UNet received
    with torch.no_grad():
        cond = den.encode_prompts([PROMPT])
        uncond = den.encode_prompts([""])
        eps = den.unet(torch.cat([noise, noise]), torch.tensor([t0, t0]),
                       encoder_hidden_states=torch.cat([cond, uncond])).sample
        score_diffusers_same_t = float((eps[0] - eps[1]).norm())
        _, mags20 = guided_denoise(den, noise, cond, uncond, num_inference_steps=20, stop_after=1)
        _, mags50 = guided_denoise(den, noise, cond, uncond, num_inference_steps=50, stop_after=1)
    sched20, sched50 = den.new_scheduler(), den.new_scheduler()
    sched20.set_timesteps(20)
    sched50.set_timesteps(50)
    info = {
        "normal_20_sigmas_first3": [round(float(s), 6) for s in sigmas[:3]],
        "sigma_max": float(ms.sigma_max), "first_sigma": float(sigma0), "first_timestep": t0,
        "max_denoise": math.isclose(float(sigma0), float(ms.sigma_max), rel_tol=1e-5),
        "input_scale_x_over_noise": float((x_in / noise).mean()),
        "expected_sqrt_1_plus_sigma2": float((1 + sigma0 ** 2).sqrt()),
        "unet_input_minus_noise_max_abs": float((unet_in - noise).abs().max()),
        "score_comfy_first_step": score_comfy,
        "score_diffusers_same_t": score_diffusers_same_t,
        "sigma_at_core_ddim20_t": float(ms.sigma(sched20.timesteps[:1].float())[0]),
        "sigma_at_core_ddim50_t": float(ms.sigma(sched50.timesteps[:1].float())[0]),
        "core_ddim20_first_t": int(sched20.timesteps[0]), "score_core_ddim20": float(mags20[0, 0]),
        "core_ddim50_first_t": int(sched50.timesteps[0]), "score_core_ddim50": float(mags50[0, 0]),
        "final_latent_shape": list(out["samples"].shape),
    }
    RESULTS["first_step"] = info
    print(json.dumps(info, indent=2))
    check("first-step score comfy hook vs diffusers same t (rel)",
          abs(score_comfy - score_diffusers_same_t) / score_diffusers_same_t)


def check_server(folder: Path, artifacts: Path | None = None) -> None:
    """The saved API graph on a real ComfyUI server: a 256x256 PNG comes back (kept in ``artifacts``)."""
    import shutil

    from comfy_server import ComfyServer
    from PIL import Image

    graph = json.loads((REPO / "workflows" / "testbed_generate_api.json").read_text())
    graph = copy.deepcopy(graph)
    if folder != BUNDLED_TESTBED:
        for node in graph.values():
            if node["class_type"] == "DejaGuardTestbedLoader":
                node["inputs"]["folder"] = str(folder)
    with ComfyServer(threads=1) as server:
        info = server.object_info()
        loader = info.get("DejaGuardTestbedLoader", {})
        RESULTS["server"] = {
            "startup_seconds": round(server.startup_seconds or 0, 1), "node_types": len(info),
            "loader_registered": bool(loader), "loader_category": loader.get("category"),
            "pack_imported": server.pack_imported(),
        }
        start = time.monotonic()
        entry = server.run(graph, timeout=600)
        RESULTS["server"]["graph_seconds"] = round(time.monotonic() - start, 1)
        files = server.output_files(entry)
        sizes = [Image.open(f).size for f in files]
        if artifacts:
            artifacts.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, artifacts / f.name)
            (artifacts / "server.log").write_text(server.log())
        RESULTS["server"]["png_sizes"] = sizes
        print(json.dumps(RESULTS["server"], indent=2))
        if not (RESULTS["server"]["loader_registered"] and RESULTS["server"]["pack_imported"]):
            FAILURES.append("pack not loaded by the server")
        if sizes != [(256, 256)]:
            FAILURES.append(f"server output sizes {sizes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="diffusers-format folder (default: the bundled testbed or $DEJAGUARD_TEST_MODEL)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--no-server", action="store_true", help="skip the real-server graph run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--artifacts", type=Path, default=None, help="keep the PNG and the server log here")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    folder = opts.model or model_folder()
    if folder is None:
        sys.exit(f"{NO_MODEL}; or pass --model")
    RESULTS["model"] = str(folder)
    print("model folder:", folder)
    with torch.inference_mode():  # as ComfyUI executes graphs
        model, clip, vae = DejaGuardTestbedLoader().load("testbed (bundled)", folder="" if folder == BUNDLED_TESTBED
                                                         else str(folder))
    params = list(model.model.parameters()) + list(clip.cond_stage_model.parameters())
    RESULTS["inference_tensor_params"] = sum(p.is_inference() for p in params)
    if RESULTS["inference_tensor_params"]:
        FAILURES.append("loader made inference-mode parameters (no gradients possible)")
    den = DiffusersDenoiser.from_folder(folder, device="cpu")
    context = check_text(clip, den)
    check_unet(model, den, context)
    first_step(model, clip, den)
    with torch.no_grad():
        lat = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
        img = vae.decode(lat)
        ref = (den.decode(lat).movedim(1, -1) + 1) / 2
        check("VAE decode max abs err", float((img - ref).abs().max()), 1e-6)
        enc = vae.encode(img)
        ref_enc = den.vae.encode(img.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        check("VAE encode max abs err", float((enc - ref_enc).abs().max()), 1e-6)
    if not opts.no_server:
        check_server(folder, opts.artifacts)
    RESULTS["failures"] = FAILURES
    if opts.json:
        opts.json.write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    print("FAILED: " + ", ".join(FAILURES) if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
