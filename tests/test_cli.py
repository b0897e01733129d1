"""The command line: help, dry runs, config resolution and validation messages."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from test_citations import FOREIGN

from mlcm_train.cli import build_parser, main, resolve_config
from mlcm_train.config import LORA_TARGET_MODULES, DistillConfig


def test_module_help_runs_in_a_fresh_interpreter():
    expected = {
        "--help": "distill",
        "distill": "--gradient-checkpointing",
        "trajectories": "--samples",
        "export": "--formats",
    }
    for command, marker in expected.items():
        argv = [command] if command == "--help" else [command, "--help"]
        out = subprocess.run(
            [sys.executable, "-m", "mlcm_train", *argv], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "usage: python -m mlcm_train" in out.stdout and marker in out.stdout


def test_distill_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--segments",
        "--skip",
        "--guidance-scale",
        "--lora-alpha",
        "--resume",
        "--dry-run",
        "--progressive",
    ):
        assert flag in text
    assert "paper" in text  # help text comes from the dataclass comments


def test_dry_run_prints_resolved_config(capsys, tmp_path):
    code = main(
        [
            "distill",
            "--teacher",
            "t.safetensors",
            "--prompts",
            "p.txt",
            "--stages",
            "1",
            "--lora-rank",
            "32",
            "--dry-run",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    config = DistillConfig.from_dict(printed)
    assert config.lora_rank == 32 and config.lora_alpha == 8.0  # PEFT's / the official alpha
    assert config.stages == (1,) and config.segments == 8 and config.skip == 20
    assert config.guidance_scale == 8.0 and config.lr_stage1 == 1e-4 and config.lr_stage2 == 1e-5
    assert config.loss_type == "l2" and config.ema_decay is None
    assert config.lora_targets == LORA_TARGET_MODULES
    assert not (tmp_path / "runs").exists()


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"teacher": "x", "prompts": "p", "segments": 4, "skip": 10}))
    args = build_parser().parse_args(["distill", "--config", str(path), "--skip", "5"])
    config = resolve_config(args)
    assert (config.segments, config.skip) == (4, 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--segments", "100"], "fewer segments or a smaller skip"),
        (["--loss-type", "l1"], "loss_type='l1' is not one of l2, huber"),
        (["--progressive", "2,4"], "strictly decreasing"),
        (["--sample-steps", "0,2"], "sample_steps=(0, 2) must be step counts of at least 1"),
        (["--ema-decay", "1.5"], "ema_decay=1.5 must be in (0, 1)"),
        (["--stages", "2,1"], "stages=(2, 1)"),
    ],
)
def test_invalid_values_fail_with_a_fix(argv, message, capsys):
    code = main(["distill", "--teacher", "t", "--prompts", "p", "--dry-run", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_teacher_or_prompts(capsys):
    assert main(["distill", "--prompts", "p", "--dry-run"]) == 2
    assert "pass --teacher" in capsys.readouterr().err
    assert main(["distill", "--teacher", "t", "--dry-run"]) == 2
    assert "pass --prompts" in capsys.readouterr().err


def test_config_hash_is_stable_and_ignores_bookkeeping():
    a = DistillConfig(teacher="t", prompts="p")
    assert a.config_hash() == DistillConfig(teacher="t", prompts="p", lora_alpha=8.0).config_hash()
    assert (
        a.config_hash()
        == a.replace(output_dir="elsewhere", checkpoint_every=7, tensorboard=True).config_hash()
    )
    assert a.config_hash() != a.replace(lora_alpha=64.0).config_hash()
    assert a.config_hash() == DistillConfig.from_dict(json.loads(a.to_json())).config_hash()
    assert len(a.config_hash()) == 16


def test_progressive_rounds_plan_phases():
    config = DistillConfig(
        teacher="t", prompts="p", progressive=(8, 4, 2), stages=(1, 2), sample_steps=(1, 2)
    )
    assert config.phases() == [(8, 1), (8, 2), (4, 1), (4, 2), (2, 1), (2, 2)]
    assert config.final_segments == 2


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown config keys"):
        DistillConfig.from_dict({"teacher": "t", "segmets": 4})


def _subcommands():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


def test_every_flag_of_every_subcommand_has_help_and_says_what_it_takes():
    """Help text is non-empty, and a flag that takes a value names what: PATH, N, F, LIST, SPEC, NAME or a choice."""
    kinds = {"PATH", "N", "F", "LIST", "SPEC", "NAME", "OUT"}
    no_value = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
    problems = []
    for name, sub in _subcommands().items():
        assert name in {"distill", "trajectories", "export", "reward", "demo", "eval"}
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = (action.help or "").replace("(default: ", "").strip(" )")
            if len(text) < 8:
                problems.append(f"{flag}: no help")
            if isinstance(action, no_value):
                continue
            metavar = action.metavar or ""
            choice = metavar.startswith("{") and metavar.endswith("}")
            if metavar not in kinds and not choice:
                problems.append(f"{flag}: metavar {metavar!r}")
    assert not problems, "\n".join(problems)


def test_help_never_names_issues_or_files_outside_the_repository(capsys):
    for name in _subcommands():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "issue" not in text.lower() and not FOREIGN.search(text), name


def test_defaults_are_the_published_recipe():
    """Rank 64, alpha 8 (scale 0.125, the official LoRA's), lr 1e-4 then 1e-5, CFG 8, 8 segments, skip 20."""
    config = resolve_config(build_parser().parse_args(["distill", "--teacher", "t", "--prompts", "p"]))
    assert (config.lora_rank, config.lora_alpha, config.lora_alpha / config.lora_rank) == (64, 8.0, 0.125)
    assert (config.lr_stage1, config.lr_stage2, config.guidance_scale) == (1e-4, 1e-5, 8.0)
    assert (config.segments, config.skip, config.stages, config.stage1_steps, config.stage2_steps) == (
        8, 20, (1, 2), 12000, 2000,
    )  # fmt: skip
    none = resolve_config(build_parser().parse_args(["distill", "--lora-alpha", "none", "--lora-rank", "16"]))
    assert none.lora_alpha == 16.0  # "none" = rank, recorded explicitly


def test_a_field_added_later_leaves_older_runs_hashes_and_warnings_alone():
    from mlcm_train.run.setup import changed_recipe

    config = DistillConfig(teacher="t", prompts="p")
    older = {k: v for k, v in config.to_dict().items() if k not in ("optimizer", "ddp_timeout")}
    assert config.config_hash() == DistillConfig.from_dict(older).config_hash()
    assert config.config_hash() != config.replace(optimizer="adamw8bit").config_hash()
    assert changed_recipe(config, older) == []
    assert set(changed_recipe(config.replace(optimizer="adamw8bit", skip=10), older)) == {"skip", "optimizer"}
