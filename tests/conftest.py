"""Shared fixtures: tiny hand-made AnnData, a small simulated .h5ad and its converted corpus (session-scoped).

def test_x(sim_h5ad, sim_corpus): ...      # ~300 cells x 50 genes, converted with small shards and batches
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fm import keys
from fm.velocity.neighbours import NeighbourConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PANCREAS = SHARED_DATA / "pancreas_supercell_3696x2000.h5ad"
SIM_SHARD_SIZE = 128  # several shards and record batches even on a small file
SIM_RECORD_BATCH = 32
TINY_NEIGHBOURS = NeighbourConfig(n_neighbours=3, n_pcs=3)  # a neighbourhood for the hand-made files of ~12 cells


def make_adata(n_cells: int = 12, n_genes: int = 6, seed: int = 0, gene_ids: bool = True, velocity: bool = True):
    """A tiny AnnData in the simulator's layout: integer CSR layers, a dense velocity layer, clusters and time.

    Cell 0 has no counts at all, gene 0 only unspliced counts and gene 1 only spliced ones, so both paths of the
    s + u > 0 rule are exercised.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    s = rng.poisson(1.0, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.6)
    u = rng.poisson(1.0, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.6)
    s[0], u[0] = 0, 0
    s[:, 0] = 0
    u[:, 1] = 0
    obs = pd.DataFrame(
        {
            keys.OBS_CLUSTERS: pd.Categorical(rng.choice(["a", "b"], n_cells)),
            keys.OBS_TIME_TRUE: rng.random(n_cells).astype(np.float32),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"Gene{j}" for j in range(n_genes)])
    if gene_ids:
        var[keys.VAR_GENE_ID] = [f"ENSG{j:05d}" for j in range(n_genes)]
    layers = {
        keys.LAYER_SPLICED: sp.csr_matrix(s.astype(np.int32)),
        keys.LAYER_UNSPLICED: sp.csr_matrix(u.astype(np.int32)),
    }
    if velocity:
        layers[keys.LAYER_VELOCITY_TRUE] = rng.standard_normal((n_cells, n_genes)).astype(np.float32)
    return ad.AnnData(X=sp.csr_matrix(s.astype(np.float32)), obs=obs, var=var, layers=layers)


def write_loom(adata, path: Path) -> Path:
    """Write ``adata``'s layers as a .loom file (loom 3 layout, genes are rows), with h5py: loompy imports numba,
    which takes longer than the whole test."""
    import h5py

    def strings(values) -> np.ndarray:
        return np.asarray(values, dtype=str).astype("S")

    s = adata.layers[keys.LAYER_SPLICED].T.toarray()
    with h5py.File(path, "w") as f:
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        f.create_dataset("matrix", data=s, chunks=(min(64, s.shape[0]), min(64, s.shape[1])))
        for name in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
            f.create_dataset(f"layers/{name}", data=adata.layers[name].T.toarray())
        f.create_dataset("row_attrs/Gene", data=strings(adata.var_names))
        if keys.VAR_GENE_ID in adata.var:
            f.create_dataset("row_attrs/Accession", data=strings(adata.var[keys.VAR_GENE_ID]))
        f.create_dataset("col_attrs/CellID", data=strings(adata.obs_names))
        if keys.OBS_CLUSTERS in adata.obs:
            f.create_dataset(f"col_attrs/{keys.OBS_CLUSTERS}", data=strings(adata.obs[keys.OBS_CLUSTERS]))
        if keys.OBS_TIME_TRUE in adata.obs:
            f.create_dataset(f"col_attrs/{keys.OBS_TIME_TRUE}", data=adata.obs[keys.OBS_TIME_TRUE].to_numpy())
        for group in ("row_graphs", "col_graphs"):
            f.create_group(group)
    return path


@pytest.fixture
def tiny_adata():
    return make_adata()


@pytest.fixture
def tiny_h5ad(tmp_path, tiny_adata) -> Path:
    path = tmp_path / "tiny.h5ad"
    tiny_adata.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def sim_h5ad(tmp_path_factory) -> Path:
    """A small simulated dataset (300 cells x 50 genes, bifurcation, seed 0) written as .h5ad."""
    from data_prep.simulate import simulate

    path = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    simulate(n_cells=300, n_genes=50, regime="bifurcation", seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def sim_corpus(sim_h5ad, tmp_path_factory) -> Path:
    """``sim_h5ad`` converted with default filters (128-cell shards, 32-cell record batches); treat as read-only."""
    from data_prep.convert import convert

    out = tmp_path_factory.mktemp("corpus") / "sim_corpus"
    convert([sim_h5ad], out, shard_size=SIM_SHARD_SIZE, record_batch_size=SIM_RECORD_BATCH, progress=False)
    return out
