"""Which reader reads which cells: (shard, record batch) units, the per-epoch deal, and the shard checks.

A *unit* is one record batch of one shard (optionally restricted to some of its rows, e.g. the training split). A
*reader* is one (rank, data-loader worker) pair; readers are numbered ``rank * num_workers + worker``.

Each epoch the units are permuted with a generator seeded by ``(seed, epoch)`` and laid end to end into a virtual
sequence of N cells. Reader i owns the contiguous slice ``[i*N//R, (i+1)*N//R)`` of that sequence, so the cells
per reader differ by at most one and every cell belongs to exactly one reader (a unit can straddle two readers; each
decodes only its own rows). Every reader then yields the same number of batches, so every rank does too (DDP and
DeepSpeed hang otherwise).

Remainder policy (``remainder``), with R readers and batch size B:

* ``drop``: every reader yields ``floor(floor(N/R) / B)`` batches, read from the start of its slice; the rest of
  each slice is not read this epoch. Each cell is read at most once; exactly ``N - R*B*n_batches`` cells are
  dropped (fewer than ``R*(B+1)``), and which ones changes with the epoch's permutation.
* ``wrap`` (default): every reader yields ``ceil(ceil(N/R) / B)`` batches; a reader whose slice is short goes on
  reading past its end into the following cells of the sequence (modulo N). Every cell is read at least once; the
  ``R*B*n_batches - N`` extra reads (fewer than ``R*B``) are the wrap fill.

Start-up at corpus scale: a per-shard index file, ``CORPUS/index/part-NNNNN.npz`` (:func:`write_shard_index`),
holds the shard's cell hashes for the hash split and a stamp of its last sha256 verification (the manifest digest,
the file's size and mtime then). The shard writer makes it at conversion; a start that finds none (an older corpus)
makes it once. Later starts check each shard's size and footer, trust the stamp while the file is unchanged, and load
the hashes: O(shards) work, no record batch read. ``data.deep_check=true`` reads every record batch, hashes every
shard and every cell id again (the index is ignored, and rewritten).

    python -c "from fm.data.shards import plan_epoch, UnitIndex; help(plan_epoch)"
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fm import keys
from fm.data.schema import CORPUS_SCHEMA, SCHEMA_VERSION, CorpusError, Manifest, ShardInfo, sha256_file
from fm.io import atomic_path

log = logging.getLogger(__name__)

REMAINDERS = ("drop", "wrap")
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
INDEX_DIR = "index"  # CORPUS/index/<shard stem>.npz: per-shard cell hashes and checksum stamp


@dataclass(frozen=True)
class Unit:
    """One record batch of one shard, optionally restricted to some rows."""

    shard: int  # index into UnitIndex.shard_paths
    batch: int  # record batch index in the shard
    n_cells: int  # rows this unit contributes
    rows: np.ndarray | None = None  # int64 row indices within the record batch (None: all rows, in order)


class UnitIndex:
    """The units of a corpus (or of one split of it), in manifest order."""

    def __init__(self, shard_paths: list[str], units: list[Unit], targets: tuple[str, ...] = (),
                 shard_infos: list[ShardInfo] | None = None):
        self.shard_paths = list(shard_paths)
        self.shard_infos = shard_infos  # the manifest's entries of shard_paths (None: an index built by hand)
        self.targets = tuple(targets)  # optional per-gene columns (targets, moments) some dataset of the corpus fills
        self.units = [u for u in units if u.n_cells > 0]
        self.n_cells_U = np.array([u.n_cells for u in self.units], dtype=np.int64)

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_cells(self) -> int:
        return int(self.n_cells_U.sum())

    @classmethod
    def from_manifest(cls, corpus: str | os.PathLike, manifest: Manifest, shard_ok: list[bool] | None = None):
        """All record batches of the shards marked usable (all shards when ``shard_ok`` is None)."""
        paths, units, infos = [], [], []
        for i, s in enumerate(manifest.shards):
            if shard_ok is not None and not shard_ok[i]:
                continue
            paths.append(str(Path(corpus) / s.path))
            infos.append(s)
            units += [Unit(len(paths) - 1, b, int(n)) for b, n in enumerate(s.record_batch_rows)]
        filled = {t for d in manifest.datasets for t in d.targets}
        return cls(paths, units, tuple(t for t in keys.GENE_VALUE_COLUMNS if t in filled), infos)

    def select(self, keep: list[np.ndarray]) -> UnitIndex:
        """A new index keeping, per unit, the rows where ``keep[u]`` (bool [rows]) is True."""
        units = []
        for u, k in zip(self.units, keep, strict=True):
            rows = np.flatnonzero(k) if u.rows is None else u.rows[k]
            units.append(Unit(u.shard, u.batch, len(rows), None if len(rows) == u.n_cells and u.rows is None else rows))
        return UnitIndex(self.shard_paths, units, self.targets, self.shard_infos)


def batches_per_reader(n_cells: int, n_readers: int, batch_size: int, remainder: str) -> int:
    """Batches every reader yields per epoch under ``remainder`` (see the module docstring)."""
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if n_cells <= 0:
        raise CorpusError("the stream has no cells (empty corpus or split)")
    if remainder == "drop":
        n = (n_cells // n_readers) // batch_size
        if n == 0:
            raise CorpusError(
                f"remainder='drop': {n_cells} cells over {n_readers} readers (ranks x workers) give no full batch of "
                f"{batch_size}; use remainder='wrap', a smaller batch_size or fewer workers"
            )
        return n
    per_reader = -(-n_cells // n_readers)
    return -(-per_reader // batch_size)


class EpochPlan:
    """The deal of one epoch: unit order and each reader's span of the virtual cell sequence."""

    def __init__(self, index: UnitIndex, *, seed: int, epoch: int, n_readers: int, batch_size: int,
                 remainder: str, shuffle: bool = True):
        if n_readers < 1 or batch_size < 1:
            raise ValueError(f"n_readers and batch_size must be >= 1, got {n_readers}, {batch_size}")
        self.index = index
        self.n_readers = n_readers
        self.batch_size = batch_size
        self.n_batches = batches_per_reader(index.n_cells, n_readers, batch_size, remainder)
        rng = np.random.default_rng([seed, epoch])
        self.order_U = rng.permutation(index.n_units) if shuffle else np.arange(index.n_units)
        self.cum_U = np.concatenate([[0], np.cumsum(index.n_cells_U[self.order_U])])  # [U+1] virtual starts

    @property
    def n_cells(self) -> int:
        return int(self.cum_U[-1])

    def reader_start(self, reader: int) -> int:
        return reader * self.n_cells // self.n_readers

    def pieces(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """The cells at virtual positions ``[start, start + length)`` (modulo N) as (unit, lo, hi) row ranges.

        ``unit`` indexes ``index.units``; ``lo:hi`` are positions within that unit's selected rows.
        """
        out, n = [], self.n_cells
        pos, end = start % n, start % n + length
        while pos < end:
            p = pos % n
            k = int(np.searchsorted(self.cum_U, p, side="right")) - 1
            lo = p - int(self.cum_U[k])
            take = min(int(self.cum_U[k + 1]) - p, end - pos)
            out.append((int(self.order_U[k]), lo, lo + take))
            pos += take
        return out


def hash_unit_interval(dataset_ids: pa.Array, cell_ids: pa.Array) -> np.ndarray:
    """A stable number in [0, 1) per cell: 64-bit FNV-1a of ``dataset_id + '\\x1f' + cell_id`` (vectorised), then
    murmur3's fmix64 finaliser: FNV alone leaves the top bits nearly equal for ids that differ only at the end
    (``cell1``, ``cell2``, ...), so a split by ``val_fraction`` would hold out far more or fewer cells than asked.

    Stable across machines, processes and Python versions (unlike ``hash``), so a split never moves a cell.
    """
    h = np.full(len(cell_ids), _FNV_OFFSET, dtype=np.uint64)
    for arr, sep in ((dataset_ids, True), (cell_ids, False)):
        arr = pa.array(arr, type=pa.string()) if not isinstance(arr, pa.Array) else arr.cast(pa.string())
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
        buf = arr.buffers()[2]
        data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
        starts, lens = offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)
        for p in range(int(lens.max(initial=0))):
            m = lens > p
            h[m] = (h[m] ^ data[starts[m] + p].astype(np.uint64)) * _FNV_PRIME
        if sep:
            h = (h ^ np.uint64(0x1F)) * _FNV_PRIME
    for shift, mult in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53)):
        h = (h ^ (h >> np.uint64(shift))) * np.uint64(mult)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class ShardReader:
    """A memory-mapped Arrow IPC shard; errors name the file."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = pa.memory_map(path, "r")
            self._reader = pa.ipc.open_file(self._file)
        except (OSError, pa.ArrowInvalid) as e:
            raise CorpusError(f"{path}: cannot open as an Arrow IPC file ({e}); corrupt or truncated shard") from e

    @property
    def num_record_batches(self) -> int:
        return self._reader.num_record_batches

    @property
    def schema(self) -> pa.Schema:
        return self._reader.schema

    def get_batch(self, i: int) -> pa.RecordBatch:
        try:
            return self._reader.get_batch(i)
        except (OSError, pa.ArrowInvalid, IndexError) as e:
            raise CorpusError(f"{self.path}: cannot read record batch {i} ({e}); corrupt or truncated shard") from e

    def close(self) -> None:
        self._file.close()


def check_shard(corpus: str | os.PathLike, info, *, checksum: bool, source: str = "INPUT", deep: bool = False) -> None:
    """Raise CorpusError naming the file if a shard is missing, of the wrong size/checksum or malformed.

    Always: size, footer (schema version, schema, record batch count). ``checksum``: sha256 against the manifest,
    unless the shard's index file stamps a verification of this very file (same digest, size and mtime). ``deep``:
    sha256 regardless of the stamp, and every record batch's row count.
    ``source``: the file the shard was converted from (the manifest's dataset source), for the rebuild command.
    """
    path = Path(corpus) / info.path
    if not path.is_file():
        raise CorpusError(f"{path}: shard listed in the manifest is missing")
    stat = path.stat()
    size = stat.st_size
    if size != info.bytes:
        raise CorpusError(f"{path}: {size} bytes, manifest says {info.bytes}; truncated or rewritten shard")
    index = None if deep else read_shard_index(corpus, info, with_hashes=False)
    stamped = index is not None and (int(index["verified_bytes"]), int(index["verified_mtime_ns"])) == \
        (size, stat.st_mtime_ns)
    if checksum and not stamped and (digest := sha256_file(path)) != info.sha256:
        # the converter keeps a finished shard (same settings) on a re-run, so the bad one must be deleted first
        raise CorpusError(
            f"{path}: sha256 {digest[:12]} does not match the manifest's {info.sha256[:12]}; the file changed after "
            f"conversion (a corrupt copy or disk) and would train on altered values. Rebuild it: delete {path}, then "
            f"`fm prep convert {source} --out {corpus}` with the settings it was built with"
        )
    reader = ShardReader(str(path))
    try:
        meta = reader.schema.metadata or {}
        version = meta.get(b"fm.schema_version", b"?").decode()
        if version != str(SCHEMA_VERSION):
            raise CorpusError(f"{path}: schema version {version}, this fm reads {SCHEMA_VERSION}; rebuild the corpus "
                              "with fm prep convert INPUTS --out CORPUS --overwrite")
        if not reader.schema.remove_metadata().equals(CORPUS_SCHEMA.remove_metadata()):
            raise CorpusError(f"{path}: Arrow schema differs from the corpus schema:\n{reader.schema}")
        if reader.num_record_batches != info.n_record_batches:
            raise CorpusError(
                f"{path}: {reader.num_record_batches} record batches, manifest says {info.n_record_batches}"
            )
        if deep:
            rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            if rows != list(info.record_batch_rows):
                raise CorpusError(f"{path}: record batch rows differ from the manifest's record_batch_rows")
    finally:
        reader.close()
    if checksum and not stamped:  # verified now: stamp it, so the next start need not read the file again
        index = read_shard_index(corpus, info)  # its hashes are good while the digest matches
        hashes = index["cell_hash"] if index is not None else shard_cell_hashes(path)
        write_shard_index(corpus, info, hashes, verified=(size, stat.st_mtime_ns))


def shard_index_path(corpus: str | os.PathLike, info: ShardInfo) -> Path:
    """``CORPUS/index/<shard stem>.npz``: the shard's index file."""
    return Path(corpus) / INDEX_DIR / f"{Path(info.path).stem}.npz"


def read_shard_index(corpus: str | os.PathLike, info: ShardInfo, *, with_hashes: bool = True) -> dict | None:
    """The shard's index (``cell_hash`` [n_cells] float64 when ``with_hashes``, ``verified_bytes``,
    ``verified_mtime_ns``: -1 when never verified), or None when there is none, it cannot be read, or it was made
    for another file (another manifest digest or cell count)."""
    path = shard_index_path(corpus, info)
    names = ("sha256", "n_cells", "verified_bytes", "verified_mtime_ns") + (("cell_hash",) if with_hashes else ())
    try:
        with np.load(path, allow_pickle=False) as f:
            index = {k: f[k] for k in names}
    except (OSError, KeyError, ValueError) as e:
        if path.exists():
            log.warning("%s: unreadable shard index, rebuilding it (%s)", path, e)
        return None
    if str(index["sha256"]) != info.sha256 or int(index["n_cells"]) != info.n_cells:
        return None
    return index


def write_shard_index(corpus: str | os.PathLike, info: ShardInfo, cell_hash: np.ndarray,
                      verified: tuple[int, int] | None = None) -> None:
    """Write the shard's index file atomically; ``verified``: (size, mtime_ns) of a file whose sha256 matched.

    A corpus on read-only storage keeps working without it (each start then does the work the index saves)."""
    path = shard_index_path(corpus, info)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, sha256=np.str_(info.sha256), n_cells=np.int64(len(cell_hash)),
                         cell_hash=np.asarray(cell_hash, np.float64),
                         verified_bytes=np.int64(verified[0] if verified else -1),
                         verified_mtime_ns=np.int64(verified[1] if verified else -1))
    except OSError as e:
        log.info("%s: cannot write the shard index (%s); each start recomputes it", path, e)


def shard_cell_hashes(path: str | os.PathLike) -> np.ndarray:
    """:func:`hash_unit_interval` of every cell of a shard, in file order: float64 [n_cells]."""
    reader = ShardReader(str(path))
    try:
        parts = [hash_unit_interval(rb.column(keys.DATASET_ID), rb.column(keys.CELL_ID))
                 for rb in (reader.get_batch(i) for i in range(reader.num_record_batches))]
    finally:
        reader.close()
    return np.concatenate(parts) if parts else np.zeros(0, np.float64)


def unit_cell_hashes(corpus: str | os.PathLike, index: UnitIndex, *, deep: bool = False) -> list[np.ndarray]:
    """Per unit of ``index``, its cells' :func:`hash_unit_interval`, from the shard index files (written where
    missing; recomputed from the cell ids, and rewritten, when ``deep``)."""
    if index.shard_infos is None:
        raise ValueError("unit_cell_hashes needs a UnitIndex built from a manifest (UnitIndex.from_manifest)")
    per_shard: dict[int, np.ndarray] = {}
    out = []
    for u in index.units:
        if u.shard not in per_shard:
            info = index.shard_infos[u.shard]
            existing = read_shard_index(corpus, info, with_hashes=not deep)
            if existing is not None and not deep:
                hashes = existing["cell_hash"]
            else:
                hashes = shard_cell_hashes(index.shard_paths[u.shard])
                stamp = (int(existing["verified_bytes"]), int(existing["verified_mtime_ns"])) \
                    if existing is not None and int(existing["verified_bytes"]) >= 0 else None
                write_shard_index(corpus, info, hashes, verified=stamp)
            per_shard[u.shard] = hashes
        info = index.shard_infos[u.shard]
        start = int(sum(info.record_batch_rows[: u.batch]))
        h = per_shard[u.shard][start: start + info.record_batch_rows[u.batch]]
        out.append(h if u.rows is None else h[u.rows])
    return out


def check_shards(corpus: str | os.PathLike, manifest: Manifest, *, checksum: bool = False,
                 tolerant: bool = False, deep: bool = False) -> list[bool]:
    """Check every shard before training (size, footer, schema; sha256 when ``checksum``, once per file version
    unless ``deep``; every record batch too when ``deep``: see :func:`check_shard`).

    Returns one flag per manifest shard (True: usable). Without ``tolerant`` the first bad shard raises; with it,
    bad shards are skipped, each logged, and the count is logged. Shards are checked on threads: sha256 reads every
    byte, and file reads and hashlib release the GIL (cost: docs/BENCHMARKS.md, Loader).
    """
    sources = {d.dataset_id: d.source for d in manifest.datasets}

    def check(info) -> CorpusError | None:
        try:
            check_shard(corpus, info, checksum=checksum, source=sources.get(info.dataset_id, "INPUT"), deep=deep)
        except CorpusError as e:
            return e
        return None

    with ThreadPoolExecutor(max(1, min(len(manifest.shards), os.cpu_count() or 1))) as pool:
        errors = list(pool.map(check, manifest.shards))
    ok = []
    for error in errors:
        if error is not None and not tolerant:
            raise error
        if error is not None:
            log.warning("tolerant: skipping shard: %s", error)
        ok.append(error is None)
    if not all(ok):
        n_bad = ok.count(False)
        cells = sum(s.n_cells for s, good in zip(manifest.shards, ok, strict=True) if not good)
        log.warning("tolerant: skipped %d of %d shards (%d cells) in %s", n_bad, len(ok), cells, corpus)
        if n_bad == len(ok):
            raise CorpusError(f"{corpus}: every shard failed its checks")
    return ok
