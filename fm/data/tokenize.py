"""Cells to a model batch (DESIGN §4): gene choice, normalisation, log1p, padding and masks.

Per cell the same genes are chosen for both modalities: all stored (nonzero) genes when there are at most
``max_genes``, else ``max_genes`` of them by ``gene_sampling`` (``random``: uniform without replacement from a
seeded generator; ``top_expressed``: the largest spliced + unspliced counts). Chosen genes keep the corpus order
(ascending vocabulary index). Values are then normalised per modality and log1p'd:

* ``total`` (default): ``counts / library_size * target_sum``, with each modality's own library size from the
  corpus columns (the sum over *all* stored genes, not only the chosen ones); a zero library gives zeros.
* ``size_factor``: ``counts / size_factor`` (the corpus column ``size_factor``, the same factor for both
  modalities); a cell without a positive finite size factor is an error naming the cell.
* ``none``: raw counts.

Binning, if any, is the model's job: the batch carries floats. Velocity targets are always present in the batch
(NaN where the corpus has none, and at padding), so every batch has the same keys.

    python -c "from fm.data.tokenize import TokenizerConfig; print(TokenizerConfig(max_genes=512))"

Legend: B cells, G gene tokens per modality (padded), N stored genes of all cells of a block (CSR).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from fm import keys

GENE_SAMPLINGS = ("random", "top_expressed")
NORMALIZATIONS = ("total", "size_factor", "none")


@dataclass
class TokenizerConfig:
    """How a cell becomes tokens."""

    max_genes: int = 1024  # most gene tokens per cell and modality
    gene_sampling: str = "random"  # rule when a cell has more than max_genes stored genes: random | top_expressed
    normalization: str = "total"  # total | size_factor | none (then log1p)
    target_sum: float = 1e4  # library size after `total` normalisation

    def __post_init__(self):
        if not isinstance(self.max_genes, int) or self.max_genes < 1:
            raise ValueError(f"TokenizerConfig.max_genes must be an int >= 1, got {self.max_genes!r}")
        if self.gene_sampling not in GENE_SAMPLINGS:
            raise ValueError(
                f"TokenizerConfig.gene_sampling must be one of {GENE_SAMPLINGS}, got {self.gene_sampling!r}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"TokenizerConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if not (isinstance(self.target_sum, (int, float)) and math.isfinite(self.target_sum) and self.target_sum > 0):
            raise ValueError(f"TokenizerConfig.target_sum must be a positive finite number, got {self.target_sum!r}")


@dataclass
class CellBlock:
    """B cells in CSR layout: cell b's stored genes are ``[offsets_B1[b], offsets_B1[b + 1])``."""

    offsets_B1: np.ndarray  # int64 [B+1]
    gene_index_N: np.ndarray  # int32 [N], sorted within each cell
    spliced_N: np.ndarray  # float32 [N] counts
    unspliced_N: np.ndarray  # float32 [N] counts
    velocity_N: np.ndarray  # float32 [N], NaN where unknown
    velocity_u_N: np.ndarray  # float32 [N], NaN where unknown
    library_size_spliced_B: np.ndarray  # float32 [B]
    library_size_unspliced_B: np.ndarray  # float32 [B]
    size_factor_B: np.ndarray  # float32 [B], NaN where unknown
    time_B: np.ndarray  # float32 [B], NaN where unknown
    cell_id: list[str]
    dataset_id: list[str]
    cell_type: list[str | None]

    def __len__(self) -> int:
        return len(self.offsets_B1) - 1


_N_FIELDS = ("gene_index_N", "spliced_N", "unspliced_N", "velocity_N", "velocity_u_N")


def _choose_columns(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator):
    """Source positions [B, G] into the block's N arrays and the mask [B, G] of real tokens."""
    lens_B = np.diff(block.offsets_B1)
    starts_B = block.offsets_B1[:-1]
    G = max(1, int(min(lens_B.max(initial=0), cfg.max_genes)))
    local_BG = np.broadcast_to(np.arange(G, dtype=np.int64), (len(lens_B), G)).copy()
    long_b = np.flatnonzero(lens_B > cfg.max_genes)
    if len(long_b):  # sample max_genes of the long cells' genes, vectorised over those cells
        L = int(lens_B[long_b].max())
        pos_bL = np.arange(L)[None, :]
        valid_bL = pos_bL < lens_B[long_b, None]
        src_bL = np.where(valid_bL, starts_B[long_b, None] + pos_bL, 0)
        if cfg.gene_sampling == "random":
            key_bL = rng.random(src_bL.shape)
        else:  # top_expressed: largest s + u first
            key_bL = -(block.spliced_N[src_bL] + block.unspliced_N[src_bL]).astype(np.float64)
        key_bL[~valid_bL] = np.inf
        pick = np.argpartition(key_bL, cfg.max_genes - 1, axis=1)[:, : cfg.max_genes]
        local_BG[long_b] = np.sort(pick, axis=1)
    mask_BG = local_BG < lens_B[:, None]
    src_BG = np.where(mask_BG, starts_B[:, None] + local_BG, 0)
    return src_BG, mask_BG


def _scales(block: CellBlock, cfg: TokenizerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell multipliers [B] for spliced and unspliced counts."""
    B = len(block)
    if cfg.normalization == "none":
        one = np.ones(B, np.float32)
        return one, one
    if cfg.normalization == "size_factor":
        sf = block.size_factor_B.astype(np.float64)
        bad = ~(np.isfinite(sf) & (sf > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"normalization='size_factor' but cell {block.cell_id[i]!r} of dataset {block.dataset_id[i]!r} has "
                f"{keys.SIZE_FACTOR}={block.size_factor_B[i]!r} (needs a positive number in the corpus column)"
            )
        s = (1.0 / sf).astype(np.float32)
        return s, s
    out = []
    for lib in (block.library_size_spliced_B, block.library_size_unspliced_B):
        lib = lib.astype(np.float64)
        out.append(np.where(lib > 0, cfg.target_sum / np.where(lib > 0, lib, 1.0), 0.0).astype(np.float32))
    return out[0], out[1]


def tokenize_block(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> dict:
    """Turn a CellBlock into the batch dict (keys from fm.keys; see the module docstring)."""
    src_BG, mask_BG = _choose_columns(block, cfg, rng)
    if len(block.gene_index_N) == 0:  # every cell empty: index a one-element stand-in (all masked anyway)
        block = dataclasses.replace(
            block, **{f: np.zeros(1, getattr(block, f).dtype) for f in _N_FIELDS}
        )
    scale_s, scale_u = _scales(block, cfg)
    s_BG = np.where(mask_BG, block.spliced_N[src_BG], 0).astype(np.float32)
    u_BG = np.where(mask_BG, block.unspliced_N[src_BG], 0).astype(np.float32)
    nan = np.float32(np.nan)
    t = torch.from_numpy
    return {
        keys.B_GENE_IDS: t(np.where(mask_BG, block.gene_index_N[src_BG], 0).astype(np.int64)),
        keys.B_GENE_MASK: t(mask_BG),
        keys.B_SPLICED: t(np.log1p(s_BG * scale_s[:, None])),
        keys.B_UNSPLICED: t(np.log1p(u_BG * scale_u[:, None])),
        keys.B_SPLICED_COUNTS: t(s_BG),
        keys.B_UNSPLICED_COUNTS: t(u_BG),
        keys.B_LIBRARY_SIZE_SPLICED: t(block.library_size_spliced_B.astype(np.float32)),
        keys.B_LIBRARY_SIZE_UNSPLICED: t(block.library_size_unspliced_B.astype(np.float32)),
        keys.B_VELOCITY: t(np.where(mask_BG, block.velocity_N[src_BG], nan).astype(np.float32)),
        keys.B_VELOCITY_U: t(np.where(mask_BG, block.velocity_u_N[src_BG], nan).astype(np.float32)),
        keys.B_TIME: t(block.time_B.astype(np.float32)),
        keys.B_CELL_TYPE: list(block.cell_type),
        keys.B_CELL_ID: list(block.cell_id),
        keys.B_DATASET_ID: list(block.dataset_id),
    }
