"""Training prompts: MLCM distillation is data-free, so prompts (no images) are all the data it needs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".caption")
COMMENT = "#"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line; blank and '#' lines skipped) or a folder of caption files.

    A folder is searched recursively for *.txt and *.caption files (as in image+caption training sets);
    each file is one prompt, its whitespace collapsed. Order is deterministic (sorted paths) and
    duplicates are kept, so prompt indices are stable across runs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"prompt source {path} does not exist; pass a .txt file or a folder of captions"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CAPTION_SUFFIXES)
        prompts = [text for text in (" ".join(_read_text(p).split()) for p in files) if text]
        where = f"folder {path} ({len(files)} caption files with suffix {' or '.join(CAPTION_SUFFIXES)})"
    else:
        lines = (line.strip() for line in _read_text(path).splitlines())
        prompts = [line for line in lines if line and not line.startswith(COMMENT)]
        where = f"file {path}"
    if not prompts:
        raise ValueError(
            f"no prompts found in {where}; write one prompt per line (lines starting with '#' are comments) "
            "or put .txt/.caption caption files in the folder"
        )
    logger.info("read %d prompts (%d unique) from %s", len(prompts), len(set(prompts)), path)
    return prompts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
