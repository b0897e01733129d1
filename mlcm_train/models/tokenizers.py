"""Finding the CLIP tokenizer files (vocab.json + merges.txt) locally; the trainer never downloads them.

Search order, first hit wins (each place is named in the error when nothing is found):
1. `tokenizer_path` (the `--tokenizer-path` flag): a folder with vocab.json + merges.txt, or a diffusers
   folder with `tokenizer/` (and `tokenizer_2/`);
2. the `tokenizer/`, `tokenizer_2/` subfolders of the teacher's diffusers folder, then of the config folder;
3. the ComfyUI installation: `comfyui_root/comfy/sd1_tokenizer`, or the first folder above this package
   that contains `comfy/sd1_tokenizer` (the pack sits in `ComfyUI/custom_nodes/`).
Diffusers folders come before ComfyUI because they describe the exact model; ComfyUI's files are the
standard CLIP vocabulary that SD1.5 and both SDXL text encoders use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COMFY_TOKENIZER = Path("comfy") / "sd1_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"  # what transformers 5 save_pretrained writes instead
# SDXL's OpenCLIP bigG tokenizer uses the CLIP vocabulary but pads with "!" (id 0); ComfyUI does the same
# (`SDXLClipGTokenizer`, pad_with_end=False) and diffusers SDXL folders ship it in tokenizer_2/.
SDXL_G_PAD_TOKEN = "!"


@dataclass(frozen=True)
class TokenizerSource:
    """Where each text encoder's tokenizer comes from; `reuse_first` = second encoder reuses the CLIP-L files."""

    folders: tuple[Path, ...]
    reuse_first: bool
    origin: str


def has_tokenizer(folder: Path) -> bool:
    """True when `folder` holds a byte-level BPE tokenizer: vocab.json + merges.txt, or a tokenizer.json."""
    return all((folder / name).is_file() for name in TOKENIZER_FILES) or (folder / TOKENIZER_JSON).is_file()


def find_comfyui_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above `start` (default: this package) that contains comfy/sd1_tokenizer."""
    here = Path(start) if start is not None else Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if has_tokenizer(folder / COMFY_TOKENIZER):
            return folder
    return None


def find_tokenizers(
    n_encoders: int,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    diffusers_dirs: tuple[Path, ...] = (),
    comfyui_root: str | os.PathLike | None = None,
    search_start: str | os.PathLike | None = None,
) -> TokenizerSource:
    """Locate tokenizer folders for `n_encoders` text encoders, or raise FileNotFoundError naming every place tried."""
    looked: list[str] = []
    if tokenizer_path is not None:
        folder = Path(tokenizer_path)
        if has_tokenizer(folder):
            return TokenizerSource(
                (folder,) * n_encoders, reuse_first=n_encoders > 1, origin=f"tokenizer_path {folder}"
            )
        source = _diffusers_tokenizers(folder, n_encoders)
        if source is not None:
            return source
        # An explicit path that does not work is an error, not a reason to silently use something else.
        raise FileNotFoundError(
            f"tokenizer_path {folder} has no {' + '.join(TOKENIZER_FILES)} and no tokenizer/ subfolder with them; "
            "point it at a CLIP tokenizer folder such as ComfyUI/comfy/sd1_tokenizer"
        )
    looked.append("tokenizer_path: not given")
    for folder in diffusers_dirs:
        source = _diffusers_tokenizers(folder, n_encoders)
        if source is not None:
            return source
        looked.append(f"{folder / 'tokenizer'}: no {' + '.join(TOKENIZER_FILES)} or {TOKENIZER_JSON}")
    if comfyui_root is not None:
        root = Path(comfyui_root)
        if has_tokenizer(root / COMFY_TOKENIZER):
            return _comfy_source(root, n_encoders)
        looked.append(f"comfyui_root {root}: no {COMFY_TOKENIZER}/{{{','.join(TOKENIZER_FILES)}}}")
    else:
        start = Path(search_start) if search_start is not None else Path(__file__).resolve().parent
        root = find_comfyui_root(start)
        if root is not None:
            return _comfy_source(root, n_encoders)
        looked.append(f"ComfyUI installation: no folder at or above {start} contains {COMFY_TOKENIZER}")
    raise FileNotFoundError(
        "no CLIP tokenizer (vocab.json + merges.txt) found for the teacher's text encoder"
        + ("s" if n_encoders > 1 else "")
        + "; looked in: "
        + "; ".join(looked)
        + ". Pass --tokenizer-path <folder with vocab.json and merges.txt> (e.g. ComfyUI/comfy/sd1_tokenizer) "
        "or --comfyui-root <your ComfyUI folder>"
    )


def _diffusers_tokenizers(folder: Path, n_encoders: int) -> TokenizerSource | None:
    first = folder / "tokenizer"
    if not has_tokenizer(first):
        return None
    if n_encoders == 1:
        return TokenizerSource((first,), reuse_first=False, origin=f"diffusers folder {folder}")
    second = folder / "tokenizer_2"
    if has_tokenizer(second):
        return TokenizerSource((first, second), reuse_first=False, origin=f"diffusers folder {folder}")
    return TokenizerSource(
        (first, first), reuse_first=True, origin=f"diffusers folder {folder} (tokenizer/ for both)"
    )


def _comfy_source(root: Path, n_encoders: int) -> TokenizerSource:
    folder = root / COMFY_TOKENIZER
    return TokenizerSource((folder,) * n_encoders, reuse_first=n_encoders > 1, origin=f"ComfyUI {folder}")


def load_tokenizers(source: TokenizerSource, max_length: int) -> tuple:
    """CLIPTokenizer for each text encoder, padded/truncated to the text encoder's `max_length` (77)."""
    from transformers import CLIPTokenizer

    tokenizers = []
    for i, folder in enumerate(source.folders):
        # ComfyUI's tokenizer_config.json says model_max_length=8192: always use the encoder's context length.
        kwargs: dict = {"model_max_length": max_length}
        if i == 1 and source.reuse_first:
            kwargs["pad_token"] = SDXL_G_PAD_TOKEN
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kwargs))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"the tokenizer files in {folder} could not be read ({exc}); replace them"
            ) from exc
    logger.info("tokenizers from %s", source.origin)
    return tuple(tokenizers)
