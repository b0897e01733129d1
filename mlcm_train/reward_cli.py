"""``python -m mlcm_train reward``: preference-tune a distilled MLCM LoRA (flags generated from RewardConfig).

``add_reward_subparser(subparsers)`` registers the subcommand on the trainer's CLI (``mlcm_train/cli.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import add_config_flags, resolve_config
from .reward_config import RewardConfig


def add_reward_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``reward`` on the trainer's subcommands (``parser.add_subparsers(...)``)."""
    reward = subparsers.add_parser(
        "reward",
        help="tune a distilled MLCM LoRA toward a preference model (ImageReward, HPSv2, PickScore, aesthetic, ...)",
        description="Student samples (1..q steps) are decoded and scored; gradients flow through the VAE decoder "
        "into the LoRA only, with the stage-2 consistency loss as an anchor. Held-out evaluation, keep-best, "
        "checkpoints, resume and export as in distill.",
    )
    reward.add_argument(
        "--config", type=Path, help="JSON file of config values; flags given here override it"
    )
    reward.add_argument(
        "--resume",
        type=Path,
        metavar="PATH",
        help="continue exactly from a reward checkpoint or run directory",
    )
    reward.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    reward.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="checkpoint and stop after N optimizer steps; continue with --resume",
    )
    add_config_flags(reward, RewardConfig)
    reward.set_defaults(run=run_reward)
    return reward


def resolve_reward_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RewardConfig:
    """Defaults <- ``base`` (a saved config) <- ``--config`` file <- explicitly given flags."""
    return resolve_config(args, base, RewardConfig)


def run_reward(args: argparse.Namespace) -> int:
    base = None
    if args.resume is not None:
        from .checkpoint import load_checkpoint

        base = load_checkpoint(args.resume).config
    config = resolve_reward_config(args, base)
    if args.dry_run:
        sys.stdout.write(config.to_json() + "\n")
        return 0
    from .reward.stage import train_reward

    train_reward(config, resume=args.resume, stop_after=args.stop_after)
    return 0


def reward_main(argv: Sequence[str]) -> int:
    """``python -m mlcm_train reward ARGS`` on its own, with the trainer CLI's handling of known failures."""
    import logging

    from .checkpoint import CheckpointError
    from .train import NonFiniteLossError

    parser = argparse.ArgumentParser(prog="python -m mlcm_train")
    add_reward_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reward", *argv])
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointError, NonFiniteLossError) as error:
        # Known, user-fixable failures: one clear line instead of a traceback.
        logging.getLogger(__name__).error("%s", error)
        return 2


if __name__ == "__main__":  # python -m mlcm_train.reward_cli ARGS (also under torchrun / accelerate launch)
    import logging
    import os

    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(reward_main(sys.argv[1:]))
