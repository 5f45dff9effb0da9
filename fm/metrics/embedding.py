"""Embedding metrics against cell types: ARI and NMI of a k-means clustering, and the cell-type silhouette.

The scores are scikit-learn's (the implementations scIB and the scVI papers report):
- ARI (Hubert & Arabie 1985) and NMI with arithmetic-mean normalisation, of k-means clusters (k = number of cell
  types, k-means++ initialisation, best of ``n_init`` runs) against the cell types;
- silhouette (Rousseeuw 1987) of the cell types in the embedding, Euclidean, in [-1, 1] (scIB reports the rescaled
  (s + 1) / 2; we report s).

Shapes: N cells, E embedding dims.

    python -c "import numpy as np; from fm.metrics.embedding import embedding_scores as f; \
x=np.r_[np.zeros((20,2)),np.ones((20,2))*5]+np.random.rand(40,2); print(f(x,['a']*20+['b']*20))"
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from sklearn import cluster, metrics


def adjusted_rand_index(labels_true: Sequence[Hashable], labels_pred: Sequence[Hashable]) -> float:
    """Adjusted Rand index; 1 for identical partitions (up to renaming), about 0 for random ones."""
    return float(metrics.adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


def normalized_mutual_info(labels_true: Sequence[Hashable], labels_pred: Sequence[Hashable]) -> float:
    """NMI with arithmetic-mean normalisation; 1 for identical partitions, 0 for independent ones."""
    return float(metrics.normalized_mutual_info_score(np.asarray(labels_true), np.asarray(labels_pred)))


def silhouette_score(x_NE: np.ndarray, labels: Sequence[Hashable]) -> float:
    """Mean silhouette coefficient of ``labels`` in ``x_NE`` (Euclidean)."""
    labels = np.asarray(labels)
    n_labels, n_cells = len(np.unique(labels)), len(labels)
    if not 2 <= n_labels < n_cells:
        raise ValueError(f"silhouette_score needs 2 <= #labels < #cells, got {n_labels} labels, {n_cells} cells")
    return float(metrics.silhouette_score(np.asarray(x_NE, dtype=np.float64), labels))


def kmeans(x_NE: np.ndarray, k: int, seed: int = 0, n_init: int = 5) -> np.ndarray:
    """k-means labels [N] (k-means++ initialisation, the best of ``n_init`` runs by inertia)."""
    x = np.asarray(x_NE, dtype=np.float64)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: k={k} out of range for {x.shape[0]} cells")
    return cluster.KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)


def embedding_scores(x_NE: np.ndarray, cell_types: Sequence[Hashable], seed: int = 0) -> dict[str, float]:
    """ARI and NMI of a k-means clustering (k = number of cell types) and the cell-type silhouette."""
    clusters = kmeans(x_NE, len(np.unique(np.asarray(cell_types))), seed=seed)
    return {
        "ari": adjusted_rand_index(cell_types, clusters),
        "nmi": normalized_mutual_info(cell_types, clusters),
        "silhouette": silhouette_score(x_NE, cell_types),
    }
