"""Test probe for tests/webui (linked into the WebUI's extensions/ by setup_webui_checkout.sh; inert without
``DEJAGUARD_WEBUI_PROBE``).

It watches the UNet from outside both WebUIs' CFG code: a forward pre-hook on the diffusion model records every
UNet call of a generation (its batch rows, and its inputs ``x (N, 4, h, w)``, ``timesteps (N,)`` and
``context (N, 77, 768)``), and after each generation the record goes to ``$DEJAGUARD_WEBUI_PROBE/<n>.pt`` (a
plain dict of tensors, readable with ``torch.load(weights_only=True)``). The tests count the calls (no extra
UNet evaluation) and recompute the first step's score from the recorded inputs on the same weights.
"""

import os
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
    _calls.append({"x": x.detach().float().cpu(), "t": t.detach().float().cpu(),
                   "context": context.detach().float().cpu()})


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
        torch.save({"calls": list(_calls)}, folder / f"{n}.pt")
        _calls.clear()
