"""Cells to a model batch (DESIGN §4): gene choice, normalisation, log1p, padding and masks.

Per cell the same genes are chosen for both modalities, by ``gene_set``:

* ``cell`` (default): all of the cell's stored (nonzero) genes when there are at most ``max_genes``, else
  ``max_genes`` of them by ``gene_sampling`` (``random``: uniform without replacement from a seeded generator;
  ``top_expressed``: the largest spliced + unspliced counts).
* ``batch``: every cell of the batch gets the same genes, the union of the batch's stored genes (sampled down to
  ``max_genes`` by the same rule, over the batch's summed counts), with zero counts where a cell lacks a gene. For
  contrastive pretraining: with ``cell``, the set of gene ids alone tells the cells of a batch apart, the same set in
  both modalities, so spliced-unspliced retrieval is solved from gene identity without reading a value; with
  ``batch`` only the values differ between cells.

Chosen genes keep the corpus order (ascending vocabulary index). Values are then normalised per modality and log1p'd:

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

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from fm import keys

GENE_SETS = ("cell", "batch")
GENE_SAMPLINGS = ("random", "top_expressed")
NORMALIZATIONS = ("total", "size_factor", "none")


@dataclass
class TokenizerConfig:
    """How a cell becomes tokens."""

    max_genes: int = 1024  # most gene tokens per cell and modality
    gene_set: str = "cell"  # cell: each cell's own stored genes | batch: the batch's union, the same for every cell
    gene_sampling: str = "random"  # rule when a cell has more than max_genes stored genes: random | top_expressed
    normalization: str = "total"  # total | size_factor | none (then log1p)
    target_sum: float = 1e4  # library size after `total` normalisation

    def __post_init__(self):
        if not isinstance(self.max_genes, int) or self.max_genes < 1:
            raise ValueError(f"TokenizerConfig.max_genes must be an int >= 1, got {self.max_genes!r}")
        if self.gene_set not in GENE_SETS:
            raise ValueError(f"TokenizerConfig.gene_set must be one of {GENE_SETS}, got {self.gene_set!r}")
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
    velocity_N: np.ndarray | None  # float32 [N], NaN where unknown; None when no cell has it
    velocity_u_N: np.ndarray | None  # float32 [N], NaN where unknown; None when no cell has it
    library_size_spliced_B: np.ndarray  # float32 [B]
    library_size_unspliced_B: np.ndarray  # float32 [B]
    size_factor_B: np.ndarray  # float32 [B], NaN where unknown
    time_B: np.ndarray  # float32 [B], NaN where unknown
    cell_id: list[str]
    dataset_id: list[str]
    cell_type: list[str | None]

    def __len__(self) -> int:
        return len(self.offsets_B1) - 1


def _chosen_mask(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> np.ndarray | None:
    """bool [N]: the stored genes kept, or None when every gene is kept (no cell has more than max_genes)."""
    lens_B = np.diff(block.offsets_B1)
    long_b = np.flatnonzero(lens_B > cfg.max_genes)
    if not len(long_b):
        return None
    starts_B = block.offsets_B1[:-1]
    # sample max_genes of the long cells' genes, vectorised over those cells
    L = int(lens_B[long_b].max())
    pos_bL = np.arange(L)[None, :]
    valid_bL = pos_bL < lens_B[long_b, None]
    if cfg.gene_sampling == "random":
        key_bL = rng.random(valid_bL.shape)
    else:  # top_expressed: largest s + u first
        src_bL = np.where(valid_bL, starts_B[long_b, None] + pos_bL, 0)
        key_bL = -(block.spliced_N[src_bL] + block.unspliced_N[src_bL]).astype(np.float64)
    key_bL[~valid_bL] = np.inf
    keep_N = np.ones(int(block.offsets_B1[-1]), dtype=bool)
    # the max_genes smallest keys of a row; with distinct keys (random draws) a threshold finds that set, the same
    # as argpartition's and ~5x faster. Ties (top_expressed; a repeated draw) leave the choice to argpartition.
    if cfg.gene_sampling == "random":
        kth_b1 = np.partition(key_bL, cfg.max_genes - 1, axis=1)[:, cfg.max_genes - 1: cfg.max_genes]
        keep_bL = key_bL <= kth_b1
        if np.all(np.count_nonzero(keep_bL, axis=1) == cfg.max_genes):
            for i, b in enumerate(long_b.tolist()):
                keep_N[starts_B[b]: starts_B[b] + lens_B[b]] = keep_bL[i, : lens_B[b]]
            return keep_N
    pick_bK = np.argpartition(key_bL, cfg.max_genes - 1, axis=1)[:, : cfg.max_genes]
    for b in long_b.tolist():
        keep_N[starts_B[b]: starts_B[b] + lens_B[b]] = False
    keep_N[(starts_B[long_b, None] + pick_bK).ravel()] = True
    return keep_N


@dataclass
class _Layout:
    """Where each kept stored gene goes in the padded [B, G] batch."""

    lens_B: np.ndarray  # kept genes per cell
    G: int  # padded width
    real_BG: np.ndarray  # bool, the token mask
    take: Callable[[np.ndarray], np.ndarray]  # flat [N] array -> the kept entries, in order
    fill: Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # writes kept values [N'] into an out [B, G]
    panel_G: np.ndarray | None = None  # gene_set='batch': the gene ids shared by every cell


def _cell_layout(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> _Layout:
    """gene_set='cell': each cell's own (sampled) genes, left-aligned in its row."""
    keep_N = _chosen_mask(block, cfg, rng)
    lens_B = np.diff(block.offsets_B1)
    if keep_N is not None:
        lens_B = np.minimum(lens_B, cfg.max_genes)
    G = max(1, int(lens_B.max(initial=0)))
    bounds_B1 = np.concatenate([[0], np.cumsum(lens_B)]).tolist()

    def fill(out_BG: np.ndarray, values_N: np.ndarray | None) -> np.ndarray:
        if values_N is not None:
            for b in range(len(lens_B)):  # cells are contiguous in the flat arrays: a slice copy per cell is faster
                lo, hi = bounds_B1[b], bounds_B1[b + 1]  # than any fancy-index gather or scatter
                out_BG[b, : hi - lo] = values_N[lo:hi]
        return out_BG

    take = (lambda a: a) if keep_N is None else (lambda a: a[keep_N])
    return _Layout(lens_B, G, np.arange(G)[None, :] < lens_B[:, None], take, fill)


def _batch_layout(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> _Layout:
    """gene_set='batch': the batch's genes in every row, zero where a cell lacks one."""
    panel_G, col_N = _batch_panel(block, cfg, rng)
    lens_B = np.diff(block.offsets_B1)
    keep_N = col_N >= 0
    G = max(1, len(panel_G))
    dest_N = np.repeat(np.arange(len(lens_B), dtype=np.int64) * G, lens_B)[keep_N] + col_N[keep_N]
    kept_B = np.bincount(np.repeat(np.arange(len(lens_B)), lens_B)[keep_N], minlength=len(lens_B))

    def fill(out_BG: np.ndarray, values_N: np.ndarray | None) -> np.ndarray:
        if values_N is not None:
            out_BG.reshape(-1)[dest_N] = values_N
        return out_BG

    real_BG = np.zeros((len(lens_B), G), dtype=bool)
    real_BG[:, : len(panel_G)] = True
    return _Layout(kept_B, G, real_BG, lambda a: a[keep_N], fill, panel_G)


def _batch_panel(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """gene_set='batch': the batch's genes (sorted vocabulary indices [G]) and each stored gene's column (-1: out)."""
    genes_N = block.gene_index_N
    panel_G, union_N = np.unique(genes_N, return_inverse=True)
    if len(panel_G) > cfg.max_genes:
        if cfg.gene_sampling == "random":
            chosen = rng.choice(len(panel_G), cfg.max_genes, replace=False)
        else:  # top_expressed over the batch
            totals = np.bincount(union_N, weights=block.spliced_N + block.unspliced_N, minlength=len(panel_G))
            chosen = np.argpartition(-totals, cfg.max_genes - 1)[: cfg.max_genes]
        chosen.sort()
        column = np.full(len(panel_G), -1, np.int64)
        column[chosen] = np.arange(len(chosen))
        return panel_G[chosen], column[union_N]
    return panel_G, union_N.astype(np.int64)


def ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n), without a Python loop."""
    total = int(lens.sum())
    cum = np.cumsum(lens) - lens
    return np.repeat(starts.astype(np.int64) - cum, lens) + np.arange(total, dtype=np.int64)


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


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """An uninitialised array; inside a DataLoader worker, in shared memory from the start.

    A worker's batch tensors go to the trainer through shared memory; a tensor born there is sent as a handle, not
    copied, which roughly halves a worker's cost per batch. This is what torch's own default_collate does.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype).numpy()
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return elem.new(storage).resize_(shape).numpy()


Alloc = Callable[[tuple[int, ...], torch.dtype], np.ndarray]


def batch_nbytes(batch_size: int, cfg: TokenizerConfig, targets: tuple[str, ...]) -> int:
    """An upper bound on the bytes of the [B, G] arrays tokenize_block allocates for ``batch_size`` cells.

    G never exceeds ``cfg.max_genes``: per-gene float32 values (4 + the targets), int64 gene ids and the bool mask.
    """
    n_floats = 4 + sum(k in targets for k in (keys.B_VELOCITY, keys.B_VELOCITY_U))
    return batch_size * cfg.max_genes * (4 * n_floats + 8 + 1)


def _log1p(counts_N: np.ndarray, scale_N: np.ndarray) -> np.ndarray:
    """log(1 + counts * scale) in float32.

    numpy's float32 log1p is not vectorised (about 6x slower than log on this path); log(1 + x) differs from it by
    < 1e-7 relative for x >= 0.01 and stays exact at 0, and normalised counts of a stored gene are rarely below that.
    """
    x_N = counts_N * scale_N
    x_N += np.float32(1)
    return np.log(x_N, out=x_N)


def tokenize_block(
    block: CellBlock,
    cfg: TokenizerConfig,
    rng: np.random.Generator,
    targets: tuple[str, ...] = (keys.B_VELOCITY, keys.B_VELOCITY_U),
    *,
    alloc: Alloc | None = None,
) -> dict:
    """Turn a CellBlock into the batch dict (keys from fm.keys; see the module docstring).

    Works on the flat N arrays: choose genes, normalise and log1p the kept values, then copy each cell's run into its
    padded row. Decode cost follows the stored genes, not B x G. The float [B, G] arrays are views of one buffer
    (three allocations per batch: floats, gene ids, and the mask when ``alloc`` is given).

    Args:
        targets: the per-gene target keys (B_VELOCITY, B_VELOCITY_U) the batch carries, NaN where a cell has none;
            the stream passes the ones its corpus has, so a pretraining corpus sends no all-NaN arrays.
        alloc: where the [B, G] arrays are born (``alloc(shape, dtype) -> numpy array``); default: fresh memory,
            shared memory in a loader worker. The stream passes a slot of its worker's ring (fm.data.stream), which
            is also where the token mask then goes. At most ``batch_nbytes(B, cfg, targets)`` bytes are asked for.
    """
    lay = (_batch_layout if cfg.gene_set == "batch" else _cell_layout)(block, cfg, rng)
    B, G, take, fill = len(lay.lens_B), lay.G, lay.take, lay.fill
    per_gene = [keys.B_SPLICED, keys.B_UNSPLICED, keys.B_SPLICED_COUNTS, keys.B_UNSPLICED_COUNTS]
    per_gene += [k for k in (keys.B_VELOCITY, keys.B_VELOCITY_U) if k in targets]
    empty = alloc or _empty
    floats_KBG = empty((len(per_gene), B, G), torch.float32)
    floats_KBG[:] = 0

    scale_s_B, scale_u_B = _scales(block, cfg)
    s_N, u_N = take(block.spliced_N), take(block.unspliced_N)
    values = {
        keys.B_SPLICED: _log1p(s_N, np.repeat(scale_s_B, lay.lens_B)),
        keys.B_UNSPLICED: _log1p(u_N, np.repeat(scale_u_B, lay.lens_B)),
        keys.B_SPLICED_COUNTS: s_N,
        keys.B_UNSPLICED_COUNTS: u_N,
        keys.B_VELOCITY: None if block.velocity_N is None else take(block.velocity_N),
        keys.B_VELOCITY_U: None if block.velocity_u_N is None else take(block.velocity_u_N),
    }
    for k, out_BG in zip(per_gene, floats_KBG):
        if k in (keys.B_VELOCITY, keys.B_VELOCITY_U):
            out_BG[:] = np.nan  # unknown at padding and for cells without the target
        fill(out_BG, values[k])
    floats_KBG = torch.from_numpy(floats_KBG)
    ids_BG = empty((B, G), torch.int64)
    ids_BG[:] = 0
    if lay.panel_G is not None:
        ids_BG[:, : len(lay.panel_G)] = lay.panel_G
    else:
        fill(ids_BG, take(block.gene_index_N))
    real_BG = lay.real_BG
    if alloc is not None:
        real_BG = alloc((B, G), torch.bool)
        real_BG[:] = lay.real_BG
    return {
        keys.B_GENE_IDS: torch.from_numpy(ids_BG),
        keys.B_GENE_MASK: torch.from_numpy(real_BG),
        **{k: floats_KBG[i] for i, k in enumerate(per_gene)},
        keys.B_LIBRARY_SIZE_SPLICED: torch.from_numpy(block.library_size_spliced_B.astype(np.float32)),
        keys.B_LIBRARY_SIZE_UNSPLICED: torch.from_numpy(block.library_size_unspliced_B.astype(np.float32)),
        keys.B_TIME: torch.from_numpy(block.time_B.astype(np.float32)),
        keys.B_CELL_TYPE: list(block.cell_type),
        keys.B_CELL_ID: list(block.cell_id),
        keys.B_DATASET_ID: list(block.dataset_id),
    }
