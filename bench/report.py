"""The one writer of docs/BENCHMARKS.md: every bench script records its results through :func:`record`.

    from bench.report import record

    record("Loader", "| 2026-11-21 | vm | ... |", intro=TABLE_INTRO)      # a row, under the section's table
    record("Train step", "### 2026-11-21, x86_64 Linux, 2 CPUs\\n\\n`python bench/train_step.py`\\n\\n| ... |")

``text`` goes at the end of the ``## {section}`` section; a run is never replaced, so results accumulate. A table row
(text starting with ``|``) goes directly under the section's last table row; anything else (a ``### date, machine``
run block) gets a blank line before it. A missing file is created with a ``# Benchmarks`` title, a missing section
at the end of the file with ``intro`` (e.g. a description and a table header) under its title. Other sections are
never touched, and the file is replaced atomically (fm.io.atomic_write_text).
"""

from __future__ import annotations

from pathlib import Path

from fm.io import atomic_write_text

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def record(section: str, text: str, *, intro: str = "", path: Path = BENCHMARKS) -> None:
    """Append ``text`` at the end of the ``## {section}`` section of ``path`` (created with ``intro`` if missing)."""
    title = f"## {section}"
    lines = path.read_text().rstrip("\n").split("\n") if path.exists() else ["# Benchmarks"]
    if title not in lines:
        lines += ["", title] + (["", *intro.strip("\n").split("\n")] if intro.strip() else [])
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "\n".join(lines[start:end]).rstrip("\n").split("\n")
    new = text.strip("\n").split("\n")
    gap = [] if new[0].startswith("|") and section[-1].startswith("|") else [""]
    rest = ["", *lines[end:]] if end < len(lines) else []
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines[:start] + section + gap + new + rest) + "\n")


def velocity_bench_logging() -> None:
    """What the velocity benchmarks share before they run: fm's INFO log lines, scVelo silent, no warnings."""
    import logging
    import warnings

    import scvelo as scv

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scv.settings.verbosity = 0
    warnings.simplefilter("ignore")
