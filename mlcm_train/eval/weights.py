"""Local weight files for the real-model metrics: every metric names the files it expects when they are missing."""

from __future__ import annotations

from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """A metric's weights are not where the user pointed; the message lists the files expected."""


def require_files(
    metric: str, folder_or_file: str | Path | None, expected: tuple[str, ...], hint: str
) -> Path:
    """``folder_or_file`` as a Path when it (and, for a folder, every name in ``expected``) exists."""
    if folder_or_file is None:
        raise MissingWeightsError(
            f"{metric} needs local weights: {', '.join(expected)}; none were given. {hint}"
        )
    path = Path(folder_or_file)
    if not path.exists():
        raise MissingWeightsError(f"{metric}: {path} does not exist; expected {', '.join(expected)}. {hint}")
    if path.is_dir():
        missing = [name for name in expected if not (path / name).exists()]
        if missing:
            raise MissingWeightsError(
                f"{metric}: {path} lacks {', '.join(missing)} (expected {', '.join(expected)}). {hint}"
            )
    return path
