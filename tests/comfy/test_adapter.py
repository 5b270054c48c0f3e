"""The ComfyUI adapter core: one support check for every node, and the pack's entry point (issue 23).

- ``test_entry_point_*`` (any interpreter, no ComfyUI needed): the top-level ``__init__.py`` builds no nodes
  where ComfyUI is absent (library use), and where ComfyUI's modules are present it lets an import error of
  the pack raise instead of registering zero nodes silently (defect 5: it used to swallow every ImportError
  whose text mentioned "comfy").
- ``test_unsupported_models_refused_alike`` (imports ComfyUI, so it runs in the .comfy venv;
  ``test_adapter_inproc_in_comfy_venv`` runs it there): tiny inpainting and unknown-family models built with
  ComfyUI's own classes are refused by Token Highlighting, Mitigate Embedding and Localize Neurons with the
  Guard's own message, because all of them go through ``model_check.check_supported`` (before, the adapter had
  rules of its own and let inpainting and unknown families through). A tiny SDXL-class model (a supported
  family of the Guard since issue 24) passes the check of Token Highlighting and Mitigate Embedding (they go on
  to its text encoder and conditioning) and is refused by Localize Neurons, which names neuron masks and SDXL.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import comfy_available  # noqa: E402
from test_explain_comfy import IN_COMFY_VENV  # noqa: E402
from workflow_checks import run_in_comfy_venv  # noqa: E402


def _import_pack(extra_path: Path | None) -> subprocess.CompletedProcess[str]:
    """``import dejaguard`` in a fresh interpreter (this one's environment), ``extra_path`` first on sys.path."""
    code = ("import sys\n"
            + (f"sys.path.insert(0, {str(extra_path)!r})\n" if extra_path else "")
            + "import dejaguard\nprint(len(dejaguard.NODE_CLASS_MAPPINGS))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_entry_point_without_comfyui_is_a_library() -> None:
    proc = _import_pack(None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0"


def test_entry_point_inside_comfyui_raises_import_errors(tmp_path: Path) -> None:
    """Defect 5: ComfyUI present (``comfy`` and ``folder_paths`` importable) but one of the pack's imports fails
    (a ``comfy`` submodule, absent from a stand-in ``comfy`` package): the error reaches ComfyUI, which
    reports the pack as failed, instead of an empty pack."""
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "__init__.py").write_text("")
    (tmp_path / "folder_paths.py").write_text("")
    proc = _import_pack(tmp_path)
    assert proc.returncode != 0, f"the import error was swallowed: {proc.stdout!r}"
    assert "ModuleNotFoundError: No module named 'comfy." in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(not IN_COMFY_VENV, reason="imports ComfyUI: runs in the .comfy venv "
                    "(test_adapter_inproc_in_comfy_venv runs it there)")
def test_unsupported_models_refused_alike() -> None:
    import check_guard as cg  # ComfyUI on the CPU, tiny SD-layout configs, the pack importable as DejaGuard
    import torch
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.nodes.explain import DejaGuardTokenHighlight
    from DejaGuard.nodes.guard import CFG1_UNAVAILABLE, DejaGuardMemorizationGuard
    from DejaGuard.nodes.mitigate import DejaGuardMitigateEmbedding
    from DejaGuard.nodes.neurons import DejaGuardLocalizeNeurons

    class AnyClip:  # the model is checked first: the text encoder is never used
        def tokenize(self, *_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError("the text encoder was used before the model was checked")

    sd = cg.comfy.supported_models
    models = {
        "sdxl": sd.SDXL(cg.tiny_unet_config(2048, adm=2816, linear=True)).get_model({}),
        "inpainting": sd.SD15(cg.tiny_unet_config(768, in_channels=9)).get_model({}),
        "unknown family": cg.FutureModel(sd.SD15(cg.tiny_unet_config(768))),
    }
    cond = [[torch.zeros(1, 77, 768), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    paths = {
        "Token Highlighting": lambda m: DejaGuardTokenHighlight().explain(m, AnyClip(), "a photograph", 0, 1),
        "Mitigate Embedding": lambda m: DejaGuardMitigateEmbedding().mitigate(m, cond, cond, latent, 0, 1.0, 0.5,
                                                                              0.1, 2),
        "Localize Neurons": lambda m: DejaGuardLocalizeNeurons().localize(m, AnyClip(), "a photograph", 1),
    }

    def refusal(call: Any, model: Any) -> str:
        with torch.inference_mode():  # as ComfyUI executes graphs
            try:
                call(model)
            except DejaGuardError as err:
                return str(err)
        return "(accepted)"

    for name, base in models.items():
        model = cg.patcher(base)
        guard = refusal(lambda m: DejaGuardMemorizationGuard().guard(m, 1.0, CFG1_UNAVAILABLE, unique_id="1"), model)
        if name == "sdxl":  # issue 24: the Guard, Token Highlighting and Mitigate accept SDXL; neuron masks refuse it
            assert guard == "(accepted)"
            with pytest.raises(AssertionError, match="the text encoder was used"):  # past the model check
                refusal(paths["Token Highlighting"], model)
            text = refusal(paths["Mitigate Embedding"], model)  # past the check, at the (SD1-shaped) conditioning
            assert text.startswith("DejaGuard Mitigate Embedding: SDXL conditioning without a pooled output"), text
            text = refusal(paths["Localize Neurons"], model)
            assert text.startswith("unsupported model for neuron masks: not yet supported for SDXL: "), text
            continue
        assert guard.startswith("unsupported model"), (name, guard)
        for node, call in paths.items():
            assert refusal(call, model) == guard, (name, node)


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_adapter_inproc_in_comfy_venv() -> None:
    """Runs the in-process test above with the .comfy venv's python (it has ComfyUI's dependencies)."""
    run_in_comfy_venv(Path(f"{Path(__file__)}::test_unsupported_models_refused_alike"), 600)
