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

Legend: B cells, G gene tokens per modality (padded), N stored genes of all cells of a block (CSR), K max_genes,
M modalities (spliced, unspliced).
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


class Segments:
    """A flat [N] array held as its B cells' pieces (views into wherever they lie), for a CellBlock.

    The stream's cells lie in the record batches of a shuffle window; copying them together, only for tokenize_block
    to copy them again into padded rows, costs a pass over the batch's memory. tokenize_block copies the pieces
    straight into the rows; whatever needs the flat array gets it from ``np.asarray`` (concatenated once, kept).
    """

    def __init__(self, pieces: list[np.ndarray], dtype):
        self.pieces, self.dtype, self._flat = pieces, np.dtype(dtype), None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._flat is None:
            self._flat = np.concatenate(self.pieces or [np.zeros(0, self.dtype)]).astype(self.dtype, copy=False)
        out = self._flat if dtype is None else self._flat.astype(dtype, copy=False)
        return out.copy() if copy else out

    def __len__(self) -> int:
        return sum(len(p) for p in self.pieces)


@dataclass
class CellBlock:
    """B cells in CSR layout: cell b's stored genes are ``[offsets_B1[b], offsets_B1[b + 1])``.

    The flat [N] arrays are numpy arrays or Segments (``np.asarray`` gives the array either way).
    """

    offsets_B1: np.ndarray  # int64 [B+1]
    gene_index_N: np.ndarray | Segments  # int32 [N], sorted within each cell
    spliced_N: np.ndarray | Segments  # float32 [N] counts
    unspliced_N: np.ndarray | Segments  # float32 [N] counts
    velocity_N: np.ndarray | Segments | None  # float32 [N], NaN where unknown; None when no cell has it
    velocity_u_N: np.ndarray | Segments | None  # float32 [N], NaN where unknown; None when no cell has it
    library_size_spliced_B: np.ndarray  # float32 [B]
    library_size_unspliced_B: np.ndarray  # float32 [B]
    size_factor_B: np.ndarray  # float32 [B], NaN where unknown
    time_B: np.ndarray  # float32 [B], NaN where unknown
    cell_id: list[str]
    dataset_id: list[str]
    cell_type: list[str | None]

    def __len__(self) -> int:
        return len(self.offsets_B1) - 1


def _long_cell_picks(block: CellBlock, cfg: TokenizerConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The genes kept in the cells with more than max_genes stored genes, or None when there is no such cell.

    Returns (long_b, pos_bK, base_b): those cells, and per cell the positions of its max_genes kept genes within the
    cell plus ``base_b`` (ascending, so corpus order): adding each cell's start minus ``base_b`` locates them in one
    pass.
    """
    lens_B = np.diff(block.offsets_B1)
    long_b = np.flatnonzero(lens_B > cfg.max_genes)
    if not len(long_b):
        return None
    K = cfg.max_genes
    # sample max_genes of the long cells' genes, vectorised over those cells
    L = int(lens_B[long_b].max())
    if cfg.gene_sampling == "random":
        key_bL = rng.random((len(long_b), L))
    else:  # top_expressed: largest s + u first
        s_N, u_N = np.asarray(block.spliced_N), np.asarray(block.unspliced_N)
        src_bL = np.minimum(block.offsets_B1[long_b, None] + np.arange(L), len(s_N) - 1)
        key_bL = -(s_N[src_bL] + u_N[src_bL]).astype(np.float64)
    for i, n in enumerate(lens_B[long_b].tolist()):
        key_bL[i, n:] = np.inf  # past the cell's end
    # the max_genes smallest keys of a row; with distinct keys (random draws) a threshold finds that set, the same
    # as argpartition's and ~5x faster. Ties (top_expressed; a repeated draw) leave the choice to argpartition.
    if cfg.gene_sampling == "random":
        kth_b1 = np.partition(key_bL, K - 1, axis=1)[:, K - 1: K]
        kept = np.flatnonzero(key_bL <= kth_b1)  # row-major, so ascending within a row
        if len(kept) == len(long_b) * K:  # every row keeps >= K, so this total means exactly K each
            return long_b, kept.reshape(len(long_b), K), L * np.arange(len(long_b))
    return long_b, np.sort(np.argpartition(key_bL, K - 1, axis=1)[:, :K], axis=1), np.zeros(len(long_b), np.int64)


@dataclass
class _Layout:
    """Where each kept stored gene of the block goes in the padded [B, G] batch."""

    lens_B: np.ndarray  # tokens per cell: its kept genes ('cell'), or the panel's ('batch')
    G: int  # padded width
    # put(out [B, G], values [N] (a flat array of the block, or its Segments), pad): writes the kept values into
    # their slots and ``pad`` into every other slot, so ``out`` needs no zeroing first
    put: Callable[[np.ndarray, np.ndarray | Segments, float], None]
    stored_BG: Callable[[], np.ndarray]  # bool [B, G]: the slots holding one of the cell's stored genes
    panel_G: np.ndarray | None = None  # gene_set='batch': the gene ids shared by every cell


def _cell_layout(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> _Layout:
    """gene_set='cell': each cell's own (sampled) genes, left-aligned in its row."""
    picks = _long_cell_picks(block, cfg, rng)
    lens_B = np.diff(block.offsets_B1)
    short_b, long_b, pos_bK, base_b = np.arange(len(lens_B)), np.zeros(0, np.int64), None, None
    if picks is not None:
        long_b, pos_bK, base_b = picks
        short_b = np.flatnonzero(lens_B <= cfg.max_genes)
    long_lens_b = lens_B[long_b]
    lens_B = np.minimum(lens_B, cfg.max_genes)
    src_bK = {}  # the long cells' kept genes: positions in the flat arrays ("flat") or in their pieces ("long")
    G = max(1, int(lens_B.max(initial=0)))  # = max_genes when a cell is long, so a long cell fills its row
    runs = list(zip(short_b.tolist(), block.offsets_B1[short_b].tolist(), block.offsets_B1[short_b + 1].tolist()))
    long_b = list(long_b)

    def src(kind: str) -> np.ndarray:
        if kind not in src_bK:
            starts_b = block.offsets_B1[long_b] if kind == "flat" else np.cumsum(long_lens_b) - long_lens_b
            src_bK[kind] = pos_bK + (starts_b - base_b)[:, None]
        return src_bK[kind]

    def put(out_BG: np.ndarray, values_N: np.ndarray | Segments, pad: float) -> None:
        pieces = values_N.pieces if isinstance(values_N, Segments) else None
        for b, lo, hi in runs:  # a short cell's genes are one run: a slice copy per cell is faster than any
            out_BG[b, : hi - lo] = values_N[lo:hi] if pieces is None else pieces[b]  # fancy-index gather or scatter
            if hi - lo < G:
                out_BG[b, hi - lo:] = pad
        if long_b and pieces is None:
            out_BG[long_b] = values_N[src("flat")]
        elif long_b:
            out_BG[long_b] = np.concatenate([pieces[b] for b in long_b])[src("long")]

    return _Layout(lens_B, G, put, lambda: np.arange(G)[None, :] < lens_B[:, None])


def _batch_layout(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> _Layout:
    """gene_set='batch': the batch's genes in every row, zero where a cell lacks one."""
    panel_G, col_N = _batch_panel(block, cfg, rng)
    lens_B = np.diff(block.offsets_B1)
    keep_N = col_N >= 0
    G = max(1, len(panel_G))
    dest_N = np.repeat(np.arange(len(lens_B), dtype=np.int64) * G, lens_B)[keep_N] + col_N[keep_N]

    def put(out_BG: np.ndarray, values_N: np.ndarray | Segments, pad: float) -> None:
        out_BG[:] = pad
        out_BG.reshape(-1)[dest_N] = np.asarray(values_N)[keep_N]

    def stored_BG() -> np.ndarray:
        out_BG = np.zeros((len(lens_B), G), dtype=bool)
        out_BG.reshape(-1)[dest_N] = True
        return out_BG

    return _Layout(np.full(len(lens_B), len(panel_G)), G, put, stored_BG, panel_G)


def _batch_panel(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """gene_set='batch': the batch's genes (sorted vocabulary indices [G]) and each stored gene's column (-1: out)."""
    genes_N = np.asarray(block.gene_index_N)
    panel_G, union_N = np.unique(genes_N, return_inverse=True)
    if len(panel_G) > cfg.max_genes:
        if cfg.gene_sampling == "random":
            chosen = rng.choice(len(panel_G), cfg.max_genes, replace=False)
        else:  # top_expressed over the batch
            s_N, u_N = np.asarray(block.spliced_N), np.asarray(block.unspliced_N)
            totals = np.bincount(union_N, weights=s_N + u_N, minlength=len(panel_G))
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
    """An upper bound on the bytes of the arrays tokenize_block allocates for ``batch_size`` cells.

    G never exceeds ``cfg.max_genes``: per-gene float32 values (4 + the targets), int64 gene ids and the bool mask;
    then three float32 per cell (library sizes, time).
    """
    n_floats = 4 + sum(k in targets for k in (keys.B_VELOCITY, keys.B_VELOCITY_U))
    return batch_size * cfg.max_genes * (4 * n_floats + 8 + 1) + batch_size * 3 * 4


def _log1p_into(out_MBG: np.ndarray, counts_MBG: np.ndarray, scale_MB: np.ndarray) -> None:
    """out = log(1 + counts * scale) in float32, a scale per modality (M) and cell.

    numpy's float32 log1p is not vectorised (about 6x slower than log on this path); log(1 + x) differs from it by
    < 1e-7 relative for x >= 0.01 and stays exact at 0, and normalised counts of a stored gene are rarely below that.
    Computed over the whole padded arrays, in place: padding (count 0) gives log(1) = 0.
    """
    np.multiply(counts_MBG, scale_MB[..., None], out=out_MBG)
    out_MBG += np.float32(1)
    np.log(out_MBG, out=out_MBG)


def tokenize_block(
    block: CellBlock,
    cfg: TokenizerConfig,
    rng: np.random.Generator,
    targets: tuple[str, ...] = (keys.B_VELOCITY, keys.B_VELOCITY_U),
    *,
    alloc: Alloc | None = None,
) -> dict:
    """Turn a CellBlock into the batch dict (keys from fm.keys; see the module docstring).

    Choose genes, copy each cell's kept counts (and targets, gene ids) from the flat N arrays into its padded row,
    then normalise and log1p the padded count arrays in place. Decode cost follows the stored genes, not B x G. The
    float [B, G] arrays are views of one buffer, as are the per-cell floats (four allocations per batch: per-gene
    floats, gene ids, mask, per-cell floats).

    Args:
        targets: the per-gene target keys (B_VELOCITY, B_VELOCITY_U) the batch carries, NaN where a cell has none;
            the stream passes the ones its corpus has, so a pretraining corpus sends no all-NaN arrays.
        alloc: where the arrays are born (``alloc(shape, dtype) -> numpy array``); default: fresh memory, shared
            memory in a loader worker (the mask: fresh memory). The stream passes a slot of its worker's ring
            (fm.data.stream), which then holds all four. At most ``batch_nbytes(B, cfg, targets)`` bytes are asked for.
    """
    lay = (_batch_layout if cfg.gene_set == "batch" else _cell_layout)(block, cfg, rng)
    B, G, put = len(lay.lens_B), lay.G, lay.put
    per_gene = [keys.B_SPLICED, keys.B_UNSPLICED, keys.B_SPLICED_COUNTS, keys.B_UNSPLICED_COUNTS]
    per_gene += [k for k in (keys.B_VELOCITY, keys.B_VELOCITY_U) if k in targets]
    empty = alloc or _empty
    floats_KBG = empty((len(per_gene), B, G), torch.float32)
    counts_2BG = floats_KBG[2:4]
    put(counts_2BG[0], block.spliced_N, 0)
    put(counts_2BG[1], block.unspliced_N, 0)
    scale_2B = np.stack(_scales(block, cfg))
    _log1p_into(floats_KBG[:2], counts_2BG, scale_2B)
    if not np.isfinite(scale_2B).all():  # 0 * inf: a slot without a stored gene must stay 0, not NaN
        floats_KBG[:2, ~lay.stored_BG()] = 0
    for k, out_BG in zip(per_gene[4:], floats_KBG[4:]):
        values_N = block.velocity_N if k == keys.B_VELOCITY else block.velocity_u_N
        if values_N is None:
            out_BG[:] = np.nan
        else:
            put(out_BG, values_N, np.nan)  # unknown at padding and for cells without the target
    floats_KBG = torch.from_numpy(floats_KBG).unbind(0)  # views, in one call
    ids_BG = empty((B, G), torch.int64)
    if lay.panel_G is not None:
        ids_BG[:] = lay.panel_G if len(lay.panel_G) else 0
    else:
        put(ids_BG, block.gene_index_N, 0)
    real_BG = empty((B, G), torch.bool) if alloc is not None else np.empty((B, G), dtype=bool)
    small = np.int16 if G < 2**15 else np.int64  # a narrower compare is 3x faster
    np.less(np.arange(G, dtype=small), lay.lens_B.astype(small)[:, None], out=real_BG)
    cell_3B = empty((3, B), torch.float32)  # per-cell floats in one array (in a loader worker: one ring region)
    for out_B, values_B in zip(cell_3B, (block.library_size_spliced_B, block.library_size_unspliced_B, block.time_B)):
        out_B[:] = values_B
    cell_3B = torch.from_numpy(cell_3B).unbind(0)
    return {
        keys.B_GENE_IDS: torch.from_numpy(ids_BG),
        keys.B_GENE_MASK: torch.from_numpy(real_BG),
        **{k: floats_KBG[i] for i, k in enumerate(per_gene)},
        keys.B_LIBRARY_SIZE_SPLICED: cell_3B[0],
        keys.B_LIBRARY_SIZE_UNSPLICED: cell_3B[1],
        keys.B_TIME: cell_3B[2],
        keys.B_CELL_TYPE: list(block.cell_type),
        keys.B_CELL_ID: list(block.cell_id),
        keys.B_DATASET_ID: list(block.dataset_id),
    }
