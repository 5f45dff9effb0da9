"""Convert ``.h5ad`` / ``.loom`` files of spliced and unspliced counts into a corpus (docs/FORMAT.md).

    fm prep convert sim.h5ad --out corpus/                                   # builds the vocabulary
    fm prep convert a.h5ad b.loom --out corpus/ --vocab vocab.tsv --workers 2 --min-shared-counts 20
    python -m data_prep.convert sim.h5ad --out corpus/                       # the same, without the fm command

Two chunked passes per dataset, so peak memory depends on the chunk and shard sizes, never on the file size:
1. statistics: per-gene totals (spliced, unspliced, shared; cells) and per-cell totals, checking every count
   (finite, non-negative, integer unless ``allow_non_integer``); the filters and the vocabulary follow from them.
2. writing: one task per shard ``shards/part-NNNNN.arrow`` (deterministic names), run in ``workers`` processes.

Idempotent: each shard records the hash of the conversion settings; a re-run keeps the shards whose hash matches
(a killed run is finished, a finished one is left untouched), and refuses shards from other settings unless
``overwrite``. Atomic: shards are written under a temporary name then renamed; the manifest, written last, is
removed before anything is rewritten, so a corpus with a manifest is always a finished one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from data_prep.sources import ConversionError, Source, open_source
from data_prep.vocab import build_vocab, map_onto
from fm import keys
from fm.data.schema import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_DIR,
    CorpusError,
    DatasetInfo,
    Manifest,
    ShardInfo,
    load_manifest,
    sha256_file,
)
from fm.data.vocab import GeneVocab
from fm.data.writer import conform, shard_name, write_manifest, write_shard

__all__ = ["ConversionError", "FilterConfig", "TargetConfig", "convert", "add_parser"]

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the same settings would write different shards
SETTINGS_KEY = "fm.settings_hash"
LOCK_NAME = ".convert.lock"
AUTO = "auto"
VELOCITY_LAYERS = (keys.LAYER_VELOCITY_TRUE, keys.LAYER_VELOCITY)
VELOCITY_U_LAYERS = (keys.LAYER_VELOCITY_U_TRUE, "velocity_u")
TIME_KEYS = (keys.OBS_TIME_TRUE, "latent_time", "velocity_pseudotime", "dpt_pseudotime")


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


@dataclass(frozen=True)
class TargetConfig:
    """Which optional fields become target columns: a name, ``"auto"`` (first found of the usual names) or None."""

    velocity_layer: str | None = AUTO  # -> velocity; auto: velocity_true, velocity
    velocity_u_layer: str | None = AUTO  # -> velocity_u; auto: velocity_u_true, velocity_u
    cell_type_key: str | None = AUTO  # obs column -> cell_type; auto: clusters
    time_key: str | None = AUTO  # obs column -> time; auto: time_true, latent_time, velocity_pseudotime, ...
    size_factor_key: str | None = None  # obs column -> size_factor


@dataclass
class _Dataset:
    """What a worker needs to read one input (picklable)."""

    path: str
    dataset_id: str
    n_cells: int
    n_genes: int
    velocity: str | None = None
    velocity_u: str | None = None
    cell_type: str | None = None
    time: str | None = None
    size_factor: str | None = None

    @property
    def targets(self) -> list[str]:
        names = {"velocity": keys.VELOCITY, "velocity_u": keys.VELOCITY_U, "cell_type": keys.CELL_TYPE}
        names |= {"time": keys.TIME, "size_factor": keys.SIZE_FACTOR}
        return [col for attr, col in names.items() if getattr(self, attr) is not None]


@dataclass
class _Stats:
    """Pass-1 statistics of a block of cells: per gene [n_genes] and per cell [rows]."""

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


@dataclass
class _ShardTask:
    index: int
    dataset: _Dataset
    rows: np.ndarray  # sorted source rows of the cells kept
    genes: np.ndarray  # source gene columns stored, ordered by vocabulary index
    vocab_index: np.ndarray  # their vocabulary indices (increasing)
    path: str
    settings_hash: str
    record_batch_size: int
    extra: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# pass 1: statistics and checks


def _check_counts(m: sp.csr_matrix, src: Source, layer: str, start: int, allow_non_integer: bool) -> None:
    d = m.data
    problems = [(~np.isfinite(d), "a NaN or infinite count", ""), (d < 0, "a negative count", "")]
    if not allow_non_integer:
        hint = "; non-integer counts (normalised data?) are accepted with --allow-non-integer"
        problems.append((np.isfinite(d) & (d != np.round(d)), "a non-integer count", hint))
    for bad, what, hint in problems:
        if bad.any():
            k = int(np.argmax(bad))
            row = int(np.searchsorted(m.indptr, k, side="right") - 1)
            gene = src.symbols[m.indices[k]]
            cell = src.read_cell_ids(start + row, start + row + 1)[0]
            raise ConversionError(
                f"{src.path}: {src.layer_field(layer)} has {what} ({float(d[k])}) at cell {cell!r} "
                f"(row {start + row}), gene {gene!r}{hint}"
            )


def _stats_task(ds: _Dataset, start: int, stop: int, chunk: int, allow_non_integer: bool, on_chunk=None) -> _Stats:
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
    return _Stats(
        start,
        **acc,
        cell_counts=np.concatenate(cell_counts),
        cell_genes=np.concatenate(cell_genes),
        cell_id_hash=np.concatenate(hashes),
    )


def _merge_stats(parts: list[_Stats]) -> _Stats:
    parts = sorted(parts, key=lambda p: p.start)
    per_gene = {
        k: sum(getattr(p, k) for p in parts)
        for k in ("counts_s", "counts_u", "cells_s", "cells_u", "shared_counts", "shared_cells")
    }
    per_cell = {
        k: np.concatenate([getattr(p, k) for p in parts]) for k in ("cell_counts", "cell_genes", "cell_id_hash")
    }
    return _Stats(0, **per_gene, **per_cell)


def _gene_mask(st: _Stats, f: FilterConfig) -> np.ndarray:
    return (
        (st.counts_s >= f.min_counts_gene)
        & (st.counts_u >= f.min_counts_u_gene)
        & (st.cells_s >= f.min_cells_gene)
        & (st.cells_u >= f.min_cells_u_gene)
        & (st.shared_counts >= f.min_shared_counts)
        & (st.shared_cells >= f.min_shared_cells)
    )


def _cell_mask(st: _Stats, f: FilterConfig) -> np.ndarray:
    # a cell without any count has nothing to store, whatever the filters say
    return (st.cell_counts >= f.min_counts_cell) & (st.cell_genes >= max(f.min_genes_cell, 1))


# ---------------------------------------------------------------------------------------------------------------
# pass 2: writing


def _values_at(pattern: sp.csr_matrix, m: sp.csr_matrix) -> np.ndarray:
    """Values of ``m`` at the stored positions of ``pattern`` (0 where ``m`` stores nothing), float32."""
    m = sp.csr_matrix(m)
    m.sum_duplicates()
    ncol = pattern.shape[1]
    key_p = np.repeat(np.arange(pattern.shape[0], dtype=np.int64), np.diff(pattern.indptr)) * ncol + pattern.indices
    key_m = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)) * ncol + m.indices
    pos = np.minimum(np.searchsorted(key_m, key_p), max(len(key_m) - 1, 0))
    out = np.zeros(len(key_p), dtype=np.float32)
    if len(key_m):
        hit = key_m[pos] == key_p
        out[hit] = m.data[pos[hit]]
    return out


def _list_array(indptr: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(indptr.astype(np.int32)), pa.array(values, type=typ))


def _obs_floats(src: Source, name: str, a: int, b: int, sel: np.ndarray) -> pa.Array:
    v = src.read_obs(name, a, b)[sel]
    try:
        return pa.array(pd.to_numeric(pd.Series(v, dtype=object)).to_numpy(np.float32, na_value=np.nan))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{src.path}: {src.obs_field(name)} is not numeric ({e})") from e


def _build_table(src: Source, t: _ShardTask, a: int, b: int, sel: np.ndarray) -> tuple[pa.Table, int]:
    """The corpus rows of source rows ``a + sel`` (sel sorted, relative to a); returns (table, cells dropped)."""
    ds = t.dataset

    def read(layer: str) -> sp.csr_matrix:
        return src.read_layer(layer, a, b)[sel][:, t.genes]

    s, u = read(keys.LAYER_SPLICED), read(keys.LAYER_UNSPLICED)
    # counts are >= 0, so s + i*u is 0 exactly where s + u = 0: its pattern is the set of genes to store
    c = sp.csr_matrix(s.astype(np.complex128) + 1j * u.astype(np.complex128))
    c.sum_duplicates()
    c.eliminate_zeros()
    n_genes = np.diff(c.indptr)
    keep = n_genes > 0  # a cell with no stored gene is not a row
    if not keep.all():
        c = c[keep]
    indptr = c.indptr
    s_val, u_val = c.data.real.astype(np.float32), c.data.imag.astype(np.float32)
    rows = np.repeat(np.arange(c.shape[0]), np.diff(indptr))
    cols = {
        keys.CELL_ID: pa.array(src.read_cell_ids(a, b)[sel][keep].astype(str)),
        keys.DATASET_ID: pa.array(np.full(c.shape[0], ds.dataset_id)),
        keys.GENE_INDEX: _list_array(indptr, t.vocab_index[c.indices].astype(np.int32), pa.int32()),
        keys.SPLICED: _list_array(indptr, s_val, pa.float32()),
        keys.UNSPLICED: _list_array(indptr, u_val, pa.float32()),
        keys.LIBRARY_SIZE_SPLICED: pa.array(np.bincount(rows, c.data.real, c.shape[0]).astype(np.float32)),
        keys.LIBRARY_SIZE_UNSPLICED: pa.array(np.bincount(rows, c.data.imag, c.shape[0]).astype(np.float32)),
    }
    for attr, col in (("velocity", keys.VELOCITY), ("velocity_u", keys.VELOCITY_U)):
        if getattr(ds, attr) is not None:
            dense = src.read_dense(getattr(ds, attr), a, b)
            if dense is not None:  # gather directly; a dense layer as CSR would cost more than the gather
                values = dense[sel][keep][:, t.genes][rows, c.indices].astype(np.float32)
            else:
                values = _values_at(c, read(getattr(ds, attr))[keep])
            cols[col] = _list_array(indptr, values, pa.float32())
    if ds.cell_type is not None:
        v = src.read_obs(ds.cell_type, a, b)[sel][keep]
        cols[keys.CELL_TYPE] = pa.array([None if x is None or x != x else str(x) for x in v], pa.string())
    for attr, col in (("time", keys.TIME), ("size_factor", keys.SIZE_FACTOR)):
        if getattr(ds, attr) is not None:
            cols[col] = _obs_floats(src, getattr(ds, attr), a, b, sel).filter(pa.array(keep))
    return pa.table(cols), int((~keep).sum())


def _shard_task(t: _ShardTask, on_chunk: Callable[[int], None] | None = None) -> tuple[ShardInfo, int]:
    """Write one shard; returns its manifest entry and the number of cells dropped for having no stored gene."""
    tables, dropped = [], 0
    with open_source(t.dataset.path) as src:
        i = 0
        while i < len(t.rows):
            a = int(t.rows[i])
            b = min(a + t.record_batch_size, int(t.rows[-1]) + 1)
            j = int(np.searchsorted(t.rows, b))
            table, n = _build_table(src, t, a, b, t.rows[i:j] - a)
            tables.append(table)
            dropped += n
            if on_chunk is not None:
                on_chunk(j - i)
            i = j
    table = pa.concat_tables([conform(x) for x in tables])
    meta = {SETTINGS_KEY: t.settings_hash, "fm.dataset_id": t.dataset.dataset_id, **t.extra}
    info = write_shard(
        t.path, table, record_batch_size=t.record_batch_size, dataset_id=t.dataset.dataset_id, metadata=meta
    )
    return info, dropped


def _shard_settings_hash(path: Path) -> str | None:
    """The settings hash a finished shard records (None when it records none or cannot be read)."""
    try:
        with pa.memory_map(str(path)) as f:
            meta = pa.ipc.open_file(f).schema.metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    h = meta.get(SETTINGS_KEY.encode())
    return h.decode() if h else None


def _shard_info(path: Path, dataset_id: str) -> ShardInfo:
    """The manifest entry of a finished shard on disk (the one write_shard returned when it wrote it)."""
    with pa.memory_map(str(path)) as f:
        reader = pa.ipc.open_file(f)
        rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    return ShardInfo(
        path=f"{SHARD_DIR}/{path.name}",
        n_cells=sum(rows),
        n_record_batches=len(rows),
        record_batch_rows=rows,
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
        dataset_id=dataset_id,
    )


# ---------------------------------------------------------------------------------------------------------------
# driver


def _resolve(src: Source, option: str | None, auto: tuple[str, ...], kind: str, path: str) -> str | None:
    """The field an option names: None stays None, ``auto`` is the first present, a name must exist."""
    has = src.has_layer if kind == "layer" else src.has_obs
    if option is None:
        return None
    if option == AUTO:
        return next((n for n in auto if has(n)), None)
    if not has(option):
        what = src.layer_field(option) if kind == "layer" else src.obs_field(option)
        raise ConversionError(f"{path}: {what} is missing (asked for as a target)")
    return option


def _inspect(path: Path, dataset_id: str, targets: TargetConfig) -> tuple[_Dataset, list[str] | None, list[str]]:
    """Open an input, check its layers and genes, and resolve its target fields; nothing is read in bulk."""
    with open_source(path) as src:
        src.check_layers([keys.LAYER_SPLICED, keys.LAYER_UNSPLICED])
        ds = _Dataset(
            path=str(path),
            dataset_id=dataset_id,
            n_cells=src.n_cells,
            n_genes=src.n_genes,
            velocity=_resolve(src, targets.velocity_layer, VELOCITY_LAYERS, "layer", str(path)),
            velocity_u=_resolve(src, targets.velocity_u_layer, VELOCITY_U_LAYERS, "layer", str(path)),
            cell_type=_resolve(src, targets.cell_type_key, (keys.OBS_CLUSTERS,), "obs", str(path)),
            time=_resolve(src, targets.time_key, TIME_KEYS, "obs", str(path)),
            size_factor=_resolve(src, targets.size_factor_key, (), "obs", str(path)),
        )
        src.check_layers([n for n in (ds.velocity, ds.velocity_u) if n is not None])
        return ds, src.gene_ids, src.symbols


def _settings_hash(datasets: list[_Dataset], settings: dict) -> str:
    files = []
    for ds in datasets:
        st = os.stat(ds.path)
        files.append(
            {**asdict(ds), "path": str(Path(ds.path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        )
    blob = json.dumps(
        {"files": files, **settings, "schema": SCHEMA_VERSION, "converter": CONVERTER_VERSION},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class _Lock:
    """``CORPUS/.convert.lock``: one conversion per corpus folder at a time; a stale lock (dead pid) is taken over."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = int(self.path.read_text().strip() or 0)
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, ValueError):
                log.warning("%s: taking over the lock of a conversion that no longer runs (pid %d)", self.path, pid)
                self.path.unlink(missing_ok=True)
                return self.__enter__()
            raise ConversionError(f"{self.path}: another conversion (pid {pid}) is writing this corpus") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes from a fork server that has imported this module once (fast and fork-safe), or None."""
    if workers <= 1:
        return None
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.convert"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _run(fn, tasks: list[tuple], pool: ProcessPoolExecutor | None, progress, task_id, weights: list[int]) -> Iterator:
    """Run ``fn(*args)`` for each task, inline (advancing per chunk) or in ``pool``; results in task order."""
    if pool is None:
        for args in tasks:
            yield fn(*args, on_chunk=lambda n: progress.advance(task_id, n))
        return
    futures = [pool.submit(fn, *args) for args in tasks]
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                progress.advance(task_id, weights[futures.index(fut)])
                fut.result()  # raises the worker's error here
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    for fut in futures:
        yield fut.result()


def convert(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    vocab: str | os.PathLike | None = None,
    *,
    workers: int = 1,
    filters: FilterConfig = FilterConfig(),
    targets: TargetConfig = TargetConfig(),
    shard_size: int = 8192,
    record_batch_size: int = 1024,
    allow_non_integer: bool = False,
    dataset_ids: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert ``inputs`` into the corpus folder ``out`` and return its manifest.

    Args:
        inputs: ``.h5ad`` / ``.loom`` files with layers ``spliced`` and ``unspliced`` (cells x genes).
        out: the corpus folder (created).
        vocab: a ``vocab.tsv`` to map onto; None builds the union of the inputs' genes that pass the filters.
        workers: processes for both passes.
        filters: scVelo-style cell and gene filters.
        targets: which optional fields become target columns.
        shard_size: cells per shard (a shard holds cells of one dataset; the last of a dataset may be shorter).
        record_batch_size: cells per record batch, also the rows read per chunk.
        allow_non_integer: accept non-integer counts (normalised or imputed data).
        dataset_ids: one per input; default the file stems.
        overwrite: replace shards written with other settings instead of stopping.
        progress: show rich progress bars.
    Raises:
        ConversionError: bad input, naming the file and the field; nothing is left half-written.
    """
    if workers < 1 or shard_size < 1 or record_batch_size < 1:
        raise ValueError(
            f"workers, shard_size and record_batch_size must be >= 1 (got {workers}, {shard_size}, {record_batch_size})"
        )
    if not inputs:
        raise ValueError("convert: no input files")
    paths = [Path(p) for p in inputs]
    dataset_ids = list(dataset_ids) if dataset_ids is not None else [p.stem for p in paths]
    if len(dataset_ids) != len(paths):
        raise ValueError(f"convert: {len(paths)} inputs but {len(dataset_ids)} dataset ids")
    if len(set(dataset_ids)) != len(dataset_ids):
        raise ConversionError(f"duplicate dataset ids {dataset_ids}; give distinct ones (--dataset-id)")
    given_vocab = GeneVocab.load(vocab) if vocab is not None else None
    inspected = [_inspect(p, d, targets) for p, d in zip(paths, dataset_ids, strict=True)]
    datasets = [ds for ds, _, _ in inspected]
    settings = {
        "filters": asdict(filters),
        "vocab": given_vocab.hash if given_vocab else None,
        "shard_size": shard_size,
        "record_batch_size": record_batch_size,
        "allow_non_integer": allow_non_integer,
    }
    settings_hash = _settings_hash(datasets, settings)
    out = Path(out)
    created = not out.exists()
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    try:
        with _Lock(out):
            done = _up_to_date(out, settings_hash)
            if done is not None:
                log.info("%s: up to date (settings %s); nothing to do", out, settings_hash[:12])
                return done
            return _convert_locked(
                paths,
                out,
                datasets,
                inspected,
                given_vocab,
                filters,
                settings,
                settings_hash,
                workers,
                shard_size,
                record_batch_size,
                allow_non_integer,
                overwrite,
                progress,
            )
    except ConversionError:
        if created:  # bad input into a new folder: leave nothing behind (an interrupted run keeps its shards)
            shutil.rmtree(out, ignore_errors=True)
        raise


def _up_to_date(out: Path, settings_hash: str) -> Manifest | None:
    """The manifest of a finished corpus written with these settings, or None."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = load_manifest(out)
    except CorpusError:
        return None
    if any(d.filters.get("settings_hash") != settings_hash for d in manifest.datasets):
        return None
    for s in manifest.shards:
        p = out / s.path
        if not p.is_file() or p.stat().st_size != s.bytes or _shard_settings_hash(p) != settings_hash:
            return None
    return manifest


def _convert_locked(
    paths,
    out,
    datasets,
    inspected,
    given_vocab,
    filters,
    settings,
    settings_hash,
    workers,
    shard_size,
    record_batch_size,
    allow_non_integer,
    overwrite,
    progress,
) -> Manifest:
    shard_dir = out / SHARD_DIR
    # shards from other settings: refuse before any work, unless asked to replace them
    foreign = [p for p in sorted(shard_dir.glob("part-*.arrow")) if _shard_settings_hash(p) != settings_hash]
    if foreign and not overwrite:
        raise ConversionError(
            f"{out}: {len(foreign)} shards (e.g. {foreign[0].name}) were written with other settings or inputs; "
            f"use --overwrite to replace them, or another --out"
        )
    chunk = record_batch_size
    pool = _pool(workers)
    with _progress(progress) as bar, pool or contextlib.nullcontext():
        # pass 1: statistics, in blocks of shard_size rows
        tasks, weights, owners = [], [], []
        for k, ds in enumerate(datasets):
            for a in range(0, ds.n_cells, shard_size):
                b = min(a + shard_size, ds.n_cells)
                tasks.append((ds, a, b, chunk, allow_non_integer))
                weights.append(b - a)
                owners.append(k)
        tid = bar.add_task("statistics", total=sum(weights))
        parts: list[list[_Stats]] = [[] for _ in datasets]
        for k, st in zip(owners, _run(_stats_task, tasks, pool, bar, tid, weights), strict=True):
            parts[k].append(st)
        stats = [_merge_stats(p) for p in parts]

        # filters, vocabulary, mapping
        gene_keep = [_gene_mask(st, filters) for st in stats]
        for ds, st in zip(datasets, stats, strict=True):
            h = st.cell_id_hash
            if len(np.unique(h)) != len(h):
                raise ConversionError(f"{ds.path}: the cell names (obs_names) are not unique")
        if given_vocab is None:
            vocab = build_vocab(
                (
                    [ids[i] for i in np.flatnonzero(keep)] if ids is not None else None,
                    [syms[i] for i in np.flatnonzero(keep)],
                )
                for (_, ids, syms), keep in zip(inspected, gene_keep, strict=True)
            )
        else:
            vocab = given_vocab
        plan: list[_ShardTask] = []
        infos: list[DatasetInfo] = []
        for path, ds, (_, ids, syms), keep, st in zip(paths, datasets, inspected, gene_keep, stats, strict=True):
            index, mapping = map_onto(vocab, ids, syms, keep)
            cells = np.flatnonzero(_cell_mask(st, filters))
            genes = np.flatnonzero(index >= 0)
            genes = genes[np.argsort(index[genes], kind="stable")]
            log.info(
                "%s: %d/%d cells pass the cell filters, %d/%d genes the gene filters; %s",
                ds.dataset_id,
                len(cells),
                ds.n_cells,
                int(keep.sum()),
                ds.n_genes,
                mapping.summary(),
            )
            if mapping.unmatched:
                log.warning("%s: %d genes not in the vocabulary are not stored", ds.dataset_id, len(mapping.unmatched))
            for a in range(0, len(cells), shard_size):
                plan.append(
                    _ShardTask(
                        index=len(plan),
                        dataset=ds,
                        rows=cells[a : a + shard_size],
                        genes=genes,
                        vocab_index=index[genes],
                        path=str(shard_dir / shard_name(len(plan))),
                        settings_hash=settings_hash,
                        record_batch_size=record_batch_size,
                    )
                )
            infos.append(
                DatasetInfo(
                    dataset_id=ds.dataset_id,
                    source=str(path),
                    n_cells_in=ds.n_cells,
                    n_cells_out=0,
                    n_genes_in=ds.n_genes,
                    n_genes_matched=mapping.n_matched,
                    n_genes_unmatched=len(mapping.unmatched),
                    filters={
                        **asdict(filters),
                        "n_cells_failing_filters": int(ds.n_cells - len(cells)),
                        "n_genes_failing_filters": int((~keep).sum()),
                        "unmatched_genes": mapping.unmatched[:100],
                        "settings_hash": settings_hash,
                        "allow_non_integer": allow_non_integer,
                    },
                    targets=ds.targets,
                )
            )

        # pass 2: one task per shard; finished shards (same settings) are kept. The input is known to be good now.
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the corpus is not a finished one
        for p in shard_dir.glob(".*.tmp-*"):  # temporary files of a killed run
            log.info("removing %s, left by an interrupted run", p)
            p.unlink()
        for p in foreign:
            p.unlink()
        planned = {Path(t.path).name for t in plan}
        for p in shard_dir.glob("part-*.arrow"):
            if p.name not in planned:
                p.unlink()
        todo = [t for t in plan if _shard_settings_hash(Path(t.path)) != settings_hash]
        todo_index = {t.index for t in todo}
        kept = [t for t in plan if t.index not in todo_index]
        if kept:
            log.info("%d of %d shards already written with these settings; keeping them", len(kept), len(plan))
        tid = bar.add_task("shards", total=sum(len(t.rows) for t in todo))
        written = list(_run(_shard_task, [(t,) for t in todo], pool, bar, tid, [len(t.rows) for t in todo]))
    shard_infos = {t.index: info for t, (info, _) in zip(todo, written, strict=True)}
    for t in kept:
        shard_infos[t.index] = _shard_info(Path(t.path), t.dataset.dataset_id)
    dropped = sum(n for _, n in written)
    if dropped:
        log.info("%d cells had no stored gene (after gene filters and vocabulary) and are not stored", dropped)
    shards = [shard_infos[t.index] for t in plan]
    for info in infos:
        info.n_cells_out = sum(s.n_cells for s in shards if s.dataset_id == info.dataset_id)
    manifest = write_manifest(out, vocab, shards, infos, record_batch_size=record_batch_size)
    log.info("%s: %d cells, %d shards, %d genes", out, manifest.n_cells, len(shards), len(vocab))
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# command line


def _optional_name(value: str) -> str | None:
    return None if value.lower() == "none" else value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert .h5ad/.loom files into a corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help=".h5ad or .loom files")
    p.add_argument("--out", required=True, help="corpus folder")
    p.add_argument("--vocab", help="map onto this vocab.tsv (default: build the union of the inputs' genes)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=8192, help="cells per shard")
    p.add_argument("--record-batch-size", type=int, default=1024, help="cells per record batch")
    p.add_argument("--allow-non-integer", action="store_true", help="accept non-integer counts")
    p.add_argument("--overwrite", action="store_true", help="replace shards written with other settings")
    p.add_argument("--dataset-id", action="append", dest="dataset_ids", help="one per input (default: file stem)")
    p.add_argument("--no-progress", action="store_true")
    for f in fields(FilterConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=f.default, help="filter (default 0)")
    t = TargetConfig()
    for name, help_ in (
        ("velocity_layer", "layer -> velocity ('auto': velocity_true, velocity; 'none')"),
        ("velocity_u_layer", "layer -> velocity_u ('auto': velocity_u_true, velocity_u; 'none')"),
        ("cell_type_key", "obs column -> cell_type ('auto': clusters; 'none')"),
        ("time_key", "obs column -> time ('auto': time_true, latent_time, velocity_pseudotime, dpt_pseudotime)"),
        ("size_factor_key", "obs column -> size_factor (default none)"),
    ):
        default = getattr(t, name)
        p.add_argument("--" + name.replace("_", "-"), type=_optional_name, default=default, help=help_)
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    filters = FilterConfig(
        **{
            f.name: (int(getattr(args, f.name)) if f.type in (int, "int") else getattr(args, f.name))
            for f in fields(FilterConfig)
        }
    )
    targets = TargetConfig(**{f.name: getattr(args, f.name) for f in fields(TargetConfig)})
    try:
        convert(
            args.inputs,
            args.out,
            args.vocab,
            workers=args.workers,
            filters=filters,
            targets=targets,
            shard_size=args.shard_size,
            record_batch_size=args.record_batch_size,
            allow_non_integer=args.allow_non_integer,
            dataset_ids=args.dataset_ids,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ConversionError, CorpusError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    from fm.cli import main

    sys.exit(main(["prep", "convert", *sys.argv[1:]]))
