"""A `distill` step measured: where its time goes on a tiny teacher, or what it costs on a full-shape one.

Tiny mode (default) prints a Markdown table of the step's parts on the tiny SD1.5-shaped teacher (teacher
trajectory / teacher target / student forward+backward / rest), peak memory, and samples/s with online vs
pre-generated trajectories:
    python benchmarks/train_step.py [--steps 12] [--batch-size 4]

Full mode builds a full-shape SD1.5 or SDXL UNet and VAE from the shipped configs with random weights
(one-layer text encoders of the real widths; nothing is downloaded), trains a few steps on this machine's
device, and prints the measured peak memory, s/step and samples/s beside the `--dry-run` plan's estimate:
    python benchmarks/train_step.py --full sd15 --resolution 256 --batch-size 1 [--stage 1|2]
        [--mixed-precision no|fp16|bf16] [--gradient-checkpointing] [--optimizer adamw8bit] [--work DIR]
`--matrix` runs every row of the README's memory table (four option sets, batch 1 and 4), each in its own
process, and prints one table; on a GPU, SDXL at 1024 px is one command:
    python benchmarks/train_step.py --full sdxl --matrix --work /tmp/mlcm-bench
The first step is a warm-up and is not timed. On a CPU the peak is the resident set above the process's
size before loading, measured in a child process with MALLOC_MMAP_THRESHOLD_ set so that freed tensors
leave it (that makes steps slow, so they are timed apart); on CUDA it is torch's peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models lives with the tests
sys.path.insert(0, str(ROOT))

from tiny_models import make_tiny_sd15  # noqa: E402

from mlcm_train.cli import main as cli_main  # noqa: E402
from mlcm_train.config import DistillConfig  # noqa: E402
from mlcm_train.distill import train_distill  # noqa: E402

PROMPTS = ["a red cat", "a dog", "the red dog", "a cat", "a red dog", "the cat"]
CATEGORIES = (
    ("teacher_trajectory", "teacher trajectory (MDS, online)"),
    ("teacher_target", "teacher target (CFG step + no-grad target)"),
    ("student_forward_backward", "student forward + backward"),
)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(config: DistillConfig) -> dict[str, float]:
    result = train_distill(config, profile=True)
    timings = dict(result.timings)
    steps = timings.pop("steps")
    return {k: v / steps for k, v in timings.items()} | {"steps": steps}


def full_shape(args: argparse.Namespace) -> None:
    """Measure a few steps on a full-shape teacher and print them beside the plan's estimate."""
    from tiny_models import make_full_shape

    from mlcm_train.run.plan import plan_distill
    from mlcm_train.run.setup import resolve_mixed_precision
    from mlcm_train.run.timer import resident_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work or tempfile.mkdtemp(prefix="mlcm-bench-"))
    teacher = work / f"full_{args.full}"
    if not (teacher / "model_index.json").is_file():
        print(f"building a full-shape {args.full} teacher in {teacher} ...", flush=True)
        make_full_shape(work, args.full)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    steps = {"stage1_steps": args.steps + 1, "stage2_steps": args.steps + 1}
    config = DistillConfig(
        teacher=str(teacher),
        prompts=str(prompts),
        stages=(args.stage,),
        **steps,
        batch_size=args.batch_size,
        resolution=args.resolution,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
        stage1_states=args.stage1_states,
        sample_every=0,
        checkpoint_every=10**6,
        log_every=10**6,
        export_formats=(),
        output_dir=tempfile.mkdtemp(prefix="run-", dir=work),  # removed below
    )
    if args.peak_only:  # the child of a CPU run: two steps, the peak as JSON
        baseline = resident_bytes() or 0
        result = train_distill(config.replace(stage1_steps=2, stage2_steps=2), profile=True)
        shutil.rmtree(config.output_dir)
        print(json.dumps({"peak_bytes": (result.peak_memory or 0) - baseline}))
        return
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    plan = plan_distill(config, mixed_precision, device)
    # On a CPU the peak comes from a child, run first: this process holds no weights yet, so the two never
    # hold a model at the same time (an SDXL model twice does not fit a 24 GB machine).
    cpu_peak = _cpu_peak(args, work) if device.type != "cuda" else None
    result = train_distill(config, profile=True)
    shutil.rmtree(config.output_dir)
    seconds = result.timings["total"] / result.timings["steps"]
    measured_peak = result.peak_memory if cpu_peak is None else cpu_peak
    phase = plan.phases[0]
    estimated_peak, estimated_seconds = plan.peak_bytes(phase), plan.seconds_per_step(phase)
    gb = 2**30
    print(
        f"\nFull-shape {args.full} UNet ({plan.weights.unet_parameters / 1e6:.0f}M), {phase.label}, "
        f"{args.resolution or 'native'} px, batch {args.batch_size}, {mixed_precision} weights, "
        f"{'gradient checkpointing, ' if args.gradient_checkpointing else ''}{args.optimizer}, "
        f"{int(result.timings['steps'])} timed steps, {plan.speed.label}\n"
    )
    print("| figure | estimate (--dry-run) | measured | estimate / measured |")
    print("|---|---|---|---|")
    print(f"| peak memory (GB) | {estimated_peak / gb:.2f} | {measured_peak / gb:.2f} | {estimated_peak / measured_peak:.2f} |")  # fmt: skip
    print(f"| s / step | {estimated_seconds:.3g} | {seconds:.3g} | {estimated_seconds / seconds:.2f} |")
    print(f"| samples / s | {args.batch_size / estimated_seconds:.3g} | {args.batch_size / seconds:.3g} | {seconds / estimated_seconds:.2f} |")  # fmt: skip
    estimated_parts = plan.part_seconds(phase)
    print("\n| part of a step | estimate (s) | measured (s) |")
    print("|---|---|---|")
    for key, label in CATEGORIES:
        measured_part = result.timings.get(key, 0.0) / result.timings["steps"]
        print(f"| {label} | {estimated_parts.get(key, 0.0):.3g} | {measured_part:.3g} |")
    print(
        f"\nplan: {plan.resident_bytes / gb:.2f} GB resident (weights, LoRA state, VAE), "
        f"{phase.activation_bytes / gb:.2f} GB activations; expected UNet calls per step: "
        + ", ".join(f"{name} {calls:.2f}" for name, calls in phase.unet_calls.items())
    )
    figures = {"peak": [estimated_peak, measured_peak], "seconds": [estimated_seconds, seconds]}
    print("FIGURES " + json.dumps(figures), flush=True)


MATRIX = (
    ("fp32 weights", ["--mixed-precision", "no"]),
    ("bf16 frozen weights", ["--mixed-precision", "bf16"]),
    ("+ adamw8bit", ["--mixed-precision", "bf16", "--optimizer", "adamw8bit"]),
    (
        "+ gradient checkpointing",
        ["--mixed-precision", "bf16", "--optimizer", "adamw8bit", "--gradient-checkpointing"],
    ),
)


def matrix(args: argparse.Namespace) -> None:
    """Every row of the README's memory table at batch 1 and 4, each in its own process: estimate and
    measurement side by side (a run that does not fit the device is reported as such)."""
    work = args.work or tempfile.mkdtemp(prefix="mlcm-bench-")
    rows = []
    for label, options in MATRIX:
        for batch in (1, 4):
            argv = [
                "--full",
                args.full,
                "--batch-size",
                str(batch),
                "--steps",
                str(args.steps),
                "--work",
                work,
            ]
            argv += ["--resolution", str(args.resolution)] if args.resolution else []
            child = subprocess.run(
                [sys.executable, __file__, *argv, *options], capture_output=True, text=True, check=False
            )
            found = [line for line in child.stdout.splitlines() if line.startswith("FIGURES ")]
            if not found:
                reason = (
                    "out of memory" if "out of memory" in child.stderr.lower() else f"exit {child.returncode}"
                )
                rows.append(f"| {label} | {batch} | - | {reason} | - | - |")
                sys.stderr.write(child.stderr[-2000:])
                continue
            figures = json.loads(found[-1].removeprefix("FIGURES "))
            (est_peak, peak), (est_s, secs) = figures["peak"], figures["seconds"]
            rows.append(
                f"| {label} | {batch} | {est_peak / 2**30:.2f} | {peak / 2**30:.2f} | {est_s:.3g} | {secs:.3g} |"
            )
            print(rows[-1], flush=True)
    print(f"\nFull-shape {args.full}, {args.resolution or 'native'} px, stage 1, {args.steps} timed steps\n")
    print(
        "| weights and options | batch | peak GB (estimate) | peak GB (measured) | s/step (estimate) | s/step (measured) |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def _cpu_peak(args: argparse.Namespace, work: Path) -> int:
    """The CPU peak from a child process whose allocator returns freed pages (too slow to time steps in)."""
    argv = [a for a in sys.argv[1:] if a != "--peak-only"]
    if "--work" not in argv:
        argv += ["--work", str(work)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large allocations map and unmap their pages
    child = subprocess.run(
        [sys.executable, __file__, *argv, "--peak-only"], env=env, capture_output=True, text=True, check=False
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode or not lines:
        sys.stderr.write(child.stderr[-4000:])
        raise SystemExit(f"the peak-memory child failed (exit {child.returncode})")
    return json.loads(lines[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (tiny: 12, full: 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="per device (tiny: 4, full: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--full", choices=("sd15", "sdxl"), help="measure a full-shape teacher of this family"
    )
    parser.add_argument("--resolution", type=int, default=None, help="full: image side (default: native)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="full: the stage to measure")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    parser.add_argument(
        "--stage1-states", default="mds", choices=("mds", "shared"), help="full: how stage 1 makes its states"
    )
    parser.add_argument("--work", help="full: folder that keeps the built teacher between runs")
    parser.add_argument("--matrix", action="store_true", help="full: every memory-table row at batch 1 and 4")
    parser.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full and args.matrix:
        args.steps = args.steps or 3
        matrix(args)
        return
    if args.full:
        args.steps, args.batch_size = args.steps or 3, args.batch_size or 1
        full_shape(args)
        return
    args.steps, args.batch_size = args.steps or 12, args.batch_size or 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = make_tiny_sd15(tmp)
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
        base = dict(
            teacher=str(teacher),
            prompts=str(prompts),
            stages=(1,),
            stage1_steps=args.steps,
            batch_size=args.batch_size,
            sample_every=0,
            checkpoint_every=10**6,
            log_every=10**6,
            mixed_precision="no",
        )
        online = run(DistillConfig(**base, output_dir=str(tmp / "online")))
        states = tmp / "states"
        cli_main(["trajectories", str(states), "--samples", str(args.steps * args.batch_size),
                  "--teacher", str(teacher), "--prompts", str(prompts), "--batch-size", str(args.batch_size)])  # fmt: skip
        cached = run(DistillConfig(**base, output_dir=str(tmp / "cached"), trajectories=str(states)))
    total = online["total"]
    rows = [(label, online.get(key, 0.0)) for key, label in CATEGORIES]
    rest = total - sum(seconds for _, seconds in rows)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\nTiny SD1.5-shaped teacher, stage 1, batch {args.batch_size}, {int(online['steps'])} timed steps, {name}\n"
    )
    print("| part of a step | ms/step | share |")
    print("|---|---|---|")
    for label, seconds in [*rows, ("rest (data, loss maths, optimizer, logging)", rest)]:
        print(f"| {label} | {1000 * seconds:.1f} | {100 * seconds / total:.1f}% |")
    print(f"| **total** | {1000 * total:.1f} | 100% |")
    print(
        f"\npeak memory: {peak_memory_mb(device):.0f} MiB ({'CUDA allocated' if device == 'cuda' else 'process RSS'})"
    )
    print(f"samples/s online: {args.batch_size / online['total']:.2f}; "
          f"pre-generated trajectories: {args.batch_size / cached['total']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
