"""Per-dataset neighbourhoods and moments, as scVelo computes them (DESIGN §9).

    from fm.velocity.neighbours import NeighbourConfig, neighbourhood
    nb = neighbourhood(spliced_NG, unspliced_NG, NeighbourConfig())   # raw counts (CSR) of one dataset
    nb.Ms, nb.Mu                                                      # first-order moments, normalised units

The steps are the field's: counts normalised per cell (``total``: each modality by its own library size, times
``target_sum``, as the tokenizer does; ``size_factor``: divided by a given factor; ``none``), log1p of the normalised
spliced counts, PCA (``n_pcs`` components of the ``n_top_genes`` most variable genes, from their covariance
accumulated over batches of 4,096 cells, so conversion holds one batch, not the dataset), a kNN graph on it
(scanpy's: UMAP connectivities over ``n_neighbours`` neighbours, exact below 8,192 cells, pynndescent above; the
same calls, without scanpy's AnnData around them). The moments are scVelo's ``pp.moments``: the connectivities
binarised, self included, each row divided by its count, times the normalised (not logged) counts; conversion builds
that operator from the kNN lists directly (:func:`operator_from_knn`, equal to it). The second-order moments
(``Mss`` = moments of s*s, ``Mus`` of u*s) are those scVelo's stochastic mode uses.

Units: ``Ms``, ``Mu`` are in the normalised units above; velocity computed from them is ds/dt in those units.

Shapes: N cells, G genes, P principal components.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh

from fm.data.counts import normalisation_scales as scales

log = logging.getLogger(__name__)

NORMALIZATIONS = ("total", "size_factor", "none")


@dataclass(frozen=True)
class NeighbourConfig:
    """How a dataset's neighbourhood is computed; recorded in corpora, checkpoints, releases and ``uns['fm']``."""

    n_neighbours: int = 30  # neighbours per cell (scVelo's default); 0: no neighbourhood
    n_pcs: int = 30  # principal components of log1p(normalised spliced) the kNN graph is built on
    n_top_genes: int = 2000  # the PCA's genes: those of highest variance of log1p(normalised spliced) (scVelo: 2000)
    normalization: str = "total"  # total (each modality by its library size) | size_factor | none
    target_sum: float = 1e4  # library size after `total` normalisation (the tokenizer's default)
    seed: int = 0  # seed of the approximate kNN search (pynndescent, above 4,096 cells)

    def __post_init__(self):
        for name in ("n_neighbours", "n_pcs", "n_top_genes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"NeighbourConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("n_pcs", "n_top_genes"):
            if self.n_neighbours and getattr(self, name) < 1:
                raise ValueError(f"NeighbourConfig.{name} must be >= 1 with neighbours, got {getattr(self, name)!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"NeighbourConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if not (isinstance(self.target_sum, (int, float)) and math.isfinite(self.target_sum) and self.target_sum > 0):
            raise ValueError(f"NeighbourConfig.target_sum must be a positive finite number, got {self.target_sum!r}")

    @property
    def enabled(self) -> bool:
        return self.n_neighbours > 0

    def to_dict(self) -> dict:
        return asdict(self)


class NeighbourhoodError(ValueError):
    """A dataset's neighbourhood cannot be computed; the message says why and names the setting."""


@dataclass
class Neighbourhood:
    """One dataset's neighbourhood: the graph, the moments operator and the first-order moments."""

    X_pca: np.ndarray  # [N, P] float32
    distances: sp.csr_matrix | None  # [N, N] kNN distances (scanpy's obsp['distances']); None: not built
    connectivities: sp.csr_matrix | None  # [N, N] UMAP connectivities (scanpy's obsp['connectivities'])
    operator: sp.csr_matrix  # [N, N] row-stochastic moments operator (scVelo's get_connectivities)
    Ms: np.ndarray | sp.csr_matrix  # [N, G] float32, first-order moments of the normalised spliced counts
    Mu: np.ndarray | sp.csr_matrix  # [N, G] float32, of the normalised unspliced counts
    origin: np.ndarray | None = None  # [P] where a cell without counts projects in X_pca's space


def normalisation_scales(
    lib_s_N: np.ndarray, lib_u_N: np.ndarray, size_factor_N: np.ndarray | None, cfg: NeighbourConfig, where: str = ""
) -> np.ndarray:
    """Per-cell multipliers [2, N] (float64): the tokenizer's rule (fm.data.counts.normalisation_scales)."""
    try:
        return scales(lib_s_N, lib_u_N, size_factor_N, cfg.normalization, cfg.target_sum, str)
    except ValueError as e:
        raise NeighbourhoodError(f"{where}: {e}") from e


def scale_rows(x_NG: sp.spmatrix, scale_N: np.ndarray) -> sp.csr_matrix:
    """``diag(scale) @ x`` as float32 CSR."""
    return sp.csr_matrix(sp.diags(scale_N) @ sp.csr_matrix(x_NG, dtype=np.float64), dtype=np.float32)


PCA_ROWS = 4096  # cells per PCA batch: every path batches a dataset's cells alike, so one file gives one PCA


class CountRows(Protocol):
    """A dataset's normalised counts, read by rows: in memory (:class:`InMemoryCounts`) or on disk (conversion)."""

    n_cells: int
    n_genes: int

    def rows(self, a: int, b: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """Normalised (spliced, unspliced) of cells ``[a, b)``, float32 CSR."""

    def take(self, idx: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """Normalised (spliced, unspliced) of cells ``idx`` (sorted, unique), float32 CSR."""


@dataclass
class InMemoryCounts:
    """Normalised counts held in memory (a user's AnnData in fm predict and fm velocity)."""

    spliced: sp.csr_matrix  # [N, G] float32
    unspliced: sp.csr_matrix

    @property
    def n_cells(self) -> int:
        return self.spliced.shape[0]

    @property
    def n_genes(self) -> int:
        return self.spliced.shape[1]

    def rows(self, a: int, b: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        return self.spliced[a:b], self.unspliced[a:b]

    def take(self, idx: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        return self.spliced[idx], self.unspliced[idx]


def pca(counts: CountRows, n_pcs: int, n_top_genes: int, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """PCA of log1p(normalised spliced) over the ``n_top_genes`` genes of highest variance, in passes over batches
    of :data:`PCA_ROWS` cells, so memory is a batch and a genes x genes covariance, not the dataset: the genes'
    variances, then the chosen genes' covariance (in the first pass where there are no more than ``n_top_genes``
    genes), then the projection.

    Written here because no library does it out of memory at a usable speed: scikit-learn's
    ``PCA(svd_solver="covariance_eigh")`` computes exactly this (the covariance's eigenvectors) but from a matrix in
    memory, and ``IncrementalPCA`` takes an SVD per batch, measured at 52-82 s for 4,096 x 1,000 on this machine's
    OpenBLAS (LAPACK gesdd) against 2.6 s for the eigendecomposition of the covariance (numpy's ``eigh``).
    Components are signed so their largest loading is positive (deterministic across runs and paths).

    Returns the cells' components [N, P] (float32) and where a cell without counts (zero expression) projects [P].
    """
    N, G = counts.n_cells, counts.n_genes
    n_comps = min(n_pcs, N - 1, G - 1)
    if n_comps < 1:
        raise NeighbourhoodError(f"{where}: PCA needs at least 2 cells and 2 genes, got {N} cells x {G} genes")
    if n_comps < n_pcs:
        log.warning("%s: %d principal components instead of n_pcs=%d (only %d cells x %d genes)",
                    where, n_comps, n_pcs, N, G)
    bounds = [(a, min(a + PCA_ROWS, N)) for a in range(0, N, PCA_ROWS)]

    def logged(a: int, b: int) -> sp.csr_matrix:
        return sp.csr_matrix(counts.rows(a, b)[0], dtype=np.float64).log1p()

    # pass 1: per-gene sums, to choose the genes; and the covariance too where every gene is chosen anyway
    one_pass = G <= n_top_genes
    s1, s2 = np.zeros(G), np.zeros(G)
    gram = np.zeros((G, G)) if one_pass else None
    for a, b in bounds:
        x = logged(a, b)
        s1 += np.asarray(x.sum(0)).ravel()
        s2 += np.asarray(x.multiply(x).sum(0)).ravel()
        if one_pass:
            gram += _gram(x)
    var = s2 / N - (s1 / N) ** 2
    if not np.any(var > 1e-12):
        raise NeighbourhoodError(
            f"{where}: PCA cannot be computed: no gene varies across the {N} cells (all-zero or constant spliced "
            "counts)"
        )
    genes = np.sort(np.argsort(-var, kind="stable")[: min(n_top_genes, G)])
    mean = s1[genes] / N
    if not one_pass:  # pass 2: the chosen genes' covariance
        gram = np.zeros((len(genes), len(genes)))
        for a, b in bounds:
            gram += _gram(logged(a, b)[:, genes])
    cov = (gram - N * np.outer(mean, mean)) / max(N - 1, 1)
    n_comps = min(n_comps, len(genes))
    # the top n_comps eigenvectors only (LAPACK's MRRR): 0.8 s against 1.3 s for all of 1,000 genes' (2,000: 1.9/4.9)
    _, vectors = eigh(cov, subset_by_index=(len(genes) - n_comps, len(genes) - 1), driver="evr")
    comps = np.ascontiguousarray(vectors[:, ::-1])  # [genes, P], by decreasing variance
    comps *= np.sign(comps[np.abs(comps).argmax(0), np.arange(n_comps)])
    X = np.empty((N, n_comps), np.float32)
    for a, b in bounds:
        X[a:b] = logged(a, b)[:, genes] @ comps - mean @ comps
    if not np.isfinite(X).all():
        raise NeighbourhoodError(f"{where}: PCA gave non-finite components")
    return X, (-mean @ comps).astype(np.float32)


EXACT_BELOW = 8192  # cells: exact kNN below (scikit-learn, brute force), pynndescent from here on (as scanpy)


def _gram(x_BG: sp.csr_matrix) -> np.ndarray:
    """``x.T @ x`` [G, G] (float64) through dense blocks of at most 2^22 entries: BLAS on the dense block was 10x
    faster than the sparse product on counts 38% nonzero (0.95 s against 10.4 s for 12,288 cells x 1,000 genes)."""
    G = x_BG.shape[1]
    out = np.zeros((G, G))
    step = max(1, 2**22 // max(G, 1))
    for r in range(0, x_BG.shape[0], step):
        d = x_BG[r: r + step].toarray()
        out += d.T @ d
    return out


@functools.cache
def cache_numba_kernels() -> None:
    """Let numba keep pynndescent's and UMAP's compiled kernels on disk where the libraries did not ask for it (numba's
    ``cache=True``, turned on per dispatcher), so a process compiles only what numba cannot cache.

    They compile in every process otherwise: the first kNN graph and operator of 20,000 cells took 51-54 s in a fresh
    process against 3 s in a warm one; with these caches 20 s (2 CPUs, load 4). What is left is pynndescent's
    ``nn_descent``, which numba cannot cache (it takes the distance function as an argument; its warning is silenced).
    The files go where numba keeps caches (beside the library, or NUMBA_CACHE_DIR); numba rebuilds them when a
    library's source changes.
    """
    import importlib
    import pkgutil

    import pynndescent
    from numba.core.caching import NullCache
    from numba.core.errors import NumbaWarning
    from numba.core.registry import CPUDispatcher

    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)
    names = [f"pynndescent.{m.name}" for m in pkgutil.iter_modules(pynndescent.__path__)] + ["umap.umap_", "umap.utils"]
    for name in names:
        module = importlib.import_module(name)
        for f in vars(module).values():
            if isinstance(f, CPUDispatcher) and f.__module__ == name and isinstance(f._cache, NullCache):
                f.enable_caching()


def knn(X_pca_NP: np.ndarray, n_neighbours: int, seed: int = 0, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Each cell's ``n_neighbours`` nearest cells in ``X_pca``, itself first, as scanpy's ``pp.neighbors`` finds
    them: (indices [N, K] int32, euclidean distances [N, K] float32), K = ``n_neighbours``, by distance.

    Below :data:`EXACT_BELOW` cells exact (scikit-learn, brute force); from there pynndescent with the settings scanpy
    and UMAP pick (k + 1 neighbours searched, ``n_trees`` and ``n_iters`` by the number of cells). Its index is
    dropped once the graph is read: no search index is compressed (scanpy's transformer does), and the index's
    memory (random-projection forest, heaps) is freed before the graph's. Exact kNN in chunks (torch or
    scikit-learn, brute force) was measured too slow above that: 59 s for 100,000 cells on 2 cores (pynndescent: 17
    s), 750 s projected for 400,000; scikit-learn's KD and ball trees 300-330 s for 100,000 cells in 30 PCs.
    """
    N = len(X_pca_NP)
    if N <= n_neighbours:
        raise NeighbourhoodError(
            f"{where}: {N} cells, fewer than n_neighbours + 1 = {n_neighbours + 1}; lower the number of neighbours "
            "(--neighbours K) or skip the neighbourhood (--neighbours 0)"
        )
    X = np.ascontiguousarray(X_pca_NP, dtype=np.float32)
    cache_numba_kernels()
    if N < EXACT_BELOW:
        from sklearn.neighbors import NearestNeighbors

        d_NK, i_NK = NearestNeighbors(n_neighbors=n_neighbours, algorithm="brute").fit(X).kneighbors(X)
    else:
        from pynndescent import NNDescent

        index = NNDescent(X, n_neighbors=n_neighbours + 1, metric="euclidean", random_state=seed, n_jobs=-1,
                          n_trees=min(64, 5 + round(N**0.5 / 20.0)), n_iters=max(5, round(np.log2(N))))
        i_NK, d_NK = index.neighbor_graph
        del index
    return _self_first(i_NK.astype(np.int32, copy=False), d_NK.astype(np.float32, copy=False), n_neighbours)


def _self_first(i_NK: np.ndarray, d_NK: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row with the cell itself first (distance 0), then its other neighbours by distance, ``k`` in all: where
    a duplicate of the cell came first it moves behind it; where the search missed the cell it is prepended and the
    farthest neighbour dropped (scanpy's rule for a search without the self column)."""
    N = len(i_NK)
    bad = np.flatnonzero(i_NK[:, 0] != np.arange(N))
    if len(bad):
        i_b, d_b = i_NK[bad], d_NK[bad]
        is_self = i_b == bad[:, None]
        order = np.argsort(~is_self, axis=1, kind="stable")  # self first, the rest in their order
        i_b, d_b = np.take_along_axis(i_b, order, 1), np.take_along_axis(d_b, order, 1)
        missing = ~is_self.any(1)
        i_b[missing] = np.concatenate([bad[missing, None], i_b[missing, :-1]], 1)
        d_b[missing] = np.concatenate([np.zeros((missing.sum(), 1), d_b.dtype), d_b[missing, :-1]], 1)
        i_NK, d_NK = i_NK.copy(), d_NK.copy()
        i_NK[bad], d_NK[bad] = i_b, d_b
    d_NK = d_NK[:, :k].copy()
    d_NK[:, 0] = 0
    return np.ascontiguousarray(i_NK[:, :k]), d_NK


def distance_matrix(i_NK: np.ndarray, d_NK: np.ndarray) -> sp.csr_matrix:
    """scanpy's ``obsp['distances']``: each cell's neighbours but itself, [N, N] CSR."""
    N, K = i_NK.shape
    rows = np.repeat(np.arange(N, dtype=np.int32), K - 1)
    return sp.csr_matrix((d_NK[:, 1:].ravel(), (rows, i_NK[:, 1:].ravel())), shape=(N, N))


def connectivities(i_NK: np.ndarray, d_NK: np.ndarray) -> sp.csr_matrix:
    """scanpy's ``obsp['connectivities']``: UMAP's fuzzy union over the kNN graph (``umap.fuzzy_simplicial_set``,
    as scanpy calls it), [N, N] CSR."""
    from umap.umap_ import fuzzy_simplicial_set

    cache_numba_kernels()
    N, K = i_NK.shape
    conn, _, _ = fuzzy_simplicial_set(sp.coo_matrix((N, 1)), K, None, None, knn_indices=i_NK, knn_dists=d_NK,
                                      set_op_mix_ratio=1.0, local_connectivity=1.0)
    return sp.csr_matrix(conn)


def knn_graph(
    X_pca_NP: np.ndarray, n_neighbours: int, seed: int = 0, where: str = ""
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """scanpy's kNN graph on ``X_pca``: (distances, connectivities), both [N, N] CSR."""
    i_NK, d_NK = knn(X_pca_NP, n_neighbours, seed, where)
    return distance_matrix(i_NK, d_NK), connectivities(i_NK, d_NK)


def attach_cells_without_counts(nb: Neighbourhood, has_n: np.ndarray, N: int, n_neighbours: int) -> Neighbourhood:
    """The neighbourhood of ``has_n`` (the n cells with counts, sorted indices into all N cells) lifted onto all N.

    A cell without counts stays out of the moments (they are zero for it, and it is no one's neighbour), as conversion
    leaves it out; in the written graph it points at the ``n_neighbours`` cells nearest to where zero expression
    projects, so that every row of ``distances`` has neighbours (scVelo's velocity_graph requires it).
    """
    from sklearn.neighbors import NearestNeighbors

    has_N, n = has_n, len(has_n)
    lift = sp.csr_matrix((np.ones(n, np.float32), (has_N, np.arange(n))), shape=(N, n))
    nb.Ms, nb.Mu = (sp.csr_matrix(lift @ m) if sp.issparse(m) else lift @ m for m in (nb.Ms, nb.Mu))
    dist, conn = (sp.csr_matrix(lift @ g @ lift.T) for g in (nb.distances, nb.connectivities))
    X = np.zeros((N, nb.X_pca.shape[1]), np.float32)
    X[has_N] = nb.X_pca
    empty = np.setdiff1d(np.arange(N), has_N)
    if len(empty):
        X[empty] = nb.origin
        k = min(n_neighbours, n)
        d_k, j_k = NearestNeighbors(n_neighbors=k).fit(nb.X_pca).kneighbors(nb.origin[None, :])
        rows = np.repeat(empty, k)
        cols = np.tile(has_N[j_k[0]], len(empty))
        d = np.tile(np.maximum(d_k[0], np.float32(1e-12)), len(empty))
        dist = dist + sp.csr_matrix((d, (rows, cols)), shape=(N, N))
        conn = conn + sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N, N))
    nb.X_pca, nb.distances, nb.connectivities = X, sp.csr_matrix(dist), sp.csr_matrix(conn)
    nb.operator = sp.csr_matrix(lift @ nb.operator @ lift.T)
    return nb


def moments_operator(connectivities_NN: sp.spmatrix) -> sp.csr_matrix:
    """scVelo's moments operator: connectivities > 0, self included, each row divided by its count (float32 CSR)."""
    C = sp.csr_matrix(connectivities_NN, dtype=np.float64)
    C = sp.csr_matrix((C > 0).astype(np.float64))
    C.setdiag(1.0)
    C = sp.csr_matrix(sp.diags(1.0 / np.asarray(C.sum(1)).ravel()) @ C)
    C = sp.csr_matrix(C, dtype=np.float32)
    # sorted column indices, as scVelo's operator has: the float32 products then sum in the same order and the
    # moments equal scVelo's bit for bit (unsorted, ~1 ulp apart, which can move a cell across the extreme-quantile
    # boundary of the steady-state fit and change that gene's gamma by ~1e-3)
    C.sort_indices()
    return C


def operator_from_knn(i_NK: np.ndarray, d_NK: np.ndarray) -> sp.csr_matrix:
    """:func:`moments_operator` of :func:`connectivities` (equal to it, bit for bit), without the connectivities.

    The operator needs only where the connectivities are > 0: an edge i -> j of the kNN graph (not to itself) whose
    UMAP membership is > 0, or its reverse (the fuzzy union a + b - ab is > 0 where a or b is). The memberships
    are UMAP's own (``smooth_knn_dist``, ``compute_membership_strengths``; one can underflow to 0 where a cell's
    nearest neighbours are much closer than the rest). So conversion holds a k-per-row pattern and the operator, not
    the connectivities' float matrices and their transposes.
    """
    from umap.umap_ import compute_membership_strengths, smooth_knn_dist

    cache_numba_kernels()
    N, K = i_NK.shape
    sigmas, rhos = smooth_knn_dist(d_NK, float(K), local_connectivity=1.0)
    rows, cols, vals, _ = compute_membership_strengths(i_NK, d_NK, sigmas, rhos)
    del rows
    keep_NK = (vals > 0).reshape(N, K)  # a cell's membership to itself (and to a missing neighbour, -1) is 0
    del vals
    indptr = np.zeros(N + 1, np.int64)
    np.cumsum(keep_NK.sum(1), out=indptr[1:])
    edges = sp.csr_matrix((np.ones(int(indptr[-1]), bool), cols[keep_NK.ravel()], indptr), shape=(N, N))
    del cols, keep_NK
    pattern = edges + edges.T.tocsr() + sp.identity(N, dtype=bool, format="csr")  # [N, N] bool, symmetric
    del edges
    pattern.sort_indices()
    count = np.diff(pattern.indptr)
    data = np.repeat((1.0 / count).astype(np.float32), count)  # as moments_operator: float64 1/count, as float32
    return sp.csr_matrix((data, pattern.indices.astype(np.int32, copy=False), pattern.indptr), shape=(N, N))


def moments(operator_NN: sp.csr_matrix, x_NG: sp.spmatrix | np.ndarray, dense: bool = True):
    """``operator @ x`` (scVelo's layers['Ms'] for x = normalised spliced): dense float32 [N, G], or CSR."""
    x = sp.csr_matrix(x_NG, dtype=np.float32) if sp.issparse(x_NG) else np.asarray(x_NG, np.float32)
    out = operator_NN @ x
    if not dense:
        return sp.csr_matrix(out, dtype=np.float32)
    return np.asarray(out.toarray() if sp.issparse(out) else out, np.float32)


def moments_of_cells(operator_NN: sp.csr_matrix, counts: CountRows, cells: np.ndarray
                     ) -> tuple[sp.csr_matrix, sp.csr_matrix, int]:
    """(Ms, Mu) [len(cells), G] of ``cells`` (sorted), reading only their neighbours' rows of ``counts`` (bounded
    memory when it is on disk), and how many rows that read; equal to those rows of :func:`moments`."""
    op = sp.csr_matrix(operator_NN[cells])
    needed = np.unique(op.indices)
    op = sp.csr_matrix((op.data, np.searchsorted(needed, op.indices), op.indptr), shape=(len(cells), len(needed)))
    s_n, u_n = counts.take(needed)
    return _block_product(op, s_n), _block_product(op, u_n), len(needed)


DENSE_ROWS_MAX = 2**24  # entries (64 MiB of float32): a block's neighbour rows up to this size are densified


def _block_product(op_BM: sp.csr_matrix, x_MG: sp.csr_matrix) -> sp.csr_matrix:
    """``op @ x`` as float32 CSR, equal to :func:`moments` (``dense=False``): the same float32 sums in the same order
    (the operator's row order), through a dense ``x`` where it is small enough, which halved the moments' time of a
    conversion (the moments of a block are ~90% nonzero: 5.6 s against 10 s per 100,000 cells and modality); without
    the zeros a sparse ``x`` stores explicitly."""
    if x_MG.shape[0] * x_MG.shape[1] > DENSE_ROWS_MAX:
        return moments(op_BM, x_MG, dense=False)
    return sp.csr_matrix(op_BM @ sp.csr_matrix(x_MG, dtype=np.float32).toarray(), dtype=np.float32)


def second_order_moments(
    operator_NN: sp.csr_matrix, s_NG: sp.spmatrix, u_NG: sp.spmatrix
) -> tuple[np.ndarray, np.ndarray]:
    """(Mss, Mus): moments of s*s and u*s, as scVelo's ``second_order_moments`` (used by the stochastic teacher)."""
    s = sp.csr_matrix(s_NG, dtype=np.float32)
    u = sp.csr_matrix(u_NG, dtype=np.float32)
    return moments(operator_NN, s.multiply(s)), moments(operator_NN, s.multiply(u))


def neighbourhood(
    spliced_NG: sp.spmatrix, unspliced_NG: sp.spmatrix, cfg: NeighbourConfig, size_factor_N: np.ndarray | None = None,
    where: str = "", dense: bool = True,
) -> tuple[Neighbourhood, sp.csr_matrix, sp.csr_matrix]:
    """Normalise raw counts, build the graph and the first-order moments of one dataset.

    Returns the neighbourhood (moments dense, or CSR with ``dense=False``) and the normalised (spliced, unspliced)
    counts [N, G] (float32 CSR).
    """
    if not cfg.enabled:
        raise NeighbourhoodError(f"{where}: n_neighbours is 0 (no neighbourhood asked for)")
    s = sp.csr_matrix(spliced_NG)
    u = sp.csr_matrix(unspliced_NG)
    lib_s = np.asarray(s.sum(1), np.float64).ravel()
    lib_u = np.asarray(u.sum(1), np.float64).ravel()
    scale_2N = normalisation_scales(lib_s, lib_u, size_factor_N, cfg, where)
    s_n, u_n = scale_rows(s, scale_2N[0]), scale_rows(u, scale_2N[1])
    graph = build_graph(InMemoryCounts(s_n, u_n), cfg, where)
    op = graph.operator
    nb = Neighbourhood(X_pca=graph.X_pca, distances=graph.distances, connectivities=graph.connectivities, operator=op,
                       Ms=moments(op, s_n, dense), Mu=moments(op, u_n, dense), origin=graph.origin)
    return nb, s_n, u_n


def build_graph(counts: CountRows, cfg: NeighbourConfig, where: str = "", graph: bool = True) -> Neighbourhood:
    """PCA, kNN graph and moments operator of a dataset's normalised counts; the moments are left to the caller
    (:func:`moments`, or :func:`moments_of_cells` a block of cells at a time), so they are empty here. With
    ``graph=False`` only the operator is built (``distances``, ``connectivities`` are None): what conversion needs."""
    X_pca, origin = pca(counts, cfg.n_pcs, cfg.n_top_genes, where)
    i_NK, d_NK = knn(X_pca, cfg.n_neighbours, cfg.seed, where)
    distances = connectivities_NN = None
    if graph:
        distances, connectivities_NN = distance_matrix(i_NK, d_NK), connectivities(i_NK, d_NK)
        operator = moments_operator(connectivities_NN)
    else:
        operator = operator_from_knn(i_NK, d_NK)
    del i_NK, d_NK
    empty = sp.csr_matrix((counts.n_cells, counts.n_genes), dtype=np.float32)
    return Neighbourhood(X_pca=X_pca, distances=distances, connectivities=connectivities_NN,
                         operator=operator, Ms=empty, Mu=empty, origin=origin)
