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

Binning, if any, is the model's job: the batch carries floats. The optional per-gene entries a corpus fills (velocity
targets; the moments ``Ms``/``Mu`` over the dataset's neighbourhood, normalised and log1p'd by the same rule as the
counts) are in every batch of that corpus, NaN where a cell has none and at padding, so every batch has the same keys.
Moments need the corpus's neighbourhood normalisation to be the tokenizer's (the data module checks it).

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
from fm.data.counts import normalisation_scales

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
    pad_to_multiple: int = 1  # the padded width G is rounded up to a multiple of this (e.g. 64: L = 2G + F moves in
    # steps of 128, one flex block, so a compiled kernel sees few shapes); padding is masked, so outputs do not change

    def __post_init__(self):
        if not isinstance(self.max_genes, int) or self.max_genes < 1:
            raise ValueError(f"TokenizerConfig.max_genes must be an int >= 1, got {self.max_genes!r}")
        if not isinstance(self.pad_to_multiple, int) or self.pad_to_multiple < 1:
            raise ValueError(f"TokenizerConfig.pad_to_multiple must be an int >= 1, got {self.pad_to_multiple!r}")
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
    ms_N: np.ndarray | Segments | None = None  # float32 [N] spliced moment (corpus units), NaN where unknown
    mu_N: np.ndarray | Segments | None = None  # float32 [N] unspliced moment

    def __len__(self) -> int:
        return len(self.offsets_B1) - 1


def _uniform_subsets(rng: np.random.Generator, n_b: np.ndarray, k_b: np.ndarray) -> np.ndarray:
    """Per row b, a uniform random ``k_b[b]``-subset of ``[0, n_b[b])``, as one bool mask of the rows end to end.

    The subset is the first ``k_b`` distinct values of a sequence of iid uniform draws from ``[0, n_b)``, which is
    uniform over the k-subsets (relabelling the values leaves the sequence's law unchanged, so every subset is as
    likely). The sequence is drawn in rounds of exactly the number of values each row still lacks, so a round never
    passes a row's k-th distinct value; all rows draw together, in one array per round. Cheaper than a key per gene
    and a partition when k is much smaller than n (dropping the few genes of a cell just over max_genes).

    Returns bool [sum(n_b)]: row b's mask is ``[start_b, start_b + n_b)`` with ``start_b = cumsum(n_b) - n_b``.
    """
    end_b = np.cumsum(n_b)
    total, hi = int(end_b[-1]) if len(end_b) else 0, int(n_b.max(initial=1))
    taken = np.zeros(total + hi, dtype=bool)  # + hi: a draw past its row's end indexes in bounds (and is dropped)
    stamp = np.empty(total + hi, dtype=np.int32)
    start_b, need, rows_b = end_b - n_b, k_b.astype(np.int64), np.arange(len(n_b))
    # the draws, one bound for all rows (a value past its row's end is drawn again), in one call for the usual
    # total (a call costs ~10 us here, a round's few draws far less); rounds take the next ones in turn
    draws, used = rng.integers(0, hi, int(need.sum() * 1.1) + 64), 0
    while need.any():
        rows = np.repeat(rows_b, need)
        if used + len(rows) > len(draws):
            draws, used = np.concatenate([draws[used:], rng.integers(0, hi, 2 * len(rows) + 64)]), 0
        v, used = draws[used: used + len(rows)], used + len(rows)
        flat = start_b[rows] + v
        ok = (v < n_b[rows]) & ~taken[flat]
        flat, rows = flat[ok], rows[ok]
        first = np.arange(len(flat), dtype=np.int32)  # one survivor per value repeated in this round (any one)
        stamp[flat] = first
        ok = stamp[flat] == first
        taken[flat[ok]] = True
        need -= np.bincount(rows[ok], minlength=len(n_b))
    return taken[:total]


def _long_cell_keep(block: CellBlock, lens_B: np.ndarray, cfg: TokenizerConfig,
                    rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
    """The cells with more than max_genes stored genes (ascending) and, end to end, their masks of kept genes.

    Returns (long_b, keep): ``keep`` has ``lens_B[b]`` entries per long cell b in turn, max_genes of them True.
    """
    long_b = np.flatnonzero(lens_B > cfg.max_genes)
    if not len(long_b):
        return [], None
    K, n_b = cfg.max_genes, lens_B[long_b]
    if cfg.gene_sampling == "random":  # draw the smaller side: the genes to drop, or (n > 2K) the genes to keep
        drop_b = n_b - K <= K
        keep = _uniform_subsets(rng, n_b, np.where(drop_b, n_b - K, K))
        if drop_b.all():
            np.logical_not(keep, out=keep)
        elif drop_b.any():
            keep ^= np.repeat(drop_b, n_b)
        return long_b.tolist(), keep
    # top_expressed: largest s + u first
    L = int(n_b.max())
    s_N, u_N = np.asarray(block.spliced_N), np.asarray(block.unspliced_N)
    src_bL = np.minimum(block.offsets_B1[long_b, None] + np.arange(L), len(s_N) - 1)
    key_bL = -(s_N[src_bL] + u_N[src_bL]).astype(np.float64)
    valid_bL = np.arange(L) < n_b[:, None]
    key_bL[~valid_bL] = np.inf  # past the cell's end
    keep_bL = np.zeros((len(long_b), L), dtype=bool)
    np.put_along_axis(keep_bL, np.argpartition(key_bL, K - 1, axis=1)[:, :K], True, axis=1)
    return long_b.tolist(), keep_bL[valid_bL]  # row-major: the cells' masks end to end


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


def padded_width(n_tokens: int, cfg: TokenizerConfig) -> int:
    """The batch width G for a longest row of ``n_tokens``: at least 1, rounded up to ``cfg.pad_to_multiple``."""
    return -(-max(1, n_tokens) // cfg.pad_to_multiple) * cfg.pad_to_multiple


def _cell_layout(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> _Layout:
    """gene_set='cell': each cell's own (sampled) genes, left-aligned in its row."""
    lens_B = np.diff(block.offsets_B1)
    long_b, keep = _long_cell_keep(block, lens_B, cfg, rng)
    lens_B = np.minimum(lens_B, cfg.max_genes)
    K, G = cfg.max_genes, padded_width(int(lens_B.max(initial=0)), cfg)  # G >= K when a cell is long
    pads = (G - lens_B).tolist()
    offsets = block.offsets_B1.tolist()
    pad_G = {}  # (dtype, pad) -> [G] of pad, for the puts of this block

    def put(out_BG: np.ndarray, values_N: np.ndarray | Segments, pad: float) -> None:
        # the rows are one run of memory: a single concatenate (cells and padding in turn) writes all of them, far
        # cheaper than a copy per cell and row, or any fancy-index gather or scatter
        if isinstance(values_N, Segments):
            pieces = list(values_N.pieces)
        else:
            pieces = [values_N[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]
        if long_b:
            kept = np.concatenate([pieces[b] for b in long_b])[keep]  # K values per long cell, in turn
            for i, b in enumerate(long_b):
                pieces[b] = kept[i * K: (i + 1) * K]
        key = (out_BG.dtype.str, str(pad))
        if key not in pad_G:
            pad_G[key] = np.full(G, pad, dtype=out_BG.dtype)
        parts = []
        for piece, n_pad in zip(pieces, pads):
            parts.append(piece)
            if n_pad:
                parts.append(pad_G[key][:n_pad])
        if parts:  # (none: a block without cells)
            np.concatenate(parts, out=np.reshape(out_BG, -1, copy=False))  # copy=False: raises unless a view

    return _Layout(lens_B, G, put, lambda: np.arange(G)[None, :] < lens_B[:, None])


def _batch_layout(block: CellBlock, cfg: TokenizerConfig, rng: np.random.Generator) -> _Layout:
    """gene_set='batch': the batch's genes in every row, zero where a cell lacks one."""
    panel_G, col_N = _batch_panel(block, cfg, rng)
    lens_B = np.diff(block.offsets_B1)
    keep_N = col_N >= 0
    G = padded_width(len(panel_G), cfg)
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


def _scales(block: CellBlock, cfg: TokenizerConfig) -> np.ndarray:
    """Per-cell multipliers [2, B] (float32) for spliced and unspliced counts (fm.data.counts.normalisation_scales)."""
    def name(i: int) -> str:
        return f"{block.cell_id[i]!r} of dataset {block.dataset_id[i]!r} (corpus column {keys.SIZE_FACTOR})"

    scale_2B = normalisation_scales(block.library_size_spliced_B, block.library_size_unspliced_B, block.size_factor_B,
                                    cfg.normalization, cfg.target_sum, name)
    return scale_2B.astype(np.float32)


def empty_shared(shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
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
_NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.int64: np.dtype(np.int64), torch.bool: np.dtype(bool)}


def _carve(nbytes: int) -> Alloc:
    """An allocator that hands out 64-byte-aligned pieces of one fresh buffer of ``nbytes``: one allocation per batch
    instead of four (each costs more than its memory here)."""
    buf, used = np.empty(nbytes, dtype=np.uint8), 0

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
        nonlocal used
        np_dtype = _NUMPY_DTYPE[dtype]
        n = math.prod(shape) * np_dtype.itemsize
        if used + n > nbytes:
            raise RuntimeError(f"tokenize_block asked for more than the {nbytes} bytes it reserved")
        out = buf[used: used + n].view(np_dtype).reshape(shape)
        used = -(-(used + n) // 64) * 64
        return out

    return alloc


# optional per-gene batch entries, in batch order, and the CellBlock field each comes from
_OPTIONAL = {keys.B_VELOCITY: "velocity_N", keys.B_VELOCITY_U: "velocity_u_N", keys.B_MS: "ms_N", keys.B_MU: "mu_N"}
_MOMENTS = (keys.B_MS, keys.B_MU)


def moment_scale(cfg: TokenizerConfig) -> float:
    """Multiplier from the corpus's moments to the tokenizer's normalised units (docs/FORMAT.md: under ``total`` the
    corpus stores moments as fractions of the library, so they take the tokenizer's ``target_sum``)."""
    return float(cfg.target_sum) if cfg.normalization == "total" else 1.0


def batch_nbytes(batch_size: int, cfg: TokenizerConfig, targets: tuple[str, ...]) -> int:
    """An upper bound on the bytes of the arrays tokenize_block allocates for ``batch_size`` cells.

    G never exceeds ``cfg.max_genes`` rounded up to ``pad_to_multiple``: per-gene float32 values (4 + the targets),
    int64 gene ids and the bool mask; then three float32 per cell (library sizes, time).
    """
    n_floats = 4 + sum(k in targets for k in _OPTIONAL)
    return batch_size * padded_width(cfg.max_genes, cfg) * (4 * n_floats + 8 + 1) + batch_size * 3 * 4


# torch's float32 log is ~1.5x numpy's here (SLEEF, within 1 ulp of it). Applied in pieces of fewer elements than
# ATen's grain size (32768), a torch kernel runs on the calling thread: never in an OpenMP pool, which hangs a process
# forked while its parent's pool ran (fm.data.stream.BatchRing), and the same values whatever the thread count.
# Pieces are a multiple of 16 floats, the width of its vectorised loop.
_LOG_PIECE = 2047 * 16


def _log1p_into(out_MBG: np.ndarray, counts_MBG: np.ndarray, scale_MB: np.ndarray) -> None:
    """out = log(1 + counts * scale) in float32, a scale per modality (M) and cell; ``out`` is C-contiguous.

    float32 log1p is ~6x slower than log on this path (numpy's is not vectorised); log(1 + x) differs from it by
    < 1e-7 relative for x >= 0.01 and stays exact at 0, and normalised counts of a stored gene are rarely below that.
    Computed over the whole padded arrays, in place: padding (count 0) gives log(1) = 0.
    """
    np.multiply(counts_MBG, scale_MB[..., None], out=out_MBG)
    out_MBG += np.float32(1)
    for piece in torch.from_numpy(out_MBG).view(-1).split(_LOG_PIECE):  # a view: raises if not contiguous
        piece.log_()


def tokenize_block(
    block: CellBlock,
    cfg: TokenizerConfig,
    rng: np.random.Generator,
    targets: tuple[str, ...] = (keys.B_VELOCITY, keys.B_VELOCITY_U, keys.B_MS, keys.B_MU),
    *,
    alloc: Alloc | None = None,
) -> dict:
    """Turn a CellBlock into the batch dict (keys from fm.keys; see the module docstring).

    Choose genes, copy each cell's kept counts (and targets, gene ids) from the flat N arrays into its padded row,
    then normalise and log1p the padded count arrays in place. Decode cost follows the stored genes, not B x G. The
    float [B, G] arrays are views of one array, as are the per-cell floats (four arrays per batch: per-gene floats,
    gene ids, mask, per-cell floats).

    Args:
        targets: the optional per-gene keys the batch carries (targets B_VELOCITY, B_VELOCITY_U; moments B_MS, B_MU,
            normalised and log1p'd as the counts), NaN where a cell has none; the stream passes the ones its corpus
            has, so a pretraining corpus sends no all-NaN arrays.
        alloc: where the arrays are born (``alloc(shape, dtype) -> numpy array``); default: one fresh buffer for all
            four, or in a loader worker shared memory (the mask: fresh memory). The stream passes a slot of its
            worker's ring (fm.data.stream), which then holds all four. At most ``batch_nbytes(B, cfg, targets)``
            bytes are asked for.
    """
    lay = (_batch_layout if cfg.gene_set == "batch" else _cell_layout)(block, cfg, rng)
    B, G, put = len(lay.lens_B), lay.G, lay.put
    per_gene = [keys.B_SPLICED, keys.B_UNSPLICED, keys.B_SPLICED_COUNTS, keys.B_UNSPLICED_COUNTS]
    per_gene += [k for k in _OPTIONAL if k in targets]
    if alloc is None and get_worker_info() is None:  # in-process: every array in one buffer
        alloc = _carve(B * G * (4 * len(per_gene) + 8 + 1) + 3 * B * 4 + 4 * 64)
    empty = alloc or empty_shared
    floats_KBG = empty((len(per_gene), B, G), torch.float32)
    counts_2BG = floats_KBG[2:4]
    put(counts_2BG[0], block.spliced_N, 0)
    put(counts_2BG[1], block.unspliced_N, 0)
    scale_2B = _scales(block, cfg)
    _log1p_into(floats_KBG[:2], counts_2BG, scale_2B)
    if not np.isfinite(scale_2B).all():  # 0 * inf: a slot without a stored gene must stay 0, not NaN
        floats_KBG[:2, ~lay.stored_BG()] = 0
    for k, out_BG in zip(per_gene[4:], floats_KBG[4:]):
        values_N = getattr(block, _OPTIONAL[k])
        if values_N is None:
            out_BG[:] = np.nan
            continue
        put(out_BG, values_N, np.nan)  # unknown at padding and for cells without the target
        if k in _MOMENTS:  # the counts' rule: normalised, then log1p
            _log1p_into(out_BG[None], out_BG[None], np.full((1, B), moment_scale(cfg), np.float32))
    floats_KBG = torch.from_numpy(floats_KBG).unbind(0)  # views, in one call
    ids_BG = empty((B, G), torch.int64)
    if lay.panel_G is not None:
        ids_BG[:, : len(lay.panel_G)] = lay.panel_G
        ids_BG[:, len(lay.panel_G):] = 0
    else:
        put(ids_BG, block.gene_index_N, 0)
    real_BG = empty((B, G), torch.bool) if alloc is not None else np.empty((B, G), dtype=bool)  # (worker: by value)
    small = np.int16 if G < 2**15 else np.int64  # a narrower compare is 3x faster
    np.less(np.arange(G, dtype=small), lay.lens_B.astype(small)[:, None], out=real_BG)
    cell_3B = empty((3, B), torch.float32)  # per-cell floats in one array (in a loader worker: one ring region)
    cell_3B[0], cell_3B[1], cell_3B[2] = block.library_size_spliced_B, block.library_size_unspliced_B, block.time_B
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
