"""A real, headless ComfyUI server for tests (built by ``tests/comfy/setup_comfy.sh``).

    with ComfyServer() as server:                  # python main.py --cpu --listen 127.0.0.1 --port <free>
        info = server.object_info()                # GET /object_info: {node type: description}
        entry = server.run(api_graph)              # POST /prompt, then poll /history/{id}
        png = server.output_files(entry)[0]        # files the graph's output nodes wrote

Only loopback traffic: the server listens on 127.0.0.1 and this helper talks to nothing else.
Each server gets fresh output/temp/input folders in a temporary ``workdir`` (removed on exit, so
read outputs inside the ``with``) unless ``workdir`` is given; its log is ``workdir/server.log``
(``server.log()`` reads it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Another ComfyUI (its own venv/ and ComfyUI/ side by side, the pack linked in its custom_nodes/) can be
# tested by pointing DEJAGUARD_COMFY_ROOT at it; the default is what setup_comfy.sh builds.
COMFY_ROOT = Path(os.environ.get("DEJAGUARD_COMFY_ROOT") or REPO / ".comfy").resolve()
COMFY_DIR = COMFY_ROOT / "ComfyUI"
COMFY_PYTHON = COMFY_ROOT / "venv" / "bin" / "python"
BUNDLED = REPO / "core" / "testbed" / "model"
# Another diffusers-format model (e.g. a training checkpoint before the testbed is bundled) can be tested by
# pointing DEJAGUARD_TEST_MODEL at it; there is no fallback path outside the repository.
MODEL_ENV = "DEJAGUARD_TEST_MODEL"
NO_MODEL = f"no testbed weights: core/testbed/model/unet is missing and {MODEL_ENV} names no model folder"


def model_folder() -> Path | None:
    """The model the ComfyUI tests load: ``$DEJAGUARD_TEST_MODEL`` if set, else the bundled testbed; None when
    that folder has no ``unet/`` (the tests then skip with :data:`NO_MODEL`)."""
    chosen = os.environ.get(MODEL_ENV, "").strip()
    folder = Path(chosen).expanduser() if chosen else BUNDLED
    return folder if (folder / "unet").is_dir() else None


# The front end of late-2025 ComfyUI (comfyui-frontend-package 1.27) throws in its own settings start-up on a
# fresh profile (a setting's onChange sets one not registered yet), before any extension is loaded.
_FRONTEND_STARTUP_BUG = "at Proxy.addSetting"


def pack_page_errors(errors: list[str]) -> list[str]:
    """The page errors (message and stack, as the browser scripts record them) that are not the front end's
    known start-up bug: every error from an extension script counts."""
    return [e for e in errors if _FRONTEND_STARTUP_BUG not in e or "/extensions/" in e]


class ComfyError(RuntimeError):
    """The server failed to start, refused a graph, or a graph failed while running."""


def comfy_available() -> bool:
    """Whether setup_comfy.sh has been run (tests skip without it)."""
    return COMFY_PYTHON.is_file() and (COMFY_DIR / "main.py").is_file()


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ComfyServer:
    """Context manager running ``main.py --cpu`` from the .comfy venv on a free loopback port.

    ``threads`` sets OMP/MKL thread counts of the server process (None: torch's default).
    ``extra_args`` are appended to the command line (e.g. ``["--preview-method", "latent2rgb"]``).
    """

    def __init__(self, comfy_dir: Path = COMFY_DIR, python: Path = COMFY_PYTHON, port: int | None = None,
                 workdir: Path | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 threads: int | None = None, startup_timeout: float = 240.0) -> None:
        self.comfy_dir = Path(comfy_dir)
        self.python = Path(python)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.client_id = uuid.uuid4().hex
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._workdir = Path(workdir) if workdir else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="comfy-test-")
            self._workdir = Path(self._tmp.name)
        return self._workdir

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    def start(self) -> ComfyServer:
        if not (self.python.is_file() and (self.comfy_dir / "main.py").is_file()):
            raise ComfyError(f"ComfyUI is not set up at {self.comfy_dir}: run bash tests/comfy/setup_comfy.sh")
        for sub in ("output", "temp", "input"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "server.log"
        cmd = [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.workdir / "output"), "--temp-directory", str(self.workdir / "temp"),
               "--input-directory", str(self.workdir / "input"), "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.threads is not None:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(
                    f"ComfyUI exited with code {self.proc.returncode} while starting:\n{self.log()[-4000:]}")
            try:
                self.object_info()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() - start > self.startup_timeout:
                self.stop()
                raise ComfyError(f"ComfyUI did not answer within {self.startup_timeout:.0f}s:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        self.startup_seconds = time.monotonic() - start
        return self

    def stop(self) -> None:
        """SIGTERM the server's process group (only the process this helper started), then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        """The server's stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.is_file() else ""

    def pack_imported(self) -> bool:
        """Whether the server imported this pack (``custom_nodes/DejaGuard`` in its log, with no IMPORT FAILED
        line for it; ComfyUI's own optional nodes may fail where their extra packages are missing)."""
        lines = self.log().splitlines()
        return any("custom_nodes/DejaGuard" in line for line in lines) and \
            not any("IMPORT FAILED" in line and "DejaGuard" in line for line in lines)

    # -- HTTP --------------------------------------------------------------------------------

    def _request(self, path: str, payload: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every registered node type and its inputs/outputs."""
        return self._request("/object_info", timeout=10.0)

    def submit(self, graph: dict[str, Any]) -> str:
        """``POST /prompt`` with an API-format graph; returns the prompt id (ComfyError on rejection)."""
        try:
            answer = self._request("/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            raise ComfyError(f"ComfyUI rejected the graph ({err.code}): {err.read().decode(errors='replace')}") from err
        return str(answer["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """``GET /history/{id}``: the finished entry, or None while it is queued or running."""
        return self._request(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll the history until the prompt finished; ComfyError if it failed or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status", {})
                if status.get("status_str", "success") != "success" or not status.get("completed", True):
                    raise ComfyError(f"graph {prompt_id} failed: {json.dumps(status.get('messages'))[:4000]}")
                return entry
            time.sleep(poll)
        raise ComfyError(f"graph {prompt_id} did not finish within {timeout:.0f}s:\n{self.log()[-4000:]}")

    def run(self, graph: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """Submit ``graph`` and wait for its history entry (``outputs`` keyed by node id)."""
        return self.wait(self.submit(graph), timeout=timeout)

    def output_files(self, entry: dict[str, Any], kind: str = "output") -> list[Path]:
        """Image files listed in a history entry's outputs (``kind``: 'output' or 'temp')."""
        base = self.workdir / kind / ("temp" if kind == "temp" else "")  # ComfyUI nests temp/ in --temp-directory
        files = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == kind:
                    files.append(base / img.get("subfolder", "") / img["filename"])
        return files
