"""A reduced `python -m mlcm_train demo` end to end: report files, table structure and sanity."""

from __future__ import annotations

import json
import math

import pytest

from mlcm_train.cli import build_parser
from mlcm_train.demo.run import ASSET_DIR, DemoSettings, run_demo


def test_demo_and_eval_subcommands_parse():
    parser = build_parser()
    args = parser.parse_args(["demo", "--quick", "--out", "x", "--samples", "12"])
    assert args.quick and args.samples == 12 and callable(args.run)
    assert args.reward and parser.parse_args(["demo", "--no-reward"]).reward is False
    args = parser.parse_args(["eval", "--teacher", "t", "--prompts", "p", "--metrics", "demo,clip"])
    assert args.metrics == "demo,clip" and callable(args.run)


def test_shipped_teacher_loads_like_any_sd_folder():
    from mlcm_train.models.teacher import load_teacher

    teacher = load_teacher(ASSET_DIR)
    assert teacher.family == "sd15" and teacher.resolution == 32
    assert teacher.latent_shape(2) == (2, 4, 8, 8)
    assert next(teacher.unet.parameters()).dtype.is_floating_point
    embeds = teacher.encode_prompts(["a red seven on a dark background"]).prompt_embeds
    assert embeds.shape[0] == 1 and math.isfinite(float(embeds.abs().sum()))


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path):
    # The CI variant itself; one thread avoids OpenMP oversubscription.
    settings = DemoSettings.quick(out=tmp_path / "demo", threads=1)
    result = run_demo(settings)
    for name in ("table.md", "table.json", "samples.png", "quality_vs_steps.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert not list((tmp_path / "demo").glob("*.tmp-*"))  # written through renamed temporary files
    table = json.loads((tmp_path / "demo" / "table.json").read_text())
    rows = table["rows"]
    expected = (
        [("teacher CFG-DDIM", s) for s in (25, 2, 4, 8)]
        + [("LCM-style (1 segment)", s) for s in (1, 2, 4, 8)]
        + [("MLCM (8 seg.)", s) for s in (1, 2, 3, 4, 8)]
        + [("MLCM + stage 2", s) for s in (1, 2, 3, 4, 8)]
        + [("MLCM + stage 2 + reward", s) for s in (1, 2, 3, 4, 8)]
    )
    assert [(r["method"], r["steps"]) for r in rows] == expected
    for r in rows:
        for key in ("seconds_per_image", "fd", "prompt_accuracy", "reward"):
            assert math.isfinite(r[key]), (r, key)
        assert 0.0 <= r["prompt_accuracy"] <= 1.0 and r["fd"] >= 0.0
    by = {(r["method"], r["steps"]): r for r in rows}
    # Measured in this variant: MLCM after stage 2 at 4 steps FD 232 vs CFG-DDIM 4 steps 256.
    assert by[("MLCM + stage 2", 4)]["fd"] < by[("teacher CFG-DDIM", 4)]["fd"]
    assert by[("teacher CFG-DDIM", 25)]["unet_evals"] == 50 and by[("MLCM (8 seg.)", 4)]["unet_evals"] == 4
    md = (tmp_path / "demo" / "table.md").read_text()
    assert "| method | steps | UNet evals | s/image | FD | prompt acc. | reward |" in md
    assert result.seconds > 0 and "goals" in table
    # The reward stage's before/after rows: present and measured (4 reward iterations here; the improvement is the
    # full demo's claim, not asserted on this variant).
    goal = next(g for name, g in table["goals"].items() if name.startswith("reward:"))
    assert math.isfinite(goal["value"]) and set(goal["reward_change"]) == {"2", "4"}
    assert table["reward_stage"]["evaluations"] and "reward_s" in table["timings"]
    assert 0 <= table["reward_stage"]["kept_step"] <= settings.reward_iterations and "Reward stage:" in md
    assert table["rows"][0]["sampling_seconds_per_image"] <= table["rows"][0]["seconds_per_image"]
    # The per-stage spread: the main table's noise first, then every extra seed set, for every stage.
    spread = table["seed_spread"]
    assert set(spread) == {"teacher CFG-DDIM", "MLCM (8 seg.)", "MLCM + stage 2", "MLCM + stage 2 + reward"}
    stage2_4 = spread["MLCM + stage 2"]["4"]
    assert len(stage2_4["fd"]) == 1 + len(settings.spread_seeds)
    assert stage2_4["fd"][0] == by[("MLCM + stage 2", 4)]["fd"] and "noise seed sets" in md


def test_eval_scores_the_demo_teacher_from_a_prompt_file(tmp_path):
    from mlcm_train.data import digits as data
    from mlcm_train.eval.evaluate import EvalRequest, evaluate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(data.all_captions()[::5]) + "\n")
    result = evaluate(
        EvalRequest(teacher=ASSET_DIR, prompts=prompts, steps=4, metrics=("demo",), out=tmp_path / "s.json")
    )
    assert result["images"] == 12 and (tmp_path / "s.json").is_file()
    for key in ("fd", "prompt_accuracy", "reward", "seconds_per_image"):
        assert math.isfinite(result[key])


def test_eval_with_an_unknown_metric_fails_clearly(tmp_path):
    from mlcm_train.eval.evaluate import EvalRequest, score_images

    with pytest.raises(ValueError, match="unknown"):
        score_images(EvalRequest(teacher=ASSET_DIR, prompts=tmp_path, metrics=("bleu",)), None, [])
