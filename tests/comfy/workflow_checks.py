"""Checks shared by the ComfyUI test modules: workflow file pairs, and in-process tests run in the .comfy venv."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from comfy_server import COMFY_PYTHON, REPO


def assert_formats_agree(ui: dict[str, Any], api: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A UI-format workflow and its API twin describe the same graph: node types (Notes are front-end only),
    links (source, slot and type) and widget values. Returns the UI's nodes by id."""
    nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] != "Note"}
    assert {k: v["class_type"] for k, v in api.items()} == {k: n["type"] for k, n in nodes.items()}
    links = {link[0]: link for link in ui["links"]}
    for node_id, node in nodes.items():
        for slot in node.get("inputs", []):
            if slot["link"] is None:
                assert slot["name"] not in api[node_id]["inputs"], (node_id, slot["name"])
                continue
            _, src, src_slot, dst, _, kind = links[slot["link"]]
            assert str(dst) == node_id and kind == slot["type"], (node_id, slot["name"])
            assert api[node_id]["inputs"][slot["name"]] == [str(src), src_slot], (node_id, slot["name"])
        values = [v for v in node.get("widgets_values", []) if v not in ("fixed", "randomize")]
        assert values == [v for v in api[node_id]["inputs"].values() if not isinstance(v, list)], node_id
    return nodes


def run_in_comfy_venv(test_file: Path, timeout: int = 900, *extra: str) -> str:
    """Run one in-process test module with the .comfy venv's python (it has ComfyUI's dependencies);
    fail unless its tests ran and passed. Returns pytest's output."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([str(COMFY_PYTHON), "-m", "pytest", "-q", *extra, "-p", "no:cacheprovider", str(test_file)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
    return proc.stdout
