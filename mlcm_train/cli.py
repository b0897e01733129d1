"""Command line of the trainer: ``python -m mlcm_train {distill,trajectories,export}``.

``distill`` flags are generated from ``DistillConfig`` (one flag per field, help text from the field's
comment), so the dataclass stays the single place where a setting and its default are defined.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import DistillConfig

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


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field in a config dataclass's source, used as the flag's help."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


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


_METAVARS = {"int": "N", "int | None": "N", "float": "F", "float | None": "F", "tuple[int, ...]": "N,N"}
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


def add_config_flags(parser: argparse.ArgumentParser, cls: type = DistillConfig) -> None:
    """One ``--field-name`` flag per field of the config dataclass ``cls``; unset flags stay absent (SUPPRESS)."""
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        # argparse expands %-formats in help text.
        help_text = f"{comments.get(field.name, '')} (default: {shown})".replace("%", "%%")
        if field.type == "bool":
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        if field.type not in _PARSERS:
            raise TypeError(
                f"{cls.__name__}.{field.name} has type {field.type}; add a parser for it in cli.py"
            )
        parser.add_argument(
            flag,
            dest=field.name,
            type=_PARSERS[field.type],
            default=argparse.SUPPRESS,
            help=help_text,
            metavar=_METAVARS.get(field.type, "A,B" if field.type.startswith("tuple") else "TEXT"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlcm_train",
        description="Distill MLCM LoRAs (multistep latent consistency, arXiv 2406.05768) from SD1.5/SDXL teachers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    distill = commands.add_parser(
        "distill",
        help="train an MLCM LoRA from a teacher checkpoint and a prompt file",
        description="Stage 1 (multistep LCD) and stage 2 (inter-segment consistency) in one run; "
        "checkpoints, resume, sample grids, export at the end.",
        epilog=DISTILL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill.add_argument(
        "--config", type=Path, help="JSON file of config values; flags given here override it"
    )
    distill.add_argument(
        "--resume",
        type=Path,
        metavar="PATH",
        help="continue exactly from a checkpoint folder or a run directory's newest checkpoint "
        "(its saved config is used; flags given here override it)",
    )
    distill.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    distill.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="checkpoint and stop once N optimizer steps (over all phases) are done; continue later with --resume",
    )
    add_config_flags(distill)
    distill.set_defaults(run=_run_distill)

    trajectories = commands.add_parser(
        "trajectories",
        help="pre-generate teacher trajectory states to disk, shared by later distill runs (--trajectories DIR)",
    )
    trajectories.add_argument("out", type=Path, help="folder for the shards")
    trajectories.add_argument(
        "--samples", type=int, default=1024, help="states per segment count (default 1024)"
    )
    trajectories.add_argument(
        "--shard-size", type=int, default=256, help="states per shard file (default 256)"
    )
    trajectories.add_argument("--config", type=Path, help="JSON file of config values")
    add_config_flags(trajectories)
    trajectories.set_defaults(run=_run_trajectories)

    export = commands.add_parser(
        "export", help="write the LoRA of a checkpoint in kohya/PEFT/diffusers formats"
    )
    export.add_argument(
        "checkpoint", type=Path, help="checkpoint folder, or a run directory (newest checkpoint)"
    )
    export.add_argument("--out", type=Path, help="output folder (default: <run>/export)")
    export.add_argument(
        "--formats",
        type=_str_list,
        default=None,
        help="comma list of kohya,peft,diffusers (default: the run's)",
    )
    export.add_argument("--name", default=None, help="file stem (default: mlcm_<family>_<segments>seg)")
    export.add_argument(
        "--best",
        action="store_true",
        help="reward runs: export the LoRA the keep-best rule kept (<run>/best) instead of the checkpoint's",
    )
    export.set_defaults(run=_run_export)

    # Subcommands owned by their features (issues 4 and 5); each module builds its own flags.
    from .demo.cli import add_demo_subparser, add_eval_subparser
    from .reward_cli import add_reward_subparser

    add_reward_subparser(commands)
    add_demo_subparser(commands)
    add_eval_subparser(commands)
    return parser


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


def _run_distill(args: argparse.Namespace) -> int:
    base = None
    if args.resume is not None:
        from .checkpoint import load_checkpoint

        base = load_checkpoint(args.resume).config
    config = resolve_config(args, base)
    if not config.teacher:
        raise ValueError(
            "no teacher given; pass --teacher PATH (a diffusers folder or a .safetensors checkpoint)"
        )
    if not config.prompts and not config.trajectories:
        raise ValueError("no prompts given; pass --prompts FILE (one prompt a line) or a folder of captions")
    if args.dry_run:
        sys.stdout.write(config.to_json() + "\n")
        return 0
    from .train import train

    train(config, resume=args.resume, stop_after=args.stop_after)
    return 0


def _run_trajectories(args: argparse.Namespace) -> int:
    """Pre-generate stage-1 teacher states for the first round's segment count (shared by ranks)."""
    import torch

    from .distill import DistillSettings
    from .run_inputs import (
        WEIGHT_DTYPES,
        load_inputs,
        make_accelerator,
        prompt_conditioning,
        resolve_mixed_precision,
        trajectory_expectation,
    )
    from .trajectories import generate_trajectory_shards

    config = resolve_config(args)
    if not config.teacher or not config.prompts:
        raise ValueError("trajectories needs --teacher PATH and --prompts FILE")
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    accelerator = make_accelerator(mixed_precision)
    device = accelerator.device
    teacher, prompts, embeddings = load_inputs(config, device, WEIGHT_DTYPES[mixed_precision])
    segments = config.rounds[0]
    identity = trajectory_expectation(config, teacher, prompts, segments)
    uncond_one = teacher.uncond(1, config.resolution).to(device)

    @torch.no_grad()
    def teacher_eps(z, t, cond):
        with accelerator.autocast():
            return teacher.unet(z, t, **cond.unet_kwargs(), return_dict=False)[0].float()

    def prompts_cond(index):
        cond = prompt_conditioning(teacher, embeddings, index, config.resolution, device)
        return cond, uncond_one.repeat(len(index))

    generate_trajectory_shards(
        teacher_eps,
        prompts_cond,
        args.out,
        num_samples=args.samples,
        shard_size=args.shard_size,
        num_prompts=len(prompts),
        settings=DistillSettings(
            segments=segments,
            skip=config.skip,
            guidance_scale=config.guidance_scale,
            num_train_timesteps=len(teacher.alphas_cumprod),
        ),
        alphas_cumprod=teacher.alphas_cumprod.to(device),
        boundaries=identity["boundaries"],
        latent_shape=identity["latent_shape"],
        seed=config.seed,
        teacher_hash=identity["teacher_hash"],
        prompts_hash=identity["prompts_hash"],
        batch_size=config.batch_size,
        device=device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        progress=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()
    log.info(
        "trajectory states for %d segments in %s; train with --trajectories %s", segments, args.out, args.out
    )
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    written = export_checkpoint(
        args.checkpoint, out_dir=args.out, formats=args.formats, name=args.name, best=args.best
    )
    for path in written:
        log.info("wrote %s", path)
    return 0


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
    except Exception as error:
        from .checkpoint import CheckpointError
        from .train import NonFiniteLossError

        if not isinstance(
            error, ValueError | FileNotFoundError | ImportError | CheckpointError | NonFiniteLossError
        ):
            raise
        # Known, user-fixable failures (bad values, missing files, an optional package not installed):
        # one clear line instead of a traceback (use -v for the traceback).
        log.debug("failed", exc_info=True)
        log.error("%s", error)
        return 2
