"""Code, CLI text and generated reports cite the project's own docs or the paper, never a file outside the
repository or an issue number a user cannot look up."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF_REFERENCING = {"test_citations.py"}  # it spells the names out to look for them
FOREIGN = re.compile(r"MLCM_METHOD|mlcm_paper|training_anchors|shared/research|\bissues? \d", re.IGNORECASE)


def test_sources_cite_only_the_repository_and_the_paper():
    offenders = []
    for folder in ("mlcm", "mlcm_train", "nodes", "workflows", "docs", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".json"} and path.name not in SELF_REFERENCING:
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if FOREIGN.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_method_doc_exists_and_the_code_points_to_it():
    assert (ROOT / "docs" / "method.md").is_file()
    cited = sum(
        "docs/method.md" in p.read_text(encoding="utf-8") for p in (ROOT / "mlcm_train").rglob("*.py")
    )
    assert cited >= 5
