"""The ``demo`` and ``eval`` subcommands; ``mlcm_train/cli.py`` registers them with these two functions."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_demo_subparser(subparsers) -> argparse.ArgumentParser:
    """``python -m mlcm_train demo [--quick] [--no-reward] [--retrain-teacher] [--out DIR] ...``."""
    from .run import DemoSettings

    defaults = DemoSettings()
    demo = subparsers.add_parser(
        "demo",
        help="distill MLCM from the shipped tiny teacher on CPU and write the quality-vs-steps report",
        description="Distills an MLCM LoRA and an LCM-style baseline from the shipped coloured-digits teacher "
        "through the same `distill` code, then measures FD, prompt accuracy, reward and time per image for the "
        "teacher, the baseline and MLCM at 1-8 steps, before and after reward tuning. Writes table.md/json, samples.png and quality_vs_steps.png.",
    )
    demo.add_argument(
        "--out", type=Path, default=defaults.out, help=f"report folder (default: {defaults.out})"
    )
    demo.add_argument(
        "--quick", action="store_true", help="reduced variant for CI (fewer iterations and samples)"
    )
    demo.add_argument(
        "--iterations", type=int, help=f"stage-1 optimizer steps (default: {defaults.iterations})"
    )
    demo.add_argument(
        "--stage2-iterations",
        type=int,
        help=f"stage-2 optimizer steps (default: {defaults.stage2_iterations})",
    )
    demo.add_argument("--samples", type=int, help=f"evaluation images per row (default: {defaults.samples})")
    demo.add_argument(
        "--no-reward",
        dest="reward",
        action="store_false",
        help="skip the reward stage (issue 5) and its 'MLCM + stage 2 + reward' rows",
    )
    demo.add_argument(
        "--reward-iterations",
        type=int,
        help=f"reward-stage optimizer steps (default: {defaults.reward_iterations})",
    )
    demo.add_argument(
        "--threads", type=int, help="torch CPU threads (default 2; use 1 on a machine busy with other work)"
    )
    demo.add_argument("--teacher", type=Path, help="teacher folder (default: the shipped demo teacher)")
    demo.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="re-create the shipped teacher and classifier from their recipes into --teacher (slow), then run",
    )
    demo.set_defaults(run=run_demo_command)
    return demo


def run_demo_command(args: argparse.Namespace) -> int:
    from .run import ASSET_DIR, DemoSettings, run_demo

    changes = {"out": args.out, "reward": args.reward}
    for name in ("iterations", "stage2_iterations", "samples", "teacher", "threads", "reward_iterations"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    settings = DemoSettings.quick(**changes) if args.quick else DemoSettings(**changes)
    if args.retrain_teacher:
        from .retrain import retrain_assets

        retrain_assets(settings.teacher or ASSET_DIR)
    result = run_demo(settings)
    log.info("report: %s", ", ".join(str(p) for p in result.files.values()))
    return 0


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    """``python -m mlcm_train eval --teacher DIR --prompts FILE [--lora RUN] --metrics demo,clip,...``."""
    from mlcm_train.eval.evaluate import METRICS

    evaluation = subparsers.add_parser(
        "eval",
        help="score a teacher (+ distilled LoRA) on a prompt file: demo FD/accuracy/reward, CLIP, aesthetic, "
        "ImageReward, FID (local weights only)",
    )
    evaluation.add_argument(
        "--teacher", type=Path, required=True, help="diffusers folder or single-file checkpoint"
    )
    evaluation.add_argument("--prompts", type=Path, required=True, help="text file, one prompt a line")
    evaluation.add_argument(
        "--lora", type=Path, help="distill run directory or checkpoint (default: the bare teacher)"
    )
    evaluation.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    evaluation.add_argument("--guidance-scale", type=float, default=3.0, help="teacher CFG without a LoRA")
    evaluation.add_argument(
        "--metrics", default="demo", help=f"comma list of {','.join(METRICS)} (default: demo)"
    )
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--batch-size", type=int, default=32)
    evaluation.add_argument("--classifier", type=Path, help="demo classifier folder (default: shipped)")
    evaluation.add_argument("--clip-model", type=Path, help="local CLIP folder for the CLIP score")
    evaluation.add_argument(
        "--aesthetic-head", type=Path, help="LAION aesthetic MLP head (.pth or .safetensors)"
    )
    evaluation.add_argument(
        "--aesthetic-clip", type=Path, help="local CLIP ViT-L/14 folder for the aesthetic head"
    )
    evaluation.add_argument("--imagereward", type=Path, help="folder with ImageReward.pt and med_config.json")
    evaluation.add_argument("--inception", type=Path, help="inception-2015-12-05.pt (TorchScript) for FID")
    evaluation.add_argument("--reference-images", type=Path, help="folder of real images for FID")
    evaluation.add_argument("--out", type=Path, help="write the scores to this JSON file")
    evaluation.set_defaults(run=run_eval_command)
    return evaluation


def run_eval_command(args: argparse.Namespace) -> int:
    from mlcm_train.eval.evaluate import EvalRequest, evaluate

    request = EvalRequest(
        teacher=args.teacher,
        prompts=args.prompts,
        lora=args.lora,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        seed=args.seed,
        batch_size=args.batch_size,
        classifier=args.classifier,
        clip_model=args.clip_model,
        aesthetic_head=args.aesthetic_head,
        aesthetic_clip=args.aesthetic_clip,
        imagereward=args.imagereward,
        inception=args.inception,
        reference_images=args.reference_images,
        out=args.out,
    )
    evaluate(request)
    return 0
