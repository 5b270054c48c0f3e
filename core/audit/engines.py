"""Audit engines: one process (:func:`run_single`), or a pool of model-holding actors on Ray (:func:`run_ray`).

Both run the same job (core/audit/jobs.py) on the same batches and write through the same sink, so the
output does not depend on the engine (Ray with 2 workers equals one process within 1e-5 relative).

Ray engine: Ray Data ``map_batches`` with a fixed pool of actors (``concurrency=workers``), each
holding one model (``num_gpus=1`` per actor when the cluster has GPUs, else ``num_cpus=1`` and one
torch thread). Actors that die are restarted and their batches retried (Ray Data's actor-pool
defaults, ``max_restarts=-1`` and ``max_task_retries=-1``). With no address a local Ray instance
is started and stopped; an already initialized Ray (a test, a notebook) is used as it is and left
running.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..denoiser import Denoiser, load_denoiser, quiet_model_libraries
from ..errors import DejaGuardError
from ..progress import Progress, report
from .inputs import Rejected
from .jobs import PairJob, PromptJob
from .sink import ResultSink

FAULT_ENV = "DEJAGUARD_FAULT_INJECT"  # test hook: "N:/path/marker" -> one actor exits on its Nth batch, once
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "RAY_DISABLE_USAGE_STATS": "1"}


@dataclass
class RunStats:
    engine: str
    workers: int
    scored: int  # rows scored in this run (new rows in the output)
    errors: int  # rows a worker could not score (written to the rejected file)
    wall_s: float
    first_result_s: float = 0.0  # until the first batch was written (Ray: actors started, models loaded)
    first_rows: int = 0  # rows in that first batch
    cpu_s: float | None = None  # this process's CPU time (single engine; all its threads)


def _batches(items: Sequence[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _write_results(sink: ResultSink, results: Sequence[dict]) -> tuple[int, int]:
    errors = [Rejected(int(r["row"]), r["error"]) for r in results if "error" in r]
    if errors:
        sink.write_rejected(errors, append=True)
    return sink.write([r for r in results if "error" not in r]), len(errors)


def run_single(items: Sequence[dict], job: PromptJob | PairJob, sink: ResultSink, denoiser: Denoiser,
               progress: Progress | None = None) -> RunStats:
    """Score ``items`` in this process, one batch of ``job.batch_size`` at a time; ``progress(rows done, rows,
    "auditing")`` after each batch (core/progress.py)."""
    start, cpu, scored, errors, first = time.perf_counter(), time.process_time(), 0, 0, None
    done = 0
    report(progress, done, len(items), "auditing")
    for batch in _batches(items, job.batch_size):
        s, e = _write_results(sink, job.score(denoiser, batch))
        scored, errors = scored + s, errors + e
        first = first or (time.perf_counter() - start, len(batch))
        done += len(batch)
        report(progress, done, len(items), "auditing")
    return RunStats("single", 1, scored, errors, time.perf_counter() - start, *(first or (0.0, 0)),
                    cpu_s=time.process_time() - cpu)


class ScoringActor:
    """A Ray Data worker holding one model; called with one batch of rows at a time."""

    def __init__(self, model: str | None, device: str | None, job: PromptJob | PairJob,
                 fault: str | None = None) -> None:
        if device is None and not torch.cuda.is_available():
            device = "cpu"
        if device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(1)  # one actor per CPU: threads would only fight each other
        quiet_model_libraries()
        self.denoiser = load_denoiser(model, device=device)
        self.job = job
        self.fault = fault
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self._maybe_die()
        names = list(batch)
        items = [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(names, values)}
                 for values in zip(*(batch[k] for k in names))]
        results = self.job.score(self.denoiser, items)
        return {"row": np.array([r["row"] for r in results], dtype=np.int64),
                "result": np.array([json.dumps(r) for r in results], dtype=object)}

    def _maybe_die(self) -> None:
        """Test hook (``DEJAGUARD_FAULT_INJECT=N:/path/marker``): the first actor to reach its Nth
        batch exits the process abruptly, once (the marker file records that it happened)."""
        if not self.fault:
            return
        n, marker = self.fault.split(":", 1)
        if self.calls == int(n):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)


def init_ray(address: str | None = None, workers: int | None = None) -> bool:
    """Connect to the Ray cluster at ``address``, or start a local Ray with ``workers`` CPUs; does
    nothing if Ray is already initialized. Returns whether the caller started it (and must shut it down)."""
    for k, v in WORKER_ENV.items():
        if k == "RAY_DISABLE_USAGE_STATS":
            os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError as err:
        raise DejaGuardError("--engine ray needs Ray: pip install 'ray[data]'") from err
    if ray.is_initialized():
        return False
    common = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "logging_level": logging.ERROR}
    if address:
        try:
            ray.init(address=address, **common)
        except Exception as err:  # ConnectionError, ValueError, ... for a wrong address
            raise DejaGuardError(f"cannot connect to the Ray cluster at {address}: {err}") from err
    else:
        for attempt in range(2):  # Ray gives its own processes 30 s to start: a busy machine can miss that once
            try:
                # A busy machine can also take minutes to start a worker: wait rather than kill it at 60 s.
                ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                         _system_config={"worker_register_timeout_seconds": 600}, **common)
                break
            except Exception as err:  # Ray raises a bare Exception for "node timed out during startup"
                ray.shutdown()
                if attempt or "timed out during startup" not in str(err):
                    raise DejaGuardError(f"could not start a local Ray: {err}") from err
    return True


def _user_error(err: BaseException) -> DejaGuardError | None:
    """The DejaGuardError a worker raised, unwrapped from Ray's exception wrappers, if any."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(cause, DejaGuardError):
            return type(cause)(*cause.args)
        if isinstance(e, DejaGuardError) and type(e).__module__.startswith("dejaguard"):
            return e
        e = e.__cause__ or e.__context__
    return None


def run_ray(items: Sequence[dict], job: PromptJob | PairJob, sink: ResultSink, model: str | Path | None = None,
            device: str | None = None, address: str | None = None, workers: int | None = None,
            progress: bool = True) -> RunStats:
    """Score ``items`` with Ray Data ``map_batches`` on a pool of ``workers`` model-holding actors.

    One block per batch, so a task is one batch: a worker that dies costs the retry of one batch,
    and the driver writes each batch as it arrives (in completion order; rows carry ``row``).
    """
    if not items:
        return RunStats("ray", workers or 0, 0, 0, 0.0)
    try:
        import pyarrow as pa
        import ray
        import ray.data
    except ImportError as err:
        raise DejaGuardError(f"--engine ray needs Ray Data: pip install 'ray[data]' ({err})") from err
    owned = init_ray(address, workers)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")  # Ray's own, not ours
            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = (device is None and gpus > 0) or (device is not None and device.startswith("cuda"))
            if use_gpu and gpus == 0:
                raise DejaGuardError(f"--device {device}: the Ray cluster has no GPU")
            if workers is None:
                workers = gpus if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)))
            if workers < 1:
                raise DejaGuardError("--workers must be at least 1")
            resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = progress
            ctx.print_on_execution_start = False
            ctx.execution_options.preserve_order = False  # a slow batch must not hold finished ones back
            logging.getLogger("ray.data").setLevel(logging.WARNING if progress else logging.ERROR)
            fields = list(items[0])
            tables = [pa.table({k: [it[k] for it in batch] for k in fields})
                      for batch in _batches(items, job.batch_size)]
            start, scored, errors, first = time.perf_counter(), 0, 0, None
            # Ray Data gives actor pools max_restarts=-1 and max_task_retries=-1 by default: a dead
            # actor is restarted (reloading the model) and its unfinished batches are retried.
            ds = ray.data.from_arrow(tables).map_batches(
                ScoringActor, batch_size=job.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                fn_constructor_kwargs={"model": None if model is None else str(model),
                                       "device": "cuda" if use_gpu else "cpu", "job": job,
                                       "fault": os.environ.get(FAULT_ENV)},
                **resources)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    s, e = _write_results(sink, [json.loads(r) for r in batch["result"]])
                    scored, errors = scored + s, errors + e
                    first = first or (time.perf_counter() - start, len(batch["result"]))
            except Exception as err:
                user = _user_error(err)
                if user is not None:
                    raise user from None
                raise
            return RunStats("ray", workers, scored, errors, time.perf_counter() - start, *(first or (0.0, 0)))
    finally:
        if owned:
            ray.shutdown()
