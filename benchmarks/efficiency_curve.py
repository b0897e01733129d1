"""Quality against teacher compute: 2-, 4- and 8-step FD and prompt accuracy along a run, per way of making states.

For a shipped demo teacher this trains the demo's distill recipe (``mlcm_train.demo.run.distill_config``,
stage 1 then stage 2) once per option and training seed, with a checkpoint every ``--every`` steps, and
scores every checkpoint like the stage study (official MLCM sampling, the teacher's classifier, 960 images
per row and seed set). The x axis is what the run had spent at that checkpoint: teacher UNet evaluations
(CFG counts 2) and wall seconds from its ``metrics.jsonl``, plus, for the cached options, the teacher
calls and seconds that made the cache. Options:

- ``online``: the default; Algorithm 1 states, one teacher trajectory per sample.
- ``shared``: ``--stage1-states shared``, one trajectory per M samples (one state per segment).
- ``cache xK``: ``python -m mlcm_train trajectories`` states, 1/K of the stage-1 samples, each used K times.
- ``cache xK +P% online``: a fraction P of the stage-1 samples made online (``--trajectory-fresh-fraction``),
  the rest read from a cache of 1/K of them.

Prints a table, writes ``curve.json`` and ``curve.png`` into ``--work``.

    python benchmarks/efficiency_curve.py --teacher digits --options online,shared,"cache x2" --train-seeds 0,1
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
from mlcm.segments import segment_boundaries
from mlcm_train.demo.run import DemoSettings, _Bench, _prompt_file, distill_config
from mlcm_train.distill import generate_trajectories, train_distill
from mlcm_train.eval.digits import DEMO_TEACHERS, load_classifier
from mlcm_train.run.checkpoint import list_checkpoints, load_checkpoint

STEPS = (2, 4, 8)
OPTIONS = ("online", "shared", "cache x2", "cache x4", "cache x2 +25% online")


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {int(r["global_step"]): r for r in rows if "teacher_evals" in r}


def _cache(
    settings: DemoSettings, prompts: Path, work: Path, seed: int, reuse: int, online: float = 0.0
) -> tuple[Path, dict]:
    """Pre-generated states for 1/reuse of the stage-1 samples read from a cache; (folder, its cost)."""
    folder = work / f"seed{seed}" / f"states_x{reuse}_{online:g}"  # not the run folder of the option
    cost_file = folder / "cost.json"
    if not cost_file.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        config = distill_config(
            replace(settings, seed=seed), prompts, folder / "gen", settings.segments, (1,)
        )
        samples = round(settings.iterations * settings.batch_size * (1 - online) / reuse)
        tick = time.perf_counter()
        generate_trajectories(config, folder / "states", samples=samples, shard_size=256)
        seconds = time.perf_counter() - tick
        evals = _cache_evaluations(folder / "states", settings.segments)
        cost_file.write_text(json.dumps({"teacher_evals": evals, "wall_s": seconds, "samples": samples}))
    return folder / "states", json.loads(cost_file.read_text())


def _cache_evaluations(states: Path, segments: int) -> int:
    """Teacher UNet evaluations that made the shards: 2 per CFG step, L = M - s steps per state (Algorithm
    1), none for a top-segment state at t_m = T."""
    from safetensors.torch import load_file

    top = segment_boundaries(segments)[0]
    total = 0
    for shard in sorted(states.glob("shard-*.safetensors")):
        tensors = load_file(str(shard))
        segment, t_m = tensors["segment"].long(), tensors["t_m"].long()
        steps = torch.where(t_m >= top, torch.zeros_like(segment), segments - segment)
        total += int(2 * steps.sum())
    return total


def train(settings: DemoSettings, work: Path, seed: int, option: str, every: int) -> tuple[Path, dict]:
    """Run (or reuse) one option's run; (run folder, the cache's cost or zeros)."""
    prompts = _prompt_file(work, load_classifier(settings.teacher).dataset)
    run_dir = work / f"seed{seed}" / option.replace(" ", "_")
    changes: dict = {"checkpoint_every": every, "checkpoints_keep": 0, "log_every": every}
    extra = {"teacher_evals": 0, "wall_s": 0.0}
    if option == "shared":
        changes["stage1_states"] = "shared"
    elif option.startswith("cache x"):
        reuse, _, online = option.removeprefix("cache x").partition(" +")
        fraction = float(online.removesuffix("% online")) / 100 if online else 0.0
        states, extra = _cache(settings, prompts, work, seed, int(reuse), fraction)
        changes.update(trajectories=str(states), trajectory_fresh_fraction=fraction)
    elif option != "online":
        raise ValueError(f"option {option!r} is unknown; choose from {', '.join(OPTIONS)}")
    if not (run_dir / "export").is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        seeded = replace(settings, seed=seed)
        train_distill(distill_config(seeded, prompts, run_dir, settings.segments, (1, 2), **changes))
    return run_dir, extra


def evaluate(bench: _Bench, lora) -> dict[int, dict]:
    rows = {}
    for s in STEPS:
        sampler = bench.consistency(segment_timesteps(s, bench.settings.segments))
        row, _ = bench.measure("lora", s, s, lora, sampler)
        rows[s] = {"fd": row.fd, "prompt_accuracy": row.prompt_accuracy}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="digits", help="digits or shapes, or a demo teacher folder")
    parser.add_argument("--options", default="online,shared", help=f"comma list of {', '.join(OPTIONS)}")
    parser.add_argument("--train-seeds", default="0", help="distill seeds, comma list")
    parser.add_argument("--eval-seeds", default="0,1", help="evaluation seed sets of the final LoRA")
    parser.add_argument("--every", type=int, default=75, help="optimizer steps between scored checkpoints")
    parser.add_argument("--samples", type=int, default=960, help="images per row and seed set")
    parser.add_argument("--iterations", type=int, default=DemoSettings.iterations, help="stage-1 steps")
    parser.add_argument("--stage2-iterations", type=int, default=DemoSettings.stage2_iterations)
    parser.add_argument("--work", type=Path, default=Path("reports/efficiency_curve"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    teacher = DEMO_TEACHERS.get(args.teacher, Path(args.teacher))
    settings = DemoSettings(
        teacher=teacher,
        samples=args.samples,
        iterations=args.iterations,
        stage2_iterations=args.stage2_iterations,
        reward=False,
    )
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    seeds = [int(s) for s in args.train_seeds.split(",")]
    eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    work = args.work / Path(teacher).name
    work.mkdir(parents=True, exist_ok=True)
    benches = {e: _Bench(replace(settings, seed=e)) for e in eval_seeds}
    curve: dict[str, dict] = {}
    started = time.perf_counter()
    for option in options:
        curve[option] = {}
        for seed in seeds:
            tick = time.perf_counter()
            run_dir, extra = train(settings, work, seed, option, args.every)
            print(f"{option!r} seed {seed}: {time.perf_counter() - tick:.0f} s", file=sys.stderr)
            metrics = _metrics(run_dir)
            points = []
            checkpoints = list_checkpoints(run_dir)
            for checkpoint in checkpoints:
                saved = load_checkpoint(checkpoint)
                step = saved.state.global_step
                final = checkpoint == checkpoints[-1]
                scored = {
                    f"eval{e}": evaluate(bench, saved.lora)
                    for e, bench in benches.items()
                    if final or e == eval_seeds[0]
                }
                spent = metrics[max(s for s in metrics if s <= step)]
                points.append(
                    {
                        "step": step,
                        "teacher_evals": saved.state.teacher_evaluations + extra["teacher_evals"],
                        "wall_s": spent["wall_s"] + extra["wall_s"],
                        "scores": scored,
                    }
                )
            curve[option][f"seed{seed}"] = points
    _report(curve, settings, work, args)
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ±{(max(values) - min(values)) / 2:.1f}"


def _report(curve: dict, settings: DemoSettings, work: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = curve.get("online")
    print(f"\n{args.teacher}: final LoRA per option (FD mean ±half-range over train x eval seeds)\n")
    print(
        "| option | teacher evals | vs online | wall s | vs online | "
        + " | ".join(f"{s}-step FD" for s in STEPS)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(STEPS))
    for option, runs in curve.items():
        finals = [points[-1] for points in runs.values()]
        evals = statistics.fmean(p["teacher_evals"] for p in finals)
        wall = statistics.fmean(p["wall_s"] for p in finals)
        cells = []
        for s in STEPS:
            fds = [score[s]["fd"] for p in finals for score in p["scores"].values()]
            accs = [score[s]["prompt_accuracy"] for p in finals for score in p["scores"].values()]
            cells.append(f"{_mean(fds)} ({100 * statistics.fmean(accs):.0f}%)")
        if reference is not None:
            ref = [points[-1] for points in reference.values()]
            ref_evals = statistics.fmean(p["teacher_evals"] for p in ref)
            ref_wall = statistics.fmean(p["wall_s"] for p in ref)
            ratios = f"{evals / ref_evals:.0%} | {wall:.0f} | {wall / ref_wall:.0%}"
        else:
            ratios = f"- | {wall:.0f} | -"
        print(f"| {option} | {evals:.0f} | {ratios} | " + " | ".join(cells) + " |")
    figure, axes = plt.subplots(1, len(STEPS), figsize=(4 * len(STEPS), 3.4), sharex=True)
    for ax, s in zip(axes, STEPS):
        for option, runs in curve.items():
            points = list(runs.values())[0]
            xs = [p["teacher_evals"] / 1000 for p in points]
            first = [next(iter(p["scores"].values()))[s]["fd"] for p in points]
            ax.plot(xs, first, marker="o", label=option)
        ax.set_title(f"{s} steps")
        ax.set_xlabel("teacher UNet evaluations (thousands)")
        ax.set_ylabel("FD (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"{args.teacher} teacher: quality against teacher compute (first seed)")
    figure.tight_layout()
    figure.savefig(work / "curve.png", dpi=110)
    (work / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    print(f"\ncurve: {work / 'curve.png'}; every measurement in {work / 'curve.json'}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
