"""The guard's badges in the real ComfyUI front end (web/js/guard.js), in headless Chromium.

Needs ``/usr/bin/chromium`` and ``playwright-core`` in ``.comfy/pw`` (see ``check_ui_workflow.py``); skipped
otherwise. Loads ``workflows/detect_testbed.json`` into the page of a real server, queues it, and checks: the
guard node shows the scores of the last run from the ``dejaguard.score`` message sent while sampling, the
memorized prompt's verdict is red ("memorized"), the novel one's green ("ok"), the text is plain text, and the
page raised no errors. ``DEJAGUARD_ARTIFACTS=DIR`` keeps the screenshot there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import COMFY_ROOT, ComfyServer, comfy_available, pack_page_errors  # noqa: E402
from test_guard import BUNDLED, CALIBRATION, MEMORIZED_VERDICT, NOVEL_VERDICT, WORKFLOWS, model_folder  # noqa: E402

MODULES = COMFY_ROOT / "pw" / "node_modules"
GUARD = "2"


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(not (MODULES / "playwright-core").is_dir() or not Path("/usr/bin/chromium").exists(),
                    reason="needs /usr/bin/chromium and playwright-core in .comfy/pw")
def test_badges_in_browser(tmp_path: Path) -> None:
    folder = model_folder()
    if folder is None:
        pytest.skip("no testbed weights (core/testbed/model/unet) to load")
    ui = json.loads((WORKFLOWS / "detect_testbed.json").read_text())
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    if folder != BUNDLED:
        nodes["1"]["widgets_values"][1] = str(folder)
    if not (folder == BUNDLED and (folder / CALIBRATION).is_file()):
        from test_guard import core_first_step_scores

        prompts = [nodes["3"]["widgets_values"][0], nodes["4"]["widgets_values"][0]]
        core = core_first_step_scores(folder, prompts, nodes["7"]["widgets_values"][0])
        nodes[GUARD]["widgets_values"][0] = round((core[0] * core[1]) ** 0.5, 3)
    workflow, out, shot = tmp_path / "workflow.json", tmp_path / "badges.json", tmp_path / "badges.png"
    workflow.write_text(json.dumps(ui))
    with ComfyServer(threads=1) as server:
        proc = subprocess.run(["node", str(HERE / "guard_badges.mjs"), server.base_url, str(workflow), str(out),
                               str(shot), GUARD, MEMORIZED_VERDICT, NOVEL_VERDICT], capture_output=True, text=True,
                              timeout=900, env=dict(os.environ, NODE_PATH=str(MODULES)), cwd=COMFY_ROOT / "pw")
        log = server.log()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    if os.environ.get("DEJAGUARD_ARTIFACTS"):
        Path(os.environ["DEJAGUARD_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["DEJAGUARD_ARTIFACTS"]) / "guard_badges.png")
    result = json.loads(out.read_text())
    assert pack_page_errors(result["errors"]) == [] and not result["timedOut"], result
    badges = result["nodes"]
    mem, nov, guard = badges[MEMORIZED_VERDICT], badges[NOVEL_VERDICT], badges[GUARD]
    assert mem["kind"] == "memorized" and mem["text"].startswith("MEMORIZED") and mem["visible"]
    assert nov["kind"] == "ok" and nov["text"].startswith("ok") and nov["visible"]
    assert guard["kind"] in ("memorized", "ok") and "image 1:" in guard["text"]  # painted from dejaguard.score
    assert guard["badge"]["lines"] in (mem["badge"]["lines"], nov["badge"]["lines"])  # the run that came last
    for badge in (mem, nov, guard):
        assert "<" not in badge["html"]  # plain text: no markup was built from the payload
