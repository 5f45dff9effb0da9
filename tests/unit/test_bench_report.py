"""bench.report.record: the one writer of docs/BENCHMARKS.md."""

from __future__ import annotations

from bench.report import record

INTRO = "`python bench/x.py`: what it measures.\n\n| date | value |\n|---|---|"
RUN = "### 2026-11-21, x86_64 Linux, 2 CPUs\n\n`python bench/y.py`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_creates_file_and_section_with_intro_then_appends_rows(tmp_path):
    path = tmp_path / "docs" / "BENCHMARKS.md"
    record("X", "| 2026-11-21 | 1 |", intro=INTRO, path=path)
    record("X", "| 2026-11-22 | 2 |", intro=INTRO, path=path)
    assert path.read_text() == (
        "# Benchmarks\n\n## X\n\n`python bench/x.py`: what it measures.\n\n"
        "| date | value |\n|---|---|\n| 2026-11-21 | 1 |\n| 2026-11-22 | 2 |\n"
    )


def test_run_block_goes_at_the_end_of_its_section_and_leaves_others(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    y_before = "# Benchmarks\n\nIntro.\n\n## Y\n\n### first run\n\n| a | b |\n|---|---|\n| 0 | 0 |\n"
    other = "## Other\n\nkept   as is\n\n\n### old run\n\n| k |\n|---|\n| v |"
    path.write_text(f"{y_before}\n{other}\n")
    record("Y", RUN, path=path)
    record("Y", RUN.replace("2026-11-21", "2026-11-22"), path=path)
    text = path.read_text()
    y, rest = text.split("## Other", 1)
    assert "## Other" + rest == other + "\n"
    assert y.startswith(y_before + "\n### 2026-11-21")
    assert y.index("2026-11-21") < y.index("2026-11-22")
    assert "| 1 | 2 |\n\n### 2026-11-22" in y and y.endswith("| 1 | 2 |\n\n")
    record("Other", "| w |", path=path)  # a row under the last section's table, directly
    assert path.read_text().endswith("| v |\n| w |\n")
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary file left


def test_section_titles_match_exactly(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## convert\n\n| r |\n|---|\n| 1 |\n\n## converter\n\ntext\n")
    record("convert", "| 2 |", path=path)
    record("Convert", "new", path=path)
    assert path.read_text() == (
        "# Benchmarks\n\n## convert\n\n| r |\n|---|\n| 1 |\n| 2 |\n\n## converter\n\ntext\n\n## Convert\n\nnew\n"
    )
