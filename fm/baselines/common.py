"""Helpers the baselines share: dense per-gene matrices from token batches, and the MLP block scvi-tools uses.

Batches list each cell's nonzero genes as tokens (``fm.keys``); the baselines model a fixed gene set (the vocabulary,
V genes), so they scatter the tokens into a dense [B, V] matrix. Genes a cell does not list are zero.

    .venv/bin/python -c "import torch; from fm.baselines.common import densify; \
print(densify(torch.tensor([[2, 0]]), torch.tensor([[True, False]]), torch.tensor([[5., 0.]]), 4))"

Legend: B cells, G gene tokens per cell (padded), V genes of the vocabulary.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from torch import Tensor, nn

from fm import keys

MODALITY_KEYS = {  # modality -> (count key, log1p key)
    "spliced": (keys.B_SPLICED_COUNTS, keys.B_SPLICED),
    "unspliced": (keys.B_UNSPLICED_COUNTS, keys.B_UNSPLICED),
}


def densify(gene_ids_BG: Tensor, mask_BG: Tensor, values_BG: Tensor, n_genes: int) -> Tensor:
    """Scatter token values into a dense [B, V] matrix (zeros where a cell has no token)."""
    if gene_ids_BG.shape != values_BG.shape or mask_BG.shape != values_BG.shape:
        raise ValueError(
            f"densify: gene ids {tuple(gene_ids_BG.shape)}, mask {tuple(mask_BG.shape)} and values "
            f"{tuple(values_BG.shape)} must have the same shape [B, G]"
        )
    ids = gene_ids_BG.masked_fill(~mask_BG, 0)
    if mask_BG.any() and int(ids[mask_BG].max()) >= n_genes:
        raise ValueError(f"densify: gene index {int(ids[mask_BG].max())} is outside the {n_genes} modelled genes")
    out_BV = values_BG.new_zeros(values_BG.shape[0], n_genes)
    return out_BV.scatter_add_(1, ids, values_BG.masked_fill(~mask_BG, 0))


def dense_counts(batch: dict, modality: str, n_genes: int) -> Tensor:
    """Raw counts [B, V] of ``spliced``, ``unspliced`` or ``total`` (spliced + unspliced)."""
    ids, mask = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK]
    if modality == "total":
        values = batch[keys.B_SPLICED_COUNTS] + batch[keys.B_UNSPLICED_COUNTS]
    elif modality in MODALITY_KEYS:
        values = batch[MODALITY_KEYS[modality][0]]
    else:
        raise ValueError(f"modality: expected spliced, unspliced or total, got {modality!r}")
    return densify(ids, mask, values.float(), n_genes)


def mlp_block(n_in: int, n_out: int, dropout: float, batch_norm: bool = True) -> nn.Sequential:
    """Linear -> BatchNorm (momentum 0.01, eps 1e-3, as scvi-tools' FCLayers) -> ReLU -> Dropout."""
    layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(n_out, momentum=0.01, eps=0.001))
    layers.append(nn.ReLU())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def imputed_layer(modality: str) -> str:
    """The layer fm predict writes a baseline's imputed ``spliced``, ``unspliced`` or ``total`` expression to."""
    return keys.LAYER_IMPUTED_TOTAL if modality == "total" else keys.LAYER_IMPUTED[modality]


def check_positive(config, *names: str) -> None:
    """Raise a ValueError naming the first listed field of ``config`` that is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{type(config).__name__}.{name}: must be > 0, got {value!r}")


def batch_from_dense(
    spliced_BV: np.ndarray,
    unspliced_BV: np.ndarray,
    velocity_BV: np.ndarray | None = None,
    dataset_id: str = "dense",
    target_sum: float = 1e4,
) -> dict:
    """A model batch (fm.keys) from dense count matrices, through the project's tokenizer; every nonzero gene kept.

    For tests and benchmarks that start from an AnnData rather than a corpus. Gene j of the matrices is vocabulary
    index j.
    """
    from fm.data.tokenize import CellBlock, TokenizerConfig, tokenize_block

    s = sp.csr_matrix(spliced_BV, dtype=np.float32)
    u = sp.csr_matrix(unspliced_BV, dtype=np.float32)
    stored = (s + u).tocsr()
    stored.data[:] = 1.0
    stored.eliminate_zeros()
    stored.sort_indices()
    rows = np.repeat(np.arange(stored.shape[0]), np.diff(stored.indptr))
    cols = stored.indices
    vel = np.full(len(cols), np.nan, np.float32) if velocity_BV is None else np.asarray(velocity_BV)[rows, cols]
    B = stored.shape[0]
    block = CellBlock(
        offsets_B1=stored.indptr.astype(np.int64),
        gene_index_N=cols.astype(np.int32),
        spliced_N=np.asarray(s[rows, cols]).ravel().astype(np.float32),
        unspliced_N=np.asarray(u[rows, cols]).ravel().astype(np.float32),
        velocity_N=vel.astype(np.float32),
        velocity_u_N=np.full(len(cols), np.nan, np.float32),
        library_size_spliced_B=np.asarray(s.sum(1)).ravel().astype(np.float32),
        library_size_unspliced_B=np.asarray(u.sum(1)).ravel().astype(np.float32),
        size_factor_B=np.full(B, np.nan, np.float32),
        time_B=np.full(B, np.nan, np.float32),
        cell_id=[str(i) for i in range(B)],
        dataset_id=[dataset_id] * B,
        cell_type=[None] * B,
    )
    max_genes = max(1, int(np.diff(stored.indptr).max(initial=1)))
    cfg = TokenizerConfig(max_genes=max_genes, target_sum=target_sum)
    return tokenize_block(block, cfg, np.random.default_rng(0))
