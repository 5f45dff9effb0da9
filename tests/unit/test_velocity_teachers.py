"""Velocity teachers (fm.velocity.teachers): parity with scVelo, truth beats its negation, genes that cannot be fitted.

    .venv/bin/pytest -q tests/unit/test_velocity_teachers.py

Parity runs scVelo on an AnnData carrying fm's normalised layers and graph (scVelo leaves non-integer layers as they
are), so both compute moments and velocities from the same inputs: fm's moments must equal ``scv.pp.moments`` to 1e-5
relative, and the steady-state / stochastic velocities ``scv.tl.velocity(mode=...)`` to 1e-4 relative per gene on the
velocity genes, with the same velocity-gene masks. On the tiny fixture (tests/assets/velocity_sim_300x40.h5ad, made by
tests/assets/make_velocity_sim.py) and on pancreas (../shared/data; skipped when absent).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from fm import keys
from fm.metrics.velocity import gene_spearman, sign_accuracy
from fm.velocity.neighbours import NeighbourConfig, neighbourhood, second_order_moments
from fm.velocity.teachers import (
    TeacherConfig,
    TeacherError,
    run_teacher,
    steady_state,
    stochastic,
    velocity_anndata,
)
from tests.conftest import PANCREAS

TINY = Path(__file__).resolve().parents[1] / "assets" / "velocity_sim_300x40.h5ad"
NCFG = NeighbourConfig()


def _load(path: Path):
    import anndata as ad

    if not path.exists():
        pytest.skip(f"{path} not present")
    a = ad.read_h5ad(path)
    nb, s, u = neighbourhood(a.layers[keys.LAYER_SPLICED], a.layers[keys.LAYER_UNSPLICED], NCFG, where=str(path))
    return a, nb, s, u


@pytest.fixture(scope="module")
def tiny():
    return _load(TINY)


@pytest.fixture(scope="module")
def pancreas():
    return _load(PANCREAS)


@pytest.fixture(params=["tiny", pytest.param("pancreas", marks=pytest.mark.slow)])
def dataset(request):
    return request.getfixturevalue(request.param)


def _scvelo_reference(nb, s, u, mode: str | None):
    """scVelo's moments (and velocity in ``mode``) on fm's normalised layers and graph."""
    scv = pytest.importorskip("scvelo")
    scv.settings.verbosity = 0
    a = velocity_anndata(s, u, nb, NCFG)
    del a.layers["Ms"], a.layers["Mu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.pp.moments(a, n_neighbors=NCFG.n_neighbours)
        assert (a.layers["spliced"] != s).nnz == 0, "scVelo re-normalised the layers: the comparison would be unfair"
        if mode is not None:
            scv.tl.velocity(a, mode=mode)
    return a


def _max_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """The largest |ours - ref| relative to the reference's largest |value|, per column (gene; all-zero: absolute)."""
    scale = np.abs(ref).max(0)
    return float((np.abs(ours - ref).max(0) / np.where(scale > 0, scale, 1.0)).max())


def test_moments_equal_scvelo(dataset):
    _, nb, s, u = dataset
    ref = _scvelo_reference(nb, s, u, None)
    assert _max_rel(nb.Ms, ref.layers["Ms"]) < 1e-5
    assert _max_rel(nb.Mu, ref.layers["Mu"]) < 1e-5


@pytest.mark.parametrize("method, mode", [("steady_state", "deterministic"), ("stochastic", "stochastic")])
def test_velocity_equals_scvelo(dataset, method, mode):
    _, nb, s, u = dataset
    ref = _scvelo_reference(nb, s, u, mode)
    ours = run_teacher(TeacherConfig(method), nb, s, u, NCFG)
    vg = ref.var["velocity_genes"].to_numpy(bool)
    np.testing.assert_array_equal(ours.velocity_genes, vg)
    assert vg.sum() >= 10
    assert _max_rel(ours.velocity[:, vg], ref.layers["velocity"][:, vg]) < 1e-4
    gamma = ref.var["velocity_gamma"].to_numpy()[vg]
    assert np.max(np.abs(ours.gamma[vg] - gamma) / np.abs(gamma)) < 1e-4
    assert ours.velocity.dtype == np.float32 and ours.velocity.shape == s.shape and ours.velocity_u is None


@pytest.mark.parametrize("method", ["steady_state", "stochastic", "dynamical"])
def test_teacher_scores_truth_better_than_negation(tiny, method):
    if method == "dynamical":
        pytest.importorskip("scvelo")
    a, nb, s, u = tiny
    # dynamical: scVelo's EM on 10 genes keeps the test short
    r = run_teacher(TeacherConfig(method, n_top_genes=10), nb, s, u, NCFG, genes=list(a.var_names))
    fitted = ~np.isnan(r.velocity).any(0)
    assert fitted.sum() >= 10
    v, truth = r.velocity[:, fitted], np.asarray(a.layers[keys.LAYER_VELOCITY_TRUE])[:, fitted]
    assert gene_spearman(v, truth)["median"] > max(0.2, gene_spearman(-v, truth)["median"])
    assert sign_accuracy(v, truth) > max(0.6, sign_accuracy(-v, truth))
    if method == "dynamical":
        assert r.velocity_u is not None and np.isfinite(r.velocity_u[:, fitted]).all()
        assert not fitted.all() and set(np.flatnonzero(~fitted)) == set(r.unfit)


@pytest.mark.parametrize("method", ["steady_state", "stochastic"])
def test_unfit_genes_reported_rest_kept(tiny, method, caplog):
    a, nb, s, u = tiny
    Ms, Mu = nb.Ms.copy(), nb.Mu.copy()
    Mss, Mus = second_order_moments(nb.operator, s, u)
    Ms[:, 3] = 0  # no spliced signal
    Mu[:, 5] = 0  # no unspliced signal
    Ms[7, 9] = np.nan  # a non-finite moment
    Ms[:, 11] = 0
    Ms[:2, 11] = 1.0  # signal in 2 cells < min_cells=3
    genes = [f"gene{i}" for i in range(Ms.shape[1])]
    with caplog.at_level(logging.WARNING, logger="fm.velocity.teachers"):
        if method == "steady_state":
            r = steady_state(Ms, Mu, TeacherConfig(method), genes=genes, where="tiny.h5ad")
        else:
            r = stochastic(Ms, Mu, Mss, Mus, TeacherConfig(method), genes=genes, where="tiny.h5ad")
    assert sorted(r.unfit) == [3, 5, 9, 11]
    assert "spliced" in r.unfit[3] and "unspliced" in r.unfit[5] and "non-finite" in r.unfit[9]
    assert "min_cells" in r.unfit[11]
    bad = np.zeros(Ms.shape[1], bool)
    bad[[3, 5, 9, 11]] = True
    assert np.isnan(r.velocity[:, bad]).all() and np.isnan(r.gamma[bad]).all() and not r.velocity_genes[bad].any()
    assert np.isfinite(r.velocity[:, ~bad]).all() and r.velocity_genes[~bad].sum() >= 10
    # the other genes are exactly what they are without the broken ones
    clean = run_teacher(TeacherConfig(method), nb, s, u, NCFG)
    keep = ~bad & clean.velocity_genes
    np.testing.assert_allclose(r.velocity[:, keep], clean.velocity[:, keep], rtol=1e-6, atol=1e-6)
    msg = caplog.text
    assert "tiny.h5ad" in msg and "4 of 40 genes" in msg and "'gene3'" in msg


def test_dynamical_without_scvelo_says_how_to_install(tiny, monkeypatch):
    _, nb, s, u = tiny
    monkeypatch.setitem(sys.modules, "scvelo", None)  # import scvelo raises ImportError
    with pytest.raises(TeacherError, match=r'pip install "fm\[velocity\]"'):
        run_teacher(TeacherConfig("dynamical"), nb, s, u, NCFG)


def test_teacher_errors_name_the_field_and_file():
    with pytest.raises(ValueError, match="TeacherConfig.method"):
        TeacherConfig("bayes")
    with pytest.raises(ValueError, match="TeacherConfig.perc"):
        TeacherConfig(perc=100)
    with pytest.raises(ValueError, match="TeacherConfig.min_cells"):
        TeacherConfig(min_cells=0)
    with pytest.raises(TeacherError, match="x.h5ad: Mu has shape"):
        steady_state(np.ones((5, 3)), np.ones((5, 2)), where="x.h5ad")


@pytest.mark.parametrize("method", ["steady_state", "stochastic"])
def test_gene_blocks_do_not_change_the_result(tiny, method, monkeypatch):
    """The fits run over blocks of genes to bound memory on large datasets; the blocks are invisible in the output."""
    from fm.velocity import teachers

    _, nb, s, u = tiny
    whole = run_teacher(TeacherConfig(method), nb, s, u, NCFG)
    monkeypatch.setattr(teachers, "BLOCK_ELEMENTS", 7 * s.shape[0])  # 7 genes a block, the last one shorter
    blocks = run_teacher(TeacherConfig(method), nb, s, u, NCFG)
    np.testing.assert_array_equal(blocks.velocity, whole.velocity)
    np.testing.assert_array_equal(blocks.gamma, whole.gamma)
    np.testing.assert_array_equal(blocks.velocity_genes, whole.velocity_genes)


@pytest.mark.parametrize("method", ["steady_state", "stochastic"])
def test_sparse_moments_give_the_same_result(tiny, method):
    """A neighbourhood computed with dense=False (CSR moments, as conversion may keep them) is fitted alike."""
    import dataclasses

    import scipy.sparse as sp

    _, nb, s, u = tiny
    sparse_nb = dataclasses.replace(nb, Ms=sp.csr_matrix(nb.Ms), Mu=sp.csr_matrix(nb.Mu))
    dense = run_teacher(TeacherConfig(method), nb, s, u, NCFG)
    sparse = run_teacher(TeacherConfig(method), sparse_nb, s, u, NCFG)
    np.testing.assert_array_equal(sparse.velocity, dense.velocity)
    np.testing.assert_array_equal(sparse.velocity_genes, dense.velocity_genes)
