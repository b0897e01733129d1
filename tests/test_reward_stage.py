"""The reward stage end to end on a tiny SD1.5 teacher and a LoRA from `distill`: only LoRA weights get
gradients, the CLI exports a LoRA recording the stage, a toy reward rises, resume is exact, bad input fails."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_PROMPTS as PROMPTS
from tiny_models import config_flags, make_tiny_sd15, make_tiny_sdxl
from tiny_reward_models import make_tiny_clip

from mlcm.lora import read_lora
from mlcm.segments import segment_timesteps
from mlcm_train.cli import main
from mlcm_train.config import DistillConfig, RewardConfig
from mlcm_train.distill import export_distilled, train_distill
from mlcm_train.eval.weights import MissingWeightsError
from mlcm_train.method.reward_loss import reward_loss
from mlcm_train.method.rollout import student_rollout
from mlcm_train.models.student import attach_lora, lora_state_dict
from mlcm_train.models.teacher import load_teacher
from mlcm_train.models.vae import decode_latents
from mlcm_train.reward.guard import HeldOut, RewardGuard
from mlcm_train.reward.models import build_reward
from mlcm_train.reward.stage import train_reward
from mlcm_train.reward.start import attach_start_lora, read_start_lora
from mlcm_train.run.checkpoint import TrainState


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(teacher folder, prompt file, distill run dir, exported kohya LoRA) from a 2-step stage-1 run."""
    root = tmp_path_factory.mktemp("reward")
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    teacher = make_tiny_sd15(root)
    result = train_distill(
        DistillConfig(
            teacher=str(teacher),
            prompts=str(prompts),
            output_dir=str(root / "distill"),
            stages=(1,),
            stage1_steps=2,
            batch_size=2,
            lora_rank=4,
            lora_alpha=8.0,
            sample_every=0,
            checkpoint_every=100,
        )
    )
    return teacher, prompts, root / "distill", result.exported[0]


def tiny_reward_config(distilled, out, **changes) -> RewardConfig:
    teacher, prompts, _, lora = distilled
    values = dict(
        teacher=str(teacher),
        prompts=str(prompts),
        lora=str(lora),
        reward="brightness",
        loss="maximise",
        keep_best="reward",
        iterations=4,
        batch_size=2,
        lr=1e-3,
        student_steps=(1, 2),
        anchor_q=2,
        anchor_p=1,
        eval_every=2,
        eval_samples=2,
        log_every=1,
        output_dir=str(out),
    )
    values.update(changes)
    return RewardConfig(**values)


def test_gradients_reach_only_the_lora(distilled, tmp_path):
    teacher_dir, _, _, lora = distilled
    teacher = load_teacher(teacher_dir)
    params = attach_start_lora(teacher.unet, read_start_lora(lora), family=teacher.family)
    teacher.vae.enable_gradient_checkpointing()
    reward = build_reward(f"clip*2={make_tiny_clip(tmp_path / 'clip')},brightness")
    prompts = ["a red cat", "a dog"]
    cond = teacher.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(0)
    shape = teacher.latent_shape(2)
    noise, renoise = torch.randn(shape, generator=generator), [torch.randn(shape, generator=generator)]

    def eps(z, t, c):
        return teacher.unet(z, t, **c.unet_kwargs(), return_dict=False)[0]

    x0 = student_rollout(
        eps, noise, renoise, cond, timesteps=segment_timesteps(2, 8), alphas_cumprod=teacher.alphas_cumprod
    )
    images = decode_latents(teacher.vae, x0)
    loss, _ = reward_loss(reward, images, prompts, loss="hinge", margin=16.0)
    loss.backward()
    lora_ids = {id(p) for p in params}
    assert params and all(p.grad is not None for p in params)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0
    frozen = [
        *(p for p in teacher.unet.parameters() if id(p) not in lora_ids),
        *teacher.vae.parameters(),
        *(p for encoder in teacher.text_encoders for p in encoder.parameters()),
        *(p for module in reward.modules() for p in module.parameters()),
    ]
    assert frozen and all(p.grad is None for p in frozen)


def test_cli_exports_a_lora_that_records_the_reward_stage(distilled, tmp_path):
    config = tiny_reward_config(distilled, tmp_path / "run", heldout="brightness", keep_best="heldout")
    assert main(["reward", *config_flags(config)]) == 0  # python -m mlcm_train reward ...
    exported = tmp_path / "run" / "export" / "mlcm_sd15_8seg_reward.safetensors"
    lora = read_lora(exported)
    start = read_lora(distilled[3])
    assert lora.metadata.stages == (*start.metadata.stages, "reward:brightness")
    assert lora.metadata.training["reward"]["config"]["reward"] == "brightness"
    assert lora.metadata.training["config"]["lora_alpha"] == 8.0  # the distill record is kept
    assert set(lora.modules) == set(start.modules)
    assert {m.scale for m in lora.modules.values()} == {2.0}  # trained alpha 8 / rank 4, kept explicit
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["global_step"] for r in evals] == [0, 2, 4]
    assert all("eval_reward@1" in r and "eval_heldout@2" in r for r in evals)
    assert any("anchor_loss" in r for r in rows)
    assert (tmp_path / "run" / "best" / "guard.json").is_file()
    card = exported.with_suffix(".md").read_text(encoding="utf-8")
    assert "## Reward stage" in card and "Reward `brightness` (maximise loss)" in card
    assert "| reward@1 |" in card and "| heldout@2 |" in card  # before / kept, per step count
    spent = lora.metadata.training["reward"]  # the reward stage's own cost, its evaluations included
    assert spent["student_evaluations"] > [r for r in rows if "student_evals" in r][-1]["student_evals"] > 0
    assert f"{spent['student_evaluations']} student UNet evaluations" in card


def test_export_cli_rewrites_a_reward_checkpoint_or_its_kept_lora(distilled, tmp_path, capsys):
    run = tmp_path / "run"
    result = train_reward(tiny_reward_config(distilled, run, checkpoint_every=4))
    assert main(["export", str(run), "--out", str(tmp_path / "last"), "--formats", "kohya,peft"]) == 0
    last = read_lora(tmp_path / "last" / "mlcm_sd15_8seg_reward.safetensors")
    assert last.metadata.stages[-1] == "reward:brightness"
    assert last.metadata.training["reward"]["kept_step"] == 4
    assert (tmp_path / "last" / "mlcm_sd15_8seg_reward_peft" / "adapter_config.json").is_file()
    current = lora_state_dict(result.unet)
    module = next(iter(last.modules.values()))
    assert any(torch.equal(module.down.float(), v.half().float()) for v in current.values())
    # --best: the LoRA the keep-best rule kept, the same tensors the run exported itself at its end
    assert main(["export", str(run), "--out", str(tmp_path / "best"), "--best"]) == 0
    best, own = (
        load_file(str(d / "mlcm_sd15_8seg_reward.safetensors")) for d in (tmp_path / "best", run / "export")
    )
    assert best.keys() == own.keys() and all(torch.equal(best[k], own[k]) for k in best)
    kept = json.loads((run / "best" / "guard.json").read_text())["best"]["step"]
    assert (
        read_lora(tmp_path / "best" / "mlcm_sd15_8seg_reward.safetensors").metadata.training["reward"][
            "kept_step"
        ]
        == kept
    )
    capsys.readouterr()
    assert main(["export", str(distilled[2]), "--out", str(tmp_path / "x"), "--best"]) == 2
    assert "--best is for reward runs" in capsys.readouterr().err
    distilled[3].rename(distilled[3].with_suffix(".moved"))
    try:
        assert main(["export", str(run), "--out", str(tmp_path / "y")]) == 2
    finally:
        distilled[3].with_suffix(".moved").rename(distilled[3])
    assert "needs the LoRA this reward run started from" in capsys.readouterr().err


def test_toy_reward_rises_starting_from_a_run_directory(distilled, tmp_path):
    config = tiny_reward_config(
        distilled,
        tmp_path / "run",
        lora=str(distilled[2]),  # the distill run directory (its newest checkpoint)
        iterations=8,
        eval_every=8,
        lr=3e-2,
        anchor_weight=0.0,
        student_steps=(2,),
        max_grad_norm=1e9,
    )
    result = train_reward(config)
    first, last = result.evaluations[0], result.evaluations[-1]
    assert (first["step"], last["step"]) == (0, 8)
    assert last["reward"] > first["reward"] + 1e-3
    # keep_best="reward": the kept weights are those of the best evaluation (here the last), as exported
    exported = read_lora(result.exported[0])
    assert result.kept is not None and len(exported.modules) * 2 == len(result.kept)


def test_resume_matches_an_uninterrupted_run(distilled, tmp_path):
    straight = train_reward(tiny_reward_config(distilled, tmp_path / "straight"))
    config = tiny_reward_config(distilled, tmp_path / "split")
    half = train_reward(config, stop_after=2)
    assert half.state.global_step == 2
    resumed = train_reward(config, resume=tmp_path / "split")
    assert resumed.state.global_step == 4
    a, b = lora_state_dict(straight.unet), lora_state_dict(resumed.unet)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in resumed.evaluations] == [0, 2, 4]
    torch.testing.assert_close(
        torch.tensor(straight.losses[2:]), torch.tensor(resumed.losses), rtol=1e-5, atol=1e-6
    )


def test_missing_reward_weights_fail_before_the_teacher_loads(distilled, tmp_path):
    config = tiny_reward_config(distilled, tmp_path / "run", reward=f"pickscore={tmp_path / 'none'}")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        train_reward(config)
    assert (
        main(
            [
                "reward",
                "--teacher",
                str(distilled[0]),
                "--prompts",
                str(distilled[1]),
                "--lora",
                str(distilled[3]),
                "--reward",
                "aesthetic",
                "--keep-best",
                "last",
                "--output-dir",
                str(tmp_path / "cli"),
            ]
        )
        == 2
    )


def test_a_lora_for_another_family_is_refused(distilled, tmp_path):
    sdxl = load_teacher(make_tiny_sdxl(tmp_path))
    attach_lora(sdxl.unet, rank=4, alpha=4.0, targets=DistillConfig().lora_targets)
    state = TrainState(2, 1, 0, 0, "sdxl", 4)
    written = export_distilled(
        lora_state_dict(sdxl.unet), DistillConfig(lora_rank=4), state, tmp_path / "sdxl"
    )
    config = tiny_reward_config(distilled, tmp_path / "run", lora=str(written[0]))
    with pytest.raises(ValueError, match="trained for sdxl but the teacher is sd15"):
        train_reward(config)


def test_a_foreign_lora_without_metadata_is_refused_by_its_modules(distilled, tmp_path):
    from mlcm.lora import write_kohya_lora

    sdxl_lora = read_lora(
        distilled[3]
    )  # take the SD1.5 LoRA's pairs and rename one module to a path SD1.5 lacks
    modules = dict(sdxl_lora.modules)
    name = next(iter(modules))
    modules["lora_unet_down_blocks_3_attentions_5_proj_in"] = modules.pop(name)
    from mlcm.lora import LoraWeights

    path = tmp_path / "foreign.safetensors"
    write_kohya_lora(path, LoraWeights(modules, None, "kohya"), metadata=None)
    config = tiny_reward_config(distilled, tmp_path / "run", lora=str(path))
    with pytest.raises(ValueError, match="modules this teacher's UNet lacks"):
        train_reward(config)


def test_guard_keeps_the_best_and_warns_on_reward_hacking(tmp_path, caplog):
    fd = HeldOut("fd", higher_is_better=False, measure=lambda images, prompts: 0.0)
    guard = RewardGuard("heldout", fd, tmp_path)
    weights = {f"w{i}": torch.full((2,), float(i)) for i in range(3)}
    with caplog.at_level(logging.WARNING):
        guard.record({"step": 0, "reward": -2.0, "heldout": 10.0}, {"w": weights["w0"]})
        guard.record({"step": 5, "reward": -1.0, "heldout": 8.0}, {"w": weights["w1"]})
        assert "reward hacking" not in caplog.text
        guard.record({"step": 10, "reward": -0.5, "heldout": 12.0}, {"w": weights["w2"]})
    assert "possible reward hacking at step 10" in caplog.text
    assert guard.best["step"] == 5
    torch.testing.assert_close(guard.best_lora()["w"], weights["w1"])
    again = RewardGuard("heldout", fd, tmp_path)
    again.restore(7)
    assert [r["step"] for r in again.history] == [0, 5] and again.best["step"] == 5
    assert RewardGuard("last", fd, tmp_path / "x").best_lora() is None


def test_guarded_rule_takes_the_best_reward_within_the_heldout_tolerance(tmp_path):
    fd = HeldOut("fd", higher_is_better=False, measure=lambda images, prompts: 0.0)
    guard = RewardGuard("guarded", fd, tmp_path, tolerance=0.1)
    rows = [(-3.0, 10.0), (-2.0, 10.5), (-1.0, 10.9), (-0.5, 11.5), (-0.2, 30.0)]  # FD +0%, 5%, 9%, 15%, 200%
    for step, (reward, heldout) in enumerate(rows):
        guard.record(
            {"step": step, "reward": reward, "heldout": heldout}, {"w": torch.full((1,), float(step))}
        )
    assert guard.best["step"] == 2  # the highest reward whose FD is at most 10% above the start's
    assert guard.best_lora()["w"].item() == 2.0
    stuck = RewardGuard("guarded", fd, tmp_path / "stuck", tolerance=0.1)
    for step, (reward, heldout) in enumerate([(-3.0, 10.0), (-1.0, 20.0)]):
        stuck.record({"step": step, "reward": reward, "heldout": heldout}, {"w": torch.zeros(1)})
    assert stuck.best["step"] == 0  # nothing qualified: the start LoRA is kept
    per_steps = RewardGuard("guarded", fd, tmp_path / "per_steps", tolerance=0.1)
    for step, (reward, fd2, fd4) in enumerate([(-3.0, 10.0, 10.0), (-1.0, 8.0, 11.5), (-2.0, 9.0, 10.5)]):
        row = {"step": step, "reward": reward, "heldout@2": fd2, "heldout@4": fd4, "heldout": (fd2 + fd4) / 2}
        per_steps.record(row, {"w": torch.zeros(1)})
    assert per_steps.best["step"] == 2  # step 1's mean FD improved, but its 4-step FD is 15% worse


def test_heldout_measures_and_their_direction(tmp_path):
    from mlcm_train.data import digits as data
    from mlcm_train.demo.classifier_train import ClassifierRecipe, save_classifier
    from mlcm_train.eval.digits import DigitClassifier
    from mlcm_train.reward.guard import build_heldout

    recipe = ClassifierRecipe(channels=(4, 4, 4), features=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        save_classifier(DigitClassifier(recipe.channels, recipe.features), tmp_path, recipe)
    fd = build_heldout(f"fd={tmp_path}")
    prompts = [data.caption(d % 10, d % 3) for d in range(12)]
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(6))  # resized to 32 px
    value = fd.measure(images, prompts)
    assert not fd.higher_is_better and value > 0 and value == fd.measure(images, prompts)
    second = build_heldout("brightness")
    assert second.higher_is_better and second.measure(images, prompts) == pytest.approx(
        float(build_reward("brightness")(images, prompts).mean())
    )
    with pytest.raises(ValueError, match="demo classifier folder"):
        build_heldout("fd")


def test_dry_run_prints_the_resolved_config(distilled, tmp_path, capsys):
    teacher, prompts, _, lora = distilled
    argv = [
        "--teacher",
        str(teacher),
        "--prompts",
        str(prompts),
        "--lora",
        str(lora),
        "--reward",
        "brightness",
    ]
    assert main(["reward", *argv, "--keep-best", "reward", "--student-steps", "2,4", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["student_steps"] == [2, 4] and printed["margin"] == 16.0 and printed["lr"] == 1e-5
    # The plan: the LoRA's own rank (4), the reward phase's peak and time, and what it leaves out.
    assert "plan: LoRA" in err and "plan: reward M=8: peak about" in err and "s per step" in err
    assert "not counted: the reward model" in err
    assert not (tmp_path / "runs").exists()


def test_a_reward_run_checkpoint_is_not_a_start_lora(distilled, tmp_path):
    train_reward(tiny_reward_config(distilled, tmp_path / "first", iterations=1, anchor_weight=0.0))
    config = tiny_reward_config(distilled, tmp_path / "second", lora=str(tmp_path / "first"))
    with pytest.raises(ValueError, match="reward run's checkpoint"):
        train_reward(config)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_reward(tiny_reward_config(distilled, tmp_path / "first"))


def test_sdxl_teacher_end_to_end(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    teacher = make_tiny_sdxl(tmp_path)
    distill = train_distill(
        DistillConfig(
            teacher=str(teacher),
            prompts=str(prompts),
            output_dir=str(tmp_path / "distill"),
            stages=(1,),
            stage1_steps=1,
            batch_size=2,
            lora_rank=4,
            sample_every=0,
        )
    )
    config = tiny_reward_config(
        (teacher, prompts, None, distill.exported[0]),
        tmp_path / "run",
        iterations=2,
        loss="auto",
    )
    result = train_reward(config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    lora = read_lora(result.exported[0])
    assert lora.metadata.base_family == "sdxl" and lora.metadata.stages[-1] == "reward:brightness"


def _default_loss_lora_gradient(distilled, spec, prompts):
    """Sum |grad| on the LoRA of the reward loss a run uses by default for ``spec`` (2-step rollout)."""
    from mlcm_train.reward.models import resolve_loss

    teacher_dir, _, _, lora = distilled
    teacher = load_teacher(teacher_dir)
    params = attach_start_lora(teacher.unet, read_start_lora(lora), family=teacher.family)
    reward = build_reward(spec)
    cond = teacher.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(0)
    shape = teacher.latent_shape(len(prompts))
    noise, renoise = torch.randn(shape, generator=generator), [torch.randn(shape, generator=generator)]

    def eps(z, t, c):
        return teacher.unet(z, t, **c.unet_kwargs(), return_dict=False)[0]

    x0 = student_rollout(
        eps, noise, renoise, cond, timesteps=segment_timesteps(2, 8), alphas_cumprod=teacher.alphas_cumprod
    )
    loss, _ = reward_loss(reward, decode_latents(teacher.vae, x0), prompts, loss=resolve_loss("auto", reward))
    loss.backward()
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.parametrize("name", ["clip", "pickscore", "hpsv2", "aesthetic", "classifier", "brightness"])
def test_every_built_in_scorer_trains_the_lora_with_its_default_loss(distilled, tmp_path, name):
    from tiny_reward_models import make_tiny_aesthetic, make_tiny_classifier, make_tiny_clip

    from mlcm_train.data import digits as data

    clip = make_tiny_clip(tmp_path / "clip")
    folders = {
        "clip": clip,
        "pickscore": clip,
        "hpsv2": clip,
        "aesthetic": make_tiny_aesthetic(tmp_path / "aesthetic", clip),
        "classifier": make_tiny_classifier(tmp_path / "classifier"),
    }
    spec = f"{name}={folders[name]}" if name in folders else name
    prompts = [data.caption(7, 0), data.caption(1, 2)] if name == "classifier" else ["a red cat", "a dog"]
    assert _default_loss_lora_gradient(distilled, spec, prompts) > 0


def test_the_paper_hinge_cannot_train_a_prompt_independent_scorer_and_is_refused(distilled, tmp_path):
    from mlcm_train.method.reward_loss import hinge_loss
    from mlcm_train.reward.models import resolve_loss

    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    scores = build_reward("brightness")(images, ["a", "b"])  # in [0, 1]: inside the margin 16
    hinge_loss(scores, scores, 16.0).backward()  # relu(16 - s) + relu(s) = 16 for any s: no gradient
    assert float(images.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="ignores the prompt"):
        resolve_loss("hinge", build_reward("brightness"))
    with pytest.raises(ValueError, match="ignores the prompt"):
        train_reward(tiny_reward_config(distilled, tmp_path / "run", loss="hinge"))
    assert resolve_loss("auto", build_reward("brightness")) == "maximise"


def test_heldout_prompts_are_encoded_before_the_text_encoders_are_released(distilled, tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a blue bird\na green frog\n", encoding="utf-8")
    config = tiny_reward_config(distilled, tmp_path / "run", iterations=1, heldout_prompts=str(heldout))
    result = train_reward(config)
    assert [row["step"] for row in result.evaluations] == [0, 1]
    teacher = load_teacher(distilled[0])
    assert teacher.release_text_encoders() > 0
    with pytest.raises(ValueError, match="keep-text-encoders"):  # what a run's teacher says afterwards
        teacher.encode_prompts(["a cat"])


def test_a_finished_run_resumed_with_more_iterations_continues_it(distilled, tmp_path):
    """The last phase stays open (checkpointed with its optimizer): 4 steps, then --iterations 8 on resume,
    gives the LoRA of 8 steps straight, evaluations included."""
    straight = train_reward(tiny_reward_config(distilled, tmp_path / "straight", iterations=8))
    train_reward(tiny_reward_config(distilled, tmp_path / "split", iterations=4))
    extended = train_reward(
        tiny_reward_config(distilled, tmp_path / "split", iterations=8), resume=tmp_path / "split"
    )
    assert extended.state.global_step == 8 and len(extended.losses) == 4
    assert [r["step"] for r in extended.evaluations] == [r["step"] for r in straight.evaluations]
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000008" / "lora.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "step-0000008" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
