"""The kinetic simulator: determinism, ground truth = time derivative of the noise-free trajectory, fields, CLI.

pytest -q tests/unit/test_simulate.py
"""

from __future__ import annotations

import importlib.util

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_prep import kinetics
from data_prep import simulate as sim
from fm import keys

N_CELLS, N_GENES = 300, 40


@pytest.fixture(scope="module")
def datasets() -> dict[str, ad.AnnData]:
    return {regime: sim.simulate(N_CELLS, N_GENES, regime=regime, seed=3, jitter=0.05) for regime in sim.REGIMES}


def finite_difference(model: sim.KineticModel, time_C: np.ndarray, lineage_C: np.ndarray, h: float = 1e-4):
    """Central differences (du/dt, ds/dt) of the closed-form trajectory, and a mask of entries at least 2h from
    any switch of their gene's α schedule (where the derivative of u and s is continuous but α jumps)."""
    u_hi, s_hi, _ = model.evaluate(time_C + h, lineage_C)
    u_lo, s_lo, _ = model.evaluate(time_C - h, lineage_C)
    smooth_CG = (np.abs(model.start_LGK[lineage_C] - time_C[:, None, None]) > 2 * h).all(-1)
    return (u_hi - u_lo) / (2 * h), (s_hi - s_lo) / (2 * h), smooth_CG


def cells(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    return adata.obs[keys.OBS_TIME_TRUE].to_numpy(np.float64), adata.obs[keys.OBS_LINEAGE].cat.codes.to_numpy()


def test_same_seed_same_data_other_seed_other_data():
    a, b = (sim.simulate(200, 30, regime="mixed", seed=5, jitter=0.05, workers=w) for w in (1, 2))
    c = sim.simulate(200, 30, regime="mixed", seed=6, jitter=0.05)
    for layer in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
        assert (a.layers[layer] != b.layers[layer]).nnz == 0  # also independent of the number of threads
        assert (a.layers[layer] != c.layers[layer]).nnz > 0
    for layer in (keys.LAYER_VELOCITY_TRUE, keys.LAYER_VELOCITY_U_TRUE, keys.LAYER_ALPHA_TRUE):
        np.testing.assert_array_equal(a.layers[layer], b.layers[layer])
    np.testing.assert_array_equal(a.obs[keys.OBS_TIME_TRUE], b.obs[keys.OBS_TIME_TRUE])
    np.testing.assert_array_equal(a.obsm[keys.OBSM_SIM_EMBEDDING], b.obsm[keys.OBSM_SIM_EMBEDDING])
    assert not np.array_equal(a.obs[keys.OBS_TIME_TRUE], c.obs[keys.OBS_TIME_TRUE])
    assert not np.array_equal(a.var[keys.VAR_BETA_TRUE], c.var[keys.VAR_BETA_TRUE])  # jitter is seeded by seed


@pytest.mark.parametrize("regime", sim.REGIMES)
def test_velocity_is_time_derivative_of_noise_free_trajectory(datasets, regime):
    adata = datasets[regime]
    model = sim.model_from_adata(adata)
    time_C, lineage_C = cells(adata)
    fd_u, fd_s, smooth = finite_difference(model, time_C, lineage_C)
    assert smooth.mean() > 0.99
    # the closed form in float64: velocity = derivative to the accuracy of central differences
    u, s, alpha = model.evaluate(time_C, lineage_C)
    vu, vs = model.velocity(u, s, alpha)
    np.testing.assert_allclose(vs[smooth], fd_s[smooth], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vu[smooth], fd_u[smooth], rtol=1e-6, atol=1e-6)
    # the stored float32 ground truth
    np.testing.assert_allclose(adata.layers[keys.LAYER_VELOCITY_TRUE][smooth], fd_s[smooth], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(adata.layers[keys.LAYER_VELOCITY_U_TRUE][smooth], fd_u[smooth], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(adata.layers[keys.LAYER_ALPHA_TRUE], alpha, rtol=1e-6)
    assert np.abs(adata.layers[keys.LAYER_VELOCITY_TRUE]).max() > 0.1  # not trivially zero


def test_trajectory_is_continuous_across_switches_and_periodic_on_the_cycle(datasets):
    model = sim.model_from_adata(datasets["mixed"])
    L, G, K = model.start_LGK.shape
    for i in range(L):
        for k in range(1, K):
            t_G = model.start_LGK[i, :, k]
            keep = np.isfinite(t_G) & (t_G > 1e-3)
            g = np.flatnonzero(keep)
            one_cell_per_gene = np.arange(len(g)), g  # each cell sits on one gene's switch
            lineage = np.full(len(g), i)
            u_lo, s_lo, _ = model.evaluate(t_G[g] - 1e-9, lineage)
            u_hi, s_hi, _ = model.evaluate(t_G[g] + 1e-9, lineage)
            np.testing.assert_allclose(u_lo[one_cell_per_gene], u_hi[one_cell_per_gene], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(s_lo[one_cell_per_gene], s_hi[one_cell_per_gene], rtol=1e-6, atol=1e-6)
    cycle = [lin.name for lin in model.lineages].index("cycle")
    period = model.lineages[cycle].period
    start = model.evaluate(np.array([0.0]), np.array([cycle]))
    end = model.evaluate(np.array([period - 1e-9]), np.array([cycle]))
    np.testing.assert_allclose(start[0], end[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(start[1], end[1], rtol=1e-6, atol=1e-8)


def test_beta_equal_gamma_is_exact_and_finite():
    table = sim.make_gene_table(20, seed=1)
    table.loc[:9, "gamma"] = table.loc[:9, "beta"]  # exactly degenerate
    table.loc[10:14, "gamma"] = table.loc[10:14, "beta"] * (1 + 1e-9)  # nearly
    adata = sim.simulate(200, 20, regime="trajectory", seed=0, gene_table=table)
    assert np.isfinite(adata.layers[keys.LAYER_VELOCITY_TRUE]).all()
    model = sim.model_from_adata(adata)
    time_C, lineage_C = cells(adata)
    fd_u, fd_s, smooth = finite_difference(model, time_C, lineage_C)
    vu, vs = model.velocity(*model.evaluate(time_C, lineage_C))
    np.testing.assert_allclose(vs[smooth], fd_s[smooth], rtol=1e-6, atol=1e-6)
    # the β = γ limit matches a slightly non-degenerate gene
    u0, s0, alpha, beta, tau = 0.3, 0.7, 2.0, 0.8, np.linspace(0, 5, 11)
    exact = kinetics.solve_kinetics(u0, s0, alpha, beta, beta, tau)
    nearby = kinetics.solve_kinetics(u0, s0, alpha, beta, beta * (1 + 1e-5), tau)
    np.testing.assert_allclose(exact, nearby, rtol=1e-4)


@pytest.mark.parametrize("regime", sim.REGIMES)
def test_fields_shapes_and_counts(datasets, regime):
    adata = datasets[regime]
    assert adata.shape == (N_CELLS, N_GENES)
    for layer in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
        counts = adata.layers[layer]
        assert sp.isspmatrix_csr(counts) and counts.dtype == np.int32
        assert counts.nnz > 0 and counts.data.min() > 0  # explicit zeros are not stored
    assert sp.issparse(adata.X) and (adata.X != adata.layers[keys.LAYER_SPLICED]).nnz == 0
    for layer in (keys.LAYER_VELOCITY_TRUE, keys.LAYER_VELOCITY_U_TRUE, keys.LAYER_ALPHA_TRUE):
        values = adata.layers[layer]
        assert isinstance(values, np.ndarray) and values.dtype == np.float32 and np.isfinite(values).all()
    assert (adata.layers[keys.LAYER_ALPHA_TRUE] >= 0).all()
    for column in (keys.OBS_TIME_TRUE, keys.OBS_LINEAGE, keys.OBS_CLUSTERS, keys.OBS_LIBRARY_SIZE):
        assert column in adata.obs
    assert isinstance(adata.obs[keys.OBS_CLUSTERS].dtype, pd.CategoricalDtype)
    assert (adata.obs[keys.OBS_LIBRARY_SIZE] > 0).all()
    for column in (keys.VAR_GENE_ID, keys.VAR_BETA_TRUE, keys.VAR_GAMMA_TRUE):
        assert column in adata.var
    assert adata.var[keys.VAR_GENE_ID].str.startswith("SIMG").all() and adata.var_names.is_unique
    assert adata.obsm[keys.OBSM_SIM_EMBEDDING].shape == (N_CELLS, 2)
    params = adata.uns[keys.UNS_SIMULATION]
    assert params["regime"] == regime and params["seed"] == 3 and params["noise"] == "nb"


def test_bifurcation_has_lineages_with_multi_kinetic_genes(datasets):
    adata = datasets["bifurcation"]
    lineages = set(adata.obs[keys.OBS_LINEAGE])
    assert {"root", "lineage_a", "lineage_b"} <= lineages
    model = sim.model_from_adata(adata)
    a, b = (list(adata.obs[keys.OBS_LINEAGE].cat.categories).index(n) for n in ("lineage_a", "lineage_b"))
    t = np.full(2, 6.0)  # after the branch, inside every multi-kinetic gene's on-window
    alpha = model.evaluate(t, np.array([a, b]))[2]
    multi = adata.var["multi_kinetic"].to_numpy()
    assert multi.sum() >= 3
    assert (np.abs(np.log((alpha[0, multi] + 1e-9) / (alpha[1, multi] + 1e-9))) > np.log(1.5)).all()
    np.testing.assert_allclose(alpha[0, ~multi], alpha[1, ~multi])
    # and in the data: the lineages' cells differ in those genes
    obs_a, obs_b = (adata.obs[keys.OBS_LINEAGE] == n for n in ("lineage_a", "lineage_b"))
    alpha_true = adata.layers[keys.LAYER_ALPHA_TRUE]
    assert not np.allclose(
        alpha_true[obs_a.to_numpy()][:, multi].mean(0), alpha_true[obs_b.to_numpy()][:, multi].mean(0)
    )


def test_boost_raises_many_genes_at_once(datasets):
    adata = datasets["boost"]
    boosted = adata.var["boosted"].to_numpy()
    time_C = adata.obs[keys.OBS_TIME_TRUE].to_numpy()
    cfg_boost = adata.uns[keys.UNS_SIMULATION]["boost_time"]
    near_before = (time_C > cfg_boost - 0.3) & (time_C < cfg_boost)
    near_after = (time_C >= cfg_boost) & (time_C < cfg_boost + 0.3)
    alpha = adata.layers[keys.LAYER_ALPHA_TRUE]
    rise = alpha[near_after][:, boosted].mean(0) / (alpha[near_before][:, boosted].mean(0) + 1e-9)
    assert boosted.sum() >= 5 and np.median(rise) > 1.5


def test_shared_gene_table_with_jitter(tmp_path):
    table = sim.make_gene_table(N_GENES, seed=7)
    a = sim.simulate(200, N_GENES, regime="bifurcation", seed=1, gene_table=table, jitter=0.05)
    b = sim.simulate(250, N_GENES, regime="boost", seed=2, gene_table=table, jitter=0.05)
    exact = sim.simulate(100, N_GENES, regime="cycle", seed=3, gene_table=table)
    np.testing.assert_array_equal(a.var[keys.VAR_GENE_ID], b.var[keys.VAR_GENE_ID])
    np.testing.assert_array_equal(a.var_names, table["symbol"])
    for col, key in (("beta", keys.VAR_BETA_TRUE), ("gamma", keys.VAR_GAMMA_TRUE)):
        log_ratio = np.log(a.var[key].to_numpy() / b.var[key].to_numpy())
        assert 0 < np.abs(log_ratio).max() < 0.05 * 2 * 5  # equal up to the jitter, but jittered
        np.testing.assert_allclose(exact.var[key], table[col], rtol=1e-6)  # no jitter: the table exactly
    assert not np.allclose(a.obs[keys.OBS_LIBRARY_SIZE].to_numpy(), b.obs[keys.OBS_LIBRARY_SIZE].to_numpy()[:200])
    assert set(a.obs[keys.OBS_LINEAGE]) != set(b.obs[keys.OBS_LINEAGE])
    # the table written beside the data reads back unchanged and reproduces the dataset
    path = sim.write(a, tmp_path / "a.h5ad")
    back = sim.read_gene_table(sim.gene_table_path(path))
    pd.testing.assert_frame_equal(back[list(sim.GENE_TABLE_COLUMNS)], table[list(sim.GENE_TABLE_COLUMNS)])
    again = sim.simulate(200, N_GENES, regime="bifurcation", seed=1, gene_table=back, jitter=0.05)
    assert (again.layers[keys.LAYER_SPLICED] != a.layers[keys.LAYER_SPLICED]).nnz == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("regime", "tree", "trajectory, bifurcation, boost, cycle, mixed"),
        ("noise", "zinb", "nb, poisson"),
        ("dropout", 1.0, "dropout"),
        ("n_cells", 0, "n_cells"),
        ("n_genes", -3, "n_genes"),
        ("jitter", -0.1, "jitter"),
        ("seed", -1, "seed"),
        ("nb_shape", 0.0, "nb_shape"),
        ("branch_time", 50.0, "branch_time"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    kwargs = {"n_cells": 10, "n_genes": 5, field: value}
    with pytest.raises(ValueError, match=f"SimulationConfig.{field}=") as err:
        sim.simulate(**kwargs)
    assert message in str(err.value)


def test_bad_gene_table_names_the_problem():
    table = sim.make_gene_table(10, seed=0)
    with pytest.raises(ValueError, match="gene_table: has 10 rows but n_genes=12"):
        sim.simulate(50, 12, gene_table=table)
    with pytest.raises(ValueError, match=r"gene_table\.gamma"):
        sim.simulate(50, 10, gene_table=table.assign(gamma=-1.0))
    with pytest.raises(ValueError, match="missing columns"):
        sim.simulate(50, 10, gene_table=table.drop(columns=["beta"]))


def test_sampler_matches_the_noise_models():
    rng = np.random.default_rng(0)
    n, mean, shape, dropout = 200_000, 2.0, 4.0, 0.1
    for noise, var in (("poisson", mean), ("nb", mean + mean**2 / shape)):
        x = sim.sample_counts(np.full(n, mean, np.float32), rng, noise, shape, dropout)
        assert x.dtype == np.int32 and x.min() == 0
        assert abs(x.mean() - (1 - dropout) * mean) < 0.02
        expected_var = (1 - dropout) * (var + mean**2) - ((1 - dropout) * mean) ** 2
        assert abs(x.var() / expected_var - 1) < 0.03
    big = sim.sample_counts(np.full(1000, 80.0, np.float32), rng, "nb", shape, 0.0)  # numpy's sampler path
    assert abs(big.mean() / 80.0 - 1) < 0.1


def test_cli_writes_a_readable_file(tmp_path):
    for module in ("data_prep.convert", "data_prep.validate"):  # fm.cli registers every prep step
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not there yet")
    from fm.cli import main

    out = tmp_path / "sim.h5ad"
    args = ["prep", "simulate", "--out", str(out), "--cells", "150", "--genes", "25", "--regime", "cycle"]
    assert main([*args, "--seed", "4", "--noise", "poisson", "--dropout", "0.1"]) == 0
    adata = ad.read_h5ad(out)
    assert adata.shape == (150, 25) and adata.uns[keys.UNS_SIMULATION]["noise"] == "poisson"
    assert sim.gene_table_path(out).exists() and not list(tmp_path.glob(".*tmp*"))
    # a second dataset on the same genes, from the table written beside the first
    out2 = tmp_path / "sim2.h5ad"
    args2 = ["prep", "simulate", "--out", str(out2), "--cells", "120", "--genes", "25", "--regime", "trajectory"]
    assert main([*args2, "--seed", "5", "--gene-table", str(sim.gene_table_path(out)), "--jitter", "0.05"]) == 0
    second = ad.read_h5ad(out2)
    np.testing.assert_array_equal(second.var[keys.VAR_GENE_ID], adata.var[keys.VAR_GENE_ID])
    # the ground truth survives the round trip through .h5ad
    model = sim.model_from_adata(second)
    time_C, lineage_C = cells(second)
    fd_u, fd_s, smooth = finite_difference(model, time_C, lineage_C)
    np.testing.assert_allclose(second.layers[keys.LAYER_VELOCITY_TRUE][smooth], fd_s[smooth], rtol=1e-3, atol=1e-3)
