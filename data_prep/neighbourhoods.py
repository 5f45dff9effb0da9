"""Between the two passes of a conversion: each dataset's neighbourhood and its cells' moments (DESIGN §2, §9).

    fm prep convert sim.h5ad --out corpus/                       # 30 neighbours on 30 PCs (the defaults)
    fm prep convert sim.h5ad --out corpus/ --neighbours 0        # no neighbourhood: the Ms/Mu columns stay null
    fm prep convert pancreas.h5ad --out corpus/ --velocity-teacher stochastic   # and a teacher's velocity target

Per dataset, in bounded memory:
1. the kept cells and stored genes are read in row chunks, normalised as the corpus records (fm.velocity.neighbours:
   the tokenizer's rule) and appended to an on-disk CSR store (``CORPUS/.neighbourhoods/<k>/``); a cell without any
   count over the stored genes is not stored (as without neighbourhoods) and takes no part in the graph;
2. the PCA (the covariance of the 2,000 most variable genes, accumulated a batch of cells at a time), the kNN
   lists and from them the moments operator (cells x cells, ~45 entries a row; the connectivities and distances
   matrices are not built unless a teacher needs them) are computed; only the components and the operator stay in
   memory;
3. the moments are computed a block of cells at a time in reverse Cuthill-McKee order of the graph, so a block's
   neighbours are mostly in the blocks around it: the rows a block reads from the store stay few (the ratio of rows
   read to rows computed is logged). They go to a second store, from which each shard's rows are cut into one file
   per shard (``part-NNNNN.npz``), so a shard task loads only its rows. The folder goes once the manifest is written.

Memory is bounded by a batch of cells, the graph and the PCA, not by the dataset's counts (measured in
docs/BENCHMARKS.md, "convert"); a velocity teacher (``--velocity-teacher``) works on the whole dataset's moments in
memory.

Stored units: under ``total`` the moments are fractions of the cell's library (counts / library size; the tokenizer
multiplies by its ``target_sum``), under ``size_factor`` counts / factor, under ``none`` counts (docs/FORMAT.md).

Shapes: N cells of the dataset (with counts), G stored genes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_prep.sources import ConversionError, open_source
from data_prep.targets import DatasetSpec
from fm import keys
from fm.data.tokenize import ranges
from fm.velocity.neighbours import (
    NeighbourConfig,
    NeighbourhoodError,
    build_graph,
    moments,
    moments_of_cells,
    normalisation_scales,
    scale_rows,
)
from fm.velocity.teachers import TeacherConfig, TeacherError, run_teacher

log = logging.getLogger(__name__)

NEIGHBOURHOOD_DIR = ".neighbourhoods"
MOMENT_BLOCK = 1024  # cells whose moments are computed together (their neighbours' rows are read once per block)
READ_ROWS = 256  # rows of an on-disk store gathered per mapping of its files (DiskRows._read)


class DiskRows:
    """Rows of two CSR matrices (spliced, unspliced) appended to files, read back through memory maps opened per read,
    so the pages a read touches do not stay counted in the process's memory. ``indptr`` stays in memory (8 bytes a
    row)."""

    def __init__(self, folder: Path, name: str, n_genes: int):
        self.folder, self.name, self.n_genes = Path(folder), name, n_genes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lens: list[list[np.ndarray]] = [[], []]  # per append, the rows' entry counts (indptr on close)
        self.indptr: list[np.ndarray] = []
        self._files = [{k: open(self._path(m, k), "wb") for k in ("indices", "data")} for m in range(2)]

    def _path(self, m: int, kind: str) -> Path:
        return self.folder / f"{self.name}.{m}.{kind}"

    def append(self, *pair: sp.csr_matrix) -> None:
        for m, x in enumerate(pair):
            x = sp.csr_matrix(x, dtype=np.float32)
            x.sort_indices()
            self._files[m]["indices"].write(x.indices.astype(np.int32).tobytes())
            self._files[m]["data"].write(x.data.astype(np.float32).tobytes())
            self._lens[m].append(np.diff(x.indptr))

    def close(self) -> DiskRows:
        for files in self._files:
            for f in files.values():
                f.close()
        self.indptr = [np.concatenate([[0], np.cumsum(np.concatenate(lens or [np.zeros(0, np.int64)]))])
                       .astype(np.int64) for lens in self._lens]
        return self

    @property
    def n_cells(self) -> int:
        return len(self.indptr[0]) - 1

    def _read(self, m: int, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The entries of rows (``starts``, ``lens``), READ_ROWS rows per mapping of the files: the kernel maps ~64 KiB
        around each page a read faults in, all counted in this process's memory while mapped, so a gather of rows
        spread over the whole store mapped most of it (the peak grew with the dataset: 1.5 GiB at 100,000 cells,
        2.4 GiB at 400,000)."""
        total = int(self.indptr[m][-1])
        out = np.empty(int(lens.sum()), np.int32), np.empty(int(lens.sum()), np.float32)
        if total == 0 or len(out[0]) == 0:
            return out
        o = 0
        for c in range(0, len(starts), READ_ROWS):
            pos = ranges(starts[c: c + READ_ROWS], lens[c: c + READ_ROWS])
            for k, (kind, dtype) in enumerate((("indices", np.int32), ("data", np.float32))):
                mapped = np.memmap(self._path(m, kind), dtype, "r", shape=(total,))
                out[k][o: o + len(pos)] = mapped[pos]
                del mapped  # unmapped: the pages read leave this process's memory
            o += len(pos)
        return out

    def take(self, cells: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        out = []
        for m in range(2):
            starts, lens = self.indptr[m][cells], np.diff(self.indptr[m])[cells]
            indices, data = self._read(m, starts, lens)
            indptr = np.concatenate([[0], np.cumsum(lens)])
            out.append(sp.csr_matrix((data, indices, indptr), shape=(len(cells), self.n_genes)))
        return out[0], out[1]

    def rows(self, a: int, b: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        return self.take(np.arange(a, b))


def _size_factors(ds: DatasetSpec, rows: np.ndarray) -> np.ndarray:
    if ds.size_factor is None:
        raise ConversionError(f"{ds.path}: --normalization size_factor needs --size-factor-key (an obs column)")
    with open_source(ds.path) as src:
        v = src.read_obs(ds.size_factor, 0, src.n_cells)[rows]
        try:
            return pd.to_numeric(pd.Series(v, dtype=object)).to_numpy(np.float64, na_value=np.nan)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"{ds.path}: {src.obs_field(ds.size_factor)} is not numeric ({e})") from e


def normalised_store(ds: DatasetSpec, cells: np.ndarray, genes: np.ndarray, cfg: NeighbourConfig, chunk: int,
                     folder: Path) -> tuple[np.ndarray, DiskRows]:
    """Read the kept ``cells`` (sorted source rows) over the stored ``genes`` in chunks, normalise them and store the
    cells with counts; returns those cells (source rows) and the store."""
    store = DiskRows(folder, "counts", len(genes))
    size_factor = _size_factors(ds, cells) if cfg.normalization == "size_factor" else None
    kept = []
    with open_source(ds.path) as src:
        i = 0
        while i < len(cells):
            a = int(cells[i])
            b = min(a + chunk, int(cells[-1]) + 1)
            j = int(np.searchsorted(cells, b))
            s, u = (sp.csr_matrix(src.read_layer(layer, a, b)[cells[i:j] - a][:, genes], dtype=np.float64)
                    for layer in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED))
            lib_s, lib_u = np.asarray(s.sum(1)).ravel(), np.asarray(u.sum(1)).ravel()
            has = lib_s + lib_u > 0
            sf = None if size_factor is None else size_factor[i:j][has]
            try:
                scale = normalisation_scales(lib_s[has], lib_u[has], sf, cfg, str(ds.path))
            except NeighbourhoodError as e:
                raise ConversionError(str(e)) from e
            store.append(scale_rows(s[has], scale[0]), scale_rows(u[has], scale[1]))
            kept.append(cells[i:j][has])
            i = j
    return (np.concatenate(kept) if kept else np.zeros(0, np.int64)), store.close()


def write_dataset_moments(ds: DatasetSpec, cells: np.ndarray, genes: np.ndarray, cfg: NeighbourConfig, chunk: int,
                          shard_size: int, folder: str, teacher: TeacherConfig | None = None,
                          on_chunk=None) -> tuple[np.ndarray, list[str]]:
    """One dataset's moments (and a teacher's velocity), one file per shard of ``shard_size`` cells under ``folder``
    (a task of `data_prep.convert`). Returns the cells kept (those with counts, source rows) and the files."""
    folder = Path(folder)
    cells, counts = normalised_store(ds, cells, genes, cfg, chunk, folder)
    try:
        graph = build_graph(counts, cfg, where=str(ds.path), graph=teacher is not None)  # operator only
    except NeighbourhoodError as e:
        raise ConversionError(str(e)) from e
    op = graph.operator
    velocity = None if teacher is None else _teacher_velocity(ds, genes, graph, counts, cfg, teacher)
    # moments in bandwidth order: a block of cells reads its neighbours' rows, mostly the same few blocks (the
    # operator's pattern is symmetric: the connectivities' fuzzy union, and the diagonal)
    order = sp.csgraph.reverse_cuthill_mckee(op, symmetric_mode=True)
    position = np.empty(len(order), np.int64)
    store = DiskRows(folder, "moments", len(genes))
    read = 0
    for a in range(0, len(order), MOMENT_BLOCK):
        block = np.sort(order[a: a + MOMENT_BLOCK])
        position[block] = np.arange(a, a + len(block))
        ms, mu, n_read = moments_of_cells(op, counts, block)
        store.append(ms, mu)
        read += n_read
        del ms, mu
        _release_freed_memory()
    store.close()
    scale = np.float32(1.0 / cfg.target_sum) if cfg.normalization == "total" else np.float32(1.0)
    files = []
    for k, a in enumerate(range(0, len(cells), shard_size)):
        b = min(a + shard_size, len(cells))
        pos = position[a:b]
        sort = np.argsort(pos)
        ms, mu = store.take(pos[sort])
        back = np.argsort(sort)  # the shard's cells in source order
        parts = [ms[back] * scale, mu[back] * scale]  # stored as fractions of the library under `total`
        if velocity is not None:
            parts.append(velocity[a:b])
        path = folder / f"{k:05d}.npz"
        _save_npz(sp.vstack(parts, format="csr"), path)
        files.append(str(path))
        del ms, mu, parts
        _release_freed_memory()
    n = max(len(cells), 1)
    log.info("%s: neighbourhood of %d cells (%d neighbours, %d PCs); %.1f genes with a moment per cell (%.1f "
             "counted); moments read %.2f rows per cell computed", ds.dataset_id, len(cells), cfg.n_neighbours,
             graph.X_pca.shape[1], store.indptr[0][-1] / n, counts.indptr[0][-1] / n, read / n)
    for p in folder.glob("counts.*"):
        p.unlink()
    for p in folder.glob("moments.*"):
        p.unlink()
    if on_chunk is not None:
        on_chunk(len(cells))
    return cells, files


def _teacher_velocity(ds: DatasetSpec, genes: np.ndarray, graph, counts: DiskRows, cfg: NeighbourConfig,
                      teacher: TeacherConfig) -> sp.csr_matrix:
    """The teacher's velocity [N, G] on the moments' pattern (NaN at genes it has no velocity for); the whole
    dataset's moments are in memory here."""
    s_n, u_n = counts.rows(0, counts.n_cells)
    graph.Ms, graph.Mu = moments(graph.operator, s_n, dense=False), moments(graph.operator, u_n, dense=False)
    with open_source(ds.path) as src:
        names = [src.symbols[g] for g in genes]
    try:
        r = run_teacher(teacher, graph, s_n, u_n, cfg, genes=names, where=str(ds.path))
    except TeacherError as e:
        raise ConversionError(str(e)) from e
    pattern = sp.csr_matrix(graph.Ms + graph.Mu)  # a cell's own counts are in its moments: every stored gene
    pattern.sort_indices()
    v = np.where(r.velocity_genes[None, :], r.velocity, np.nan).astype(np.float32)
    rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
    log.info("%s: %s teacher, %d of %d genes with velocity", ds.dataset_id, teacher.method,
             int(r.velocity_genes.sum()), len(genes))
    return sp.csr_matrix((v[rows, pattern.indices], pattern.indices, pattern.indptr), shape=pattern.shape)


def _release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). The moments'
    temporaries (a few to ~30 MiB each, under glibc's adaptive mmap threshold) were left as free heap pages between
    blocks: the process's memory grew ~400 MiB over the moments of 100,000 cells."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _save_npz(x: sp.csr_matrix, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        sp.save_npz(f, x, compressed=False)
    tmp.replace(path)


def load_shard_moments(path: str | Path, rows: int) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix | None]:
    """(Ms, Mu, teacher velocity or None) [rows, G] of one shard, as ``write_dataset_moments`` wrote them."""
    both = sp.load_npz(path).tocsr()
    velocity = both[2 * rows:] if both.shape[0] > 2 * rows else None
    return both[:rows], both[rows:2 * rows], velocity
