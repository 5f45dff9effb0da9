"""Worker batches through the shared-memory ring: bit-identical to the in-process reader, never overwritten early.

    python -m pytest -q tests/unit/test_stream_ring.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm import keys
from fm.data.schema import load_manifest
from fm.data.shards import UnitIndex
from fm.data.stream import _ALIGN, BatchRing, ShardedArrowDataset, ShardedDataLoader
from fm.data.tokenize import TokenizerConfig, batch_nbytes, tokenize_block
from tests.stream_helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), [30, 17, 25], record_batch_size=8)


def _dataset(corpus, **kw) -> ShardedArrowDataset:
    args = dict(batch_size=4, shuffle_buffer=8, rank=0, world_size=1, tokenizer=TokenizerConfig(max_genes=16))
    args.update(kw)
    return ShardedArrowDataset(UnitIndex.from_manifest(corpus, load_manifest(corpus)), **args)


def _assert_same_batch(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert not a[k].is_shared(), k  # the trainer gets its own copy, not the worker's slot
            x, y = (a[k], b[k]) if a[k].dtype == torch.bool else (a[k].view(torch.uint8), b[k].view(torch.uint8))
            assert torch.equal(x, y), k  # bitwise, so NaN targets compare too
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("prefetch_factor", [1, 2])
@pytest.mark.parametrize("gene_set", ["cell", "batch"])
def test_worker_batches_equal_the_in_process_reader_even_when_all_are_kept(corpus, prefetch_factor, gene_set):
    ds = _dataset(corpus, tokenizer=TokenizerConfig(max_genes=16, gene_set=gene_set))
    dl = ShardedDataLoader(ds, num_workers=2, prefetch_factor=prefetch_factor)
    got = list(dl)  # every batch held at once: a slot reused while its batch was still referenced would show here
    per_worker = [list(ds.iter_reader(0, w)) for w in range(2)]
    expected = [per_worker[k % 2][k // 2] for k in range(len(got))]
    assert len(got) == len(dl) == sum(map(len, per_worker)) > 2 * (prefetch_factor + 1)  # slots were reused
    for a, b in zip(got, expected, strict=True):
        _assert_same_batch(a, b)


def test_ring_message_carries_no_tensor_and_the_bound_holds(corpus, monkeypatch):
    from fm.data import stream

    ds = _dataset(corpus, tokenizer=TokenizerConfig(max_genes=16, gene_set="batch"), batch_size=5)
    blocks = []  # the CellBlocks reader 0 tokenizes in epoch 0
    monkeypatch.setattr(stream, "tokenize_block", lambda block, *a, **k: blocks.append(block) or {})
    list(ds.iter_reader(0, 0))
    assert len(blocks) > 2
    targets = (keys.B_VELOCITY, keys.B_VELOCITY_U)  # the largest batch: both per-gene targets
    ring = BatchRing(2, batch_nbytes(5, ds.tokenizer, targets) + 4 * _ALIGN)  # what ShardedDataLoader allocates
    for j, block in enumerate(blocks):
        alloc = ring.writer(j)
        batch = tokenize_block(block, ds.tokenizer, np.random.default_rng(j), targets=targets, alloc=alloc)
        msg = ring.pack(alloc, j, batch, worker=0)
        kinds = {k: f[0] for k, f in msg.fields.items()}
        assert all(kinds[k] == "ring" for k in (keys.B_GENE_IDS, keys.B_GENE_MASK, keys.B_SPLICED, keys.B_VELOCITY_U))
        assert not any(isinstance(x, torch.Tensor) for f in msg.fields.values() for x in f)  # no shared segments
        ref = tokenize_block(block, ds.tokenizer, np.random.default_rng(j), targets=targets)
        _assert_same_batch(ring.unpack(msg), ref)


def test_overwritten_slot_fails_loudly_and_overflow_falls_back():
    ring = BatchRing(2, 256)
    cfg = TokenizerConfig(max_genes=8)
    from tests.unit.test_tokenize import CELLS, _block

    alloc = ring.writer(0)
    msg = ring.pack(alloc, 0, tokenize_block(_block(CELLS), cfg, np.random.default_rng(0), alloc=alloc), worker=0)
    ring.writer(2)  # batch 2 takes batch 0's slot before batch 0 was copied out
    with pytest.raises(RuntimeError, match="ring slot 0"):
        ring.unpack(msg)

    tiny = BatchRing(1, 64)  # fits the [2, 3] gene ids, not the [4, 2, 3] floats: those go by value
    alloc = tiny.writer(0)
    batch = tokenize_block(_block(CELLS), cfg, np.random.default_rng(0), alloc=alloc)
    msg = tiny.pack(alloc, 0, batch, worker=0)
    kinds = {k: f[0] for k, f in msg.fields.items()}
    assert kinds[keys.B_SPLICED] == "numpy" and kinds[keys.B_GENE_IDS] == "ring"
    _assert_same_batch(tiny.unpack(msg), tokenize_block(_block(CELLS), cfg, np.random.default_rng(0)))


def _read_one_epoch(corpus: str) -> None:
    # max_genes sizes the ring (MBs): any torch copy into or out of it would run multi-threaded
    dl = ShardedDataLoader(_dataset(corpus, tokenizer=TokenizerConfig(max_genes=1 << 16)), num_workers=2)
    assert sum(len(b[keys.B_CELL_ID]) for b in dl) > 0


def test_a_process_forked_after_torch_ran_multithreaded_can_still_stream(corpus):
    """Ranks started by fork inherit a running OpenMP pool; a torch kernel in the ring path would hang them."""
    import multiprocessing as mp

    torch.ones(1 << 22).mul_(2)  # starts this process's intra-op (OpenMP) threads where there are several CPUs
    child = mp.get_context("fork").Process(target=_read_one_epoch, args=(str(corpus),))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("a forked process streaming through loader workers hung (fork after OpenMP)")
    assert child.exitcode == 0
