"""In-process checks of the Memorization Guard and Verdict nodes with a real ComfyUI (March 2024).

Run with the .comfy venv (after ``bash tests/comfy/setup_comfy.sh``); ``tests/comfy/test_guard.py`` does:

    .comfy/venv/bin/python tests/comfy/check_guard.py [--model DIR] [--json OUT] [--steps N]

``--model`` defaults to the bundled ``core/testbed/model``. Checks (exit code 1 if any fails):

1. Unsupported models give a DejaGuardError naming what is unsupported (a Flux-class model, SD1.5-inpainting-like,
   a model without attn2 cross-attention, an unknown BaseModel subclass); tiny SD1.x / SD2.x (v-prediction),
   SDXL and the testbed are accepted by the Guard.
2. Scores: per image of a batch of 2 (ComfyUI's noise ``randn((2, 4, 32, 32), manual_seed(seed))``) and for a
   memorized and a novel prompt, the guard's score == the core library's ``guided_denoise(stop_after=1)``
   magnitude on the same noise, within 1e-3 relative.
3. UNet calls and evals (noise predictions: the samples of those calls), counted by a forward hook: plain ==
   guarded at CFG 7.5; at CFG 1 the guard adds 0 ('report unavailable') or exactly 1 noise prediction for the
   one image ('one extra UNet evaluation': its own call on March 2024 ComfyUI, the batch's unconditional half of
   the first step's call on late-2025 ComfyUI), reported as the verdict's ``extra_unet_evals``, and the
   latter's score equals the CFG 7.5 score.
4. The cached model is never changed: sha256 of its state dict and its ModelPatcher options before == after.
5. The ``dejaguard.score`` progress message is sent through ``PromptServer.instance.send_sync`` (a stand-in
   server) with the guard's node id and the scores; the verdict picks the run that produced its LATENT.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import tempfile
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from comfy_server import COMFY_DIR, REPO  # noqa: E402

_DETECT = json.loads((REPO / "workflows" / "detect_testbed_api.json").read_text())
MEMORIZED, NOVEL = _DETECT["3"]["inputs"]["text"], _DETECT["4"]["inputs"]["text"]  # the workflow's two prompts
TOL = 1e-3

sys.path.insert(0, str(COMFY_DIR))
sys.path.insert(0, str(COMFY_DIR / "custom_nodes"))  # the pack is importable as `DejaGuard`, as ComfyUI loads it

import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management is imported: no CUDA device here

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
from DejaGuard.core.calibration import Calibration, save_calibration  # noqa: E402
from DejaGuard.core.denoiser import BUNDLED_TESTBED, DiffusersDenoiser  # noqa: E402
from DejaGuard.core.detect import ScoreSettings  # noqa: E402
from DejaGuard.core.errors import DejaGuardError  # noqa: E402
from DejaGuard.core.sampling import guided_denoise  # noqa: E402
from DejaGuard.nodes.guard import (  # noqa: E402
    CFG1_EXTRA_EVAL,
    CFG1_UNAVAILABLE,
    SCORE_EVENT,
    DejaGuardMemorizationGuard,
    DejaGuardMemorizationVerdict,
    resolve_threshold,
)
from DejaGuard.nodes.model_check import check_supported  # noqa: E402
from DejaGuard.nodes.testbed import DejaGuardTestbedLoader  # noqa: E402

import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py)

RESULTS: dict[str, Any] = {}
FAILURES: list[str] = []


def expect(name: str, ok: bool, detail: Any = "") -> None:
    RESULTS.setdefault("checks", {})[name] = bool(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        FAILURES.append(name)


# -- 1. supported and unsupported models -------------------------------------------------------


def tiny_unet_config(context_dim: int, adm: int | None = None, in_channels: int = 4, linear: bool = False
                     ) -> dict[str, Any]:
    """An SD-layout ComfyUI ``unet_config`` at a tiny size (2 levels, 32/64 channels, attention on level 2)."""
    return {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": adm, "in_channels": in_channels, "out_channels": 4, "model_channels": 32,
            "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
            "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "context_dim": context_dim,
            "use_linear_in_transformer": linear, "use_temporal_attention": False, "use_temporal_resblock": False,
            "num_heads": -1, "num_head_channels": 16}


def patcher(base: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


class FutureModel(comfy.model_base.BaseModel):
    """Stands for a model family this version of DejaGuard does not know."""


class Flux(comfy.model_base.BaseModel):
    """Stands for ComfyUI's Flux class (newer versions only): a guidance-distilled family, refused by name."""


def check_models(testbed: Any) -> None:
    sd15 = comfy.supported_models.SD15(tiny_unet_config(768))
    sd20 = comfy.supported_models.SD20(tiny_unet_config(1024, linear=True))
    sdxl = comfy.supported_models.SDXL(tiny_unet_config(2048, adm=2816, linear=True))
    inpaint = comfy.supported_models.SD15(tiny_unet_config(768, in_channels=9))
    no_attn = comfy.model_base.BaseModel(comfy.supported_models.SD15(tiny_unet_config(768)))
    no_attn.diffusion_model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))  # a tiny throwaway model
    cases = {  # (SDXL is a supported family since issue 24: tests/comfy/test_families.py)
        "flux_like": (patcher(Flux(comfy.supported_models.SD15(tiny_unet_config(768)))), "unconditional prediction"),
        "inpainting": (patcher(inpaint.get_model({})), "input channels"),
        "no_attn2": (patcher(no_attn), "attn2"),
        "unknown_class": (patcher(FutureModel(comfy.supported_models.SD15(tiny_unet_config(768)))), "FutureModel"),
    }
    RESULTS["unsupported_messages"] = {}
    for name, (model, needle) in cases.items():
        try:
            DejaGuardMemorizationGuard().guard(model, 1.0, CFG1_UNAVAILABLE, unique_id="9")
            expect(f"unsupported model refused: {name}", False, "(accepted)")
        except DejaGuardError as err:
            RESULTS["unsupported_messages"][name] = str(err)
            expect(f"unsupported model refused: {name}", needle in str(err), f"-> {err}")
    v_model = patcher(comfy.model_base.BaseModel(sd20, model_type=comfy.model_base.ModelType.V_PREDICTION))
    supported = {"sd15": patcher(sd15.get_model({})), "sd20_v": v_model, "testbed": testbed,
                 "sdxl": patcher(sdxl.get_model({}))}
    for name, model in supported.items():
        try:
            info = check_supported(model, "guard")
            expect(f"supported model accepted: {name}", True, f"-> {info}")
        except DejaGuardError as err:
            expect(f"supported model accepted: {name}", False, f"-> {err}")
    expect("v-prediction noted", any("v-prediction" in n for n in check_supported(v_model).notes))
    try:  # an SD1.x model with threshold 0: the bundled calibration is for another model (fingerprint)
        resolve_threshold(patcher(sd15.get_model({})), 0.0, str(BUNDLED_TESTBED))
        expect("SD1.x model without calibration refused", False)
    except DejaGuardError as err:
        expect("SD1.x model without calibration refused", "another model" in str(err)
               and "dejaguard calibrate" in str(err), f"-> {err}")


# -- helpers -----------------------------------------------------------------------------------


def state_hash(model: Any) -> str:
    h = hashlib.sha256()
    for name, t in model.model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class UNetCalls:
    """Counts forward calls of the diffusion model (a forward hook; removed on exit)."""

    def __init__(self, model: Any) -> None:
        self.module = model.model.diffusion_model
        self.calls = 0
        self.samples = 0

    def __enter__(self) -> UNetCalls:
        def hook(_m: Any, inputs: Any, _out: Any) -> None:
            self.calls += 1
            self.samples += int(inputs[0].shape[0])

        self._handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def encode(clip: Any, text: str) -> Any:
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def ksample(model: Any, clip: Any, prompt: str, seed: int, steps: int, cfg: float, batch: int = 1,
            sampler: str = "euler") -> dict:
    latent = comfy_nodes.EmptyLatentImage().generate(256, 256, batch)[0]
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", encode(clip, prompt),
                                       encode(clip, ""), latent)[0]


def core_scores(den: DiffusersDenoiser, prompt: str, seed: int, batch: int) -> list[float]:
    """The core library's first-step magnitude on ComfyUI's noise for ``seed`` (whole-batch draw)."""
    noise = torch.randn((batch, 4, 32, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cond = den.encode_prompts([prompt] * batch)
        _, mags = guided_denoise(den, noise, cond, den.encode_prompts([""]), stop_after=1)
    return [float(m) for m in mags[:, 0]]


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# -- 2-5. scores, UNet evaluations, cached model, messages -------------------------------------


def check_guard(model: Any, clip: Any, den: DiffusersDenoiser, folder: Path, steps: int, seed: int) -> None:
    messages: list[tuple[str, dict, Any]] = []
    fake = types.ModuleType("server")  # stands for ComfyUI's server module, which main.py imports
    fake.PromptServer = type("PromptServer", (), {})  # type: ignore[attr-defined]
    fake.PromptServer.instance = types.SimpleNamespace(  # type: ignore[attr-defined]
        client_id="client-1", send_sync=lambda event, data, sid=None: messages.append((event, data, sid)))
    saved_server = sys.modules.get("server")
    sys.modules["server"] = fake
    try:
        _check_guard(model, clip, den, folder, steps, seed, messages)
    finally:
        if saved_server is not None:
            sys.modules["server"] = saved_server
        else:
            del sys.modules["server"]


STATE_HASH: list[str] = []


def _check_guard(model: Any, clip: Any, den: DiffusersDenoiser, folder: Path, steps: int, seed: int,
                 messages: list) -> None:
    hash_before = state_hash(model)
    STATE_HASH.append(hash_before)
    options_before = copy.deepcopy(model.model_options)
    calibrated = (folder / "dejaguard_calibration.json").is_file()
    if calibrated:
        threshold, source = resolve_threshold(model, 0.0, str(folder))
    else:  # a partially trained checkpoint: place the threshold between the two core scores
        mem, nov = core_scores(den, MEMORIZED, seed, 1)[0], core_scores(den, NOVEL, seed, 1)[0]
        threshold, source = (mem * nov) ** 0.5, "geometric mean of the core scores (uncalibrated checkpoint)"
    RESULTS["threshold"] = {"value": threshold, "source": source}
    print("threshold:", threshold, source)
    guarded, state = DejaGuardMemorizationGuard().guard(model, threshold if not calibrated else 0.0,
                                                         CFG1_UNAVAILABLE, str(folder) if calibrated else "",
                                                         unique_id="12")
    verdict = DejaGuardMemorizationVerdict()

    with UNetCalls(model) as plain:
        ksample(model, clip, MEMORIZED, seed, steps, 7.5)
    with UNetCalls(model) as watched:
        out_mem = ksample(guarded, clip, MEMORIZED, seed, steps, 7.5)
    out_nov = ksample(guarded, clip, NOVEL, seed, steps, 7.5)
    out_batch = ksample(guarded, clip, MEMORIZED, seed, steps, 7.5, batch=2)
    RESULTS["unet_calls"] = {"plain": plain.calls, "guarded": watched.calls, "steps": steps}
    expect("no extra UNet evaluation at CFG 7.5", plain.calls == watched.calls and plain.samples == watched.samples,
           f"(plain {plain.calls} calls / {plain.samples} samples, guarded {watched.calls} / {watched.samples})")

    # The verdicts, taken in an order other than the sampling order: each must find its own run.
    v_batch = verdict.verdict(state, out_batch)
    v_mem = verdict.verdict(state, out_mem)
    v_nov = verdict.verdict(state, out_nov)
    pay = {k: v["ui"]["dejaguard"][0] for k, v in (("memorized", v_mem), ("novel", v_nov), ("batch", v_batch))}
    core = {"memorized": core_scores(den, MEMORIZED, seed, 1), "novel": core_scores(den, NOVEL, seed, 1),
            "batch": core_scores(den, MEMORIZED, seed, 2)}
    RESULTS["scores"] = {k: {"comfy": pay[k]["scores"], "core": core[k], "rel_err": rel(pay[k]["scores"], core[k]),
                             "flagged": pay[k]["flagged"], "run": pay[k]["run"], "matched": pay[k]["matched"]}
                         for k in pay}
    print(json.dumps(RESULTS["scores"], indent=1))
    for k in pay:
        err = rel(pay[k]["scores"], core[k])
        expect(f"score == core [{k}]", err <= TOL, f"rel err {err:.2e}")
        expect(f"verdict found its run [{k}]", pay[k]["matched"])
    expect("memorized flagged", pay["memorized"]["flagged"] == [True])
    expect("novel not flagged", pay["novel"]["flagged"] == [False])
    batch_scores = pay["batch"]["scores"]
    expect("batch: a score per image", len(batch_scores) == 2 and batch_scores[0] != batch_scores[1])
    res_mem = v_mem["result"]
    expect("verdict outputs (LATENT passthrough, FLOAT max, BOOLEAN, STRING)",
           res_mem[0] is out_mem and res_mem[1] == max(pay["memorized"]["scores"]) and res_mem[2] is True
           and "MEMORIZED" in res_mem[3], repr(res_mem[1:]))
    RESULTS["summary_memorized"] = res_mem[3]
    score_msgs = [m for m in messages if m[0] == SCORE_EVENT]
    expect("progress message per run", len(score_msgs) == 3 and all(m[1]["node"] == "12" and m[2] == "client-1"
                                                                    for m in score_msgs), f"({len(score_msgs)})")
    expect("progress message carries the scores", score_msgs[0][1]["scores"] == pay["memorized"]["scores"])

    # Samplers with several model calls per step, or noise added per step: still one run, same first step.
    for sampler in ("heun", "dpmpp_2m", "euler_ancestral", "dpmpp_sde"):
        before = len(state.runs)
        out = ksample(guarded, clip, MEMORIZED, seed, steps, 7.5, sampler=sampler)
        got = verdict.verdict(state, out)["ui"]["dejaguard"][0]
        expect(f"one run per sampling, found by its LATENT [{sampler}]",
               len(state.runs) == before + 1 and got["matched"] and got["run"] == state.runs[-1].index)
        expect(f"same first-step score [{sampler}]", rel(got["scores"], pay["memorized"]["scores"]) <= 1e-5)
    before = len(state.runs)
    one_step = [ksample(guarded, clip, p, seed, 1, 7.5) for p in (MEMORIZED, NOVEL)]  # back-to-back 1-step runs
    got = [verdict.verdict(state, o)["ui"]["dejaguard"][0]["scores"] for o in one_step]
    expect("back-to-back one-step runs are two runs", len(state.runs) == before + 2
           and rel(got[0], pay["memorized"]["scores"]) <= 1e-5 and rel(got[1], pay["novel"]["scores"]) <= 1e-5)
    messages.clear()

    # CFG 1: no unconditional prediction in ComfyUI.
    with UNetCalls(model) as plain1:
        ksample(model, clip, MEMORIZED, seed, steps, 1.0)
    with UNetCalls(model) as unavailable:
        out1 = ksample(guarded, clip, MEMORIZED, seed, steps, 1.0)
    v1 = verdict.verdict(state, out1)["ui"]["dejaguard"][0]
    guarded_x, state_x = DejaGuardMemorizationGuard().guard(model, threshold, CFG1_EXTRA_EVAL, unique_id="13")
    with UNetCalls(model) as extra:
        out_x = ksample(guarded_x, clip, MEMORIZED, seed, steps, 1.0)
    vx = verdict.verdict(state_x, out_x)["ui"]["dejaguard"][0]
    RESULTS["cfg1"] = {"plain_calls": plain1.calls, "unavailable_calls": unavailable.calls, "extra_calls": extra.calls,
                       "unavailable_summary": v1["summary"], "extra_scores": vx["scores"],
                       "extra_unet_evals": vx["extra_unet_evals"]}
    expect("CFG 1 reported unavailable, no extra evaluation",
           v1["scores"] == [] and v1["score"] == -1.0 and "CFG 1" in v1["summary"]
           and unavailable.calls == plain1.calls)
    one_more_call = extra.calls == plain1.calls + 1 and extra.samples == plain1.samples + 1
    one_more_sample = extra.calls == plain1.calls and extra.samples == plain1.samples + 1  # batched at step 1
    expect("CFG 1 with one extra evaluation: exactly one more UNet evaluation",
           (one_more_call or one_more_sample) and vx["extra_unet_evals"] == extra.samples - plain1.samples == 1,
           f"({extra.calls} calls of {extra.samples} samples vs {plain1.calls} of {plain1.samples})")
    expect("CFG 1 extra-evaluation score == CFG 7.5 score", rel(vx["scores"], pay["memorized"]["scores"]) <= 1e-5)

    expect("cached model weights unchanged", state_hash(model) == hash_before)
    expect("cached model options unchanged (guard works on a clone)",
           model.model_options.keys() == options_before.keys()
           and "sampler_post_cfg_function" not in model.model_options and not model.patches)


def check_thresholds(model: Any, den: DiffusersDenoiser, folder: Path) -> None:
    """Threshold 0 reads a calibration made for this very model (matched by core's UNet fingerprint)."""
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "model"
        (cal / "unet").mkdir(parents=True)
        shutil.copy(folder / "unet" / "config.json", cal / "unet" / "config.json")
        settings = asdict(ScoreSettings())
        save_calibration(Calibration(0.123, 0.01, settings, den.fingerprint(), 100, "test"), cal)
        value, source = resolve_threshold(model, 0.0, str(cal))
        expect("calibration of this model found by fingerprint", value == 0.123, f"({value}, {source})")
        expect("threshold set on the node wins", resolve_threshold(model, 0.5, str(cal))[0] == 0.5)
        # After sampling a patched clone (LoRA-like weight diff), ComfyUI leaves the shared weights patched in
        # place until another model loads: the fingerprint must still see the model's own weights.
        lora = model.clone()
        lora.add_patches({"diffusion_model.out.2.bias": (torch.ones(4),)}, 0.5)
        comfy.model_management.load_models_gpu([lora])
        patched = state_hash(model) != STATE_HASH[0]
        value, _ = resolve_threshold(model, 0.0, str(cal))
        expect("calibration still found while a patched clone is loaded", patched and value == 0.123,
               f"(weights patched in place: {patched})")
        save_calibration(Calibration(0.123, 0.01, settings, "0123456789abcdef", 100, "test"), cal)
        cases = {"missing file": "/nonexistent/dejaguard_calibration.json", "other model's calibration": str(cal)}
        for name, path in cases.items():
            try:
                resolve_threshold(model, 0.0, path)
                expect(f"no threshold -> clear error [{name}]", False)
            except DejaGuardError as err:
                expect(f"no threshold -> clear error [{name}]", "dejaguard calibrate" in str(err), f"-> {err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_TESTBED, help="diffusers-format folder")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per run (the score uses the first)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    RESULTS["model"] = str(opts.model)
    with torch.inference_mode():  # as ComfyUI executes graphs
        model, clip, _ = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(opts.model))
        check_models(model)
    den = DiffusersDenoiser.from_folder(opts.model, device="cpu")
    with torch.inference_mode():
        check_guard(model, clip, den, opts.model, opts.steps, opts.seed)
        check_thresholds(model, den, opts.model)
    RESULTS["failures"] = FAILURES
    if opts.json:
        opts.json.write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    print("FAILED: " + ", ".join(FAILURES) if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
