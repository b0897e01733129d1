"""Command line of the trainer: ``python -m mlcm_train {distill,trajectories,export,reward,demo,eval}``.

One parser and one ``main`` for every subcommand. The ``distill``, ``trajectories`` and ``reward`` flags are
generated from ``DistillConfig`` / ``RewardConfig``: one flag per field, its help and metavar from the
field's metadata, so a dataclass stays the single place where a setting, its default and its help live.
Subcommands import their stage only when they run, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlcm_train.config import DistillConfig, RewardConfig
from mlcm_train.demo.run import DemoSettings
from mlcm_train.eval.evaluate import METRICS
from mlcm_train.run.checkpoint import CheckpointError, load_checkpoint
from mlcm_train.run.loop import NonFiniteLossError

log = logging.getLogger(__name__)

DISTILL_EXAMPLES = """examples:
  python -m mlcm_train distill --teacher models/checkpoints/sdxl.safetensors --prompts prompts.txt \\
      --output-dir runs/sdxl                     # stage 1 then stage 2, exports runs/sdxl/export/*.safetensors
  accelerate launch --multi_gpu --num_processes 4 -m mlcm_train distill ...   # DDP on 4 GPUs
  python -m mlcm_train distill --resume runs/sdxl                             # continue exactly
  python -m mlcm_train distill ... --progressive 8,4,2 --stages 1              # rounds with fewer segments
  python -m mlcm_train trajectories states/ --teacher ... --prompts ... --samples 20000
  python -m mlcm_train distill ... --trajectories states/                      # stage 1 from cached states
  python -m mlcm_train export runs/sdxl --formats kohya,peft,diffusers
"""
REWARD_EXAMPLES = """examples:
  python -m mlcm_train reward --teacher sdxl.safetensors --prompts prompts.txt --lora runs/sdxl \\
      --reward pickscore=/models/pickscore --heldout clip=/models/clip --output-dir runs/sdxl_reward
  python -m mlcm_train reward --resume runs/sdxl_reward                       # continue exactly
  python -m mlcm_train export runs/sdxl_reward --best                         # the LoRA keep-best kept
"""
# Known, user-fixable failures: one clear line instead of a traceback (use -v for the traceback).
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, CheckpointError, NonFiniteLossError)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 8,4,2"
        ) from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "") else convert(text)

    parse.__name__ = convert.__name__
    return parse


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "str | None": _optional(str),
    "int | None": _optional(int),
    "float | None": _optional(float),
    "tuple[int, ...]": _int_list,
    "tuple[str, ...]": _str_list,
}


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per field of the config dataclass ``cls``; unset flags stay absent (SUPPRESS)."""
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if not field.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{field.name} has no help text; declare it with config.option()")
        # argparse expands %-formats in help text.
        help_text = f"{field.metadata['help']} (default: {shown})".replace("%", "%%")
        if field.type == "bool":
            action = argparse.BooleanOptionalAction
            parser.add_argument(
                flag, dest=field.name, action=action, default=argparse.SUPPRESS, help=help_text
            )
            continue
        if field.type not in _PARSERS or not field.metadata.get("metavar"):
            raise TypeError(
                f"{cls.__name__}.{field.name} ({field.type}) needs a parser in cli.py and a metavar"
            )
        parser.add_argument(
            flag,
            dest=field.name,
            type=_PARSERS[field.type],
            default=argparse.SUPPRESS,
            help=help_text,
            metavar=field.metadata["metavar"],
        )


def resolve_config(
    args: argparse.Namespace, base: dict[str, Any] | None = None, cls: type = DistillConfig
) -> Any:
    """A ``cls`` config from defaults <- ``base`` (a saved config) <- ``--config`` file <- given flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None) is not None:
        try:
            values.update(json.loads(Path(args.config).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read --config {args.config}: {error}") from error
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls.from_dict(values)


# --- the subcommands -------------------------------------------------------------------------------------------


def _add_run_flags(parser: argparse.ArgumentParser, cls: type, noun: str) -> None:
    """--config, --resume, --dry-run, --stop-after, then one flag per config field."""
    parser.add_argument(
        "--config", type=Path, metavar="PATH", help="JSON file of config values; flags given here override it"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="PATH",
        help=f"continue exactly from a {noun} checkpoint folder or a run directory's newest checkpoint "
        "(its saved config is used; flags given here override it)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config as JSON, log the estimated peak memory and time per step on this "
        "machine's device (from the configs, no weights loaded), and exit",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="checkpoint and stop once N optimizer steps are done; continue later with --resume",
    )
    add_config_flags(parser, cls)


def _resolve_run(args: argparse.Namespace, cls: type) -> Any:
    base = load_checkpoint(args.resume).config if args.resume is not None else None
    return resolve_config(args, base, cls)


def _run_distill(args: argparse.Namespace) -> int:
    config = _resolve_run(args, DistillConfig)
    if not config.teacher:
        raise ValueError(
            "no teacher given; pass --teacher PATH (a diffusers folder or a .safetensors checkpoint)"
        )
    if not config.prompts and not config.trajectories:
        raise ValueError("no prompts given; pass --prompts FILE (one prompt a line) or a folder of captions")
    if args.dry_run:
        sys.stdout.write(config.to_json() + "\n")
        _log_plan(config)
        return 0
    from mlcm_train.distill import train_distill

    train_distill(config, resume=args.resume, stop_after=args.stop_after)
    return 0


def _log_plan(config: DistillConfig | RewardConfig) -> None:
    """The run's estimated peak memory and time per step on this machine's device (stderr; stdout stays the
    config JSON)."""
    import torch

    from mlcm_train.run.plan import plan_distill, plan_reward
    from mlcm_train.run.setup import resolve_mixed_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    try:
        if isinstance(config, DistillConfig):
            plan = plan_distill(config, mixed_precision, device)
        else:
            from mlcm_train.reward.recipe import resolve_segments
            from mlcm_train.reward.start import plan_targets, read_start_lora

            start = read_start_lora(config.lora)
            segments = resolve_segments(config, start)
            plan = plan_reward(
                config, mixed_precision, start.rank, start.alpha, plan_targets(start), segments, device
            )
    except (OSError, ValueError) as error:
        log.warning("no plan: cannot read the teacher's or the LoRA's configuration (%s)", error)
        return
    for line in plan.lines():
        log.info("plan: %s", line)


def _run_trajectories(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if not config.teacher or not config.prompts:
        raise ValueError("trajectories needs --teacher PATH and --prompts FILE")
    from mlcm_train.distill import generate_trajectories

    generate_trajectories(config, args.out, samples=args.samples, shard_size=args.shard_size)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    saved = load_checkpoint(args.checkpoint)
    options = {"out_dir": args.out, "formats": args.formats, "name": args.name}
    if "reward" in saved.config:
        from mlcm_train.reward.export import export_reward_checkpoint

        written = export_reward_checkpoint(saved, best=args.best, **options)
    elif args.best:
        raise ValueError(f"--best is for reward runs; {saved.path} is a distill checkpoint")
    else:
        from mlcm_train.distill import export_distill_checkpoint

        written = export_distill_checkpoint(saved, **options)
    for path in written:
        log.info("wrote %s", path)
    return 0


def _run_reward(args: argparse.Namespace) -> int:
    config = _resolve_run(args, RewardConfig)
    if args.dry_run:
        sys.stdout.write(config.to_json() + "\n")
        if config.teacher and config.lora:
            _log_plan(config)
        return 0
    from mlcm_train.reward.stage import train_reward

    train_reward(config, resume=args.resume, stop_after=args.stop_after)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from mlcm_train.demo.retrain import retrain_assets
    from mlcm_train.demo.run import run_demo
    from mlcm_train.eval.digits import DEMO_TEACHERS

    changes = {"out": args.out, "reward": args.reward}
    for name in ("iterations", "stage2_iterations", "samples", "threads", "reward_iterations"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    # A shipped teacher by its set's name, else a folder.
    dataset = args.teacher if args.teacher in DEMO_TEACHERS else None
    if args.teacher is not None:
        changes["teacher"] = DEMO_TEACHERS[dataset] if dataset is not None else Path(args.teacher)
    settings = DemoSettings.quick(**changes) if args.quick else DemoSettings(**changes)
    if args.retrain_teacher:
        retrain_assets(settings.teacher, dataset)
    result = run_demo(settings)
    log.info("report: %s", ", ".join(str(p) for p in result.files.values()))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from mlcm_train.eval.evaluate import EvalRequest, evaluate

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRequest) if f.name != "metrics"}
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    evaluate(EvalRequest(metrics=metrics, **values))
    return 0


def _add_distill(commands: Any) -> None:
    distill = commands.add_parser(
        "distill",
        help="train an MLCM LoRA from a teacher checkpoint and a prompt file",
        description="Stage 1 (multistep LCD) and stage 2 (inter-segment consistency) in one run; "
        "checkpoints, resume, sample grids, export at the end.",
        epilog=DISTILL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_flags(distill, DistillConfig, "distill")
    distill.set_defaults(run=_run_distill)

    trajectories = commands.add_parser(
        "trajectories",
        help="pre-generate teacher trajectory states to disk, shared by later distill runs (--trajectories DIR)",
    )
    trajectories.add_argument("out", type=Path, metavar="OUT", help="folder for the shards")
    trajectories.add_argument(
        "--samples", type=int, default=1024, metavar="N", help="states per segment count (default: 1024)"
    )
    trajectories.add_argument(
        "--shard-size", type=int, default=256, metavar="N", help="states per shard file (default: 256)"
    )
    trajectories.add_argument("--config", type=Path, metavar="PATH", help="JSON file of config values")
    add_config_flags(trajectories, DistillConfig)
    trajectories.set_defaults(run=_run_trajectories)


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write the LoRA of a checkpoint in kohya/PEFT/diffusers formats (no teacher needed)"
    )
    export.add_argument(
        "checkpoint",
        type=Path,
        metavar="PATH",
        help="checkpoint folder, or a run directory (newest checkpoint)",
    )
    export.add_argument("--out", type=Path, metavar="PATH", help="output folder (default: <run>/export)")
    export.add_argument(
        "--formats",
        type=_str_list,
        default=None,
        metavar="LIST",
        help="comma list of kohya,peft,diffusers (default: the run's)",
    )
    export.add_argument(
        "--name", default=None, metavar="NAME", help="file stem (default: mlcm_<family>_<segments>seg)"
    )
    export.add_argument(
        "--best",
        action="store_true",
        help="reward runs: export the LoRA the keep-best rule kept (<run>/best) instead of the checkpoint's",
    )
    export.set_defaults(run=_run_export)


def _add_reward(commands: Any) -> None:
    reward = commands.add_parser(
        "reward",
        help="tune a distilled MLCM LoRA toward a preference model (ImageReward, HPSv2, PickScore, aesthetic, ...)",
        description="Student samples (1..q steps) are decoded and scored; gradients flow through the VAE decoder "
        "into the LoRA only, with the stage-2 consistency loss as an anchor. Held-out evaluation, keep-best, "
        "checkpoints, resume and export as in distill.",
        epilog=REWARD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_flags(reward, RewardConfig, "reward")
    reward.set_defaults(run=_run_reward)


def _add_demo(commands: Any) -> None:
    defaults = DemoSettings()
    demo = commands.add_parser(
        "demo",
        help="distill MLCM from the shipped tiny teacher on CPU and write the quality-vs-steps report",
        description="Distills an MLCM LoRA and an LCM-style baseline from a shipped teacher (coloured digits, or --teacher shapes) "
        "through the same `distill` code, then measures FD, prompt accuracy, reward and time per image for the "
        "teacher, the baseline and MLCM at 1-8 steps, before and after reward tuning. Writes table.md/json, "
        "samples.png and quality_vs_steps.png.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=defaults.out,
        metavar="PATH",
        help=f"report folder (default: {defaults.out})",
    )
    demo.add_argument(
        "--quick", action="store_true", help="reduced variant for CI (fewer iterations and samples)"
    )
    numbers = (
        ("--iterations", f"stage-1 optimizer steps (default: {defaults.iterations})"),
        ("--stage2-iterations", f"stage-2 optimizer steps (default: {defaults.stage2_iterations})"),
        ("--samples", f"evaluation images per row (default: {defaults.samples})"),
        ("--reward-iterations", f"reward-stage optimizer steps (default: {defaults.reward_iterations})"),
        (
            "--threads",
            f"torch CPU threads (default: {defaults.threads}; use 1 on a machine busy with other work)",
        ),
    )
    for flag, text in numbers:
        demo.add_argument(flag, type=int, metavar="N", help=text)
    demo.add_argument(
        "--no-reward",
        dest="reward",
        action="store_false",
        help="skip the reward stage and its 'MLCM + stage 2 + reward' rows",
    )
    demo.add_argument(
        "--teacher",
        metavar="PATH",
        help="a teacher folder with its classifier, or the name of a shipped demo teacher: digits (the "
        "default) or shapes",
    )
    demo.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="re-create the shipped teacher and classifier from their recipes into --teacher (slow), then run",
    )
    demo.set_defaults(run=_run_demo)


def _add_eval(commands: Any) -> None:
    evaluation = commands.add_parser(
        "eval",
        help="score a teacher (+ distilled LoRA) on a prompt file: demo FD/accuracy/reward, CLIP, aesthetic, "
        "ImageReward, FID (local weights only)",
    )
    paths = (
        ("--teacher", "diffusers folder or single-file checkpoint (required)"),
        ("--prompts", "text file, one prompt a line (required)"),
        ("--lora", "distill run directory or checkpoint (default: the bare teacher)"),
        ("--classifier", "demo classifier folder (default: the shipped one)"),
        ("--clip-model", "local CLIP folder for the CLIP score"),
        ("--aesthetic-head", "LAION aesthetic MLP head (.pth or .safetensors)"),
        ("--aesthetic-clip", "local CLIP ViT-L/14 folder for the aesthetic head"),
        ("--imagereward", "folder with ImageReward.pt and med_config.json"),
        ("--inception", "inception-2015-12-05.pt (TorchScript) for FID"),
        ("--reference-images", "folder of real images for FID"),
        ("--out", "write the scores to this JSON file"),
    )
    for flag, text in paths:
        required = flag in ("--teacher", "--prompts")
        evaluation.add_argument(flag, type=Path, metavar="PATH", required=required, help=text)
    evaluation.add_argument("--steps", type=int, default=4, metavar="N", help="sampling steps (default: 4)")
    evaluation.add_argument(
        "--guidance-scale",
        type=float,
        default=3.0,
        metavar="F",
        help="teacher CFG without a LoRA (default: 3.0)",
    )
    evaluation.add_argument(
        "--metrics", default="demo", metavar="LIST", help=f"comma list of {','.join(METRICS)} (default: demo)"
    )
    evaluation.add_argument("--seed", type=int, default=0, metavar="N", help="noise seed (default: 0)")
    evaluation.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images per batch (default: 32)"
    )
    evaluation.set_defaults(run=_run_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlcm_train",
        description="Distill MLCM LoRAs (multistep latent consistency, arXiv 2406.05768) from SD1.5/SDXL teachers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_distill, _add_export, _add_reward, _add_demo, _add_eval):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mlcm_train``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun/accelerate launch every process runs this; only rank 0 reports progress.
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    try:
        return args.run(args)
    except USER_ERRORS as error:
        log.debug("failed", exc_info=True)
        log.error("%s", error)
        return 2
