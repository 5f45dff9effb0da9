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
