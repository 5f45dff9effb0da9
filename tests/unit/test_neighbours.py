"""The kNN graph and moments operator (fm.velocity.neighbours) against scanpy's, and the lean paths conversion takes.

    .venv/bin/pytest -q tests/unit/test_neighbours.py

The graph must be scanpy's ``pp.neighbors`` (below 8,192 cells, where both are exact), the operator built from the
kNN lists without the connectivities must equal scVelo's operator of the connectivities bit for bit (also where UMAP
memberships underflow to 0), and the blockwise moments product must equal the sparse one.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from fm.velocity import neighbours as nbm
from fm.velocity.neighbours import (
    _block_product,
    _self_first,
    connectivities,
    knn,
    knn_graph,
    moments,
    moments_operator,
    operator_from_knn,
)


def _points(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "gaussian":
        return rng.normal(size=(300, 10)).astype(np.float32)
    # groups of 8 identical cells beside single ones: duplicates ahead of a cell's self, and memberships that
    # underflow to 0 (a cell's nearest neighbours at distance 0, the rest far)
    return np.repeat(rng.normal(size=(60, 5)).astype(np.float32), [1, 8] * 30, axis=0)


def _equal(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return (a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data))


@pytest.mark.parametrize("kind", ["gaussian", "duplicates"])
def test_operator_from_knn_equals_operator_of_connectivities(kind):
    i_NK, d_NK = knn(_points(kind), 30)
    assert i_NK.dtype == np.int32 and d_NK.dtype == np.float32 and i_NK.shape == (len(i_NK), 30)
    assert (i_NK[:, 0] == np.arange(len(i_NK))).all() and (d_NK[:, 0] == 0).all()
    conn = connectivities(i_NK, d_NK)
    op = operator_from_knn(i_NK, d_NK)
    assert _equal(op, moments_operator(conn))
    assert op.indices.dtype == np.int32 and op.data.dtype == np.float32
    if kind == "duplicates":  # the case the memberships matter for: kNN edges without a connectivity
        knn_edges = sp.csr_matrix((np.ones(i_NK.size), (np.repeat(np.arange(len(i_NK)), 30), i_NK.ravel())))
        assert (knn_edges > 0).sum() > (conn + sp.identity(len(i_NK)) > 0).multiply(knn_edges > 0).sum()


def test_knn_graph_equals_scanpy():
    sc = pytest.importorskip("scanpy")
    import anndata as ad

    X = _points("gaussian")
    a = ad.AnnData(X=np.zeros((len(X), 0), np.float32), obsm={"X_pca": X})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(a, n_neighbors=30, use_rep="X_pca", random_state=0)
    dist, conn = knn_graph(X, 30)
    assert abs(dist - a.obsp["distances"]).max() == 0
    assert abs(conn - a.obsp["connectivities"]).max() == 0


def test_self_first():
    i = np.array([[1, 0, 2], [0, 2, 3], [2, 1, 0]], np.int32)  # 0: a duplicate first; 1: itself missing
    d = np.array([[0.0, 0.0, 1.0], [0.5, 1.0, 2.0], [0.0, 1.0, 2.0]], np.float32)
    i2, d2 = _self_first(i, d, 3)
    np.testing.assert_array_equal(i2, [[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    np.testing.assert_array_equal(d2, [[0, 0, 1], [0, 0.5, 1], [0, 1, 2]])


@pytest.mark.parametrize("dense_max", [nbm.DENSE_ROWS_MAX, 0])
def test_block_product_equals_sparse_moments(monkeypatch, dense_max):
    monkeypatch.setattr(nbm, "DENSE_ROWS_MAX", dense_max)
    rng = np.random.default_rng(1)
    x = sp.random(400, 50, density=0.3, random_state=2, format="csr", dtype=np.float32) * 7
    i_NK, d_NK = knn(rng.normal(size=(400, 8)).astype(np.float32), 30)
    op = operator_from_knn(i_NK, d_NK)[:100]
    ref = moments(op, x, dense=False)
    ref.sort_indices()  # (the sparse product leaves them unsorted; the on-disk store sorts them)
    out = _block_product(op, x)
    out.sort_indices()
    assert _equal(out, ref)
