"""Metrics on constructed inputs whose answer is known (hand-computed where it is not 0, 1 or -1)."""

import math

import numpy as np
import pytest

from fm.metrics.embedding import (
    adjusted_rand_index,
    embedding_scores,
    kmeans,
    normalized_mutual_info,
    silhouette_score,
)
from fm.metrics.expression import gene_mean_imputation, hold_out_entries, imputation_error
from fm.metrics.velocity import (
    cross_boundary_correctness,
    embed_velocity,
    gene_spearman,
    in_cluster_coherence,
    knn_indices,
    rate_recovery,
    scaled_cosine,
    sign_accuracy,
    steady_state_gamma,
    steady_state_velocity,
    transition_matrix,
    velocity_graph,
)


@pytest.fixture
def truth():
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 8)) * rng.uniform(0.01, 100, size=8)  # genes on very different scales


# --- velocity vs truth ---------------------------------------------------------------------------------------------
def test_gene_spearman_perfect_reversed_monotone(truth):
    assert gene_spearman(truth, truth)["median"] == pytest.approx(1.0)
    assert gene_spearman(-truth, truth)["median"] == pytest.approx(-1.0)
    assert gene_spearman(truth**3 + 1, truth)["median"] == pytest.approx(1.0)  # rank-based


def test_gene_spearman_excludes_constant_and_counts():
    t = np.random.default_rng(1).normal(size=(30, 3))
    t[:, 1] = 2.0
    t[:5, 2] = np.nan  # unknown entries are skipped, not excluded
    out = gene_spearman(np.nan_to_num(t), t)
    assert out["n_excluded"] == 1 and out["n_genes"] == 2
    assert np.isnan(out["per_gene"][1]) and out["per_gene"][2] == pytest.approx(1.0)
    # a constant prediction carries no ranking: 0
    assert gene_spearman(np.ones_like(t), np.nan_to_num(t))["per_gene"][0] == 0.0


def test_scaled_cosine(truth):
    assert scaled_cosine(truth, truth)["median"] == pytest.approx(1.0)
    assert scaled_cosine(-truth, truth)["median"] == pytest.approx(-1.0)
    assert scaled_cosine(2.0 * truth, truth)["mean"] == pytest.approx(1.0)
    # per-gene scaling matters: with one huge gene, raw cosine would be ~1 for a prediction that only gets that gene
    t = np.stack([np.r_[1.0, -1.0] * 1000, np.r_[1.0, -1.0]], axis=1)  # 2 cells x 2 genes
    p = t * np.r_[1.0, -1.0]  # second gene reversed
    assert scaled_cosine(p, t)["mean"] == pytest.approx(0.0, abs=1e-12)


def test_sign_accuracy():
    t = np.array([[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]])
    assert sign_accuracy(t, t) == 1.0
    assert sign_accuracy(-t, t) == 0.0
    p = np.array([[1.0, 2.0, 5.0], [3.0, 9.0, -1.0]])  # 3 of 4 nonzero-truth entries right; zeros ignored
    assert sign_accuracy(p, t) == pytest.approx(0.75)


def test_rate_recovery_scale_free():
    beta = np.random.default_rng(2).uniform(0.1, 10, size=50)
    out = rate_recovery(3.0 * beta, beta)
    assert out["spearman"] == pytest.approx(1.0)
    assert out["median_abs_log_ratio"] == pytest.approx(math.log(3.0))
    assert out["median_abs_log_ratio_centred"] == pytest.approx(0.0, abs=1e-12)
    assert rate_recovery(1.0 / beta, beta)["spearman"] == pytest.approx(-1.0)


def test_steady_state_gamma_recovers_line():
    rng = np.random.default_rng(3)
    gamma = np.array([0.5, 2.0, 0.1])
    s = rng.uniform(0, 10, size=(400, 3))
    u = gamma * s
    # cells off steady state (induction: u above the line), but only at low expression
    low = s < 5
    u = np.where(low, u * rng.uniform(1.1, 2, size=u.shape), u)
    np.testing.assert_allclose(steady_state_gamma(u, s), gamma, rtol=1e-10)
    v = steady_state_velocity(u, s)
    assert (v[~low] == pytest.approx(0.0, abs=1e-9)) and (v[low] > 0).all()


# --- real-data metrics ---------------------------------------------------------------------------------------------
def _line(n=40):
    x = np.linspace(0, 2, n)[:, None]
    clusters = np.where(x[:, 0] < 1, "A", "B")
    return x, clusters


def test_knn_indices_self_first():
    x = np.random.default_rng(4).normal(size=(30, 3))
    nb = knn_indices(x, 5)
    assert (nb[:, 0] == np.arange(30)).all()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nb[:, 1:], np.argsort(d, 1)[:, 1:5])
    assert not (knn_indices(x, 4, include_self=False) == np.arange(30)[:, None]).any()
    np.testing.assert_array_equal(knn_indices(x, 4, include_self=False), nb[:, 1:5])
    assert (knn_indices(x, 1) == np.arange(30)[:, None]).all()
    with pytest.raises(ValueError, match="k=30 out of range"):
        knn_indices(x, 30, include_self=False)


def test_knn_indices_put_the_cell_itself_first_among_duplicates():
    x = np.repeat(np.random.default_rng(4).normal(size=(10, 3)), 3, axis=0)  # every cell three times
    nb = knn_indices(x, 3)
    assert (nb[:, 0] == np.arange(30)).all()
    assert (nb[:, 1:] // 3 == np.arange(30)[:, None] // 3).all()  # then its two copies


def test_cbdir_forward_and_reversed():
    x, clusters = _line()
    nb = knn_indices(x, 6)
    fwd = np.ones_like(x)
    scores, mean = cross_boundary_correctness(x, fwd, clusters, [("A", "B")], nb)
    assert mean == pytest.approx(1.0) and scores[("A", "B")] == pytest.approx(1.0)
    _, mean_rev = cross_boundary_correctness(x, -fwd, clusters, [("A", "B")], nb)
    assert mean_rev == pytest.approx(-1.0)
    # an edge whose clusters never touch scores NaN and is left out of the mean
    scores, mean = cross_boundary_correctness(x, fwd, clusters, [("A", "B"), ("A", "C")], nb)
    assert np.isnan(scores[("A", "C")]) and mean == pytest.approx(1.0)


def test_iccoh():
    x, clusters = _line()
    nb = knn_indices(x, 6)
    v = np.tile([1.0, 2.0, 3.0], (40, 1))
    assert in_cluster_coherence(v, clusters, nb)[1] == pytest.approx(1.0)
    v_alt = v * np.where(np.arange(40) % 2 == 0, 1.0, -1.0)[:, None]
    scores, mean = in_cluster_coherence(v_alt, clusters, nb)
    assert set(scores) == {"A", "B"} and -1.0 < mean < 0.5  # self (+1) and alternating neighbours


def test_cbdir_of_the_scvelo_projection_along_a_line():
    t, clusters = _line()
    d = np.random.default_rng(1).standard_normal(20)  # varies across genes: a common shift carries no direction
    x = 5.0 + t * d + 0.01 * np.random.default_rng(2).standard_normal((40, 20))
    emb = np.c_[t[:, 0], np.zeros(40)]
    nb = knn_indices(x, 6)
    v_emb = embed_velocity(emb, transition_matrix(velocity_graph(x, np.tile(d, (40, 1)), nb)))
    assert (v_emb[5:35, 0] > 0).all()
    assert cross_boundary_correctness(emb, v_emb, clusters, [("A", "B")], nb)[1] == pytest.approx(1.0)
    assert cross_boundary_correctness(emb, -v_emb, clusters, [("A", "B")], nb)[1] == pytest.approx(-1.0)


# --- imputation ----------------------------------------------------------------------------------------------------
def test_imputation_protocol():
    rng = np.random.default_rng(5)
    x = rng.poisson(3.0, size=(50, 10)).astype(float)
    xm, held = hold_out_entries(x, 0.1, seed=0)
    assert held.sum() == round(0.1 * (x > 0).sum()) and (x[held] > 0).all() and (xm[held] == 0).all()
    assert imputation_error(x, x, held) == 0.0
    baseline = gene_mean_imputation(xm, held)
    np.testing.assert_allclose(baseline[0], (xm * ~held).sum(0) / (~held).sum(0))
    assert imputation_error(baseline, x, held) > 0


def test_imputation_hand_computed():
    true = np.array([[1.0, 4.0], [2.0, 0.0]])
    held = np.array([[True, True], [True, False]])
    pred = np.array([[2.0, 1.0], [2.5, 9.0]])  # errors 1, 3, 0.5 -> median 1
    assert imputation_error(pred, true, held) == 1.0
    np.testing.assert_allclose(gene_mean_imputation(true, held), [[0.0, 0.0], [0.0, 0.0]])  # col 0 all held: 0


# --- embedding -----------------------------------------------------------------------------------------------------
def test_ari_nmi_hand_computed():
    t, p = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert adjusted_rand_index(t, p) == pytest.approx(0.8 / 3.3)  # index 2, expected 1.2, max 4.5
    mi = 2 / 3 * math.log(2)
    assert normalized_mutual_info(t, p) == pytest.approx(mi / ((math.log(2) + math.log(3)) / 2))
    assert adjusted_rand_index(t, ["b", "b", "b", "a", "a", "a"]) == 1.0
    assert normalized_mutual_info(t, [5, 5, 5, 7, 7, 7]) == pytest.approx(1.0)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)


def test_silhouette_hand_computed():
    x = np.array([[0.0], [1.0], [4.0], [5.0]])
    assert silhouette_score(x, ["a", "a", "b", "b"]) == pytest.approx((7 / 9 + 5 / 7) / 2)
    with pytest.raises(ValueError, match="labels"):
        silhouette_score(x, ["a"] * 4)


def test_embedding_scores_separated_clusters():
    rng = np.random.default_rng(6)
    x = np.r_[rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (20, 3)), rng.normal(-5, 0.1, (20, 3))]
    types = ["a"] * 20 + ["b"] * 20 + ["c"] * 20
    out = embedding_scores(x, types)
    assert out["ari"] == pytest.approx(1.0) and out["nmi"] == pytest.approx(1.0) and out["silhouette"] > 0.9
    assert len(np.unique(kmeans(x, 3))) == 3
