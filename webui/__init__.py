"""DejaGuard inside Stable Diffusion WebUI (AUTOMATIC1111 and its Forge fork).

The WebUI loads ``scripts/dejaguard.py`` from the repository root (the repository placed or linked into the
WebUI's ``extensions/`` folder); that file loads this package and nothing else of the repository's entry points,
so the WebUI never imports ComfyUI's modules (the node pack in ``nodes/`` is not touched), and nothing outside
this package imports it, so the library and the ComfyUI node pack never import WebUI modules.

- :mod:`webui.guard`: the WebUI-independent part (plain torch): which checkpoints are supported, their
  fingerprint and calibrated threshold, the score from the WebUI's own first-step cond/uncond predictions, and
  the per-image generation parameters. Importable and testable without a WebUI.
- :mod:`webui.denoiser`: core's denoiser seam over the WebUI's loaded model (plain torch; the glue hands over the
  WebUI's UNet and text encoding), so core's calibration runs on it unchanged.
- :mod:`webui.script`: the glue (imports ``modules.*`` and gradio): the always-visible "DejaGuard" script and
  the CFG hooks of A1111 (``on_cfg_denoiser`` / ``on_cfg_denoised`` / ``on_cfg_after_cfg``) and Forge (a post-CFG
  function on a clone of ``forge_objects.unet``), the Calibrate button and its API route.

The page's per-image badge is ``javascript/dejaguard.js`` at the repository root (the WebUI loads an extension's
``javascript/*.js``; ComfyUI loads ``web/js/`` instead).
"""
