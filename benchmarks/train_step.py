"""Per-training-step time split of `distill` on the tiny SD1.5-shaped teacher .

Prints a Markdown table: teacher trajectory / teacher target / student forward+backward / rest, the rest
as a fraction of the step, peak memory, and samples/s with online vs pre-generated trajectories.
Run: `python benchmarks/train_step.py [--steps 12] [--batch-size 4] [--device-note "2 CPU cores"]`.
"""

from __future__ import annotations

import argparse
import resource
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
