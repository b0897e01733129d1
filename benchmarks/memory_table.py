"""The README's table of estimated peak training memory per device, from the `--dry-run` plan.

For SD1.5 (512 px) and SDXL (1024 px) at batch 1 and 4: stage-1 distillation with fp32 weights, then with
frozen weights in bf16 (the LoRA stays fp32), then adding 8-bit AdamW, then gradient checkpointing. Built
from the shipped configs on the meta device: no weights, no GPU, a minute on a CPU.
    python benchmarks/memory_table.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from tiny_models import make_tiny_single_file  # noqa: E402

from mlcm_train.config import DistillConfig  # noqa: E402
from mlcm_train.run.plan import plan_distill  # noqa: E402

OPTIONS = (
    ("fp32 weights", "no", {}),
    ("bf16 frozen weights (`--mixed-precision bf16`)", "bf16", {}),
    ("+ `--optimizer adamw8bit`", "bf16", {"optimizer": "adamw8bit"}),
    ("+ `--gradient-checkpointing`", "bf16", {"optimizer": "adamw8bit", "gradient_checkpointing": True}),
)


def main() -> None:
    gb = 2**30
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # A tiny single-file checkpoint says only which family; the plan uses the shipped full-size config.
        teachers = {family: make_tiny_single_file(Path(tmp) / family, family) for family in ("sd15", "sdxl")}
        for family, resolution in (("sd15", 512), ("sdxl", 1024)):
            for label, precision, changes in OPTIONS:
                cells = []
                for batch in (1, 4):
                    config = DistillConfig(
                        teacher=str(teachers[family]), prompts="p", batch_size=batch, **changes
                    )
                    plan = plan_distill(config, precision)
                    cells.append(f"{plan.peak_bytes(plan.phases[0]) / gb:.1f}")
                rows.append(
                    f"| {family.upper().replace('SD15', 'SD1.5')} {resolution} px | {label} | {' | '.join(cells)} |"
                )
    print("| teacher | weights and options | batch 1 (GB, estimated) | batch 4 (GB, estimated) |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
