"""Pass 1 of the conversion: per-gene and per-cell statistics of an input, the count checks and the filters.

    fm prep convert sim.h5ad --out corpus/ --min-shared-counts 20 --min-genes-cell 10   # CPU; filters applied here

Statistics are gathered in blocks of rows (one task per block, run by `data_prep.convert` inline or in worker
processes), merged per dataset, and turned into gene and cell masks by a `FilterConfig`. Every count is checked on
the way: finite, non-negative, integer unless ``allow_non_integer``; an error names the file, cell and gene.

Shapes: G genes of the input, C cells of a block (or of the whole dataset once merged).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_prep.sources import ConversionError, Source, open_source
from data_prep.targets import DatasetSpec
from fm import keys
from fm.data.counts import check_counts


@dataclass(frozen=True)
class FilterConfig:
    """scVelo-style filters. Cell and gene statistics are both computed on the unfiltered matrix of a dataset."""

    min_counts_cell: float = 0  # spliced + unspliced counts of a cell, over all its genes
    min_genes_cell: int = 0  # genes with spliced + unspliced > 0 in a cell
    min_counts_gene: float = 0  # spliced counts of a gene over all cells (scVelo min_counts)
    min_counts_u_gene: float = 0  # unspliced counts of a gene (scVelo min_counts_u)
    min_cells_gene: int = 0  # cells with spliced > 0 (scVelo min_cells)
    min_cells_u_gene: int = 0  # cells with unspliced > 0 (scVelo min_cells_u)
    min_shared_counts: float = 0  # s + u summed over the cells where both are > 0 (scVelo min_shared_counts)
    min_shared_cells: int = 0  # cells where both spliced and unspliced are > 0 (scVelo min_shared_cells)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"FilterConfig.{f.name} must be a finite number >= 0, got {v!r}")


@dataclass
class BlockStats:
    """Pass-1 statistics of a block of cells: per gene (G) and per cell of the block (C)."""

    start: int
    counts_s: np.ndarray
    counts_u: np.ndarray
    cells_s: np.ndarray
    cells_u: np.ndarray
    shared_counts: np.ndarray
    shared_cells: np.ndarray
    cell_counts: np.ndarray
    cell_genes: np.ndarray
    cell_id_hash: np.ndarray


def _check_counts(m: sp.csr_matrix, src: Source, layer: str, start: int, allow_non_integer: bool) -> None:
    check_counts(m, f"{src.path}: {src.layer_field(layer)}", allow_non_integer,
                 cell_name=lambda r: src.read_cell_ids(start + r, start + r + 1)[0],
                 gene_name=lambda c: src.symbols[c], row_offset=start, error=ConversionError)


def collect_stats(
    ds: DatasetSpec, start: int, stop: int, chunk: int, allow_non_integer: bool, on_chunk=None
) -> BlockStats:
    """Statistics of source rows [start, stop), read ``chunk`` rows at a time."""
    g = ds.n_genes
    acc = {k: np.zeros(g) for k in ("counts_s", "counts_u", "cells_s", "cells_u", "shared_counts", "shared_cells")}
    cell_counts, cell_genes, hashes = [], [], []
    with open_source(ds.path) as src:
        for a in range(start, stop, chunk):
            b = min(a + chunk, stop)
            s = src.read_layer(keys.LAYER_SPLICED, a, b)
            u = src.read_layer(keys.LAYER_UNSPLICED, a, b)
            _check_counts(s, src, keys.LAYER_SPLICED, a, allow_non_integer)
            _check_counts(u, src, keys.LAYER_UNSPLICED, a, allow_non_integer)
            s.eliminate_zeros()
            u.eliminate_zeros()
            both = (s > 0).multiply(u > 0)
            acc["counts_s"] += np.asarray(s.sum(0)).ravel()
            acc["counts_u"] += np.asarray(u.sum(0)).ravel()
            acc["cells_s"] += np.bincount(s.indices, minlength=g)
            acc["cells_u"] += np.bincount(u.indices, minlength=g)
            acc["shared_counts"] += np.asarray((s.multiply(both) + u.multiply(both)).sum(0)).ravel()
            acc["shared_cells"] += np.asarray(both.sum(0)).ravel()
            total = s + u
            total.eliminate_zeros()
            cell_counts.append(np.asarray(total.sum(1)).ravel())
            cell_genes.append(np.diff(total.indptr))
            ids = src.read_cell_ids(a, b)
            hashes.append(pd.util.hash_array(ids.astype(str).astype(object)))
            if on_chunk is not None:
                on_chunk(b - a)
    return BlockStats(
        start,
        **acc,
        cell_counts=np.concatenate(cell_counts),
        cell_genes=np.concatenate(cell_genes),
        cell_id_hash=np.concatenate(hashes),
    )


def merge_stats(parts: list[BlockStats]) -> BlockStats:
    parts = sorted(parts, key=lambda p: p.start)
    per_gene = {
        k: sum(getattr(p, k) for p in parts)
        for k in ("counts_s", "counts_u", "cells_s", "cells_u", "shared_counts", "shared_cells")
    }
    per_cell = {
        k: np.concatenate([getattr(p, k) for p in parts]) for k in ("cell_counts", "cell_genes", "cell_id_hash")
    }
    return BlockStats(0, **per_gene, **per_cell)


def gene_mask(st: BlockStats, f: FilterConfig) -> np.ndarray:
    return (
        (st.counts_s >= f.min_counts_gene)
        & (st.counts_u >= f.min_counts_u_gene)
        & (st.cells_s >= f.min_cells_gene)
        & (st.cells_u >= f.min_cells_u_gene)
        & (st.shared_counts >= f.min_shared_counts)
        & (st.shared_cells >= f.min_shared_cells)
    )


def cell_mask(st: BlockStats, f: FilterConfig) -> np.ndarray:
    # a cell without any count has nothing to store, whatever the filters say
    return (st.cell_counts >= f.min_counts_cell) & (st.cell_genes >= max(f.min_genes_cell, 1))
