"""Velocity metrics: against simulation truth, on real data with known transitions, and the steady-state baseline.

Against truth (DESIGN.md §8), all on cells x genes arrays:

- ``gene_spearman``: per gene, Spearman's rho between predicted and true velocity across cells; the median over
  genes is the headline (genes whose truth is constant are excluded and counted; a constant prediction scores 0).
- ``scaled_cosine``: per cell, cos(v_pred / sd_true, v_true / sd_true), each gene divided by the standard deviation
  of its true velocity so that highly expressed genes do not dominate the direction.
- ``sign_accuracy``: mean over entries with nonzero truth of [sign(v_pred) == sign(v_true)].
- ``rate_recovery``: Spearman and median |log(pred / true)| for a rate (beta, gamma per gene; alpha per cell-gene).
  Kinetic rates are identifiable only up to the unit of time, so the log-ratio is also given after removing its
  median (``median_abs_log_ratio_centred``).

Real data (Qiao & Huang, "Representation learning of RNA velocity reveals robust cell transitions", PNAS 2021, the
VeloAE benchmark; the same code ships with UniTVelo, ``unitvelo/eval_utils.py``):

- ``cross_boundary_correctness`` (CBDir), for a known transition A -> B: for each cell c in A whose kNN contain cells
  of B, the mean over those B neighbours b of cos(x_b - x_c, v_c) in a low-dimensional embedding (x: positions,
  v: the velocity projected onto the embedding); averaged over cells per edge, then over edges.
- ``in_cluster_coherence`` (ICCoh): for each cell c, the mean over its kNN of the same cluster of cos(v_c, v_n) in
  gene space; averaged over cells per cluster, then over clusters.
  As in the reference, the kNN list includes the cell itself (scanpy's ``uns['neighbors']['indices']`` does).
- ``velocity_graph`` -> ``transition_matrix`` -> ``embed_velocity``: gene-space velocity projected onto an
  embedding as scVelo computes it (``tl.velocity_graph``, ``tl.transition_matrix``, ``tl.velocity_embedding`` with
  their defaults): cosine *correlations* (both vectors centred over genes) over the recursive kNN (neighbours of
  neighbours), transition weights sign(cos)(exp(10|cos|) - 1) with self-transitions for cells with no good
  neighbour, and the expected unit displacement minus the uniform one (fm.metrics.projection runs it on an AnnData).
- ``knn_indices``: each cell's nearest cells (scikit-learn's exact NearestNeighbors), the cell itself first.

Baseline: ``steady_state_velocity`` (v = u - gamma * s with gamma fitted per gene by least squares through the origin
on the cells in the upper extreme quantile of s/max(s) + u/max(u), as scVelo's deterministic/steady-state model does
with its defaults ``fit_offset=False, perc=[5, 95]``; La Manno et al. 2018, Bergen et al. 2020).

Shapes: N cells, G genes, E embedding dims, K neighbours.

    python -c "import numpy as np; from fm.metrics.velocity import gene_spearman as f; \
x=np.random.rand(50, 4); print(f(x, x))"
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.neighbors import NearestNeighbors

log = logging.getLogger(__name__)

_EPS = 1e-12


def _check_pair(pred_NG: np.ndarray, true_NG: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_NG, true_NG = np.asarray(pred_NG, dtype=np.float64), np.asarray(true_NG, dtype=np.float64)
    if pred_NG.shape != true_NG.shape or pred_NG.ndim != 2:
        raise ValueError(
            f"pred and true must be 2-d cells x genes of equal shape, got {pred_NG.shape}, {true_NG.shape}"
        )
    if not np.isfinite(pred_NG).all():
        raise ValueError("pred holds NaN or inf entries")
    return pred_NG, true_NG


def _pearson_columns(a_NG: np.ndarray, b_NG: np.ndarray) -> np.ndarray:
    a = a_NG - a_NG.mean(0)
    b = b_NG - b_NG.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    out = np.zeros(a.shape[1])
    ok = den > _EPS
    out[ok] = (a * b).sum(0)[ok] / den[ok]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two 1-d arrays (average ranks for ties); 0 when either is constant."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(_pearson_columns(rankdata(a)[:, None], rankdata(b)[:, None])[0])


def gene_spearman(pred_NG: np.ndarray, true_NG: np.ndarray) -> dict:
    """Per-gene Spearman of predicted vs true velocity across cells.

    Entries where the truth is NaN are left out of that gene's correlation. Genes with fewer than 3 known cells or a
    constant truth are excluded (their rho is NaN in ``per_gene``) and counted in ``n_excluded``.

    Returns:
        dict with ``median`` (over the included genes), ``per_gene`` [G], ``n_genes`` (included), ``n_excluded``.
    """
    pred_NG, true_NG = _check_pair(pred_NG, true_NG)
    n_genes = true_NG.shape[1]
    rho = np.full(n_genes, np.nan)
    known_NG = np.isfinite(true_NG)
    for g in range(n_genes):
        k = known_NG[:, g]
        t = true_NG[k, g]
        if t.size < 3 or np.ptp(t) == 0:
            continue
        rho[g] = spearman(pred_NG[k, g], t)
    included = np.isfinite(rho)
    n_excluded = int(n_genes - included.sum())
    if n_excluded:
        log.info("gene_spearman: %d of %d genes excluded (constant or unknown truth)", n_excluded, n_genes)
    median = float(np.median(rho[included])) if included.any() else float("nan")
    return {"median": median, "per_gene": rho, "n_genes": int(included.sum()), "n_excluded": n_excluded}


def scaled_cosine(pred_NG: np.ndarray, true_NG: np.ndarray) -> dict:
    """Per-cell cosine between predicted and true velocity after dividing each gene by its true-velocity std.

    Genes with zero (or undefined) std are dropped; NaN truth entries are zeroed in both vectors.

    Returns:
        dict with ``mean``, ``median`` and ``per_cell`` [N] (NaN for a cell whose either vector is zero).
    """
    pred_NG, true_NG = _check_pair(pred_NG, true_NG)
    sd_G = np.nanstd(true_NG, axis=0)
    keep = np.isfinite(sd_G) & (sd_G > 0)
    known = np.isfinite(true_NG[:, keep])
    p = np.where(known, pred_NG[:, keep] / sd_G[keep], 0.0)
    t = np.where(known, true_NG[:, keep] / sd_G[keep], 0.0)
    den = np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1)
    cos = np.full(p.shape[0], np.nan)
    ok = den > _EPS
    cos[ok] = (p * t).sum(1)[ok] / den[ok]
    return {"mean": float(np.nanmean(cos)), "median": float(np.nanmedian(cos)), "per_cell": cos}


def sign_accuracy(pred_NG: np.ndarray, true_NG: np.ndarray) -> float:
    """Fraction of entries with known, nonzero truth where the predicted sign matches (a zero prediction misses)."""
    pred_NG, true_NG = _check_pair(pred_NG, true_NG)
    sel = np.isfinite(true_NG) & (true_NG != 0)
    if not sel.any():
        raise ValueError("sign_accuracy: no entry with known nonzero truth")
    return float((np.sign(pred_NG[sel]) == np.sign(true_NG[sel])).mean())


def rate_recovery(pred: np.ndarray, true: np.ndarray) -> dict:
    """How well predicted kinetic rates (any shape, e.g. beta [G] or alpha [N, G]) match the true ones.

    Returns:
        dict with ``spearman``, ``median_abs_log_ratio`` = median |log(pred/true)|, and
        ``median_abs_log_ratio_centred`` = the same after subtracting the median log-ratio (time-unit free).
    """
    pred, true = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"rate_recovery: shapes differ, {pred.shape} vs {true.shape}")
    sel = np.isfinite(pred) & np.isfinite(true) & (pred > 0) & (true > 0)
    if sel.sum() < 2:
        raise ValueError("rate_recovery: fewer than 2 positive, finite (pred, true) pairs")
    lr = np.log(pred[sel]) - np.log(true[sel])
    return {
        "spearman": spearman(pred[sel], true[sel]),
        "median_abs_log_ratio": float(np.median(np.abs(lr))),
        "median_abs_log_ratio_centred": float(np.median(np.abs(lr - np.median(lr)))),
    }


def steady_state_gamma(u_NG: np.ndarray, s_NG: np.ndarray, perc: float = 95.0) -> np.ndarray:
    """Per-gene degradation ratio gamma_hat (scVelo steady-state, no offset) fitted on the upper extreme quantile.

    Cells with s/max(s) + u/max(u) >= the ``perc``-th percentile are taken to be at steady state (u = gamma s) and
    gamma = sum(u s) / sum(s^2) over them. Returns [G]; 0 for a gene with no spliced signal there.
    """
    u_NG, s_NG = np.asarray(u_NG, dtype=np.float64), np.asarray(s_NG, dtype=np.float64)
    if u_NG.shape != s_NG.shape:
        raise ValueError(f"u and s shapes differ: {u_NG.shape} vs {s_NG.shape}")
    norm = s_NG / np.clip(s_NG.max(0), 1e-3, None) + u_NG / np.clip(u_NG.max(0), 1e-3, None)
    w = norm >= np.percentile(norm, perc, axis=0)
    ss = (w * s_NG * s_NG).sum(0)
    us = (w * u_NG * s_NG).sum(0)
    return np.where(ss > 0, us / np.maximum(ss, _EPS), 0.0)


def steady_state_velocity(u_NG: np.ndarray, s_NG: np.ndarray, perc: float = 95.0) -> np.ndarray:
    """Steady-state baseline velocity v = u - gamma_hat * s, gamma_hat per gene from :func:`steady_state_gamma`."""
    gamma_G = steady_state_gamma(u_NG, s_NG, perc)
    return np.asarray(u_NG, dtype=np.float64) - gamma_G * np.asarray(s_NG, dtype=np.float64)


def knn_indices(x_NE: np.ndarray, k: int, include_self: bool = True) -> np.ndarray:
    """Indices [N, k] of each cell's k nearest cells (Euclidean, exact), nearest first; the cell itself first if
    included, whatever ties (duplicate cells) say."""
    x = np.asarray(x_NE, dtype=np.float64)
    n = x.shape[0]
    if not 0 < k <= n - (0 if include_self else 1):
        raise ValueError(f"knn_indices: k={k} out of range for {n} cells")
    others = k - 1 if include_self else k
    # kneighbors() without a query leaves each cell out of its own list
    nb_NK = NearestNeighbors().fit(x).kneighbors(n_neighbors=others, return_distance=False) if others else None
    if not include_self:
        return nb_NK.astype(np.int64)
    self_N1 = np.arange(n, dtype=np.int64)[:, None]
    return self_N1 if nb_NK is None else np.concatenate([self_N1, nb_NK], axis=1)


def _cos_rows(a_ME: np.ndarray, b_E: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a_ME, axis=1) * np.linalg.norm(b_E)
    return np.where(den > _EPS, a_ME @ b_E / np.maximum(den, _EPS), 0.0)


def cross_boundary_correctness(
    x_emb_NE: np.ndarray,
    v_emb_NE: np.ndarray,
    clusters: Sequence[Hashable],
    edges: Sequence[tuple[Hashable, Hashable]],
    neighbours_NK: np.ndarray,
) -> tuple[dict, float]:
    """CBDir (Qiao & Huang 2021): direction correctness of velocity across known transitions A -> B.

    Args:
        x_emb_NE: cell positions in the embedding (e.g. UMAP).
        v_emb_NE: velocity projected onto the same embedding (:func:`embed_velocity`).
        clusters: cluster label of each cell.
        edges: the known transitions (A, B).
        neighbours_NK: kNN indices (:func:`knn_indices`, usually in expression PCA space).

    Returns:
        ({(A, B): mean score}, mean over edges). An edge with no A cell next to a B cell scores NaN and is left out
        of the mean.
    """
    labels = np.asarray(clusters)
    x, v = np.asarray(x_emb_NE, dtype=np.float64), np.asarray(v_emb_NE, dtype=np.float64)
    scores = {}
    for a, b in edges:
        cell_scores = []
        for c in np.flatnonzero(labels == a):
            nb = neighbours_NK[c][labels[neighbours_NK[c]] == b]
            if nb.size:
                cell_scores.append(_cos_rows(x[nb] - x[c], v[c]).mean())
        if not cell_scores:
            log.warning("CBDir: no cell of %r has a neighbour in %r", a, b)
        scores[(a, b)] = float(np.mean(cell_scores)) if cell_scores else float("nan")
    vals = [s for s in scores.values() if np.isfinite(s)]
    return scores, float(np.mean(vals)) if vals else float("nan")


def in_cluster_coherence(
    v_NG: np.ndarray, clusters: Sequence[Hashable], neighbours_NK: np.ndarray
) -> tuple[dict, float]:
    """ICCoh (Qiao & Huang 2021): mean cosine between a cell's velocity and its same-cluster neighbours' velocities.

    Returns:
        ({cluster: mean score}, mean over clusters).
    """
    labels = np.asarray(clusters)
    v = np.asarray(v_NG, dtype=np.float64)
    vn = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), _EPS)
    scores = {}
    for cat in np.unique(labels):
        cell_scores = []
        for c in np.flatnonzero(labels == cat):
            nb = neighbours_NK[c][labels[neighbours_NK[c]] == cat]
            if nb.size:
                cell_scores.append(float((vn[nb] @ vn[c]).mean()))
        scores[cat.item() if hasattr(cat, "item") else cat] = float(np.mean(cell_scores)) if cell_scores else np.nan
    vals = [s for s in scores.values() if np.isfinite(s)]
    return scores, float(np.mean(vals)) if vals else float("nan")


# --- scVelo's velocity graph, transition matrix and embedded velocity (Bergen et al. 2020, scvelo.tl) ------------
def recursive_neighbours(neighbours_NK: np.ndarray, c: int, n_recurse: int = 2) -> np.ndarray:
    """Cell ``c``'s neighbours, their neighbours, ... (``n_recurse`` levels), sorted, without ``c`` itself."""
    idx = np.asarray([c])
    for _ in range(n_recurse):
        idx = np.union1d(idx, neighbours_NK[idx].ravel())
    return idx[idx != c]


def velocity_graph(x_NG: np.ndarray, v_NG: np.ndarray, neighbours_NK: np.ndarray, n_recurse: int = 2):
    """scVelo's ``tl.velocity_graph``: the cosine correlation of v_c with x_n - x_c for n in c's recursive kNN.

    Both vectors are centred over genes before the cosine (scVelo's ``cosine_correlation``), so a shift common to
    every gene carries no direction. A cell whose velocity is zero everywhere gets zeros.

    Args:
        x_NG: expression the displacements are taken in (scVelo: ``layers['Ms']``, kNN-smoothed normalised spliced).
        v_NG: velocity on the same genes (finite).
        neighbours_NK: kNN indices (:func:`knn_indices`); the cell itself, if listed, is skipped.
        n_recurse: levels of neighbours of neighbours (scVelo's default 2).

    Returns:
        scipy.sparse CSR [N, N] of correlations in [-1, 1].
    """
    import scipy.sparse as sp

    x = np.asarray(x_NG, dtype=np.float64)
    v = np.asarray(v_NG, dtype=np.float64)
    if x.shape != v.shape or x.ndim != 2:
        raise ValueError(f"velocity_graph: x and v must be cells x genes of equal shape, got {x.shape}, {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("velocity_graph: v holds NaN or inf entries (keep only genes with a finite velocity)")
    v = v - v.mean(1, keepdims=True)
    n = x.shape[0]
    rows, cols, vals = [], [], []
    for c in range(n):
        nb = recursive_neighbours(neighbours_NK, c, n_recurse)
        d = x[nb] - x[c]
        d -= d.mean(1, keepdims=True)
        den = np.linalg.norm(d, axis=1) * np.linalg.norm(v[c])
        cos = np.where(den > _EPS, d @ v[c] / np.maximum(den, _EPS), 0.0)
        rows.append(np.full(nb.size, c))
        cols.append(nb)
        vals.append(cos)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


def _offdiagonal(matrix_NN) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(rows, cols, values, N) of a square sparse matrix's stored entries off the diagonal."""
    import scipy.sparse as sp

    coo = sp.coo_matrix(matrix_NN)
    keep = coo.row != coo.col
    return coo.row[keep], coo.col[keep], np.asarray(coo.data[keep], dtype=np.float64), coo.shape[0]


def transition_matrix(graph_NN, scale: float = 10.0, self_transitions: bool = True,
                      use_negative_cosines: bool = True):
    """scVelo's ``tl.transition_matrix`` (no diffusion kernel): T[c, n] from the velocity graph's correlations.

    T[c, n] ∝ sign(cos) * (exp(scale |cos|) - 1) (with ``use_negative_cosines``, scVelo's default in
    ``velocity_embedding``: a neighbour against the velocity pushes the other way; without, it gets weight 0), rows
    normalised by the sum of |T|. With ``self_transitions`` a cell whose best correlation is low keeps some
    probability on itself: T[c, c] from clip(q98 - max_n cos, 0, 1), q98 the 98th percentile over cells of that
    maximum (the diagonal of ``graph_NN`` is ignored).

    Returns:
        scipy.sparse CSR [N, N].
    """
    import scipy.sparse as sp

    rows, cols, cos, n = _offdiagonal(graph_NN)
    if use_negative_cosines:
        w = np.sign(cos) * np.expm1(scale * np.abs(cos))
    else:
        w = np.expm1(scale * np.clip(cos, 0.0, None))
    if self_transitions:
        confidence_N = np.zeros(n)  # best positive correlation
        np.maximum.at(confidence_N, rows, cos)
        self_prob_N = np.clip(np.percentile(confidence_N, 98) - confidence_N, 0.0, 1.0)
        rows, cols = np.concatenate([rows, np.arange(n)]), np.concatenate([cols, np.arange(n)])
        w = np.concatenate([w, np.expm1(scale * self_prob_N)])
    norm_N = np.bincount(rows, weights=np.abs(w), minlength=n)
    w = np.where(norm_N[rows] > 0, w / np.maximum(norm_N[rows], _EPS), 0.0)
    t = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    t.eliminate_zeros()
    return t


def embed_velocity(emb_NE: np.ndarray, transitions_NN) -> np.ndarray:
    """scVelo's ``tl.velocity_embedding``: the expected unit displacement in the embedding minus the uniform one.

    v_emb_c = sum_n T[c, n] u_cn - mean_n(T[c, n]) sum_n u_cn over the neighbours n != c with T[c, n] != 0,
    u_cn = (e_n - e_c) / |e_n - e_c| (0 where two cells coincide). Returns [N, E], in units of the embedding's
    directions (scale it for display).
    """
    e = np.asarray(emb_NE, dtype=np.float64)
    rows, cols, p, _ = _offdiagonal(transitions_NN)
    nonzero = p != 0
    rows, cols, p = rows[nonzero], cols[nonzero], p[nonzero]
    d = e[cols] - e[rows]
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    d = np.where(norm > _EPS, d / np.maximum(norm, _EPS), 0.0)
    n = e.shape[0]
    count_N = np.bincount(rows, minlength=n)
    mean_p_N = np.bincount(rows, weights=p, minlength=n) / np.maximum(count_N, 1)
    out = np.zeros_like(e)
    for j in range(e.shape[1]):
        out[:, j] = np.bincount(rows, weights=p * d[:, j], minlength=n) - mean_p_N * np.bincount(
            rows, weights=d[:, j], minlength=n
        )
    return out
