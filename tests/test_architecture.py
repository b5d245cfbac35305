"""docs/architecture.md traces one expand optimizer step file by file: its table lists exactly
the project files whose code runs from the expand node to the first AdamW step (traced here in
this process, at the embedded default's settings), and no more than the readable limit."""

import re

import pytest

from tests.step_trace import PROJECT, files_to_first_step

MOST_FILES = 15  # issue 29: one step readable in at most 15 project files


def documented_files() -> list[str]:
    """The files of the table under '## One expand optimizer step' (paths relative to
    src/tulip_pipelines, one row each)."""
    text = (PROJECT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## One expand optimizer step", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    return sorted(re.search(r"`([^`]+\.py)`", row).group(1) for row in rows)


@pytest.mark.slow  # a DeepSpeed engine and one training step
def test_the_documented_step_is_the_traced_step(tmp_path):
    traced = files_to_first_step(tmp_path)
    documented = documented_files()
    assert documented == traced, (
        f"in the doc, not run: {sorted(set(documented) - set(traced))}; "
        f"run, not in the doc: {sorted(set(traced) - set(documented))}")
    assert len(traced) <= MOST_FILES, f"{len(traced)} files on the way to one step"
