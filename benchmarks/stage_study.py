"""What each distillation stage, and each stage-2 recipe, does to 1-, 2-, 4- and 8-step quality, with seed spread.

For one shipped demo teacher (``--teacher digits`` or ``shapes``) this runs the demo's distill recipe
(``mlcm_train.demo.run.distill_config``) through ``train_distill``: stage 1 once per training seed, then
stage 2 from that stage-1 LoRA once per variant, each variant a set of ``DistillConfig`` changes. Every LoRA
is sampled with the official MLCM update at 1, 2, 4 and 8 steps on several evaluation seed sets (the demo's
240 prompts and noise per set) and scored by the teacher's classifier; the teacher's 25-step CFG-DDIM is the
reference. Prints one table (FD mean over all seeds, its spread max - min, prompt accuracy) and writes
``study.json`` with every measurement. Runs are cached in ``--work``: a rerun with more variants trains
only the new ones.

    python benchmarks/stage_study.py --teacher shapes --variants paper,fresh,fresh+reg --train-seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mlcm import segment_timesteps
from mlcm_train.demo.run import DemoSettings, _Bench, _prompt_file, distill_config
from mlcm_train.distill import train_distill
from mlcm_train.eval.digits import DEMO_TEACHERS, load_classifier
from mlcm_train.run.checkpoint import list_checkpoints, load_checkpoint

# Stage-2 recipes as DistillConfig changes on top of the demo's. "demo" is the demo's own recipe (its default
# after the stage-2 study); the others are the alternatives the study compared.
ONE_ROUND = {"stage2_rounds": (8,)}  # the paper's stage 2: one round at M = 8
ROUNDS = {"stage2_rounds": (8, 4, 2)}  # stage 2 at 8, 4, then 2 segments, a third of the steps each
VARIANTS: dict[str, dict] = {
    "demo": {},  # the demo's recipe with the trainer's defaults, whatever they are now
    "paper": {**ONE_ROUND, "stage2_renoise": "same"},  # Algorithm 2 read literally
    "lr/10": {**ONE_ROUND, "lr_stage2": 2e-5},
    "fresh": {**ONE_ROUND, "stage2_renoise": "fresh"},
    # The stage-1 loss is ~1000x smaller than stage 2's (2e-5 against 0.02-0.08 on the demo teachers), so
    # a weight of 1 leaves stage 2 unchanged; 100 and 1000 let it pull.
    "fresh+reg": {**ONE_ROUND, "stage2_renoise": "fresh", "stage2_stage1_weight": 1.0},
    "fresh+reg100": {**ONE_ROUND, "stage2_renoise": "fresh", "stage2_stage1_weight": 100.0},
    "fresh+reg1000": {**ONE_ROUND, "stage2_renoise": "fresh", "stage2_stage1_weight": 1000.0},
    "ema": {**ONE_ROUND, "ema_decay": 0.95},
    "progressive": {**ROUNDS, "stage2_renoise": "same"},
    "progressive fresh": {**ROUNDS, "stage2_renoise": "fresh"},
    "progressive ema": {**ROUNDS, "stage2_renoise": "same", "ema_decay": 0.95},
}
STEPS = (1, 2, 4, 8)
STAGE1 = "stage 1"


def _lora_file(run_dir: Path) -> Path:
    files = sorted((run_dir / "export").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/export holds no .safetensors LoRA; did the run finish?")
    return files[0]


def train(settings: DemoSettings, work: Path, seed: int, variant: str) -> dict[str, torch.Tensor]:
    """The LoRA of (seed, variant); ``variant`` None-like STAGE1 is the stage-1 run itself. Cached in ``work``."""
    prompts = _prompt_file(work, load_classifier(settings.teacher).dataset)
    seeded = replace(settings, seed=seed)
    stage1_dir = _run_dir(work, seed, STAGE1)
    if not (stage1_dir / "export").is_dir():
        shutil.rmtree(stage1_dir, ignore_errors=True)  # an interrupted run: start it again
        train_distill(distill_config(seeded, prompts, stage1_dir, settings.segments, (1,)))
    if variant == STAGE1:
        return load_checkpoint(list_checkpoints(stage1_dir)[-1]).lora
    run_dir = _run_dir(work, seed, variant)
    if not (run_dir / "export").is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        config = distill_config(
            seeded, prompts, run_dir, settings.segments, (2,), init_lora=str(_lora_file(stage1_dir))
        )
        train_distill(replace(config, **VARIANTS[variant]))
    return load_checkpoint(list_checkpoints(run_dir)[-1]).lora  # the end of its last phase


def evaluate(bench: _Bench, lora, steps: tuple[int, ...]) -> dict[int, dict]:
    """FD and prompt accuracy at each step count: the teacher's CFG-DDIM when ``lora`` is None, else MLCM."""
    settings = bench.settings
    rows = {}
    for s in steps:
        if lora is None:
            row, _ = bench.measure("teacher", s, 2 * s, None, bench.ddim(s))
        else:
            sampler = bench.consistency(segment_timesteps(s, settings.segments))
            row, _ = bench.measure("lora", s, s, lora, sampler)
        rows[str(s)] = {"fd": row.fd, "prompt_accuracy": row.prompt_accuracy}  # str: the JSON cache's keys
    return rows


def _run_dir(work: Path, seed: int, variant: str) -> Path:
    name = "stage1" if variant == STAGE1 else variant.replace("/", "_").replace("+", "_").replace(" ", "_")
    return work / f"seed{seed}" / name


def cached(path: Path, key: str, compute):
    """``compute()`` once per key, kept in the JSON file ``path`` (a run's scores survive a rerun)."""
    store = json.loads(path.read_text()) if path.is_file() else {}
    if key not in store:
        store[key] = compute()
        path.write_text(json.dumps(store, indent=1) + "\n")
    return store[key]


@torch.no_grad()
def diagnose(bench: _Bench, lora, teacher_steps: int = 10, count: int = 240) -> dict[str, dict[str, float]]:
    """Where a LoRA's x0 goes wrong, per boundary, on the states 8-step sampling visits and on stage 2's.

    At each boundary t of the 8-step schedule: the student's x0 from a state against the teacher's answer
    from that same state (CFG-DDIM down to 0 in ``teacher_steps`` steps), as a mean squared latent error.
    ``sampled``: the states the official 8-step update visits (x0 re-noised with fresh noise);
    ``stage2 same``/``stage2 fresh``: stage 2's start states, the 4-step student sample forward-diffused
    with the starting noise again (Algorithm 2 read literally) or with fresh noise.
    """
    from mlcm.vp import add_noise, ddim_to, x0_from_eps
    from mlcm_train.method.rollout import student_rollout
    from mlcm_train.method.teacher_ddim import cfg_eps
    from mlcm_train.method.timesteps import stage2_student_timesteps
    from mlcm_train.models.student import load_lora_state_dict

    settings = bench.settings
    acp, noise = bench.acp, bench.noise[:count]
    cond, uncond = bench.cond[:count], bench.uncond[:count]
    load_lora_state_dict(bench.unet, lora)
    generator = torch.Generator().manual_seed(settings.seed + 10_000)

    def fresh() -> torch.Tensor:
        return torch.randn(noise.shape, generator=generator)

    def teacher_x0(z, t: int) -> torch.Tensor:
        from mlcm_train.models.student import adapters_disabled

        grid = torch.linspace(t, 0, teacher_steps + 1).round().long().tolist()
        with adapters_disabled(bench.unet):
            for a, b in zip(grid, grid[1:]):
                ta = torch.full((z.shape[0],), a, dtype=torch.long)
                eps = cfg_eps(bench.eps, z, ta, cond, uncond, settings.guidance_scale)
                x0 = x0_from_eps(z, eps, ta, acp)
                z = ddim_to(z, x0, ta, torch.full_like(ta, b), acp) if b > 0 else x0
        return z

    def error(z, t: int) -> float:
        tv = torch.full((z.shape[0],), t, dtype=torch.long)
        return float((x0_from_eps(z, bench.eps(z, tv, cond), tv, acp) - teacher_x0(z, t)).square().mean())

    timesteps = segment_timesteps(8, settings.segments)
    out: dict[str, dict[str, float]] = {"sampled": {}, "stage2 same": {}, "stage2 fresh": {}}
    z = noise
    for i, t in enumerate(timesteps):
        out["sampled"][str(t)] = error(z, t)
        tv = torch.full((z.shape[0],), t, dtype=torch.long)
        x0 = x0_from_eps(z, bench.eps(z, tv, cond), tv, acp)
        if i + 1 < len(timesteps):
            z = add_noise(x0, fresh(), torch.full_like(tv, timesteps[i + 1]), acp)
    q_steps = stage2_student_timesteps(4, len(acp))
    sample = student_rollout(
        bench.eps, noise, [noise] * (len(q_steps) - 1), cond, timesteps=q_steps, alphas_cumprod=acp
    )
    for t in timesteps:
        tv = torch.full((noise.shape[0],), t, dtype=torch.long)
        out["stage2 same"][str(t)] = error(add_noise(sample, noise, tv, acp), t)
        out["stage2 fresh"][str(t)] = error(add_noise(sample, fresh(), tv, acp), t)
    return out


def _summary(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ±{(max(values) - min(values)) / 2:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="digits", help="digits or shapes, or a demo teacher folder")
    parser.add_argument("--variants", default="demo", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--train-seeds", default="0", help="distill seeds, comma list")
    parser.add_argument("--eval-seeds", default="0,1", help="evaluation noise seed sets, comma list")
    parser.add_argument("--stage2-iterations", type=int, default=DemoSettings.stage2_iterations)
    parser.add_argument("--iterations", type=int, default=DemoSettings.iterations)
    parser.add_argument("--work", type=Path, default=Path("reports/stage_study"))
    parser.add_argument(
        "--samples",
        type=int,
        default=960,
        help="images per row and seed set (default 960: at the demo's 240 the shapes set's real-against-real "
        "FD alone ranges 129-324 between draws, at 960 37-52)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also print each LoRA's x0 error against the teacher per boundary (first seeds only)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    teacher = DEMO_TEACHERS.get(args.teacher, Path(args.teacher))
    settings = DemoSettings(
        teacher=teacher,
        iterations=args.iterations,
        stage2_iterations=args.stage2_iterations,
        samples=args.samples,
        reward=False,
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    work = args.work / Path(teacher).name
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {"teacher 25 steps": {}, "teacher CFG-DDIM": {}}
    started = time.perf_counter()
    benches = {e: _Bench(replace(settings, seed=e)) for e in eval_seeds}
    teacher_scores = work / "teacher_scores.json"
    for e, bench in benches.items():
        key = f"eval{e}/samples{args.samples}"
        results["teacher 25 steps"][f"eval{e}"] = cached(
            teacher_scores, f"{key}/25", lambda b=bench: evaluate(b, None, (settings.teacher_steps,))
        )
        results["teacher CFG-DDIM"][f"eval{e}"] = cached(
            teacher_scores, f"{key}/ddim", lambda b=bench: evaluate(b, None, (2, 4, 8))
        )
    for name in [STAGE1, *variants]:
        results[name] = {}
        for seed in train_seeds:
            tick = time.perf_counter()
            lora = train(settings, work, seed, name)
            print(f"trained {name!r} seed {seed} in {time.perf_counter() - tick:.0f} s", file=sys.stderr)
            scores = _run_dir(work, seed, name) / "scores.json"
            for e, bench in benches.items():
                results[name][f"seed{seed}/eval{e}"] = cached(
                    scores, f"eval{e}/samples{args.samples}", lambda b=bench, lo=lora: evaluate(b, lo, STEPS)
                )
    top = str(settings.teacher_steps)
    teacher_fd = [r[top]["fd"] for r in results["teacher 25 steps"].values()]
    teacher_acc = [r[top]["prompt_accuracy"] for r in results["teacher 25 steps"].values()]
    print(
        f"\n{args.teacher}: teacher CFG-DDIM 25 steps FD {_summary(teacher_fd)}, prompt acc. "
        f"{100 * statistics.fmean(teacher_acc):.1f}%; {len(train_seeds)} train x {len(eval_seeds)} eval seeds, "
        f"FD mean ±half-range (prompt acc.)\n"
    )
    print("| model | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for name, runs in results.items():
        if name == "teacher 25 steps":
            continue
        cells = []
        for s in STEPS:
            fds = [r[str(s)]["fd"] for r in runs.values() if str(s) in r]
            accs = [r[str(s)]["prompt_accuracy"] for r in runs.values() if str(s) in r]
            cells.append(f"{_summary(fds)} ({100 * statistics.fmean(accs):.0f}%)" if fds else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.diagnose:
        bench = benches[eval_seeds[0]]
        print("\nx0 error against the teacher's answer from the same state (latent MSE), per boundary:")
        for name in [STAGE1, *variants]:
            lora = train(settings, work, train_seeds[0], name)
            scores = _run_dir(work, train_seeds[0], name) / "scores.json"
            found = cached(scores, f"diagnosis/eval{eval_seeds[0]}", lambda lo=lora: diagnose(bench, lo))
            results[name]["diagnosis"] = found
            for kind, per_t in found.items():
                cells = " | ".join(f"{t}: {v:.3f}" for t, v in per_t.items())
                print(f"| {name} | {kind} | {cells} |")
    out = work / "study.json"
    out.write_text(json.dumps({"teacher": str(teacher), "results": results}, indent=1) + "\n")
    print(f"\n{time.perf_counter() - started:.0f} s; every measurement in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
