"""``python -m mlcm_train demo``: distill MLCM and an LCM-style baseline from the shipped teacher, measure, report.

1. Distill through ``mlcm_train.distill.train_distill`` with a ``DistillConfig`` (the code path users run on
   SDXL): MLCM (8 segments, stage 1 then stage 2; the stage-1 LoRA is read from the phase-boundary checkpoint)
   and the LCM-style baseline (one segment, stage 1 only, the same number of optimizer steps).
   Then tune the stage-2 LoRA with the demo classifier's reward through ``mlcm_train.reward.stage``, the code
   path of ``python -m mlcm_train reward``; its kept weights are the "+ reward" rows.
2. Generate the same prompts from the same noise with every method and step count, decode, time.
3. Score with the demo classifier (FD to held-out real digits, prompt accuracy, reward) and write the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mlcm import lcm_timesteps, segment_timesteps
from mlcm_train.config import LORA_TARGET_MODULES, DistillConfig
from mlcm_train.data.captioned import CaptionedSet
from mlcm_train.demo.recipe import DEMO_REWARD_ITERATIONS, demo_reward_config
from mlcm_train.demo.report import Row, write_grid, write_plot, write_table
from mlcm_train.distill import train_distill
from mlcm_train.eval.digits import DEMO_ASSETS, DemoEvaluator, load_classifier
from mlcm_train.eval.generate import Generated, generate
from mlcm_train.method.rollout import consistency_sample
from mlcm_train.method.teacher_ddim import teacher_cfg_ddim
from mlcm_train.models.student import adapters_disabled, attach_lora, load_lora_state_dict
from mlcm_train.models.teacher import load_teacher
from mlcm_train.reward.guard import BEST_DIR, GUARD_FILE
from mlcm_train.reward.stage import train_reward
from mlcm_train.run.checkpoint import list_checkpoints, load_checkpoint

log = logging.getLogger(__name__)

ASSET_DIR = DEMO_ASSETS  # the shipped teacher; its classifier lives beside it
TIME_BUDGET_S = 15 * 60  # the whole demo on 2 CPU cores, teacher retraining excluded
TEACHER, LCM = "teacher CFG-DDIM", "LCM-style (1 segment)"
MLCM_STAGE2, MLCM_REWARD = "MLCM + stage 2", "MLCM + stage 2 + reward"
REWARD_FD_TOLERANCE = 0.1  # FD may worsen by at most 10% against the LoRA the reward stage started from


def mlcm_stage1_label(segments: int) -> str:
    return f"MLCM ({segments} seg.)"


@dataclass(frozen=True)
class DemoSettings:
    """What one demo run does; the defaults are the full demo, ``quick()`` the CI variant."""

    out: Path = Path("reports/demo")
    teacher: Path = ASSET_DIR
    iterations: int = 300  # stage-1 optimizer steps, MLCM and the LCM baseline alike
    stage2_iterations: int = 150  # stage-2 optimizer steps of MLCM
    samples: int = 240  # evaluation images per table row (4 per caption)
    batch_size: int = 16  # training batch
    eval_batch_size: int = 120
    lora_rank: int = 16
    lr_stage1: float = 2e-3  # higher than SDXL's 1e-4: a tiny UNet and a few hundred steps
    lr_stage2: float = 2e-4
    guidance_scale: float = 3.0  # the teacher's CFG w, used in the DDIM rows and baked into the students
    segments: int = 8
    teacher_steps: int = 25
    ddim_steps: tuple[int, ...] = (2, 4, 8)
    lcm_steps: tuple[int, ...] = (1, 2, 4, 8)
    mlcm_steps: tuple[int, ...] = (1, 2, 3, 4, 8)
    reward: bool = True  # tune the stage-2 LoRA with the classifier reward, add the "+ reward" rows
    reward_iterations: int = DEMO_REWARD_ITERATIONS
    grid_columns: int = 10
    # More noise seed sets for the per-stage spread table (2, 4 and 8 steps), beside the main table's seed.
    spread_seeds: tuple[int, ...] = (1, 2)
    spread_steps: tuple[int, ...] = (2, 4, 8)
    seed: int = 0
    threads: int = 2

    @classmethod
    def quick(cls, **changes: object) -> DemoSettings:
        """Reduced CI variant: minutes instead of the full run; same rows, fewer iterations and samples."""
        quick = {
            "iterations": 40,
            "stage2_iterations": 8,
            "samples": 60,
            "reward_iterations": 4,
            "spread_seeds": (1,),
        }
        return replace(cls(), **{**quick, **changes})


@dataclass
class DemoResult:
    rows: list[Row]
    files: dict[str, Path]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _prompt_file(folder: Path, dataset: CaptionedSet) -> Path:
    path = folder / "prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(dataset.all_captions()) + "\n", encoding="utf-8")
    return path


def distill_config(
    settings: DemoSettings, prompts: Path, run_dir: Path, segments: int, stages: tuple[int, ...], **changes
) -> DistillConfig:
    """The demo's ``DistillConfig`` of one run: its recipe at ``segments`` and ``stages``, plus ``changes``."""
    values = dict(
        teacher=str(settings.teacher),
        prompts=str(prompts),
        segments=segments,
        guidance_scale=settings.guidance_scale,
        stages=stages,
        stage1_steps=settings.iterations,
        stage2_steps=settings.stage2_iterations,
        lr_stage1=settings.lr_stage1,
        lr_stage2=settings.lr_stage2,
        lora_rank=settings.lora_rank,
        lora_alpha=float(settings.lora_rank),  # the demo's own recipe: scale 1.0 (its lr was tuned at it)
        batch_size=settings.batch_size,
        mixed_precision="no",
        seed=settings.seed,
        output_dir=str(run_dir),
        checkpoint_every=10**9,  # only the phase boundaries: they hold each stage's LoRA
        checkpoints_keep=0,
        sample_every=0,
        sample_steps=tuple(s for s in (1, 2, 4, 8) if s <= segments),
        log_every=10,
    )
    values.update(changes)
    return DistillConfig(**values)


def stage_loras(run_dir: Path, config: DistillConfig) -> dict[int, dict[str, torch.Tensor]]:
    """{stage: LoRA state dict at the end of that stage's last phase} of a finished run, read from its
    phase-boundary checkpoints (stage 2's rounds end at the last one)."""
    phases = config.phases()
    loras = {}
    for checkpoint in list_checkpoints(run_dir):
        saved = load_checkpoint(checkpoint)
        if saved.state.phase_step == 0 and saved.state.phase > 0:
            loras[phases[saved.state.phase - 1][1]] = saved.lora
    return loras


def _distill(settings: DemoSettings, prompts: Path, name: str, segments: int, stages: tuple[int, ...]):
    """One ``train_distill()`` run; returns {stage: LoRA state dict} read from the phase-boundary checkpoints."""
    run_dir = settings.out / "runs" / name
    if run_dir.exists():  # the demo's own scratch folder; train_distill() refuses to start over checkpoints
        shutil.rmtree(run_dir)
    config = distill_config(settings, prompts, run_dir, segments, stages)
    train_distill(config)
    return stage_loras(run_dir, config)


def _reward_tune(settings: DemoSettings, prompts: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The reward stage from the MLCM stage-2 run; returns the kept LoRA (PEFT names) and run facts."""
    run_dir = settings.out / "runs" / "reward"
    if run_dir.exists():  # the demo's own scratch folder; train_reward() refuses to start over checkpoints
        shutil.rmtree(run_dir)
    config = demo_reward_config(
        settings.teacher,
        prompts,
        settings.out / "runs" / "mlcm",  # the newest checkpoint of that run is the end of stage 2
        run_dir,
        iterations=settings.reward_iterations,
        eval_samples=settings.samples,  # the same number of images as a table row
        seed=settings.seed,
    )
    result = train_reward(config)
    if result.kept is None:
        raise RuntimeError(f"the reward stage in {run_dir} returned no kept LoRA; see its log")
    guard_file = run_dir / BEST_DIR / GUARD_FILE
    best = json.loads(guard_file.read_text(encoding="utf-8"))["best"] if guard_file.is_file() else None
    facts = {
        "iterations": config.iterations,
        "keep_best": config.keep_best,
        "kept_step": best["step"] if best is not None else config.iterations,
        "exported": [str(path) for path in result.exported],
        "evaluations": result.evaluations,  # the reward stage's own evaluation seeds, not the table's
    }
    return result.kept, facts


def run_demo(settings: DemoSettings | None = None) -> DemoResult:
    """The whole demo; writes ``table.md``, ``table.json``, ``samples.png`` and ``quality_vs_steps.png``."""
    from tqdm.auto import tqdm

    settings = settings or DemoSettings()
    torch.set_num_threads(settings.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    dataset = load_classifier(settings.teacher).dataset  # the set the teacher was trained on
    loras, reward_facts = _train_all(settings, _prompt_file(out, dataset), timings)

    tick = time.perf_counter()
    bench = _Bench(settings)
    plan = bench.plan(loras)
    timings["eval_setup_s"] = time.perf_counter() - tick
    rows: list[Row] = []
    grid: list[tuple[str, torch.Tensor]] = []
    tick = time.perf_counter()
    for method, steps, evals, lora, sampler in tqdm(plan, desc="evaluate"):
        row, images = bench.measure(method, steps, evals, lora, sampler)
        rows.append(row)
        grid.append((f"{method}\n{steps} steps", images[bench.grid_index]))
        log.info("%s %d steps: FD %.2f, prompt acc. %.3f", method, steps, row.fd, row.prompt_accuracy)
    timings["evaluate_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    spread = seed_spread(settings, rows, loras)
    timings["seed_spread_s"] = time.perf_counter() - tick
    total = time.perf_counter() - started
    files = {
        "grid": write_grid(grid, [bench.prompts[i] for i in bench.grid_index], out / "samples.png"),
        "plot": write_plot(rows, rows[0], out / "quality_vs_steps.png"),
    }
    goals = check_goals(rows, settings)
    extra = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()},
        "seconds_total": total,
        # CPU seconds of this process (all threads): wall time on a busy shared machine overstates the cost.
        "cpu_seconds_total": time.process_time() - cpu_started,
        "timings": timings,
        "goals": goals,
        "seed_spread": spread,
        "reward_stage": reward_facts,
        "threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],  # other work sharing the cores during the run
    }
    notes = goals_markdown(goals) + spread_markdown(spread, settings) + _reward_note(reward_facts)
    notes += f"\nTotal demo time: {total:.0f} s on {torch.get_num_threads()} threads.\n"
    files["table_md"], files["table_json"] = write_table(rows, out, extra, notes)
    log.info("demo finished in %.0f s; report in %s", total, out)
    return DemoResult(rows, files, total, timings)


def _train_all(settings: DemoSettings, prompts: Path, timings: dict[str, float]) -> tuple[dict, dict]:
    """MLCM (stages 1, 2), the LCM-style baseline and, when asked, the reward stage: {row label: LoRA}, facts."""
    tick = time.perf_counter()
    mlcm = _distill(settings, prompts, "mlcm", settings.segments, (1, 2))
    timings["distill_mlcm_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    lcm = _distill(settings, prompts, "lcm", 1, (1,))
    timings["distill_lcm_s"] = time.perf_counter() - tick
    loras = {LCM: lcm[1], mlcm_stage1_label(settings.segments): mlcm[1], MLCM_STAGE2: mlcm[2]}
    facts: dict = {}
    if settings.reward:
        tick = time.perf_counter()
        loras[MLCM_REWARD], facts = _reward_tune(settings, prompts)
        timings["reward_s"] = time.perf_counter() - tick
    return loras, facts


class _Bench:
    """The fixed evaluation set: the teacher with an attachable LoRA, prompts, conditioning, noise, scorer."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.teacher = load_teacher(settings.teacher)
        self.unet, self.acp = self.teacher.unet, self.teacher.alphas_cumprod
        attach_lora(
            self.unet, rank=settings.lora_rank, alpha=float(settings.lora_rank), targets=LORA_TARGET_MODULES
        )
        self.unet.requires_grad_(False)
        self.evaluator = DemoEvaluator(load_classifier(settings.teacher))
        dataset = self.evaluator.dataset
        captions = dataset.all_captions()
        self.prompts = [captions[i % len(captions)] for i in range(settings.samples)]
        self.cond = self.teacher.encode_prompts(self.prompts)
        self.uncond = self.teacher.uncond(settings.samples)
        generator = torch.Generator().manual_seed(settings.seed)
        self.noise = torch.randn(self.teacher.latent_shape(settings.samples), generator=generator)
        # Grid column d: class d mod K in colour d mod C (prompt index class * C + colour), every class once when
        # possible; columns beyond the K classes take the next image of that caption.
        classes, colours = len(dataset.class_words), len(dataset.colours)
        self.grid_index = [
            (d // classes) * len(captions) + (d % classes) * colours + d % colours
            for d in range(settings.grid_columns)
        ]
        if max(self.grid_index) >= settings.samples:
            self.grid_index = list(range(min(settings.grid_columns, settings.samples)))

    def eps(self, z, t, c):
        return self.unet(z, t, **c.unet_kwargs(), return_dict=False)[0].float()

    def ddim(self, steps: int):
        guidance = self.settings.guidance_scale
        return lambda z, c, u: teacher_cfg_ddim(
            self.eps, z, c, u, steps=steps, guidance_scale=guidance, alphas_cumprod=self.acp
        )

    def consistency(self, timesteps: list[int]):
        seed = self.settings.seed
        return lambda z, c, u: consistency_sample(
            self.eps, z, c, timesteps=timesteps, alphas_cumprod=self.acp, seed=seed
        )

    def plan(self, loras: dict) -> list[tuple]:
        """(method, steps, UNet evals, LoRA or None, sampler) of every table row, in order."""
        settings = self.settings
        plan = [
            (TEACHER, s, 2 * s, None, self.ddim(s)) for s in (settings.teacher_steps, *settings.ddim_steps)
        ]
        plan += [(LCM, s, s, loras[LCM], self.consistency(lcm_timesteps(s))) for s in settings.lcm_steps]
        for label in (mlcm_stage1_label(settings.segments), MLCM_STAGE2, MLCM_REWARD):
            if label in loras:
                plan += [
                    (label, s, s, loras[label], self.consistency(segment_timesteps(s, settings.segments)))
                    for s in settings.mlcm_steps
                ]
        return plan

    def measure(self, method: str, steps: int, evals: int, lora, sampler) -> tuple[Row, torch.Tensor]:
        """Generate the evaluation set with ``sampler`` (the teacher alone when ``lora`` is None) and score it."""
        if lora is None:
            with adapters_disabled(self.unet):
                generated = self._generate(sampler)
        else:
            load_lora_state_dict(self.unet, lora)
            with _merged(self.unet):  # as ComfyUI patches weights: a distilled step costs one plain UNet call
                generated = self._generate(sampler)
        scores = self.evaluator.score(generated.images, self.prompts)
        samples = self.settings.samples
        row = Row(
            method,
            steps,
            evals,
            generated.seconds / samples,
            scores.fd,
            scores.prompt_accuracy,
            scores.reward,
            scores.digit_accuracy,
            scores.colour_accuracy,
            (generated.seconds - generated.decode_seconds) / samples,
        )
        return row, generated.images

    def _generate(self, sampler) -> Generated:
        return generate(
            sampler,
            self.teacher.vae,
            self.noise,
            self.cond,
            self.uncond,
            batch_size=self.settings.eval_batch_size,
            select=lambda c, rows: c[rows],
        )


def seed_spread(settings: DemoSettings, rows: list[Row], loras: dict) -> dict[str, dict[str, dict]]:
    """FD and prompt accuracy of the teacher's 25 steps and of every MLCM stage at ``spread_steps``, on the
    main table's noise and on each of ``spread_seeds``: {method: {steps: {"fd": [...], "prompt_accuracy": [...]}}}."""
    labels = [
        label for label in (mlcm_stage1_label(settings.segments), MLCM_STAGE2, MLCM_REWARD) if label in loras
    ]
    wanted = [(TEACHER, settings.teacher_steps)] + [(m, s) for m in labels for s in settings.spread_steps]
    spread: dict[str, dict[str, dict]] = {}
    for method, steps in wanted:
        row = _find(rows, method, steps)
        if row is not None:
            entry = spread.setdefault(method, {}).setdefault(str(steps), {"fd": [], "prompt_accuracy": []})
            entry["fd"].append(row.fd)
            entry["prompt_accuracy"].append(row.prompt_accuracy)
    for seed in settings.spread_seeds:
        bench = _Bench(replace(settings, seed=seed))
        for method, steps in wanted:
            if method == TEACHER:
                row, _ = bench.measure(method, steps, 2 * steps, None, bench.ddim(steps))
            else:
                sampler = bench.consistency(segment_timesteps(steps, settings.segments))
                row, _ = bench.measure(method, steps, steps, loras[method], sampler)
            entry = spread[method][str(steps)]
            entry["fd"].append(row.fd)
            entry["prompt_accuracy"].append(row.prompt_accuracy)
    return spread


def spread_markdown(spread: dict[str, dict[str, dict]], settings: DemoSettings) -> str:
    """The per-stage table: FD mean, its spread (min-max) and prompt accuracy over the noise seed sets."""
    if not spread:
        return ""
    seeds = 1 + len(settings.spread_seeds)
    steps = [str(s) for s in settings.spread_steps]
    lines = [
        "",
        f"## What each stage does: FD mean (min-max) and prompt accuracy over {seeds} noise seed sets",
        "",
        "| method | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]

    def cell(entry: dict) -> str:
        fd, acc = entry["fd"], entry["prompt_accuracy"]
        return f"{sum(fd) / len(fd):.1f} ({min(fd):.1f}-{max(fd):.1f}), {100 * sum(acc) / len(acc):.1f}%"

    for method, per_steps in spread.items():
        if method == TEACHER:
            top = per_steps[str(settings.teacher_steps)]
            lines.append(
                f"| {TEACHER}, {settings.teacher_steps} steps | {cell(top)} |" + " |" * (len(steps) - 1)
            )
        else:
            lines.append(
                f"| {method} | "
                + " | ".join(cell(per_steps[s]) if s in per_steps else "-" for s in steps)
                + " |"
            )
    return "\n".join(lines) + "\n"


def _reward_note(facts: dict) -> str:
    """Which weights the "+ reward" rows use; step 0 means the keep-best rule kept the stage-2 LoRA itself."""
    if not facts:
        return ""
    note = (
        f"\nReward stage: {facts['iterations']} iterations; the '{MLCM_REWARD}' rows use the weights of step "
        f"{facts['kept_step']} (keep-best rule '{facts['keep_best']}': the highest classifier reward whose FD is "
        f"at most {REWARD_FD_TOLERANCE:.0%} worse than at its start)."
    )
    if facts["kept_step"] == 0:
        note += f" Step 0 is the stage-2 LoRA unchanged, so those rows equal '{MLCM_STAGE2}'."
    return note + "\n"


@contextlib.contextmanager
def _merged(unet: torch.nn.Module) -> Iterator[None]:
    """LoRA merged into the base weights inside the block (unmerged after), for inference-speed timing."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in layers:
            layer.unmerge()


def _find(rows: list[Row], method: str, steps: int) -> Row | None:
    return next((r for r in rows if r.method == method and r.steps == steps), None)


def check_goals(rows: list[Row], settings: DemoSettings) -> dict[str, dict]:
    """The demo's goals for MLCM after stage 1 and 2 and for the reward rows; measured value and met."""
    teacher = rows[0]
    goals: dict[str, dict] = {}

    def add(name: str, value: float, target: str, met: bool) -> None:
        goals[name] = {"value": value, "target": target, "met": bool(met)}

    for prefix, label in (
        (mlcm_stage1_label(settings.segments), "MLCM stage 1"),
        (MLCM_STAGE2, "MLCM stage 2"),
    ):
        m4, m2 = _find(rows, prefix, 4), _find(rows, prefix, 2)
        if m4 is not None:
            add(f"{label} 4 steps FD / teacher FD", m4.fd / teacher.fd, "<= 1.2", m4.fd <= 1.2 * teacher.fd)
            ratio = m4.prompt_accuracy / max(teacher.prompt_accuracy, 1e-9)
            add(f"{label} 4 steps prompt acc. / teacher", ratio, ">= 0.95", ratio >= 0.95)
            speed = teacher.seconds_per_image / m4.seconds_per_image
            add(f"{label} 4 steps speed-up (s/image, with VAE decode)", speed, ">= 10", speed >= 10)
            unet_speed = teacher.sampling_seconds_per_image / m4.sampling_seconds_per_image
            add(f"{label} 4 steps speed-up (sampling only)", unet_speed, ">= 10", unet_speed >= 10)
        if m2 is not None:
            add(f"{label} 2 steps FD / teacher FD", m2.fd / teacher.fd, "<= 1.5", m2.fd <= 1.5 * teacher.fd)
        for steps in (4, 8):
            m, lcm, ddim = (
                _find(rows, prefix, steps),
                _find(rows, LCM, steps),
                _find(rows, TEACHER, steps),
            )
            if m is not None and lcm is not None:
                add(f"{label} {steps} steps FD / LCM-style FD", m.fd / lcm.fd, "< 1", m.fd < lcm.fd)
            if m is not None and ddim is not None:
                add(
                    f"{label} {steps} steps FD / CFG-DDIM FD",
                    m.fd / ddim.fd,
                    "< 0.5 (wide margin)",
                    m.fd < 0.5 * ddim.fd,
                )
    pairs = [(_find(rows, MLCM_STAGE2, s), _find(rows, MLCM_REWARD, s)) for s in (2, 4)]
    if all(before is not None and after is not None for before, after in pairs):
        fd_ratio = max(after.fd / before.fd for before, after in pairs)
        reward_up = all(after.reward > before.reward for before, after in pairs)
        goals[
            "reward: classifier reward improves at 2 and 4 steps while FD worsens by at most 10% vs MLCM + stage 2"
        ] = {
            "value": fd_ratio,  # the worse of the two FD ratios; the reward changes are listed beside it
            "target": f"reward up at 2 and 4; FD ratio <= {1 + REWARD_FD_TOLERANCE:g}",
            "met": bool(reward_up and fd_ratio <= 1 + REWARD_FD_TOLERANCE),
            "reward_change": {str(after.steps): after.reward - before.reward for before, after in pairs},
        }
    return goals


def goals_markdown(goals: dict[str, dict]) -> str:
    lines = ["## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for name, g in goals.items():
        value = g["value"]
        shown = f"{value:.3f}" if math.isfinite(value) else str(value)
        lines.append(f"| {name} | {shown} | {g['target']} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"
