"""Run by Stable Diffusion WebUI (AUTOMATIC1111, Forge) when it prepares its environment at start-up: installs
what the DejaGuard extension needs and the WebUI lacks, without moving the WebUI's own pins.

Only ``diffusers`` can be missing (A1111 does not ship it; the extension's checkpoint fingerprint uses its
``convert_ldm_unet_checkpoint``). It is installed together with the installed ``huggingface_hub`` and
``safetensors`` versions pinned: the newest diffusers would otherwise upgrade huggingface_hub past what A1111's
transformers accepts. Anywhere else (ComfyUI-Manager also runs a custom node's ``install.py``, where the node
pack's requirements.txt has already installed diffusers) there is no WebUI ``launch`` module and nothing is done.
"""

import importlib.metadata
import importlib.util


def requirements() -> list[str]:
    """The pip requirements to install: empty when diffusers is importable."""
    if importlib.util.find_spec("diffusers") is not None:
        return []
    pins = []
    for name in ("huggingface_hub", "safetensors"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ["diffusers>=0.27", *pins]


def main() -> None:
    try:
        import launch
    except ImportError:  # not a WebUI
        return
    needed = requirements()
    if needed and hasattr(launch, "run_pip"):
        launch.run_pip("install " + " ".join(f'"{r}"' for r in needed), "diffusers for DejaGuard")


main()
