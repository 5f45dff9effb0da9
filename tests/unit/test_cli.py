"""The `fm` command: bad input ends in one line naming the field, and a non-zero exit; -v shows the traceback.

    python -m pytest -q tests/unit/test_cli.py
"""

from __future__ import annotations

import pytest

from fm.cli import main


def test_bad_value_is_one_line_naming_the_field(tmp_path, capsys):
    code = main(["prep", "simulate", "--out", str(tmp_path / "x.h5ad"), "--cells", "10", "--genes", "5",
                 "--dropout", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fm: error: ") and "dropout" in err and "Traceback" not in err
    assert not (tmp_path / "x.h5ad").exists()


def test_verbose_shows_the_exception(tmp_path):
    with pytest.raises(ValueError, match="dropout"):
        main(["-v", "prep", "simulate", "--out", str(tmp_path / "x.h5ad"), "--cells", "10", "--genes", "5",
              "--dropout", "2"])


def test_pretrain_without_a_corpus_is_one_line_and_leaves_no_run_folder(tmp_path):
    """A missing required key: one line naming it, exit code 2 (Hydra: a 24-line traceback, exit 1), and no
    time-stamped run folder left behind."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fm.cli", "pretrain", "logger=csv"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = "fm: error: data.corpus must be set: add data.corpus=... to the command"
    assert proc.stderr.strip().splitlines() == [expected]
    assert not list(tmp_path.iterdir()), sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
