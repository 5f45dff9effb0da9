"""`fm velocity` end to end on the tiny fixture: fields scVelo reads, the input untouched, bad input refused cleanly.

    .venv/bin/pytest -q tests/unit/test_velocity_command.py
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from fm import keys
from fm.cli import main

TINY = Path(__file__).resolve().parents[1] / "assets" / "velocity_sim_300x40.h5ad"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _variant(tmp_path: Path, name: str, edit) -> Path:
    """A copy of the fixture changed by ``edit(adata)``."""
    import anndata as ad

    a = ad.read_h5ad(TINY)
    edit(a)
    path = tmp_path / name
    a.write_h5ad(path)
    return path


def _refused(capsys, argv: list[str], out: Path, *patterns: str) -> str:
    """The command exits 2 with one line naming what is wrong, and leaves no output (nor a temporary file)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    for p in patterns:
        assert p in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("velocity") / "sim_velocity.h5ad"
    before = _md5(TINY)
    assert main(["velocity", str(TINY), "--out", str(out), "--method", "stochastic"]) == 0
    assert _md5(TINY) == before
    return out


def test_writes_what_scvelo_reads(written):
    import anndata as ad

    from fm.velocity.neighbours import NeighbourConfig, neighbourhood
    from fm.velocity.teachers import TeacherConfig, run_teacher

    a = ad.read_h5ad(written)
    inp = ad.read_h5ad(TINY)
    for layer in (keys.LAYER_VELOCITY, "Ms", "Mu"):
        assert a.layers[layer].shape == a.shape and a.layers[layer].dtype == np.float32
    assert keys.LAYER_VELOCITY_U not in a.layers  # the stochastic model has no du/dt
    assert a.var[keys.VAR_VELOCITY_GENES].dtype == bool and a.var[keys.VAR_VELOCITY_GENES].sum() >= 10
    assert np.isfinite(a.var["velocity_gamma"]).all()
    assert a.obsm["X_pca"].shape == (a.n_obs, 30)
    assert a.uns["neighbors"]["params"]["n_neighbors"] == 30 and set(a.obsp) == {"distances", "connectivities"}
    fm = a.uns[keys.UNS_FM]
    assert fm["method"] == "stochastic" and fm["neighbours"]["n_neighbours"] == 30 and fm["fm_version"]
    # the input's own fields are carried over
    np.testing.assert_array_equal(a.layers[keys.LAYER_SPLICED].toarray(), inp.layers[keys.LAYER_SPLICED].toarray())
    assert list(a.obs.columns) == list(inp.obs.columns)
    # the velocity is the teacher's, on fm's neighbourhood
    nb, s, u = neighbourhood(inp.layers[keys.LAYER_SPLICED], inp.layers[keys.LAYER_UNSPLICED], NeighbourConfig())
    np.testing.assert_array_equal(a.layers["Ms"], nb.Ms)
    r = run_teacher(TeacherConfig("stochastic"), nb, s, u)
    np.testing.assert_array_equal(a.layers[keys.LAYER_VELOCITY], r.velocity)


def test_scvelo_pseudotime_starts_at_the_root(written):
    import anndata as ad
    from scipy.stats import spearmanr

    scv = pytest.importorskip("scvelo")
    scv.settings.verbosity = 0
    a = ad.read_h5ad(written)
    time_true = a.obs[keys.OBS_TIME_TRUE].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity_graph(a, n_jobs=1, show_progress_bar=False)
        scv.tl.velocity_pseudotime(a, root_key=int(np.argmin(time_true)))
    pt = a.obs["velocity_pseudotime"].to_numpy()
    early = time_true < np.quantile(time_true, 0.1)
    assert np.median(pt[early]) < 0.15
    assert spearmanr(pt, time_true).statistic > 0.8


def test_unfit_gene_reported_rest_kept(tmp_path):
    import anndata as ad

    def zero_gene(a):
        for layer in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
            x = sp.csr_matrix(a.layers[layer]).tolil()
            x[:, 4] = 0
            a.layers[layer] = x.tocsr()

    inp = _variant(tmp_path, "zero_gene.h5ad", zero_gene)
    out = tmp_path / "out.h5ad"
    assert main(["velocity", str(inp), "--out", str(out), "--method", "steady_state"]) == 0
    a = ad.read_h5ad(out)
    name = a.var_names[4]
    assert list(a.uns[keys.UNS_FM]["unfit_genes"]) == [name]
    assert "all-zero" in a.uns[keys.UNS_FM]["unfit_reasons"][0]
    v = a.layers[keys.LAYER_VELOCITY]
    assert np.isnan(v[:, 4]).all() and not a.var[keys.VAR_VELOCITY_GENES].iloc[4]
    assert np.isfinite(np.delete(v, 4, axis=1)).all()


def test_refuses_non_integer_counts(tmp_path, capsys):
    def normalise(a):
        a.layers[keys.LAYER_UNSPLICED] = sp.csr_matrix(a.layers[keys.LAYER_UNSPLICED], dtype=np.float32) * 0.5

    inp = _variant(tmp_path, "normalised.h5ad", normalise)
    _refused(capsys, ["velocity", str(inp), "--out", str(tmp_path / "o.h5ad")], tmp_path / "o.h5ad",
             "normalised.h5ad", "layers['unspliced']", "non-integer")


def test_refuses_fewer_cells_than_neighbours(tmp_path, capsys):
    out = tmp_path / "o.h5ad"
    _refused(capsys, ["velocity", str(TINY), "--out", str(out), "--neighbours", "300"], out,
             "velocity_sim_300x40.h5ad", "300 cells", "--neighbours")


def test_refuses_a_dataset_without_pca(tmp_path, capsys):
    def zero_spliced(a):
        a.layers[keys.LAYER_SPLICED] = sp.csr_matrix(a.shape, dtype=np.int32)

    inp = _variant(tmp_path, "no_spliced.h5ad", zero_spliced)
    out = tmp_path / "o.h5ad"
    _refused(capsys, ["velocity", str(inp), "--out", str(out)], out, "no_spliced.h5ad", "PCA cannot be computed")


def test_refuses_dynamical_without_scvelo(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scvelo", None)  # import scvelo raises ImportError
    out = tmp_path / "o.h5ad"
    _refused(capsys, ["velocity", str(TINY), "--out", str(out), "--method", "dynamical"], out,
             'pip install "fm[velocity]"')


def test_refuses_to_overwrite(tmp_path, capsys, written):
    import shutil

    copy = tmp_path / "in.h5ad"
    shutil.copy(TINY, copy)
    before = _md5(copy)
    assert main(["velocity", str(copy), "--out", str(copy)]) == 2
    assert "will not overwrite the input" in capsys.readouterr().err and _md5(copy) == before
    out = tmp_path / "o.h5ad"
    _refused(capsys, ["velocity", str(written), "--out", str(out)], out, "layers['velocity']", "--overwrite")
    _refused(capsys, ["velocity", str(TINY), "--out", str(out), "--normalization", "size_factor"], out,
             "obs['size_factor']", "--size-factor-key")
