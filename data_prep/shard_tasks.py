"""Pass 2 of the conversion: write one shard of kept cells and genes, and read back what a finished shard records.

    fm prep convert sim.h5ad --out corpus/ --workers 2 --record-batch-size 512   # CPU; shards written here

A `ShardTask` names the source rows and gene columns of one shard; `write_shard_task` reads them a record batch at
a time and writes ``shards/part-NNNNN.arrow`` through `fm.data.writer`, recording the settings hash in the shard's
metadata so that a re-run can keep it (`shard_settings_hash`, `read_shard_info`).

Shapes: rows of a record batch are cells; list columns hold one entry per stored (cell, gene).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from data_prep.neighbourhoods import load_shard_moments
from data_prep.sources import ConversionError, Source, open_source
from data_prep.targets import DatasetSpec
from fm import keys
from fm.data.counts import stored_entries, values_at
from fm.data.schema import SHARD_DIR, ShardInfo, sha256_file
from fm.data.writer import conform, write_shard

SETTINGS_KEY = "fm.settings_hash"


@dataclass
class ShardTask:
    """One shard to write: which source rows and gene columns, where, and with which settings (picklable)."""

    index: int
    dataset: DatasetSpec
    rows: np.ndarray  # sorted source rows of the cells kept
    genes: np.ndarray  # source gene columns stored, ordered by vocabulary index
    vocab_index: np.ndarray  # their vocabulary indices (increasing)
    path: str
    settings_hash: str
    record_batch_size: int
    extra: dict[str, str] = field(default_factory=dict)
    moments: str | None = None  # the shard's moments file (data_prep.neighbourhoods), rows aligned with `rows`


def _list_array(indptr: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(indptr.astype(np.int32)), pa.array(values, type=typ))


def _obs_floats(src: Source, name: str, a: int, b: int, sel: np.ndarray) -> pa.Array:
    v = src.read_obs(name, a, b)[sel]
    try:
        return pa.array(pd.to_numeric(pd.Series(v, dtype=object)).to_numpy(np.float32, na_value=np.nan))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{src.path}: {src.obs_field(name)} is not numeric ({e})") from e


def _build_table(src: Source, t: ShardTask, a: int, b: int, sel: np.ndarray,
                 moments: tuple[sp.csr_matrix, sp.csr_matrix] | None = None,
                 teacher: sp.csr_matrix | None = None) -> tuple[pa.Table, int]:
    """The corpus rows of source rows ``a + sel`` (sel sorted, relative to a); returns (table, cells dropped).

    ``moments``: (Ms, Mu) of these rows; ``teacher``: a velocity teacher's output for them (the velocity column).
    A gene is stored where s + u > 0, with its moments (fm.data.counts.stored_entries; docs/FORMAT.md).
    """
    ds = t.dataset

    def read(layer: str) -> sp.csr_matrix:
        return src.read_layer(layer, a, b)[sel][:, t.genes]

    s, u = read(keys.LAYER_SPLICED), read(keys.LAYER_UNSPLICED)
    keep = np.asarray((s + u).sum(1)).ravel() > 0  # a cell without counts is not a row (counts are >= 0)
    c, ms_val, mu_val = stored_entries(s[keep], u[keep], None if moments is None else tuple(m[keep] for m in moments))
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
    if moments is not None:
        cols[keys.MS] = _list_array(indptr, ms_val, pa.float32())
        cols[keys.MU] = _list_array(indptr, mu_val, pa.float32())
    if teacher is not None:  # on the moments' pattern, which holds every gene with counts (NaN: no velocity)
        cols[keys.VELOCITY] = _list_array(indptr, values_at(c, teacher[keep]), pa.float32())
    for attr, col in (("velocity", keys.VELOCITY), ("velocity_u", keys.VELOCITY_U)):
        if getattr(ds, attr) is not None and col not in cols:
            dense = src.read_dense(getattr(ds, attr), a, b)
            if dense is not None:  # gather directly; a dense layer as CSR would cost more than the gather
                values = dense[sel][keep][:, t.genes][rows, c.indices].astype(np.float32)
            else:
                values = values_at(c, read(getattr(ds, attr))[keep])
            cols[col] = _list_array(indptr, values, pa.float32())
    if ds.cell_type is not None:
        v = src.read_obs(ds.cell_type, a, b)[sel][keep]
        cols[keys.CELL_TYPE] = pa.array([None if x is None or x != x else str(x) for x in v], pa.string())
    for attr, col in (("time", keys.TIME), ("size_factor", keys.SIZE_FACTOR)):
        if getattr(ds, attr) is not None:
            cols[col] = _obs_floats(src, getattr(ds, attr), a, b, sel).filter(pa.array(keep))
    return pa.table(cols), int((~keep).sum())


def write_shard_task(t: ShardTask, on_chunk: Callable[[int], None] | None = None) -> tuple[ShardInfo, int]:
    """Write one shard; returns its manifest entry and the number of cells dropped for having no stored gene."""
    tables, dropped = [], 0
    ms, mu, teacher = load_shard_moments(t.moments, len(t.rows)) if t.moments is not None else (None, None, None)
    with open_source(t.dataset.path) as src:
        i = 0
        while i < len(t.rows):
            a = int(t.rows[i])
            b = min(a + t.record_batch_size, int(t.rows[-1]) + 1)
            j = int(np.searchsorted(t.rows, b))
            table, n = _build_table(src, t, a, b, t.rows[i:j] - a, None if ms is None else (ms[i:j], mu[i:j]),
                                    None if teacher is None else teacher[i:j])
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


def shard_settings_hash(path: Path) -> str | None:
    """The settings hash a finished shard records (None when it records none or cannot be read)."""
    try:
        with pa.memory_map(str(path)) as f:
            meta = pa.ipc.open_file(f).schema.metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    h = meta.get(SETTINGS_KEY.encode())
    return h.decode() if h else None


def read_shard_info(path: Path, dataset_id: str) -> ShardInfo:
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
