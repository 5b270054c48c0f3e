"""Test probe for tests/webui (linked into the WebUI's extensions/ by setup_webui_checkout.sh; inert without
``DEJAGUARD_WEBUI_PROBE``).

It watches the UNet from outside both WebUIs' CFG code: a forward pre-hook on the diffusion model records every
UNet call of a generation (its batch rows, and its inputs ``x (N, 4, h, w)``, ``timesteps (N,)`` and
``context (N, 77, 768)``; SDXL: ``(N, 77, 2048)`` and the adm vector ``y (N, 2816)``), and after each generation
the record goes to ``$DEJAGUARD_WEBUI_PROBE/<n>.pt`` (a plain dict of tensors, readable with
``torch.load(weights_only=True)``). The tests count the calls (no extra UNet evaluation) and recompute the first
step's score from the recorded inputs on the same weights.

After the first generation it also scores that generation's first-step UNet inputs the way the Calibrate
button does: through DejaGuard's WebUI adapter of the denoiser seam (``webui_denoiser`` of the loaded model) and core's
scoring step (``core.detect.step_scores``, which :func:`core.calibration.calibrate` runs), prompts encoded by the
WebUI, the unconditional one as the guard's calibrations are made (SDXL: zeros, ``webui.guard.score_settings``);
the test compares these with the guard's scores (``adapter_scores`` and ``adapter_t`` in ``0.pt``).
"""

import os
import sys
from pathlib import Path

import modules.scripts as scripts
import torch

PROBE_DIR = os.environ.get("DEJAGUARD_WEBUI_PROBE", "")
_calls: list[dict] = []
_hooked: set[int] = set()


def _unet(sd_model):
    forge = getattr(sd_model, "forge_objects", None)
    return forge.unet.model.diffusion_model if forge is not None else sd_model.model.diffusion_model


def _record(module, args, kwargs):
    x = args[0] if args else kwargs["x"]
    t = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("t"))
    context = args[2] if len(args) > 2 else kwargs.get("context")
    y = args[3] if len(args) > 3 else kwargs.get("y")  # SDXL: the adm vector (pooled text and sizes), (N, 2816)
    _calls.append({"x": x.detach().float().cpu(), "t": t.detach().float().cpu(),
                   "context": context.detach().float().cpu(),
                   **({} if y is None else {"y": y.detach().float().cpu()})})


class DejaGuardProbe(scripts.Script):
    def title(self):
        return "DejaGuard test probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        if not PROBE_DIR:
            return
        _calls.clear()
        unet = _unet(p.sd_model)
        if id(unet) not in _hooked:
            unet.register_forward_pre_hook(_record, with_kwargs=True)
            _hooked.add(id(unet))

    def postprocess(self, p, processed, *args):
        if not PROBE_DIR:
            return
        folder = Path(PROBE_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.glob("*.pt")))
        record = {"calls": list(_calls)}  # a copy: the adapter's own UNet calls below are not the generation's
        if n == 0 and _calls:
            record.update(_adapter_scores(p, record["calls"]))
        torch.save(record, folder / f"{n}.pt")
        _calls.clear()


def _adapter_scores(p, calls):
    """The first step's scores of the batch by the Calibrate button's path (see the module doc)."""
    glue = next(m for name, m in list(sys.modules.items()) if name.endswith(".webui.script")
                and hasattr(m, "webui_denoiser"))
    package = glue.__name__.rsplit(".", 2)[0]
    detect, guard = sys.modules[package + ".core.detect"], sys.modules[package + ".webui.guard"]
    sampling = sys.modules[package + ".core.sampling"]
    first_t = max(float(c["t"].max()) for c in calls)
    batch = int(p.batch_size)
    first = next(c for c in calls if float(c["t"].max()) == first_t)
    x = first["x"][-batch:]  # the unconditional rows, one per image (the conditional rows have the same x)
    family, _ = guard.supported_family(glue.checkpoint_path(p))
    settings = guard.score_settings(family)
    with torch.inference_mode():
        denoiser = glue.webui_denoiser(p.sd_model, p.width, p.height, family)
        cond = denoiser.encode_prompts(list(p.all_prompts[:batch]))
        uncond = sampling.unconditional_embedding(denoiser, settings.unconditional)
        scores = detect.step_scores(denoiser, x.to(denoiser.device), cond, uncond, settings)[:, 0]
        schedule = denoiser.new_scheduler()
        schedule.set_timesteps(settings.num_inference_steps)
    return {"adapter_scores": scores.double().cpu(), "adapter_t": torch.tensor(float(schedule.timesteps[0])),
            "first_t": torch.tensor(first_t)}
