"""The demo report: the table as Markdown and JSON, the sample grid PNG and the quality-vs-steps plot PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor

from mlcm_train.data.trajectories import write_atomic

TABLE_COLUMNS = ("method", "steps", "UNet evals", "s/image", "FD", "prompt acc.", "reward")


@dataclass(frozen=True)
class Row:
    method: str
    steps: int
    unet_evals: int  # UNet forward passes per image (CFG counts two)
    seconds_per_image: float
    fd: float
    prompt_accuracy: float
    reward: float
    digit_accuracy: float = math.nan
    colour_accuracy: float = math.nan
    sampling_seconds_per_image: float = math.nan  # s/image without the VAE decode (UNet sampling only)


def markdown_table(rows: Sequence[Row]) -> str:
    """``| method | steps | UNet evals | s/image | FD | prompt acc. | reward |`` with one line per row."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.steps} | {r.unet_evals} | {r.seconds_per_image:.4f} | {r.fd:.2f} | "
            f"{100 * r.prompt_accuracy:.1f}% | {r.reward:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Row], folder: Path, extra: dict, notes: str = "") -> tuple[Path, Path]:
    """``table.md`` (the table plus notes) and ``table.json`` (rows plus run facts in ``extra``)."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "table.md"
    write_atomic(
        md,
        lambda tmp: tmp.write_text(
            "# MLCM demo: quality vs steps\n\n" + markdown_table(rows) + "\n" + notes, encoding="utf-8"
        ),
    )
    js = folder / "table.json"
    text = json.dumps({"rows": [asdict(r) for r in rows], **extra}, indent=2) + "\n"
    write_atomic(js, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return md, js


def write_grid(rows: Sequence[tuple[str, Tensor]], prompts: Sequence[str], path: Path) -> Path:
    """One labelled row per (method, steps), one column per prompt/seed (images (K, 3, H, W) in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(prompts)
    height = 0.9 * len(rows) + 0.8
    fig, axes = plt.subplots(len(rows), columns, figsize=(0.9 * columns + 2.2, height), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(columns):
            ax = axes[i][j]
            ax.imshow(images[j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(prompts[j].removeprefix("a ").removesuffix(" on a dark background"), fontsize=6)
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("same prompts and seeds in every row", fontsize=8, y=1.0 - 0.08 / height)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.3 / height))  # keep the title clear of the column labels
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_plot(rows: Sequence[Row], reference: Row, path: Path) -> Path:
    """FD and prompt accuracy against steps, one line per method; the 25-step teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in rows if r is not reference))
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        points = sorted(
            (r.steps, r.fd, r.prompt_accuracy) for r in rows if r.method == method and r is not reference
        )
        steps = [p[0] for p in points]
        ax_fd.plot(steps, [p[1] for p in points], marker="o", label=method)
        ax_acc.plot(steps, [100 * p[2] for p in points], marker="o", label=method)
    ax_fd.axhline(
        reference.fd, linestyle="--", color="k", label=f"{reference.method} {reference.steps} steps"
    )
    ax_acc.axhline(100 * reference.prompt_accuracy, linestyle="--", color="k")
    for ax, label in ((ax_fd, "FD (lower is better)"), (ax_acc, "prompt accuracy % (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_fd.set_yscale("log")
    ax_fd.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
