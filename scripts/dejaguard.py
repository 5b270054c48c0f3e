"""DejaGuard's entry point for Stable Diffusion WebUI (AUTOMATIC1111 and Forge).

The WebUI runs every ``scripts/*.py`` of an extension as a loose module (not as part of a package), and
registers the ``Script`` subclasses it finds in it. This file makes the repository importable as a package
(``dejaguard``, or ``dejaguard_webui_extension`` when another ``dejaguard`` is already imported) *without running
the repository's ``__init__.py``*, which is ComfyUI's entry point, so the WebUI never imports ComfyUI's modules
nor the node pack; then it takes the script class from :mod:`webui.script` and registers the CFG callbacks
(again at every load: a UI reload clears them).
"""

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _package() -> str:
    """The name under which the repository is (now) importable as a package."""
    for name in ("dejaguard", "dejaguard_webui_extension"):
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(_REPO)]
            sys.modules[name] = importlib.util.module_from_spec(spec)
            return name
        if [str(Path(p).resolve()) for p in getattr(module, "__path__", [])] == [str(_REPO)]:
            return name
    raise ImportError(f"cannot import DejaGuard from {_REPO}: both package names are taken")


_script = importlib.import_module(f"{_package()}.webui.script")
_script.register_callbacks()
DejaGuardScript = _script.DejaGuardScript
