"""Velocity projected onto a 2-D embedding as scVelo does it, in the velocity's own units (used by fm plot and
fm evaluate's CBDir, so that the arrows one sees and the score one reads come from the same projection).

The displacements the velocity is compared with are kNN means (kNN in a PCA of log1p normalised spliced) of
spliced counts in the velocity's own units (:class:`ExpressionSpace`): the release's tokenizer settings recorded by
`fm predict` in ``uns['fm']`` (log1p normalised), else scVelo's ``Ms`` (total-count normalised). The units matter:
the simulator's truth is in amounts, and as its total counts rise with time, total-count normalisation turns its
arrows around. Then fm.metrics.velocity's ``velocity_graph`` -> ``transition_matrix`` -> ``embed_velocity``.

Shapes: N cells, G genes, K neighbours, P principal components, E embedding dims.

    python -c "from data_prep.simulate import simulate; from fm.metrics.projection import *; a = simulate(300, 50); \
a.layers['velocity'] = a.layers['velocity_true']; a.obs['size_factor'] = a.obs['library_size']; \
print(project_onto_embedding(a, a.obsm['X_sim'], space=ExpressionSpace('size_factor'))[:3])"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from fm import keys

log = logging.getLogger(__name__)

NORMALIZATIONS = ("total", "size_factor", "none")  # fm.data.tokenize's (not imported: it imports torch)
N_PCS = 30
BASIS_NAMES = {"X_umap": "UMAP", "X_tsne": "t-SNE", "X_pca": "PC", "X_sim": "simulated layout"}


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _pca(x_NF: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` principal component scores of ``x_NF`` (scikit-learn's PCA, seeded; its solver by shape, randomized
    for a large matrix; sign fixed: each component's largest loading positive)."""
    k = max(1, min(k, min(x_NF.shape) - 1))
    return PCA(n_components=k, random_state=0).fit_transform(x_NF)


def velocity_genes(adata, vkey: str = keys.LAYER_VELOCITY) -> np.ndarray:
    """Bool [G]: genes whose velocity is finite in every cell, and flagged in the ``var`` columns fm predict or
    scVelo write (``fm_in_vocab``: in the model's vocabulary; ``velocity_genes``: scVelo's selection) when present."""
    if vkey not in adata.layers:
        raise ValueError(f"no layers['{vkey}'] (layers: {sorted(adata.layers)}); run `fm predict` first")
    genes_G = np.isfinite(_dense(adata.layers[vkey])).all(0)
    for flag in (keys.VAR_FM_IN_VOCAB, keys.VAR_VELOCITY_GENES):
        if flag in adata.var:
            genes_G &= np.asarray(adata.var[flag], dtype=bool)
    if not genes_G.any():
        raise ValueError(f"layers['{vkey}'] has no gene with a finite velocity in every cell")
    log.info("velocity on %d of %d genes", genes_G.sum(), adata.n_vars)
    return genes_G


@dataclass(frozen=True)
class ExpressionSpace:
    """Where the displacements x_n - x_c the velocity is compared with are taken: the velocity's own units.

    x = kNN mean of f(spliced), f = per-cell scaling (``normalization``) then, optionally, log1p. scVelo's ``Ms``
    is ``total`` without log1p; `fm predict` velocities are in the units of the release's tokenizer (log1p).
    """

    normalization: str = "total"  # total | size_factor (obs['size_factor']) | none, as fm.data.tokenize
    log1p: bool = False  # log1p after the scaling
    target_sum: float | None = None  # library size after `total` (None: the median library size)

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"ExpressionSpace.normalization={self.normalization!r}: expected one of {NORMALIZATIONS}")
        if self.target_sum is not None and not self.target_sum > 0:
            raise ValueError(f"ExpressionSpace.target_sum={self.target_sum!r}: must be positive")

    @classmethod
    def from_adata(cls, adata) -> ExpressionSpace:
        """The tokenizer settings of the velocity model in ``uns['fm']`` (`fm predict`), else scVelo's ``Ms``."""
        models = (adata.uns.get(keys.UNS_FM) or {}).get("models") or {}
        recorded = [m for m in models.values() if m.get("head") == "velocity"] or list(models.values())
        tokenizer = recorded[0].get("tokenizer") if recorded else None
        if not tokenizer:
            return cls()
        return cls(normalization=str(tokenizer.get("normalization", "total")), log1p=True,
                   target_sum=float(tokenizer["target_sum"]) if tokenizer.get("target_sum") else None)

    def describe(self) -> str:
        scale = {"total": "total-count normalised", "size_factor": "size-factor normalised", "none": "raw"}
        return f"{'log1p ' if self.log1p else ''}{scale[self.normalization]} spliced"

    def transform(self, adata, s_NG: np.ndarray) -> np.ndarray:
        """f(spliced counts) [N, G]."""
        if self.normalization == "total":
            total_N1 = s_NG.sum(1, keepdims=True)
            target = self.target_sum or float(np.median(total_N1))
            s_NG = s_NG / np.maximum(total_N1, 1e-12) * target
        elif self.normalization == "size_factor":
            if keys.SIZE_FACTOR not in adata.obs:
                raise ValueError(f"normalization='size_factor' needs obs['{keys.SIZE_FACTOR}'] "
                                 f"(obs columns: {list(adata.obs.columns)})")
            sf_N = np.asarray(adata.obs[keys.SIZE_FACTOR], dtype=np.float64)
            if not (np.isfinite(sf_N) & (sf_N > 0)).all():
                raise ValueError(f"obs['{keys.SIZE_FACTOR}'] holds values that are not positive numbers")
            s_NG = s_NG / sf_N[:, None]
        return np.log1p(s_NG) if self.log1p else s_NG


def expression_space(adata, n_neighbors: int = 30, space: ExpressionSpace | None = None,
                     n_pcs: int = N_PCS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_NG, pcs_NP, neighbours_NK): the displacement space, the expression PCA and the kNN (self first).

    The kNN are found in the top ``n_pcs`` principal components of log1p spliced counts normalised to the median
    library size (as scVelo's ``pp.moments``); ``x`` is the mean over each cell's kNN of ``space``'s f(spliced).
    """
    from fm.metrics.velocity import knn_indices

    if keys.LAYER_SPLICED not in adata.layers:
        raise ValueError(f"no layers['{keys.LAYER_SPLICED}'] (layers: {sorted(adata.layers)}): spliced counts "
                         "are needed for the cells' neighbours")
    s_NG = _dense(adata.layers[keys.LAYER_SPLICED])
    total_N1 = s_NG.sum(1, keepdims=True)
    pcs_NP = _pca(np.log1p(s_NG / np.maximum(total_N1, 1) * np.median(total_N1)), n_pcs)
    neighbours_NK = knn_indices(pcs_NP, max(2, min(n_neighbors, adata.n_obs - 1)))
    x_NG = (space or ExpressionSpace()).transform(adata, s_NG)
    return x_NG[neighbours_NK].mean(1), pcs_NP, neighbours_NK


def embedding_2d(adata, basis: str | None = None, pcs_NP: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """(emb_N2, what it is): ``obsm[basis]`` (PCA to 2-D past two columns), else X_umap, else PCA of expression."""
    if basis is None:
        if "X_umap" in adata.obsm:
            basis = "X_umap"
        else:
            if pcs_NP is None:
                pcs_NP = expression_space(adata)[1]
            return pcs_NP[:, :2], "PCA of log1p normalised spliced"
    if basis not in adata.obsm:
        raise ValueError(f"no obsm['{basis}'] for --basis (obsm: {sorted(adata.obsm)})")
    emb = np.asarray(adata.obsm[basis], dtype=np.float64)
    if emb.ndim != 2 or emb.shape[1] < 2:
        raise ValueError(f"obsm['{basis}'] has shape {emb.shape}; an embedding needs at least 2 columns")
    if not np.isfinite(emb).all():
        raise ValueError(f"obsm['{basis}'] holds NaN or inf entries")
    if emb.shape[1] == 2:
        return emb, BASIS_NAMES.get(basis, basis)
    return _pca(emb, 2), f"PCA of {basis}"


def project_onto_embedding(adata, emb_NE: np.ndarray, *, vkey: str = keys.LAYER_VELOCITY, n_neighbors: int = 30,
                           space: ExpressionSpace | None = None, neighbourhood: tuple | None = None) -> np.ndarray:
    """Velocity projected onto ``emb_NE`` as scVelo does (module docstring). Returns [N, E].

    ``space``: the velocity's units (default :meth:`ExpressionSpace.from_adata`); ``neighbourhood``: a result of
    :func:`expression_space` to reuse.
    """
    from fm.metrics.velocity import embed_velocity, transition_matrix, velocity_graph

    genes_G = velocity_genes(adata, vkey)
    if neighbourhood is None:
        neighbourhood = expression_space(adata, n_neighbors, space or ExpressionSpace.from_adata(adata))
    ms_NG, _, neighbours_NK = neighbourhood
    v_NG = _dense(adata.layers[vkey])[:, genes_G]
    graph_NN = velocity_graph(ms_NG[:, genes_G], v_NG, neighbours_NK)
    return embed_velocity(emb_NE, transition_matrix(graph_NN))
