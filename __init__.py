"""DejaGuard: a ComfyUI node pack (and Python library) that finds and switches off memorization.

ComfyUI imports this file as the pack's entry point. Importing it without ComfyUI present (as
the ``dejaguard`` package, for the library and command line) must not fail, so the node
mappings are only built when ComfyUI's own modules (``comfy``, ``folder_paths``) can be found.
Whether they can is decided before importing the nodes, not from an ImportError's text: inside
ComfyUI any import error of the pack (a bug, a missing dependency) is raised, so ComfyUI reports it,
instead of leaving the pack registered with zero nodes.
"""

import importlib.util
import sys

WEB_DIRECTORY = "./web/js"


def _comfyui_present() -> bool:
    """Whether ComfyUI's modules are importable here (inside ComfyUI, or with its folder on ``sys.path``)."""
    return all(name in sys.modules or importlib.util.find_spec(name) is not None for name in ("comfy", "folder_paths"))


if _comfyui_present():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # library / command-line use
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
