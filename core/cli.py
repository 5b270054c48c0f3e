"""The ``dejaguard`` command line: demo, audit, calibrate, localize, subspace, and the testbed's train / evaluate.

Bad input ends in one line ``dejaguard: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .errors import DejaGuardError
from .progress import TqdmProgress


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.formatwarning = lambda msg, *a, **k: f"dejaguard: warning: {msg}\n"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped. Errors for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise DejaGuardError(f"prompt file not found: {path}")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise DejaGuardError(f"prompt file {path} is not UTF-8 text") from err
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DejaGuardError(f"prompt file {path} has no prompts")
    return prompts


def _settings(args: argparse.Namespace):
    from .detect import ScoreSettings

    return ScoreSettings(steps=args.steps, generations=args.generations, guidance_scale=args.cfg)


def _threshold(args: argparse.Namespace, denoiser, settings) -> float:
    from .denoiser import BUNDLED_TESTBED
    from .detect import load_threshold

    if args.threshold is not None:
        return args.threshold
    return load_threshold(args.calibration or args.model or BUNDLED_TESTBED, settings, denoiser.fingerprint())


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit_prompts, warn_rejected

    settings = _settings(args)
    summary = audit_prompts(
        args.prompts, args.out, model=args.model, device=args.device, settings=settings, seed=args.seed,
        threshold=args.threshold, calibration=args.calibration, batch_size=args.batch_size, engine=args.engine,
        address=args.address, workers=args.workers, resume=args.resume, caption_column=args.caption_column,
        fmt=args.format, shard_rows=args.shard_rows, progress=True)
    warn_rejected(summary)
    rows, threshold, st = summary.rows, summary.threshold, summary.stats
    flagged = summary.flagged
    engine = "one process" if st.engine == "single" else f"Ray, {st.workers} workers"
    resumed = f"; {summary.resumed} already in the output" if summary.resumed else ""
    print(f"scored {st.scored} prompts in {st.wall_s:.1f}s ({engine}; "
          f"{st.scored * 2 * settings.steps * settings.generations} noise predictions){resumed}; "
          f"{flagged} of {len(rows)} flagged above {threshold:.4f}")
    print(f"wrote {summary.out}")
    if args.report:
        from .report import ReportData, write_report

        path = write_report(ReportData(
            title="DejaGuard audit", prompts=[r["prompt"] for r in rows], scores=[r["score"] for r in rows],
            flagged=[r["flagged"] for r in rows], threshold=threshold,
            summary={"model": str(args.model or "bundled testbed"), "prompts": len(rows),
                     "flagged": flagged, "threshold": f"{threshold:.4f}", "settings": settings.key(),
                     "malformed rows skipped": len(summary.rejected), "wall seconds": f"{st.wall_s:.1f}"},
        ), args.report)
        print(f"wrote {path}")
    return 0


def cmd_audit_training(args: argparse.Namespace) -> int:
    import numpy as np

    from .audit import audit_training_pairs, warn_rejected

    try:
        timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    except ValueError as err:
        raise DejaGuardError(f"--timesteps must be comma-separated integers: {args.timesteps!r}") from err
    summary = audit_training_pairs(
        args.pairs, args.out, args.threshold, scores=args.scores, model=args.model, device=args.device,
        timesteps=timesteps, batch_size=args.batch_size, engine=args.engine, address=args.address,
        workers=args.workers, resume=args.resume, caption_column=args.caption_column,
        image_column=args.image_column, progress=True)
    warn_rejected(summary)
    rows, st = summary.rows, summary.stats
    mags = np.array([r["magnitude"] for r in rows])
    print(f"scored {st.scored} pairs in {st.wall_s:.1f}s; {summary.flagged} of {len(rows)} to drop "
          f"(magnitude > {args.threshold:g}); magnitude median {np.median(mags):.4f}, "
          f"99th percentile {np.quantile(mags, 0.99):.4f}")
    print(f"wrote {args.out} (pairs to drop) and {summary.out} (every pair's magnitude)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .denoiser import BUNDLED_TESTBED, load_denoiser
    from .detect import calibrate, save_calibration

    denoiser = load_denoiser(args.model, device=args.device)
    memorized: list[str] = []
    if args.prompts:
        prompts, source = read_prompts(args.prompts), str(args.prompts)
        if args.memorized:
            memorized = read_prompts(args.memorized)
    elif args.model is None:
        from .testbed.data import calibration_specs, memorized_eval_prompts

        prompts = [s.caption() for s in calibration_specs()]
        source = "testbed calibration_specs() (200 compositional prompts, disjoint from held-out)"
        memorized = [p for p, _ in memorized_eval_prompts()]
    else:
        raise DejaGuardError("--prompts (a file of prompts known not to be memorized) is required for this model")
    with TqdmProgress("calibrate", unit="gen") as bar:
        cal = calibrate(denoiser, prompts, _settings(args), args.target_fpr, source, memorized, progress=bar)
    path = save_calibration(cal, args.out or args.model or BUNDLED_TESTBED)
    tpr = ""
    if cal.memorized_tpr is not None:
        tpr = f"; {cal.memorized_tpr:.1%} of {len(memorized)} memorized prompts flagged"
    print(f"threshold {cal.threshold:.4f} for {_settings(args).key()} at target FPR {cal.target_fpr:g} "
          f"from {cal.n_prompts} prompts{tpr}")
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), device=args.device)
    return 0


def cmd_testbed_train(args: argparse.Namespace) -> int:
    from .denoiser import BUNDLED_TESTBED
    from .testbed.train import TrainConfig, train

    out = Path(args.out)
    if out.resolve() == BUNDLED_TESTBED.resolve() and not args.overwrite_bundled:
        raise DejaGuardError("refusing to overwrite the shipped testbed weights; pass --overwrite-bundled")
    cfg = TrainConfig(seed=args.seed) if args.steps is None else TrainConfig(steps=args.steps, seed=args.seed)
    if args.filter is not None:
        cfg.filter_threshold = args.filter
        cfg.filter_min_timestep = args.filter_min_timestep
    record = train(out, cfg, checkpoint_every=args.checkpoint_every, device=args.device)
    print(f"trained {cfg.steps} steps on {record['device']} in {record['wall_seconds']:.0f}s; wrote {out}")
    return 0


def cmd_testbed_evaluate(args: argparse.Namespace) -> int:
    from .denoiser import load_denoiser
    from .testbed.evaluate import evaluate

    denoiser = load_denoiser(args.model, device=args.device)
    result = evaluate(denoiser, seeds=tuple(range(args.seeds)), novel_count=args.novel,
                      novel_seeds=args.novel_seeds)
    summary = {k: v for k, v in result["memorized"].items() if k != "per_prompt"}
    print(json.dumps({"memorized": summary, "novel": result["novel"], "unconditional": result["unconditional"]},
                     indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bar_progress(desc: str):
    """A tqdm bar driven by fractions in [0, 1] (the NeMo progress callback), and a close function."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, desc=desc, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def update(fraction: float, stage: str) -> None:
        bar.set_description(f"{desc}: {stage}", refresh=False)
        bar.update(max(0, round(1000 * fraction) - bar.n))

    return update, bar.close


def cmd_localize(args: argparse.Namespace) -> int:
    from .denoiser import load_denoiser
    from .neurons import LocalizeSettings, localize, nemo_statistics

    denoiser = load_denoiser(args.model, device=args.device)
    stats_prompts = read_prompts(args.stats_prompts) if args.stats_prompts else None
    if stats_prompts is None and args.model is not None:
        print("dejaguard: note: activation statistics from the testbed's compositional captions; pass "
              "--stats-prompts with prompts typical for this model that are not memorized", file=sys.stderr)
    settings = LocalizeSettings(seeds=args.seeds, schedule="reference" if args.reference else "fast",
                                batch=args.batch, score=args.score, blocks=args.blocks,
                                generation_steps=args.generation_steps, verify_rounds=args.verify_rounds)
    update, close = _bar_progress("statistics")
    stats = nemo_statistics(denoiser, stats_prompts, seeds=settings.seeds, score_prompts=args.score_prompts,
                            cache=args.cache, progress=update, score=args.score, blocks=args.blocks,
                            generation_steps=args.generation_steps)
    close()
    update, close = _bar_progress("localizing")
    try:
        mask = localize(denoiser, args.prompt, stats, settings, threshold=args.threshold, progress=update)
    finally:
        close()
    info = mask.info
    if not info["memorized"]:
        print(f"not memorized by NeMo's measure: score {info['score_before']:.3f} < threshold "
              f"{info['threshold']:.3f}; the mask is empty")
    else:
        print(f"{info['neurons']} neuron(s) switch off the memorization: score {info['score_before']:.3f} -> "
              f"{info['score_after']:.3f} (threshold {info['threshold']:.3f}); {info['candidate_evaluations']} "
              f"candidate sets, {info['unet_evals']} noise predictions in {info['unet_calls']} UNet calls, "
              f"{info['wall_s']:.1f}s")
        for r in info.get("verification", []):
            print(f"verified on unseen seeds {r['seeds'][0]}..{r['seeds'][-1]}: score {r['score_unmasked']:.3f} -> "
                  f"{r['score_masked']:.3f} with {r['neurons']} neurons off ({'passed' if r['passed'] else 'failed'})")
        print(mask.describe())
    print(f"wrote {mask.save(args.out)}")
    return 0


def cmd_subspace(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .denoiser import load_denoiser
    from .prune import subspace_mask

    prompts = read_prompts(args.prompts)
    neutral = read_prompts(args.neutral) if args.neutral else [""]
    denoiser = load_denoiser(args.model, device=args.device)
    bar = tqdm(total=(len(prompts) + len(neutral)) * args.seeds, desc="FFN activations", unit="gen")

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        mask = subspace_mask(denoiser, prompts, neutral, ratio=args.ratio, seeds=tuple(range(args.seeds)),
                             steps=args.steps, progress=update)
    finally:
        bar.close()
    info = mask.info
    print(f"pruned {info['weights']} weights ({args.ratio:.2%} per output row) in {len(mask.layers)} ff.net.2 "
          f"layers from {len(prompts)} memorized prompts; {info['unet_evals']} noise predictions, "
          f"{info['wall_s']:.1f}s")
    print(f"wrote {mask.save(args.out)}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .denoiser import load_denoiser
    from .explain import ranking_text, to_json, token_significance

    denoiser = load_denoiser(args.model, device=args.device)
    result = token_significance(denoiser, args.prompt, steps=args.steps, seed=args.seed)
    print(json.dumps(to_json(result, args.steps)) if args.json else ranking_text(result, args.steps))
    return 0


def mitigation_levels(args: argparse.Namespace, denoiser) -> tuple[float, float]:
    """(threshold, target): ``--threshold`` / ``--target``, else core.mitigate.default_levels from the calibration."""
    from .denoiser import BUNDLED_TESTBED
    from .mitigate import default_levels

    if args.threshold is not None and args.target is not None:
        return args.threshold, args.target
    threshold, target = default_levels(args.calibration or args.model or BUNDLED_TESTBED, denoiser.fingerprint())
    if args.threshold is not None:
        threshold = args.threshold
        target = min(target, threshold)
    if args.target is not None:
        target = args.target
        threshold = max(threshold, target)  # a --target above the calibrated threshold raises the threshold too
    return threshold, target


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .denoiser import load_denoiser
    from .mitigate import DEFAULT_LR, DEFAULT_MAX_ITERATIONS, content_tokens, mitigate_prompt
    from .sampling import generate

    if not args.prompt.strip():
        raise DejaGuardError("empty prompt: --prompt states nothing to generate")
    denoiser = load_denoiser(args.model, device=args.device)
    content_tokens(denoiser, args.prompt)
    cond = None
    if args.mitigate == "embedding":
        threshold, target = mitigation_levels(args, denoiser)
        lr = DEFAULT_LR if args.lr is None else args.lr
        iterations = DEFAULT_MAX_ITERATIONS if args.max_iterations is None else args.max_iterations
        r = mitigate_prompt(denoiser, args.prompt, [args.seed], target, threshold=threshold, lr=lr,
                            max_iterations=iterations, num_inference_steps=args.steps)
        cond = r.embedding
        state = ("untouched: at or below the threshold" if r.iterations == 0 else
                 "target met" if r.reached else "target NOT met")
        print(f"mitigation (embedding): score {r.score_before:.4f} -> {r.score_after:.4f} (threshold "
              f"{threshold:.4f}, target {target:.4f}; {state}) in {r.iterations} iterations, "
              f"{r.unet_forwards} UNet forwards, {r.unet_backwards} backwards")
    with TqdmProgress("generate", unit="image") as bar:
        samples = generate(denoiser, [args.prompt], [args.seed], args.steps, args.cfg, cond_embeddings=cond,
                           progress=bar)
    image = denoiser.decode(samples)[0]
    array = ((image.float().cpu().clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(out)
    print(f"wrote {out} ({args.steps} steps, CFG {args.cfg:g}, seed {args.seed})")
    return 0


DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejaguard", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, scoring: bool = True) -> None:
        sp.add_argument("--model", type=Path, default=None,
                        help="diffusers-format model folder (default: the bundled testbed)")
        sp.add_argument("--device", default=None, help=DEVICE_HELP)
        if scoring:
            sp.add_argument("--steps", type=int, default=1, help="first sampling steps averaged (default 1)")
            sp.add_argument("--generations", type=int, default=1, help="initial noises averaged (default 1)")
            sp.add_argument("--cfg", type=float, default=7.5, help="guidance scale of the trajectory (steps > 1)")

    sp = sub.add_parser("demo", help="generate, score and report on the bundled testbed")
    sp.add_argument("--out", default="dejaguard-demo", help="output folder (default ./dejaguard-demo)")
    sp.add_argument("--device", default=None)
    sp.set_defaults(func=cmd_demo)

    def engine_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--engine", choices=["single", "ray"], default="single",
                        help="single: this process (default); ray: a pool of model-holding Ray actors")
        sp.add_argument("--address", default=None, help="Ray cluster (ray://head:10001, auto, host:6379); "
                        "default: start a local Ray and stop it at the end")
        sp.add_argument("--workers", type=int, default=None,
                        help="Ray actors, one model each (default: the cluster's GPUs, else its CPUs)")
        sp.add_argument("--resume", action="store_true", help="skip the rows already in the output")

    sp = sub.add_parser("audit", help="score a prompt list for memorization")
    common(sp)
    sp.add_argument("--prompts", required=True, help="text file (one prompt per line), or CSV/Parquet with a "
                    "caption column")
    sp.add_argument("--out", required=True, help="X.jsonl, X.parquet, or a folder of shards; one object per prompt")
    sp.add_argument("--seed", type=int, default=None, help="base seed (default: derived from each prompt)")
    sp.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    sp.add_argument("--calibration", type=Path, default=None, help="calibration file (default: in the model folder)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--report", default=None, help="also write an HTML report")
    sp.add_argument("--caption-column", default=None,
                    help="caption column of a CSV/Parquet input (default: caption, text or prompt)")
    sp.add_argument("--format", choices=["jsonl", "parquet"], default=None,
                    help="shard format when --out is a folder (default jsonl; a .jsonl/.parquet file sets its own)")
    sp.add_argument("--shard-rows", type=int, default=100_000, help="rows per output shard (folder output)")
    engine_options(sp)
    sp.set_defaults(func=cmd_audit)

    sp = sub.add_parser("audit-training", help="training-set filter: list the (caption, image) pairs to drop")
    common(sp, scoring=False)
    sp.add_argument("--pairs", required=True, help="CSV/Parquet with caption and image-path columns, or a folder "
                    "of images with .txt caption files")
    sp.add_argument("--threshold", type=float, required=True, help="drop pairs whose magnitude exceeds this")
    sp.add_argument("--out", required=True, help="JSONL of the pairs to drop")
    sp.add_argument("--scores", default=None, help="JSONL of every pair's magnitude (default: OUT.scores.jsonl)")
    sp.add_argument("--timesteps", default="999", help="comma-separated training timesteps averaged (default 999)")
    sp.add_argument("--caption-column", default=None)
    sp.add_argument("--image-column", default=None, help="image path column (default: image, image_path, path, "
                    "file, file_name or filename)")
    sp.add_argument("--batch-size", type=int, default=32)
    engine_options(sp)
    sp.set_defaults(func=cmd_audit_training)

    sp = sub.add_parser("calibrate", help="calibrate the detection threshold on non-memorized prompts")
    common(sp)
    sp.add_argument("--prompts", default=None, help="prompts known not to be memorized (default for the testbed: "
                    "its calibration prompts)")
    sp.add_argument("--memorized", default=None, help="optional known memorized prompts, to report the TPR")
    sp.add_argument("--target-fpr", type=float, default=0.01)
    sp.add_argument("--out", default=None, help="calibration file (default: dejaguard_calibration.json in the model)")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("localize", help="NeMo: find the cross-attention neurons that carry a memorized prompt")
    common(sp, scoring=False)
    sp.add_argument("--prompt", required=True, help="the memorized prompt")
    sp.add_argument("--out", required=True, help="neuron mask file to write (.safetensors)")
    sp.add_argument("--seeds", type=int, default=4, help="fixed initial noises of the memorization score (default 4)")
    sp.add_argument("--batch", type=int, default=2,
                    help="candidate masks per batched UNet call (default 2; more on a GPU)")
    sp.add_argument("--score", choices=["ssim", "magnitude", "generation"], default="ssim",
                    help="memorization score: NeMo's first-step seed-consistency SSIM (default), the detector's "
                    "first-step magnitude, or 'generation': short generations of the masked model compared with "
                    "the unmasked model's (catches memorization that re-forms after the first step; slower)")
    sp.add_argument("--generation-steps", type=int, default=10,
                    help="steps of the 'generation' score's short generations (default 10)")
    sp.add_argument("--blocks", choices=["down_mid", "all"], default="down_mid",
                    help="attn2.to_v layers searched: down and mid blocks (the paper's, default) or all, up blocks too")
    sp.add_argument("--verify-rounds", type=int, default=0,
                    help="check the mask on --seeds unseen seeds; if it fails there, search again with them too "
                    "(at most this many rounds; default 0: no check)")
    sp.add_argument("--reference", action="store_true",
                    help="the paper's sequential schedule, one candidate per UNet call (slower; for comparison)")
    sp.add_argument("--threshold", type=float, default=None,
                    help="memorization-score threshold (default: mean + 1 std over the statistics prompts)")
    sp.add_argument("--stats-prompts", default=None,
                    help="non-memorized prompts for the activation statistics (default: the testbed's captions)")
    sp.add_argument("--score-prompts", type=int, default=64,
                    help="how many of them calibrate the score threshold (default 64)")
    sp.add_argument("--cache", default=None, help="statistics cache folder (default $DEJAGUARD_CACHE or "
                    "~/.cache/dejaguard)")
    sp.set_defaults(func=cmd_localize)

    sp = sub.add_parser("subspace", help="prune a shared FFN subspace of many memorized prompts (one static mask)")
    common(sp, scoring=False)
    sp.add_argument("--prompts", required=True, help="memorized prompts, one per line")
    sp.add_argument("--out", required=True, help="neuron mask file to write (.safetensors)")
    sp.add_argument("--ratio", type=float, default=0.01, help="weights pruned per output row (default 0.01)")
    sp.add_argument("--neutral", default=None, help="neutral prompts to contrast with (default: the empty prompt)")
    sp.add_argument("--steps", type=int, default=5, help="first sampling steps the activations come from")
    sp.add_argument("--seeds", type=int, default=2, help="initial noises per prompt (default 2)")
    sp.set_defaults(func=cmd_subspace)

    sp = sub.add_parser("explain", help="token significance: which prompt words drive the text-conditional "
                        "prediction")
    common(sp, scoring=False)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--steps", type=int, default=1, help="first sampling steps averaged (default 1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sp.add_argument("--json", action="store_true", help="print JSON (tokens, word ids, scores) instead of a ranking")
    sp.set_defaults(func=cmd_explain)

    sp = sub.add_parser("generate", help="generate one image, optionally with memorization mitigation")
    common(sp, scoring=False)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", required=True, help="PNG file to write")
    sp.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sp.add_argument("--steps", type=int, default=50, help="DDIM sampling steps (default 50)")
    sp.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    sp.add_argument("--mitigate", choices=["embedding"], default=None,
                    help="embedding: if the prompt's first-step memorization score exceeds --threshold, "
                    "optimize its embedding until the score is at or below --target (Wen et al.)")
    sp.add_argument("--threshold", type=float, default=None,
                    help="mitigate only if the first-step score exceeds this (default: the calibrated detection "
                    "threshold)")
    sp.add_argument("--target", type=float, default=None,
                    help="first-step score to push a mitigated prompt to (default: half the calibrated median "
                    "score of non-memorized prompts)")
    sp.add_argument("--calibration", type=Path, default=None, help="calibration file (default: in the model folder)")
    sp.add_argument("--lr", type=float, default=None,
                    help="AdamW learning rate of the mitigation (default: core.mitigate.DEFAULT_LR, 0.3)")
    sp.add_argument("--max-iterations", type=int, default=None,
                    help="mitigation iterations at most (default: core.mitigate.DEFAULT_MAX_ITERATIONS, 30)")
    sp.set_defaults(func=cmd_generate)

    tb = sub.add_parser("testbed", help="the bundled memorizing testbed model").add_subparsers(
        dest="testbed_command", required=True)
    sp = tb.add_parser("train", help="retrain the testbed from scratch (CPU, under an hour)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--checkpoint-every", type=int, default=0)
    sp.add_argument("--device", default=None, help=DEVICE_HELP)
    sp.add_argument("--overwrite-bundled", action="store_true")
    sp.add_argument("--filter", type=float, default=None, metavar="THRESHOLD",
                    help="training-time mitigation: drop samples whose text-conditional magnitude exceeds "
                    "THRESHOLD from the loss (default: off)")
    sp.add_argument("--filter-min-timestep", type=int, default=0, metavar="T",
                    help="with --filter: judge only samples drawn at timestep >= T (default 0: all)")
    sp.set_defaults(func=cmd_testbed_train)
    sp = tb.add_parser("evaluate", help="measure the testbed's memorization and novel-prompt alignment")
    common(sp, scoring=False)
    sp.add_argument("--seeds", type=int, default=16, help="seeds per memorized prompt (default 16)")
    sp.add_argument("--novel", type=int, default=240, help="held-out novel prompts, 1..240 (default 240)")
    sp.add_argument("--novel-seeds", type=int, default=4, metavar="N",
                    help="seeds per novel prompt (default 4; 1 is the protocol of v5's first figures)")
    sp.add_argument("--json", default=None)
    sp.set_defaults(func=cmd_testbed_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_libraries()
        return args.func(args)
    except DejaGuardError as err:
        print(f"dejaguard: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dejaguard: interrupted", file=sys.stderr)
        return 130
