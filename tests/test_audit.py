"""Audits at scale (core/audit/): inputs, malformed rows, resumable sharded output, the training
filter, and the Ray engine (same scores as one process, a killed worker loses nothing).

Ray is required (CI installs it): the Ray tests fail, never skip, when it is missing. One local Ray
instance serves the whole module.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dejaguard.core.audit import (
    FAULT_ENV,
    ResultSink,
    audit_prompts,
    audit_training_pairs,
    init_ray,
    read_captions,
    read_pairs,
)
from dejaguard.core.detect import ScoreSettings, first_step_scores
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.loss_filter import training_pair_magnitude

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 1.0  # explicit, so no test depends on the shipped calibration


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def prompts(testbed_prompts):
    memorized, novel = testbed_prompts
    return memorized[:6] + novel[:14]  # 20 prompts


@pytest.fixture(scope="module")
def reference(testbed, prompts):
    """Scores of ``prompts`` from the core function in one call: what every engine must reproduce."""
    return {p: r.score for p, r in zip(prompts, first_step_scores(testbed, prompts))}


@pytest.fixture(scope="module")
def ray_local():
    import ray  # no importorskip: CI installs ray, a missing Ray is a failure

    started = init_ray(None, 2)
    yield ray
    if started:
        ray.shutdown()


def _rows(path: Path) -> list[dict]:
    files = sorted(path.glob("part-*.jsonl")) if path.is_dir() else [path]
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def _write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------


def test_batching_does_not_change_scores(testbed, prompts, reference):
    for batch_size in (7, 1):
        scores = first_step_scores(testbed, prompts[::-1], batch_size=batch_size)
        assert max(_rel(r.score, reference[r.prompt]) for r in scores) < 1e-5


def test_malformed_rows_reported_with_line_numbers(tmp_path, testbed):
    text = tmp_path / "p.txt"
    text.write_bytes(b"a red circle on the left\n   \n\nbad \xff\xfe bytes\na blue square on the right\n")
    inp = read_captions(text)
    assert [(it["row"], it["prompt"]) for it in inp.items] == [(1, "a red circle on the left"),
                                                                (5, "a blue square on the right")]
    assert [(r.row, r.reason) for r in inp.rejected] == [(2, "empty caption"), (4, "line is not UTF-8 text")]

    csv_file = tmp_path / "p.csv"
    csv_file.write_text('id,TEXT\n1,a red circle on the left\n2,\n3,"a green\ntriangle at the top"\n4\n'
                        '5,a pink diamond on the right\n', encoding="utf-8")
    inp = read_captions(csv_file)  # TEXT autodetected; a quoted caption spans lines 4-5
    assert [it["row"] for it in inp.items] == [2, 4, 7]
    assert [(r.row, r.reason) for r in inp.rejected] == [(3, "empty caption"), (6, "missing caption (null/NaN)")]

    out = tmp_path / "out.jsonl"
    summary = audit_prompts(text, out, threshold=THRESHOLD, denoiser=testbed, progress=False)
    assert [r["row"] for r in _rows(out)] == [1, 5]
    rejected = [json.loads(line) for line in (tmp_path / "out.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejected] == [(2, "empty caption"), (4, "line is not UTF-8 text")]
    assert len(summary.rejected) == 2 and summary.input_rows == 2

    with pytest.raises(DejaGuardError, match="has no prompts .2 malformed rows skipped"):
        read_captions(_write_text(tmp_path / "bad.txt", ["  ", "\t"]))
    with pytest.raises(DejaGuardError, match="no caption column"):
        read_captions(_write_text(tmp_path / "x.csv", ["a,b", "1,2"]))


def test_csv_and_parquet_input_and_output(tmp_path, testbed, prompts, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    few = prompts[:5]
    pq.write_table(pa.table({"caption": few[:2] + [None] + few[2:], "n": list(range(6))}), tmp_path / "p.parquet")
    out = tmp_path / "shards"
    summary = audit_prompts(tmp_path / "p.parquet", out, fmt="parquet", shard_rows=2, batch_size=2,
                            threshold=THRESHOLD, denoiser=testbed, progress=False)
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 3 and not (out / "_journal.jsonl").exists()
    rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
    assert [r["row"] for r in rows] == [1, 2, 4, 5, 6] and [r["prompt"] for r in rows] == few
    assert max(_rel(r["score"], reference[r["prompt"]]) for r in rows) < 1e-5
    assert all(r["flagged"] == (r["score"] > THRESHOLD) for r in rows)
    assert [(r.row, r.reason) for r in summary.rejected] == [(3, "missing caption (null/NaN)")]

    (tmp_path / "p.csv").write_text("prompt\n" + "\n".join(f'"{p}"' for p in few) + "\n")
    audit_prompts(tmp_path / "p.csv", tmp_path / "o.parquet", threshold=THRESHOLD, denoiser=testbed, progress=False)
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [r["row"] for r in rows] == [2, 3, 4, 5, 6]  # CSV rows are line numbers, the header is line 1
    assert max(_rel(r["score"], reference[r["prompt"]]) for r in rows) < 1e-5


class _Interrupting:
    """The testbed, interrupted (Ctrl-C) at its ``n``-th UNet call."""

    def __init__(self, denoiser, n: int) -> None:
        self._d, self._n = denoiser, n

    def __getattr__(self, name):
        return getattr(self._d, name)

    def predict_noise(self, *args):
        self._n -= 1
        if self._n == 0:
            raise KeyboardInterrupt
        return self._d.predict_noise(*args)


@pytest.mark.parametrize("layout", ["file.jsonl", "shards_jsonl", "shards_parquet", "file.parquet"])
def test_interrupted_audit_resumes_without_loss(tmp_path, testbed, prompts, reference, layout):
    src = _write_text(tmp_path / "p.txt", prompts[:9])
    out = tmp_path / layout
    fmt = "parquet" if layout == "shards_parquet" else None
    kw = {"threshold": THRESHOLD, "batch_size": 2, "fmt": fmt, "shard_rows": 3, "progress": False}
    with pytest.raises(KeyboardInterrupt):  # dies in its 3rd batch: 2 batches (4 rows) are on disk
        audit_prompts(src, out, denoiser=_Interrupting(testbed, 3), **kw)
    assert len(ResultSink(out, fmt, 3, resume=True).done) == 4
    if layout == "file.jsonl":
        with out.open("a") as f:
            f.write('{"row": 9, "prompt": "torn')  # a write cut off by the kill
    summary = audit_prompts(src, out, denoiser=testbed, resume=True, **kw)
    assert summary.resumed == 4 and summary.stats.scored == 5
    rows = summary.rows
    assert [r["row"] for r in rows] == list(range(1, 10))
    assert max(_rel(r["score"], reference[r["prompt"]]) for r in rows) < 1e-5
    again = ResultSink(out, fmt, 3, resume=True)
    assert sorted(again.done) == list(range(1, 10))  # on disk, each row once
    if layout.endswith("jsonl"):
        assert len(_rows(out)) == 9

    summary = audit_prompts(src, out, denoiser=testbed, resume=True, **kw)
    assert summary.stats.scored == 0 and summary.resumed == 9
    with pytest.raises(DejaGuardError, match="threshold"):
        audit_prompts(src, out, denoiser=testbed, resume=True, **{**kw, "threshold": 2.0})
    _write_text(src, prompts[1:10])
    with pytest.raises(DejaGuardError, match="input changed"):
        audit_prompts(src, out, denoiser=testbed, resume=True, **kw)


def test_parquet_journal_survives_a_kill(tmp_path):
    rows = [{"row": i, "prompt": f"p{i}", "score": float(i)} for i in range(1, 5)]
    sink = ResultSink(tmp_path / "o", "parquet", shard_rows=10)
    sink.write(rows[:3])  # then the process is killed: no close(), the rows are in the journal only
    del sink
    sink = ResultSink(tmp_path / "o", "parquet", shard_rows=10, resume=True)
    assert sorted(sink.done) == [1, 2, 3] and sink.write(rows[1:]) == 1  # rows 2 and 3 are not written twice
    journal = (tmp_path / "o" / "_journal.jsonl").read_text()
    sink.close()
    (tmp_path / "o" / "_journal.jsonl").write_text(journal)  # killed between the shard's rename and the unlink
    ResultSink(tmp_path / "o", "parquet", shard_rows=10, resume=True).close()
    import pyarrow.parquet as pq

    on_disk = [r["row"] for f in sorted((tmp_path / "o").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(on_disk) == [1, 2, 3, 4]


def test_cli_audit_csv_resume(tmp_path, capsys, prompts):
    from dejaguard.core.cli import main

    with (tmp_path / "p.csv").open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([["caption"], *[[p] for p in prompts[:3]], [""]])
    args = ["audit", "--prompts", str(tmp_path / "p.csv"), "--out", str(tmp_path / "out"), "--threshold", "1"]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr()
    assert "scored 3 prompts" in out.out and "scored 0 prompts" in out.out and "3 already in the output" in out.out
    assert "1 malformed rows skipped (line 5: empty caption)" in out.err
    assert [r["row"] for r in _rows(tmp_path / "out")] == [2, 3, 4]


def test_resume_refuses_a_run_with_other_settings(tmp_path, testbed, prompts, monkeypatch):
    """Issue 23, defect 1: a resume with another seed, CFG, schedule, model or job used to mix rows."""
    src = _write_text(tmp_path / "p.txt", prompts[:3])
    out = tmp_path / "o.jsonl"
    audit_prompts(src, out, threshold=THRESHOLD, seed=1, denoiser=testbed, progress=False)
    _write_text(src, prompts[:4])  # one more prompt to score: a resume would append its row
    kw = {"threshold": THRESHOLD, "seed": 1, "denoiser": testbed, "resume": True, "progress": False}
    for change, named in [({"seed": 999}, "seed=1, this run has seed=999"),
                          ({"settings": ScoreSettings(guidance_scale=3.0)}, "guidance_scale=7.5, this run has"),
                          ({"settings": ScoreSettings(num_inference_steps=25)}, "schedule=50, this run has "
                           "schedule=25"),
                          ({"threshold": 2.0}, "threshold=1.0, this run has threshold=2.0"),
                          ({"settings": ScoreSettings(score="anisotropy")}, "score=None, this run has "
                           "score='anisotropy'"),
                          ({"settings": ScoreSettings(unconditional="zeros")}, "unconditional=None, this run has "
                           "unconditional='zeros'")]:
        with pytest.raises(DejaGuardError, match=f"cannot resume .*{named}") as err:
            audit_prompts(src, out, **{**kw, **change})
        assert "\n" not in str(err.value)
    with monkeypatch.context() as m:
        m.setattr(testbed, "fingerprint", lambda: "0123456789abcdef")  # another model
        with pytest.raises(DejaGuardError, match="this run has model='0123456789abcdef'"):
            audit_prompts(src, out, **kw)
    _pairs(tmp_path)
    with pytest.raises(DejaGuardError, match="job='prompts'.*this run has job='training-pairs'"):
        audit_training_pairs(tmp_path / "pairs", tmp_path / "drop.jsonl", THRESHOLD, scores=out, denoiser=testbed,
                             resume=True, progress=False)
    assert [r["seeds"] for r in _rows(out)] == [[1]] * 3  # nothing was mixed in
    summary = audit_prompts(src, out, **kw)  # the same settings resume
    assert summary.resumed == 3 and [r["seeds"] for r in _rows(out)] == [[1]] * 4

    (tmp_path / "o.jsonl.run.json").unlink()  # an output that does not say how it was written
    with pytest.raises(DejaGuardError, match="no record of the settings"):
        audit_prompts(src, out, **kw)


def _pairs(tmp_path: Path) -> None:
    """A folder of one (caption, image) pair: ``tmp_path / "pairs"``."""
    from PIL import Image

    (tmp_path / "pairs").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "pairs" / "a.png")
    (tmp_path / "pairs" / "a.txt").write_text("a red square")


@pytest.mark.parametrize("case", ["batch_size", "corrupt_parquet", "foreign_jsonl", "row_not_a_number",
                                  "row_not_an_object", "training_batch_size", "nul_in_image_path"])
def test_bad_audit_input_is_one_line_error(tmp_path, capsys, case):
    """Issue 23, defect 4: these ended in a ValueError (or KeyError, TypeError) traceback."""
    from dejaguard.core.cli import main

    src = _write_text(tmp_path / "p.txt", ["a red circle on the left"])
    audit = ["audit", "--prompts", str(src), "--threshold", "1"]
    if case == "batch_size":
        args, pattern = [*audit, "--out", str(tmp_path / "o.jsonl"), "--batch-size", "0"], "batch size must be"
    elif case == "training_batch_size":
        _pairs(tmp_path)
        args = ["audit-training", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "d.jsonl"),
                "--threshold", "1", "--batch-size", "0"]
        pattern = "batch size must be"
    elif case == "corrupt_parquet":
        (tmp_path / "o.parquet").write_text("not parquet")
        args, pattern = [*audit, "--out", str(tmp_path / "o.parquet"), "--resume"], "not a readable Parquet file"
    elif case == "nul_in_image_path":
        (tmp_path / "pairs.csv").write_text("caption,image\na red square,a\x00b.png\n")
        args = ["audit-training", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "d.jsonl"),
                "--threshold", "1"]
        pattern = "no usable (caption, image) pairs (1 malformed rows skipped)"
    else:
        line = {"foreign_jsonl": '{"a": 1}', "row_not_a_number": '{"row": "x"}', "row_not_an_object": "[1, 2]"}[case]
        (tmp_path / "o.jsonl").write_text(line + "\n")
        args, pattern = [*audit, "--out", str(tmp_path / "o.jsonl"), "--resume"], "is not a DejaGuard audit output"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dejaguard: error:") and pattern in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_training_pair_magnitude_mismatch_is_one_line_error(testbed):
    """Issue 23, defect 4: one caption and one seed per image; was a ValueError."""
    images = torch.zeros(2, *testbed.image_shape)
    with pytest.raises(DejaGuardError, match="one caption and one seed per image"):
        training_pair_magnitude(testbed, images, ["a red square"], [0, 1], 999)


def test_library_modules_do_not_import_the_testbed():
    """Issue 23: audits, the loss filter and mitigation load the testbed package only where it is the default
    model, lazily; importing them imports none of it."""
    code = ("import sys, dejaguard.core.audit, dejaguard.core.loss_filter, dejaguard.core.mitigate; "
            "print([m for m in sys.modules if m.startswith('dejaguard.core.testbed')])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Training-set filter
# ---------------------------------------------------------------------------------------------


def _save_png(image: np.ndarray, path: Path, upscale: int = 8) -> None:
    """``image``: (3, 32, 32) in [-1, 1] -> PNG at the VAE's input size (nearest upsampling)."""
    from PIL import Image

    arr = np.clip((image.transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    Image.fromarray(arr.repeat(upscale, 0).repeat(upscale, 1)).save(path)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """3 memorized training pairs, 3 novel ones, a missing and a corrupt image, as CSV and a folder."""
    from dejaguard.core.testbed.data import MEMORIZED, heldout_specs, load_memorized_images, render_scene

    d = tmp_path_factory.mktemp("pairs")
    (d / "img").mkdir()
    images = load_memorized_images()
    rows = []
    for m in MEMORIZED[:3]:
        _save_png(images[m.name], d / "img" / f"{m.name}.png")
        rows.append((m.eval_prompts[0], f"img/{m.name}.png", 1))
    rng = np.random.default_rng(0)
    for i, spec in enumerate(heldout_specs()[:3]):
        _save_png(render_scene(spec, rng), d / "img" / f"novel{i}.png")
        rows.append((spec.caption(), f"img/novel{i}.png", 0))
    (d / "img" / "broken.png").write_bytes(b"not a png")
    rows += [("a red circle on the left", "img/missing.png", 0), ("a blue square on the right", "img/broken.png", 0)]
    with (d / "pairs.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("caption", "image")] + [(c, i) for c, i, _ in rows])
    for c, i, _ in rows[:6]:
        (d / "img" / Path(i).with_suffix(".txt").name).write_text(c)
    return d, [label for _, _, label in rows[:6]]


def test_training_pair_magnitude_is_per_sample(testbed, pairs_dir):
    from dejaguard.core.audit import load_image

    d, _ = pairs_dir
    inp = read_pairs(d / "pairs.csv")
    items = inp.items[:6]
    images = torch.stack([load_image(it["path"], testbed.image_shape) for it in items])
    caps, seeds = [it["caption"] for it in items], list(range(6))
    before = testbed.counter.snapshot()
    whole = training_pair_magnitude(testbed, images, caps, seeds, 999)
    assert testbed.counter.since(before).calls == 1 and whole.shape == (6,)
    alone = torch.cat([training_pair_magnitude(testbed, images[i : i + 1], caps[i : i + 1], seeds[i : i + 1], 999)
                       for i in range(6)])
    assert torch.allclose(whole, alone, rtol=1e-5)
    mixed = training_pair_magnitude(testbed, images, caps, seeds, torch.tensor([999, 500] * 3))
    assert torch.allclose(mixed[::2], whole[::2], rtol=1e-5) and not torch.allclose(mixed[1::2], whole[1::2])


def test_training_filter_writes_drop_list(tmp_path, testbed, pairs_dir):
    d, labels = pairs_dir
    summary = audit_training_pairs(d / "pairs.csv", tmp_path / "drop.jsonl", threshold=0.0, denoiser=testbed,
                                   batch_size=4, progress=False)
    rows = summary.rows
    assert [r["row"] for r in rows] == [2, 3, 4, 5, 6, 7]
    mags = np.array([r["magnitude"] for r in rows])
    labels = np.array(labels)
    # The criterion's property: memorized training pairs stand out from novel ones.
    assert mags[labels == 1].mean() > mags[labels == 0].mean()
    assert sorted((r.row, r.reason.split(":")[0]) for r in summary.rejected) == [
        (8, "image not found"), (9, "unreadable image img/broken.png")]

    threshold = float((mags[labels == 1].mean() + mags[labels == 0].mean()) / 2)
    summary = audit_training_pairs(d / "pairs.csv", tmp_path / "drop2.jsonl", threshold=threshold, denoiser=testbed,
                                   progress=False)
    drop = [json.loads(line) for line in (tmp_path / "drop2.jsonl").read_text().splitlines()]
    assert [r["row"] for r in drop] == [r["row"] for r in summary.rows if r["magnitude"] > threshold]
    assert all({"caption", "image", "magnitude"} <= r.keys() for r in drop) and drop
    by_row = {r["row"]: r["magnitude"] for r in rows}
    assert all(_rel(by_row[r["row"]], r["magnitude"]) < 1e-5 for r in summary.rows)  # batch size 32 vs 4

    folder = audit_training_pairs(d / "img", tmp_path / "drop3.jsonl", threshold=threshold, denoiser=testbed,
                                  progress=False)
    assert sorted(r["magnitude"] for r in folder.rows) == pytest.approx(sorted(mags), rel=1e-5)
    assert [r.reason for r in folder.rejected] == ["no caption file broken.txt"]


# ---------------------------------------------------------------------------------------------
# Ray engine
# ---------------------------------------------------------------------------------------------


def test_ray_matches_single_process(tmp_path, ray_local, prompts, reference):
    src = _write_text(tmp_path / "p.txt", prompts)
    summary = audit_prompts(src, tmp_path / "ray", engine="ray", workers=2, batch_size=3, threshold=THRESHOLD,
                            progress=False)
    assert summary.stats.engine == "ray" and summary.stats.workers == 2
    rows = _rows(tmp_path / "ray")
    assert sorted(r["row"] for r in rows) == list(range(1, 21))
    assert max(_rel(r["score"], reference[r["prompt"]]) for r in rows) < 1e-5
    assert ray_local.is_initialized()  # an already running Ray is left running


def test_ray_worker_killed_mid_run(tmp_path, ray_local, prompts, reference, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"2:{marker}")  # the first actor to reach its 2nd batch exits abruptly, once
    src = _write_text(tmp_path / "p.txt", prompts[:12])
    summary = audit_prompts(src, tmp_path / "out.jsonl", engine="ray", workers=2, batch_size=2, threshold=THRESHOLD,
                            progress=False)
    assert marker.exists()  # a worker really died
    rows = _rows(tmp_path / "out.jsonl")
    assert sorted(r["row"] for r in rows) == list(range(1, 13))  # every prompt, exactly once
    assert max(_rel(r["score"], reference[r["prompt"]]) for r in rows) < 1e-5
    assert summary.stats.scored == 12


def test_ray_training_filter(tmp_path, ray_local, testbed, pairs_dir):
    d, _ = pairs_dir
    single = audit_training_pairs(d / "pairs.csv", tmp_path / "a.jsonl", threshold=1.0, denoiser=testbed,
                                  progress=False)
    ray_run = audit_training_pairs(d / "pairs.csv", tmp_path / "b.jsonl", threshold=1.0, engine="ray", workers=2,
                                   batch_size=2, progress=False)
    a = {r["row"]: r["magnitude"] for r in single.rows}
    b = {r["row"]: r["magnitude"] for r in ray_run.rows}
    assert a.keys() == b.keys() and max(_rel(a[k], b[k]) for k in a) < 1e-5
    assert [r.row for r in ray_run.rejected] == [8, 9]  # the unreadable image was reported by a worker


def test_cli_ray_engine_starts_and_stops_local_ray(tmp_path, prompts):
    with (tmp_path / "p.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("id", "caption"), *enumerate(prompts[:6])])
    proc = subprocess.run([sys.executable, "-m", "dejaguard", "audit", "--prompts", str(tmp_path / "p.csv"),
                           "--out", str(tmp_path / "out"), "--engine", "ray", "--workers", "2", "--batch-size", "2",
                           "--threshold", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 6 prompts" in proc.stdout and "Ray, 2 workers" in proc.stdout
    assert sorted(r["row"] for r in _rows(tmp_path / "out")) == list(range(2, 8))
