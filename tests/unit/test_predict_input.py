"""fm predict's input checks: the converter's raw-count rule (fm.data.counts), and unreadable files in one line.

    python -m pytest tests/unit/test_predict_input.py -q
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from fm.cli import main
from fm.data.counts import find_bad_count
from fm.predict import read_counts
from tests.conftest import make_adata


def log1p_normalised(adata: ad.AnnData) -> ad.AnnData:
    """What scanpy's normalize_total + log1p leave in the layers: the file a user may hand over by mistake."""
    out = adata.copy()
    for name in ("spliced", "unspliced"):
        x = np.asarray(out.layers[name].toarray() if sp.issparse(out.layers[name]) else out.layers[name], float)
        out.layers[name] = sp.csr_matrix(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))
    return out


def test_the_rule():
    assert find_bad_count(np.array([0.0, 3.0, 7.0]), allow_non_integer=False) is None
    assert find_bad_count(np.array([0, 3], np.int32), allow_non_integer=False) is None
    assert find_bad_count(np.array([1.0, 0.5]), allow_non_integer=False).what == "a non-integer count"
    assert find_bad_count(np.array([1.0, 0.5]), allow_non_integer=True) is None
    assert find_bad_count(np.array([0.5, -1.0]), allow_non_integer=True).what == "a negative count"
    assert find_bad_count(np.array([-1.0, np.inf]), allow_non_integer=True).index == 1  # NaN/inf reported first


def test_normalised_layers_are_refused_naming_the_file_layer_and_flag():
    adata = log1p_normalised(make_adata())
    with pytest.raises(ValueError, match=r"^in\.h5ad: layers\['spliced'\] has a non-integer count \(\S+\) at cell "
                                         r"'cell\d+' \(row \d+\), gene '\w+'.*--allow-non-integer"):
        read_counts(adata, "in.h5ad")
    s, u = read_counts(adata, "in.h5ad", allow_non_integer=True)  # the flag lets them through
    assert s.shape == u.shape == adata.shape


def test_cli_refuses_normalised_data_before_any_model_is_loaded(tmp_path, capsys):
    """The same rule and message as `fm prep convert` on this file, through `fm predict`'s command line."""
    path = tmp_path / "normalised.h5ad"
    log1p_normalised(make_adata()).write_h5ad(path)
    args = ["predict", "--checkpoint", str(tmp_path / "no-release"), "--input", str(path),
            "--output", str(tmp_path / "o.h5ad")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}: layers['spliced'] has a non-integer count" in err and "--allow-non-integer" in err
    assert "Traceback" not in err and not (tmp_path / "o.h5ad").exists()
    assert main([*args, "--allow-non-integer"]) == 2  # gets past the counts, to the (missing) release
    assert "no-release" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "truncated", "not-hdf5"])
def test_cli_unreadable_input_is_one_line(tmp_path, capsys, case):
    path = tmp_path / "in.h5ad"
    make_adata(n_cells=200, n_genes=50).write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not-hdf5": b"hello" * 100}[case])
    assert main(["predict", "--checkpoint", str(tmp_path / "r"), "--input", str(path),
                 "--output", str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"fm: error: {path}: ")
    assert ("empty file (0 bytes)" if case == "empty" else "not a readable .h5ad") in err
