"""Between the two passes of a conversion: each dataset's neighbourhood and its cells' moments (DESIGN §2, §9).

    fm prep convert sim.h5ad --out corpus/                       # 30 neighbours on 30 PCs (the defaults)
    fm prep convert sim.h5ad --out corpus/ --neighbours 0        # no neighbourhood: the Ms/Mu columns stay null

For one dataset, the kept cells and stored genes are read in row chunks, normalised as the corpus records
(`fm.velocity.neighbours`: the tokenizer's rule), and the graph and first-order moments are computed over the whole
dataset. The moments are then cut into one file per shard (``CORPUS/.neighbourhoods/part-NNNNN.npz``, CSR), so a
shard task loads only its own rows; the files go once the manifest is written.

Stored units: under ``total`` the moments are fractions of the cell's library (counts / library size, the tokenizer
multiplies by its ``target_sum``), under ``size_factor`` counts / factor, under ``none`` counts (docs/FORMAT.md).
Cells without any count over the stored genes are not stored (as without neighbourhoods) and take no part in the
graph: they have no position in expression space.

Memory: the dataset's kept counts (CSR) and moments are held at once, so peak memory follows the largest dataset's
stored entries, not the corpus (docs/BENCHMARKS.md, "Conversion with neighbourhoods").

Shapes: N cells of the dataset (kept), G stored genes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_prep.sources import ConversionError, open_source
from data_prep.targets import DatasetSpec
from fm import keys
from fm.velocity.neighbours import NeighbourConfig, NeighbourhoodError, neighbourhood
from fm.velocity.teachers import TeacherConfig, TeacherError, run_teacher

log = logging.getLogger(__name__)

NEIGHBOURHOOD_DIR = ".neighbourhoods"


@dataclass
class DatasetMoments:
    """One dataset's moments: the cells that have counts (source rows) and their moments [N, G] (CSR, stored units),
    and a teacher's velocity on the moments' pattern (NaN at genes it could not fit or flags as no velocity gene)."""

    cells: np.ndarray  # sorted source rows of the cells kept (a subset of the filters' cells)
    Ms: sp.csr_matrix
    Mu: sp.csr_matrix
    velocity: sp.csr_matrix | None = None


def _read_rows(path: str, layer: str, rows: np.ndarray, genes: np.ndarray, chunk: int) -> sp.csr_matrix:
    """Source rows ``rows`` (sorted) and columns ``genes`` of ``layer``, read ``chunk`` source rows at a time."""
    parts = []
    with open_source(path) as src:
        i = 0
        while i < len(rows):
            a = int(rows[i])
            b = min(a + chunk, int(rows[-1]) + 1)
            j = int(np.searchsorted(rows, b))
            parts.append(sp.csr_matrix(src.read_layer(layer, a, b)[rows[i:j] - a][:, genes], dtype=np.float32))
            i = j
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(genes)), dtype=np.float32)


def _size_factors(ds: DatasetSpec, rows: np.ndarray) -> np.ndarray | None:
    if ds.size_factor is None:
        return None
    with open_source(ds.path) as src:
        v = src.read_obs(ds.size_factor, 0, src.n_cells)[rows]
        try:
            return pd.to_numeric(pd.Series(v, dtype=object)).to_numpy(np.float64, na_value=np.nan)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"{ds.path}: {src.obs_field(ds.size_factor)} is not numeric ({e})") from e


def dataset_moments(ds: DatasetSpec, cells: np.ndarray, genes: np.ndarray, cfg: NeighbourConfig,
                    chunk: int, teacher: TeacherConfig | None = None) -> DatasetMoments:
    """The neighbourhood moments of one dataset's kept ``cells`` over its stored ``genes`` (source columns), and with
    ``teacher`` its velocity (fm.velocity.teachers) in the units of the moments the teacher saw (normalised counts,
    ``target_sum`` per library under ``total``)."""
    s = _read_rows(ds.path, keys.LAYER_SPLICED, cells, genes, chunk)
    u = _read_rows(ds.path, keys.LAYER_UNSPLICED, cells, genes, chunk)
    has = np.asarray(s.sum(1)).ravel() + np.asarray(u.sum(1)).ravel() > 0
    if not has.all():
        cells, s, u = cells[has], s[has], u[has]
    size_factor = _size_factors(ds, cells) if cfg.normalization == "size_factor" else None
    if cfg.normalization == "size_factor" and size_factor is None:
        raise ConversionError(f"{ds.path}: --normalization size_factor needs --size-factor-key (an obs column)")
    try:
        nb, s_n, u_n = neighbourhood(s, u, cfg, size_factor, where=str(ds.path), dense=False)
    except NeighbourhoodError as e:
        raise ConversionError(str(e)) from e
    velocity = None
    if teacher is not None:
        with open_source(ds.path) as src:
            names = [src.symbols[g] for g in genes]
        try:
            r = run_teacher(teacher, nb, s_n, u_n, cfg, genes=names, where=str(ds.path))
        except TeacherError as e:
            raise ConversionError(str(e)) from e
        pattern = sp.csr_matrix(nb.Ms + nb.Mu)  # a cell's own counts are in its moments: a superset of its genes
        pattern.sort_indices()
        v = np.where(r.velocity_genes[None, :], r.velocity, np.nan).astype(np.float32)
        rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
        velocity = sp.csr_matrix((v[rows, pattern.indices], pattern.indices, pattern.indptr), shape=pattern.shape)
        log.info("%s: %s teacher, %d of %d genes with velocity", ds.dataset_id, teacher.method,
                 int(r.velocity_genes.sum()), len(genes))
    Ms, Mu = nb.Ms, nb.Mu
    if cfg.normalization == "total":  # stored as fractions of the library: the tokenizer applies its own target_sum
        Ms, Mu = Ms / np.float32(cfg.target_sum), Mu / np.float32(cfg.target_sum)
    log.info("%s: neighbourhood of %d cells (%d neighbours, %d PCs); %.1f genes with a moment per cell (%.1f counted)",
             ds.dataset_id, len(cells), cfg.n_neighbours, nb.X_pca.shape[1], Ms.getnnz() / max(len(cells), 1),
             s.getnnz() / max(len(cells), 1))
    return DatasetMoments(cells, sp.csr_matrix(Ms, dtype=np.float32), sp.csr_matrix(Mu, dtype=np.float32), velocity)


def save_shard_moments(moments: DatasetMoments, start: int, stop: int, path: Path) -> None:
    """Rows ``[start, stop)`` of a dataset's moments into one file for one shard (``Ms`` and ``Mu`` stacked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    parts = [moments.Ms, moments.Mu] + ([moments.velocity] if moments.velocity is not None else [])
    both = sp.vstack([m[start:stop] for m in parts], format="csr")
    with open(tmp, "wb") as f:
        sp.save_npz(f, both, compressed=False)
    tmp.replace(path)


def load_shard_moments(path: str | Path, rows: int) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix | None]:
    """(Ms, Mu, teacher velocity or None) [rows, G] of one shard, as ``save_shard_moments`` wrote them."""
    both = sp.load_npz(path).tocsr()
    velocity = both[2 * rows:] if both.shape[0] > 2 * rows else None
    return both[:rows], both[rows:2 * rows], velocity


def write_dataset_moments(ds: DatasetSpec, cells: np.ndarray, genes: np.ndarray, cfg: NeighbourConfig, chunk: int,
                          shard_size: int, folder: str, teacher: TeacherConfig | None = None,
                          on_chunk=None) -> tuple[np.ndarray, list[str]]:
    """One dataset's moments (and teacher velocity), cut into one file per shard of ``shard_size`` cells.

    Returns the cells kept (those with counts) and the files, in shard order (a task of `data_prep.convert`).
    """
    m = dataset_moments(ds, cells, genes, cfg, chunk, teacher)
    files = []
    for k, a in enumerate(range(0, len(m.cells), shard_size)):
        path = Path(folder) / f"{k:05d}.npz"
        save_shard_moments(m, a, min(a + shard_size, len(m.cells)), path)
        files.append(str(path))
    if on_chunk is not None:
        on_chunk(len(cells))
    return m.cells, files
