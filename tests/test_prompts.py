"""read_prompts: text files, caption folders, and the empty case."""

from __future__ import annotations

import pytest

from mlcm_train.data.prompts import read_prompts


def test_text_file_one_prompt_per_line_skipping_blanks_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeff# my prompts\na cat\n\n   \n  a red dog  \n#skip me\na cat\n", encoding="utf-8")
    # Duplicates are kept (prompt indices stay stable); whitespace at the ends is stripped.
    assert read_prompts(path) == ["a cat", "a red dog", "a cat"]


def test_caption_folder_recursive_sorted_and_whitespace_collapsed(tmp_path):
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.caption").write_text("first  caption\nover two lines", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert read_prompts(tmp_path) == ["first caption over two lines", "second", "third"]


def test_no_prompts_is_a_value_error_that_says_what_to_do(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts found in file"):
        read_prompts(empty)
    folder = tmp_path / "captions"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"0 caption files"):
        read_prompts(folder)


def test_missing_path_and_non_utf8(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        read_prompts(bad)
