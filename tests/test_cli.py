"""The command line: help, dry runs, config resolution and validation messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    assert config.lora_rank == 32 and config.lora_alpha == 32.0  # alpha resolved explicitly
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
    assert a.config_hash() == DistillConfig(teacher="t", prompts="p", lora_alpha=64.0).config_hash()
    assert (
        a.config_hash()
        == a.replace(output_dir="elsewhere", checkpoint_every=7, tensorboard=True).config_hash()
    )
    assert a.config_hash() != a.replace(lora_alpha=8.0).config_hash()
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
