"""Stream a corpus as model batches: ShardedArrowDataset (an IterableDataset) and its stateful ShardedDataLoader.

Each reader (rank x data-loader worker) reads its span of the epoch's deal (fm.data.shards: the deal and the
``drop``/``wrap`` remainder policy) through memory-mapped shards, and yields whole batches, so the DataLoader runs
with ``batch_size=None``. Every reader yields the same number of batches, so every rank does.

Shuffle buffer: a reader cuts its span into windows of ``shuffle_buffer`` cells (rounded up to whole batches),
decodes a window's record batches (zero-copy views into the memory map) and yields its cells in a permutation
seeded by (seed, epoch, reader, window). As the units of a span are already a random draw over all shards, a batch
mixes cells of about ``shuffle_buffer / record_batch_size`` record batches from random shards. With
``length_bucketing`` the window's cells are grouped into batches of similar length, in a random batch order.

Resume: batch k of a rank comes from worker ``k % W`` (DataLoader round-robin, equal counts per worker), so the
number of batches the main process handed out fixes every reader's position; the loader's ``state_dict`` holds it
and the workers skip straight to the window they are in, without decoding the skipped record batches. Gene sampling
draws from a generator seeded by (seed, epoch, reader, batch), so a resumed stream is bit-identical.

Workers: each writes its batches into a ring of shared-memory slots the loader allocated before starting it
(BatchRing: ``prefetch_factor + 1`` slots, safe by the DataLoader's request protocol, checked by a generation
number) and sends a few hundred bytes per batch; the main process copies the batch out. Sending the tensors
themselves cost a fresh shared-memory segment per storage and a file-descriptor handshake, over twice a worker's
tokenizing time (docs/BENCHMARKS.md, Loader). The batches are bit-identical to the in-process reader's.

A shard that fails at read time raises with its file name, even with ``tolerant``: skipping it then would give the
ranks different batch counts. ``tolerant`` acts at setup (fm.data.shards.check_shards).

    python -c "from fm.data.stream import ShardedArrowDataset; help(ShardedArrowDataset)"
"""

from __future__ import annotations

import logging
import math
import signal
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fm import keys
from fm.data.schema import CorpusError
from fm.data.shards import REMAINDERS, EpochPlan, ShardReader, UnitIndex, batches_per_reader
from fm.data.tokenize import CellBlock, Segments, TokenizerConfig, batch_nbytes, empty_shared, ranges, tokenize_block
from fm.distributed import get_rank, get_world_size

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MAX_OPEN_SHARDS = 64


def _generator(seed: list[int]) -> np.random.Generator:
    """``np.random.default_rng(seed)``, the same stream, built without its argument checks (~30% of its cost)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))


def _as_is(batch):
    """The batches are collated already (module level so workers can pickle it)."""
    return batch


# A scheduler's stop signal goes to the whole process group (`scancel`, `timeout`, `kill -- -PGID`). A worker killed
# by it makes the main process raise "DataLoader worker ... killed by signal" before it can save; the main process
# (fm.tasks.callbacks.PreemptionCheckpoint) handles these, then shuts the workers down itself.
WORKER_IGNORED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))


def _leave_signals_to_main(worker_id: int) -> None:
    """``worker_init_fn``: ignore the stop signals, then unblock them (they were blocked across the worker's start)."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)


_ALIGN = 64  # bytes: every region of a slot (and the slot header) starts on a cache line


class _RingBatch:
    """What a worker sends for one batch: where its arrays lie in the worker's ring, plus the small fields by value."""

    def __init__(self, worker: int, slot: int, generation: int, regions: list, fields: dict):
        self.worker, self.slot, self.generation = worker, slot, generation
        self.regions = regions  # [(byte offset in the slot, numel, numpy dtype string)]
        # key -> ("ring", region, element offset, shape) | ("numpy", array) sent by value | ("value", anything)
        self.fields = fields


class BatchRing:
    """Shared-memory slots one loader worker writes its batches into; the main process copies each batch out.

    Sending a tensor from a worker normally costs a fresh shared-memory segment per storage (create, fault in the
    zeroed pages) plus passing its file descriptor over a socket; for ~2 MB batches that is most of a worker's time.
    The ring is allocated once per epoch by the main process, before the workers start, so the workers inherit it,
    write into it, and send only a few hundred bytes per batch.

    Why a slot is never overwritten while it is read: the DataLoader sends a worker its request for batch j only
    when the main process takes the worker's batch ``j - prefetch_factor`` off the queue, and the loader copies
    every batch out before it asks for the next one. So batches ``j - prefetch_factor .. j`` may be unread, and
    ``prefetch_factor + 1`` slots, used round robin, keep them apart. Each slot also carries a generation number
    that the main process checks before and after its copy (a loud error, never a silently mixed batch).

    Every access goes through numpy, never a torch kernel: a process forked from one whose OpenMP pool is running
    (a rank started by fork, a worker) hangs in its first multi-threaded torch op.
    """

    def __init__(self, n_slots: int, slot_nbytes: int):
        self.n_slots = n_slots
        self.slot_nbytes = -(-slot_nbytes // _ALIGN) * _ALIGN
        width = _ALIGN + self.slot_nbytes
        storage = torch.UntypedStorage._new_shared(n_slots * width)  # born shared: no copy into it
        self.buf_SX = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n_slots, width), (width, 1))
        self._views()
        self.generation_S[:] = 0

    def _views(self) -> None:
        self.np_SX = self.buf_SX.numpy()
        self.generation_S = self.np_SX[:, :8].view(np.int64)[:, 0]
        self._addr = self.np_SX.__array_interface__["data"][0] + _ALIGN  # of slot 0's first region

    def __getstate__(self):  # spawned workers get the shared buffer (as a handle); the numpy views are remade
        return {"n_slots": self.n_slots, "slot_nbytes": self.slot_nbytes, "buf_SX": self.buf_SX}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._views()

    def _region(self, slot: int, offset: int, numel: int, dtype: np.dtype) -> np.ndarray:
        return self.np_SX[slot, _ALIGN + offset: _ALIGN + offset + numel * dtype.itemsize].view(dtype)

    def writer(self, j: int):
        """An allocator (fm.data.tokenize.Alloc) in the slot of this worker's batch ``j`` (counted from 0)."""
        slot = j % self.n_slots
        self.generation_S[slot] = 0  # being written
        regions, used = [], 0

        def alloc(shape, dtype):
            nonlocal used
            np_dtype = _NUMPY_DTYPES[dtype]
            numel = math.prod(shape)
            if used + numel * np_dtype.itemsize > self.slot_nbytes:  # not expected (tokenize's bound): sent as usual
                return empty_shared(shape, dtype)
            regions.append((used, numel, np_dtype.str))
            out = self._region(slot, used, numel, np_dtype).reshape(shape)
            used = -(-(used + numel * np_dtype.itemsize) // _ALIGN) * _ALIGN
            return out

        alloc.slot, alloc.regions = slot, regions
        return alloc

    def pack(self, alloc, j: int, batch: dict, worker: int) -> _RingBatch:
        """The message for ``batch``, whose arrays ``alloc`` placed in the slot; marks the slot written."""
        slot, fields = alloc.slot, {}
        first = self._addr + slot * self.np_SX.shape[1]
        spans = [(first + off, first + off + numel * _ITEMSIZE[dt]) for off, numel, dt in alloc.regions]
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor):
                fields[k] = ("value", v)
                continue
            ptr = v.data_ptr()
            r = next((i for i, (lo, hi) in enumerate(spans) if lo <= ptr < hi), None)
            if r is not None and v.is_contiguous():
                fields[k] = ("ring", r, (ptr - spans[r][0]) // v.element_size(), tuple(v.shape))
            elif v.is_shared():  # born in shared memory outside the ring: sent as a handle, as torch does
                fields[k] = ("value", v)
            else:  # a few floats per cell: by value, no shared-memory segment
                fields[k] = ("numpy", v.numpy())
        self.generation_S[slot] = j + 1
        return _RingBatch(worker, slot, j + 1, list(alloc.regions), fields)

    def unpack(self, msg: _RingBatch, pin: bool = False) -> dict:
        """The batch of ``msg`` as tensors of the main process (a copy: the slot is reused)."""
        def check(when: str):
            got = int(self.generation_S[msg.slot])
            if got != msg.generation:
                raise RuntimeError(
                    f"loader ring slot {msg.slot} holds generation {got} {when} copying batch generation "
                    f"{msg.generation}: a worker overwrote a batch not yet read (DataLoader protocol changed?)"
                )

        check("before")
        copies = []
        for off, numel, dt in msg.regions:
            dst = torch.empty(numel, dtype=_TORCH_DTYPES[dt], pin_memory=pin)
            np.copyto(dst.numpy(), self._region(msg.slot, off, numel, _NUMPY_DTYPE_OF[dt]))
            copies.append(dst)
        check("after")
        out = {}
        for k, (kind, *f) in msg.fields.items():
            if kind == "ring":
                r, off, shape = f
                out[k] = copies[r][off: off + math.prod(shape)].view(shape)
            else:
                out[k] = torch.from_numpy(f[0]) if kind == "numpy" else f[0]
        return out


_NUMPY_DTYPES = {t: torch.empty(0, dtype=t).numpy().dtype for t in (torch.float32, torch.int64, torch.int32,
                                                                     torch.bool)}
# regions name their dtype by its short string ('<f4'): a numpy dtype object costs ~10x more to pickle
_NUMPY_DTYPE_OF = {d.str: d for d in _NUMPY_DTYPES.values()}
_TORCH_DTYPES = {v.str: k for k, v in _NUMPY_DTYPES.items()}
_ITEMSIZE = {d.str: d.itemsize for d in _NUMPY_DTYPES.values()}


@dataclass
class _Unit:
    """A decoded record batch: numpy views of the memory-mapped buffers."""

    offsets: np.ndarray  # int64 [n+1] into the value arrays
    gene_index: np.ndarray  # int32 [nnz]
    spliced: np.ndarray
    unspliced: np.ndarray
    velocity: np.ndarray | None  # float32 [nnz] aligned with gene_index (NaN for cells without), None if absent
    velocity_u: np.ndarray | None
    ms: np.ndarray | None  # moments, as velocity
    mu: np.ndarray | None
    lib_s: np.ndarray  # float32 [n]
    lib_u: np.ndarray
    size_factor: np.ndarray  # float32 [n], NaN unknown
    time: np.ndarray
    cell_id: pa.Array
    dataset_id: pa.Array
    cell_type: pa.Array


def _list_parts(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    return arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy(zero_copy_only=False)


def _scalar(arr: pa.Array) -> np.ndarray:
    # a float column's nulls come out as NaN (a copy only when there are nulls): ~1 us, where pc.fill_null cost
    # ~12 us warm and ~0.3 ms on a worker's first calls, per column and record batch
    return arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def decode_unit(rb: pa.RecordBatch, where: str) -> _Unit:
    """Numpy views of one record batch (flat values + offsets; no per-cell Python)."""
    col = rb.column
    offsets, genes = _list_parts(col(keys.GENE_INDEX))
    parts = {}
    for name in (keys.SPLICED, keys.UNSPLICED):
        off, parts[name] = _list_parts(col(name))
        if not np.array_equal(off - off[0], offsets - offsets[0]):
            raise CorpusError(f"{where}: column {name!r} is not aligned with {keys.GENE_INDEX!r}")
        parts[name] = parts[name][off[0]:]
    genes = genes[offsets[0]:]
    offsets = offsets - offsets[0]
    optional = {}
    for name in keys.GENE_VALUE_COLUMNS:
        arr = col(name)
        if arr.null_count == len(arr):
            optional[name] = None
            continue
        off, vals = _list_parts(arr)
        valid = ~arr.is_null().to_numpy(zero_copy_only=False)
        lens, want = np.diff(off), np.diff(offsets)
        if np.any(lens[valid] != want[valid]):
            raise CorpusError(f"{where}: column {name!r} is not aligned with {keys.GENE_INDEX!r}")
        out = np.full(int(offsets[-1]), np.nan, np.float32)
        out[ranges(offsets[:-1][valid], want[valid])] = vals[ranges(off[:-1][valid], want[valid])]
        optional[name] = out
    return _Unit(
        offsets, genes, parts[keys.SPLICED], parts[keys.UNSPLICED], optional[keys.VELOCITY], optional[keys.VELOCITY_U],
        optional[keys.MS], optional[keys.MU],
        _scalar(col(keys.LIBRARY_SIZE_SPLICED)), _scalar(col(keys.LIBRARY_SIZE_UNSPLICED)),
        _scalar(col(keys.SIZE_FACTOR)), _scalar(col(keys.TIME)),
        col(keys.CELL_ID), col(keys.DATASET_ID), col(keys.CELL_TYPE),
    )


_FLAT_FIELDS = ("gene_index", "spliced", "unspliced", "velocity", "velocity_u", "ms", "mu")


@dataclass
class _Window:
    """Cells of decoded units, with per cell (C) its unit, its run in the unit's flat arrays and its scalars.

    Built once per shuffle window, so a batch's gather is a little fancy indexing and one view per cell and array
    (fm.data.tokenize.Segments: tokenize_block copies the cells straight from the memory map into the batch).
    """

    units: list[_Unit]
    piece_C: np.ndarray  # int64: index into units
    lo_C: np.ndarray  # int64: the cell's run [lo, hi) in its unit's flat arrays
    hi_C: np.ndarray
    lib_s_C: np.ndarray  # float32
    lib_u_C: np.ndarray
    size_factor_C: np.ndarray
    time_C: np.ndarray
    names_C: list[np.ndarray]  # cell_id, dataset_id, cell_type (object arrays)
    arrays: dict[str, list[np.ndarray | None]]  # per flat field, each unit's array (None: the unit lacks a target)
    arrays_with: frozenset[str]  # the fields some unit has

    @classmethod
    def of(cls, units: list[_Unit], piece_C: np.ndarray, row_C: np.ndarray, names_C: list[np.ndarray]) -> _Window:
        """Cell c is row ``row_C[c]`` of ``units[piece_C[c]]``."""
        per_cell = {k: np.empty(len(row_C), dt) for k, dt in (("offsets", np.int64), ("lib_s", np.float32),
                    ("lib_u", np.float32), ("size_factor", np.float32), ("time", np.float32))}
        hi_C = np.empty(len(row_C), np.int64)
        for k, unit in enumerate(units):
            m = piece_C == k
            for field, out in per_cell.items():
                out[m] = getattr(unit, field)[row_C[m]]
            hi_C[m] = unit.offsets[row_C[m] + 1]
        arrays = {f: [getattr(u, f) for u in units] for f in _FLAT_FIELDS}
        arrays_with = frozenset(f for f, a in arrays.items() if any(x is not None for x in a))
        return cls(units, piece_C, per_cell["offsets"], hi_C, per_cell["lib_s"], per_cell["lib_u"],
                   per_cell["size_factor"], per_cell["time"], names_C, arrays, arrays_with)

    @property
    def lens_C(self) -> np.ndarray:
        return self.hi_C - self.lo_C

    def block(self, cells: np.ndarray) -> CellBlock:
        """The window cells ``cells`` (in that order) as a CellBlock whose flat arrays are Segments (no copy)."""
        runs = list(zip(self.piece_C[cells].tolist(), self.lo_C[cells].tolist(), self.hi_C[cells].tolist()))
        lens = self.hi_C[cells] - self.lo_C[cells]

        def pieces(field: str, dtype) -> Segments:
            arrays = self.arrays[field]
            return Segments([arrays[p][lo:hi] for p, lo, hi in runs], dtype)

        def optional(field: str) -> Segments | None:  # a target: None when no cell has it, NaN for the cells without
            arrays = self.arrays[field]
            if field not in self.arrays_with or all(arrays[p] is None for p, _, _ in runs):
                return None
            nan = np.float32(np.nan)
            return Segments([np.full(hi - lo, nan) if arrays[p] is None else arrays[p][lo:hi] for p, lo, hi in runs],
                            np.float32)

        cell_id, dataset_id, cell_type = (x[cells].tolist() for x in self.names_C)
        return CellBlock(
            np.concatenate([[0], np.cumsum(lens)]), pieces("gene_index", np.int32), pieces("spliced", np.float32),
            pieces("unspliced", np.float32), optional("velocity"), optional("velocity_u"),
            self.lib_s_C[cells], self.lib_u_C[cells], self.size_factor_C[cells], self.time_C[cells],
            cell_id, dataset_id, cell_type, ms_N=optional("ms"), mu_N=optional("mu"),
        )


def gather_block(units: list[_Unit], piece_B: np.ndarray, row_B: np.ndarray, names_B: list[np.ndarray]) -> CellBlock:
    """Copy B cells (cell b = row ``row_B[b]`` of ``units[piece_B[b]]``) into one contiguous CellBlock.

    ``names_B``: the cells' cell_id, dataset_id and cell_type (object arrays). The stream gathers through a _Window
    it builds once per shuffle window, and leaves the cells where they lie (fm.data.tokenize.Segments).
    """
    block = _Window.of(units, np.asarray(piece_B), np.asarray(row_B), names_B).block(np.arange(len(row_B)))
    flat = {f"{f}_N": getattr(block, f"{f}_N") for f in _FLAT_FIELDS}
    return replace(block, **{k: None if v is None else np.asarray(v) for k, v in flat.items()})


class ShardedArrowDataset(IterableDataset):
    """Batches of a corpus (or split), dealt to readers per epoch; see the module docstring.

    Args:
        index: the units to read (fm.data.shards.UnitIndex; a split is a row selection of it).
        batch_size: cells per batch.
        tokenizer: gene choice and normalisation.
        seed: base seed of the deal, the shuffle and gene sampling.
        shuffle: permute units and shuffle within windows (False: corpus order, e.g. validation).
        shuffle_buffer: cells per shuffle window (rounded up to whole batches).
        remainder: ``drop`` or ``wrap`` (fm.data.shards).
        length_bucketing: batch cells of similar length within a window (less padding).
        rank, world_size: this process's place in the job; None asks fm.distributed (outside a job: 0, 1).
        num_workers: the DataLoader's workers (readers per rank); ShardedDataLoader sets it.
    """

    def __init__(self, index: UnitIndex, *, batch_size: int, tokenizer: TokenizerConfig | None = None, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 8192, remainder: str = "wrap",
                 length_bucketing: bool = False, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0):
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is None:
            rank, world_size = get_rank(), get_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.index, self.batch_size, self.seed = index, batch_size, seed
        self.tokenizer = tokenizer or TokenizerConfig()
        self.shuffle, self.remainder, self.length_bucketing = shuffle, remainder, length_bucketing
        self.window = max(1, -(-max(shuffle_buffer, 1) // batch_size)) * batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.epoch = 0
        self.start_batch = 0  # batches of this rank already consumed in `epoch` (resume)
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._rings: list[BatchRing] | None = None  # one per worker, set by ShardedDataLoader for each epoch

    # --- the deal --------------------------------------------------------------------------------------------------
    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def n_readers(self) -> int:
        return self.world_size * self.workers_per_rank

    @property
    def batches_per_reader(self) -> int:
        return batches_per_reader(self.index.n_cells, self.n_readers, self.batch_size, self.remainder)

    def __len__(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return self.batches_per_reader * self.workers_per_rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch the next iteration reads, and how many of this rank's batches to skip (resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(self)}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def reader_batches_done(self, consumed: int) -> list[int]:
        """Batches each worker of a rank has yielded once the rank handed out ``consumed`` batches."""
        W = self.workers_per_rank
        return [max(0, -(-(consumed - w) // W)) for w in range(W)]

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.index, seed=self.seed, epoch=epoch, n_readers=self.n_readers,
                         batch_size=self.batch_size, remainder=self.remainder, shuffle=self.shuffle)

    # --- iteration -------------------------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if n_workers != self.workers_per_rank:
            raise RuntimeError(
                f"ShardedArrowDataset was dealt for {self.workers_per_rank} workers per rank but runs in a DataLoader "
                f"with {n_workers}; build the loader with ShardedDataLoader (it sets num_workers)"
            )
        # the DataLoader asks worker 0 first; after k consumed batches the next one is logical worker k % W's
        logical = (worker + self.start_batch) % n_workers
        skip = self.reader_batches_done(self.start_batch)[logical]
        ring = None if info is None or self._rings is None else self._rings[worker]
        yield from self.iter_reader(self.epoch, self.rank * n_workers + logical, skip, ring=ring, worker=worker)

    def iter_reader(self, epoch: int, reader: int, skip: int = 0, ring: BatchRing | None = None, worker: int = 0):
        """The batches of one reader in one epoch, from its batch ``skip`` on.

        With ``ring`` (in a loader worker), each batch is written into the ring and a _RingBatch is yielded instead.
        """
        j = 0  # batches yielded by this iterator (the ring's slot counter)
        plan = self.plan(epoch)
        B, S = self.batch_size, self.window
        length = plan.n_batches * B
        start = plan.reader_start(reader)
        for w in range(skip * B // S, -(-length // S)):
            lo, hi = w * S, min(length, (w + 1) * S)
            window = self._load_window(plan, start + lo, hi - lo)
            order = np.arange(hi - lo)
            if self.shuffle:
                rng = _generator([self.seed, epoch, reader, w, 0])
                order = rng.permutation(hi - lo)
                if self.length_bucketing:
                    order = order[np.argsort(window.lens_C[order], kind="stable")].reshape(-1, B)
                    order = order[rng.permutation(len(order))].reshape(-1)
            first = w * S // B
            for b in range(max(skip, first), first + (hi - lo) // B):
                cells = order[(b - first) * B: (b - first + 1) * B]
                block = window.block(cells)
                rng = _generator([self.seed, epoch, reader, b, 1])
                if ring is None:
                    yield tokenize_block(block, self.tokenizer, rng, targets=self.index.targets)
                    continue
                alloc = ring.writer(j)
                batch = tokenize_block(block, self.tokenizer, rng, targets=self.index.targets, alloc=alloc)
                yield ring.pack(alloc, j, batch, worker)
                j += 1

    def _load_window(self, plan: EpochPlan, start: int, length: int) -> _Window:
        """Decode the units covering virtual cells [start, start + length) (window cell c: virtual cell start + c)."""
        units, piece, rows, names = [], [], [], ([], [], [])
        for k, (u, lo, hi) in enumerate(plan.pieces(start, length)):
            unit = self.index.units[u]
            path = self.index.shard_paths[unit.shard]
            decoded = decode_unit(self._reader(path).get_batch(unit.batch), f"{path} (record batch {unit.batch})")
            r = np.arange(lo, hi) if unit.rows is None else unit.rows[lo:hi]
            units.append(decoded)
            take = pa.array(r)
            for out, arr in zip(names, (decoded.cell_id, decoded.dataset_id, decoded.cell_type), strict=True):
                out += arr.take(take).to_pylist()
            piece.append(np.full(hi - lo, k, np.int64))
            rows.append(r.astype(np.int64))
        names_C = [np.array(x, dtype=object) for x in names]
        return _Window.of(units, np.concatenate(piece), np.concatenate(rows), names_C)

    def _reader(self, path: str) -> ShardReader:
        reader = self._readers.pop(path, None) or ShardReader(path)
        self._readers[path] = reader
        while len(self._readers) > _MAX_OPEN_SHARDS:
            self._readers.popitem(last=False)[1].close()
        return reader

    def __getstate__(self):  # open memory maps stay in the process that opened them
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()
        return state


def _warm_pyarrow() -> None:
    """Make pyarrow load what it loads lazily on first use (pandas, ~1 s) in this process, once.

    Workers are started afresh each epoch; forked from a process that did this, they inherit it instead of each
    paying it every epoch (measured: up to a third of a worker's time in a short epoch).
    """
    pa.array(np.zeros(1, np.int64)).to_numpy()


class ShardedDataLoader(DataLoader):
    """A DataLoader over a ShardedArrowDataset with ``state_dict``/``load_state_dict`` (Lightning saves it).

    Each ``iter()`` starts the next epoch (0 first), or, right after ``load_state_dict``/``set_epoch``, the given
    epoch and position. ``len()`` is the number of batches per rank per epoch, so Lightning does not prefetch past
    the batch it trains on and the consumed count in a checkpoint is exact. Workers are not persistent: each epoch
    starts them with the epoch and position they need. ``fixed_epoch`` (validation) reads that epoch every time.
    """

    def __init__(self, dataset: ShardedArrowDataset, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None, timeout: float = 0,
                 fixed_epoch: int | None = None):
        dataset.num_workers = num_workers
        super().__init__(dataset, batch_size=None, shuffle=None, num_workers=num_workers, pin_memory=pin_memory,
                         collate_fn=_as_is, worker_init_fn=_leave_signals_to_main,
                         prefetch_factor=prefetch_factor if num_workers > 0 else None, persistent_workers=False,
                         multiprocessing_context=multiprocessing_context, timeout=timeout)
        self._next = (0, 0)  # (epoch, start batch) of the next iter()
        self._pending = True  # the state is `_next` (nothing read since it was set), else (_epoch, _consumed)
        self._epoch, self._consumed = 0, 0
        self.fixed_epoch = fixed_epoch  # validation: every iter() reads this epoch from its start

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` read ``epoch`` from its start."""
        self._next, self._pending = (int(epoch), 0), True

    def __iter__(self):
        epoch, start = self._next if self.fixed_epoch is None else (self.fixed_epoch, 0)
        if start >= len(self):  # a state saved at the end of an epoch resumes at the next one
            epoch, start = epoch + 1, 0
        self.dataset.set_epoch(epoch, start)
        self._epoch, self._consumed, self._next, self._pending = epoch, start, (epoch + 1, 0), False
        if start:
            log.info("resuming the stream at epoch %d, batch %d of %d", epoch, start, len(self))
        if self.num_workers == 0:  # the dataset's own iterator: torch's single-process one only adds its per-batch
            return self._count(iter(self.dataset), None)  # cost (~45 us; collate_fn is the identity; pinning: _count)
        _warm_pyarrow()  # fresh rings each epoch: a previous iterator's workers may still write theirs
        ds: ShardedArrowDataset = self.dataset
        nbytes = batch_nbytes(ds.batch_size, ds.tokenizer, ds.index.targets) + 4 * _ALIGN
        rings = [BatchRing(self.prefetch_factor + 1, nbytes) for _ in range(self.num_workers)]
        self.dataset._rings = rings
        # blocked while the workers start, so none dies of a signal before _leave_signals_to_main ignores it (the
        # mask is inherited); one sent meanwhile reaches this process when the mask is restored
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            it = super().__iter__()  # starts the workers, which inherit the rings
        finally:
            self.dataset._rings = None
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return self._count(it, rings)

    def _count(self, it, rings: list[BatchRing] | None):
        pin = self.pin_memory and torch.cuda.is_available()
        for batch in it:
            if isinstance(batch, _RingBatch):  # copied out before the next batch is asked for (see BatchRing)
                batch = rings[batch.worker].unpack(batch, pin=pin)
            elif pin and rings is None:  # in-process, as torch's single-process iterator would
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self._consumed += 1  # before the yield: a checkpoint taken while this batch trains counts it
            yield batch

    def state_dict(self) -> dict:
        ds: ShardedArrowDataset = self.dataset
        epoch, consumed = self._next if self._pending else (self._epoch, self._consumed)
        done = ds.reader_batches_done(consumed)
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,  # by each rank (equal on all ranks, so rank 0's checkpoint suffices)
            "batches_per_epoch": len(self),
            "seed": ds.seed,
            "batch_size": ds.batch_size,
            "world_size": ds.world_size,
            "num_workers": ds.num_workers,
            "remainder": ds.remainder,
            "n_cells": ds.index.n_cells,
            "n_units": ds.index.n_units,
            # batches yielded by every reader (rank * workers + worker), derived from batches_consumed
            "reader_batches": [done[w] for _ in range(ds.world_size) for w in range(ds.workers_per_rank)],
        }

    def load_state_dict(self, state: dict) -> None:
        ds: ShardedArrowDataset = self.dataset
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state: field 'version' is {state.get('version')!r}, expected {STATE_VERSION}")
        for name, mine in (("seed", ds.seed), ("batch_size", ds.batch_size), ("n_cells", ds.index.n_cells),
                           ("n_units", ds.index.n_units), ("remainder", ds.remainder)):
            if state[name] != mine:
                raise ValueError(f"stream state: field {name!r} is {state[name]!r} in the checkpoint, {mine!r} now")
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        mid_epoch = 0 < consumed < state["batches_per_epoch"]
        for name, mine in (("world_size", ds.world_size), ("num_workers", ds.num_workers)):
            if mid_epoch and state[name] != mine:
                raise ValueError(
                    f"stream state: field {name!r} is {state[name]!r} in the checkpoint, {mine!r} now; a stream "
                    f"resumes mid-epoch only with the same {name} (an end-of-epoch checkpoint resumes with any)"
                )
        if not mid_epoch:
            epoch, consumed = (epoch + 1, 0) if consumed else (epoch, 0)
        self._next, self._pending = (epoch, consumed), True
