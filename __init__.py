"""DejaGuard: a ComfyUI node pack (and Python library) that finds and switches off memorization.

ComfyUI imports this file as the pack's entry point. Importing it without ComfyUI present (as
the ``dejaguard`` package, for the library and command line) must not fail, so the node
mappings are only built when ComfyUI's modules can be imported.
"""

WEB_DIRECTORY = "./web/js"

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as err:  # ComfyUI absent: library / command-line use
    if "comfy" not in str(err) and "folder_paths" not in str(err):
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
