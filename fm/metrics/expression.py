"""Imputation metrics: hold out entries, predict them, compare (the scVI / scScope protocol).

Protocol (Lopez et al., scVI, Nat. Methods 2018; Deng et al., scScope, Nat. Methods 2019): choose a fraction (10 %)
of the nonzero entries of the count matrix uniformly at random, set them to zero in the model's input, and report the
median absolute error |x_hat - x| over those held-out entries. The gene-mean baseline predicts each held-out entry by
the mean of its gene over the entries that were not held out.

Shapes: N cells, G genes.

    python -c "import numpy as np; from fm.metrics.expression import *; x=np.random.poisson(2,(100,20)).astype(float); \
xm,m=hold_out_entries(x,0.1,0); print(imputation_error(gene_mean_imputation(xm,m),x,m))"
"""

from __future__ import annotations

import numpy as np


def hold_out_entries(x_NG: np.ndarray, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Zero a random ``fraction`` of the nonzero entries.

    Returns:
        (x_masked_NG, held_out_NG): the corrupted copy and the bool mask of held-out entries.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"hold_out_entries: fraction must be in (0, 1), got {fraction}")
    x = np.asarray(x_NG, dtype=np.float64)
    rows, cols = np.nonzero(x)
    if rows.size == 0:
        raise ValueError("hold_out_entries: the matrix has no nonzero entry")
    rng = np.random.default_rng(seed)
    n = max(1, int(round(fraction * rows.size)))
    pick = rng.choice(rows.size, size=n, replace=False)
    held = np.zeros(x.shape, dtype=bool)
    held[rows[pick], cols[pick]] = True
    return np.where(held, 0.0, x), held


def imputation_error(pred_NG: np.ndarray, true_NG: np.ndarray, held_out_NG: np.ndarray) -> float:
    """Median |pred - true| over the held-out entries (scVI's imputation score; lower is better)."""
    held = np.asarray(held_out_NG, dtype=bool)
    pred, true = np.asarray(pred_NG, dtype=np.float64), np.asarray(true_NG, dtype=np.float64)
    if not pred.shape == true.shape == held.shape:
        raise ValueError(f"imputation_error: shapes differ, {pred.shape}, {true.shape}, {held.shape}")
    if not held.any():
        raise ValueError("imputation_error: no held-out entry")
    return float(np.median(np.abs(pred[held] - true[held])))


def gene_mean_imputation(x_masked_NG: np.ndarray, held_out_NG: np.ndarray) -> np.ndarray:
    """Baseline: every entry predicted by its gene's mean over the entries that were not held out. Returns [N, G]."""
    x = np.asarray(x_masked_NG, dtype=np.float64)
    seen = ~np.asarray(held_out_NG, dtype=bool)
    mean_G = (x * seen).sum(0) / np.maximum(seen.sum(0), 1)
    return np.broadcast_to(mean_G, x.shape).copy()
