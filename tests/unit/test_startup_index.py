"""Start-up at corpus scale: the per-shard index (cell hashes, checksum stamp) makes setup O(shards).

    python -m pytest tests/unit/test_startup_index.py -q
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import fm.data.shards as shards
from fm.data.datamodule import CorpusDataModule
from fm.data.schema import CorpusError, load_manifest
from fm.data.shards import INDEX_DIR, ShardReader, hash_unit_interval
from tests.stream_helpers import write_corpus
from tests.unit.test_stream import SHARDS


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "c", SHARDS, record_batch_size=8)


@pytest.fixture
def reads(monkeypatch):
    """Counts of record batches read and files hashed."""
    counts = {"batches": 0, "sha256": 0}
    get_batch, sha256_file = ShardReader.get_batch, shards.sha256_file

    def counted_get_batch(self, i):
        counts["batches"] += 1
        return get_batch(self, i)

    def counted_sha256(path, *a, **k):
        counts["sha256"] += 1
        return sha256_file(path, *a, **k)

    monkeypatch.setattr(ShardReader, "get_batch", counted_get_batch)
    monkeypatch.setattr(shards, "sha256_file", counted_sha256)
    return counts


def _split(dm):
    dm.setup()
    return [(u.shard, u.batch, None if u.rows is None else u.rows.tolist()) for u in dm.val_index.units]


def _expected_val_rows(corpus, val_fraction):
    """Today's full read: every cell's hash from its record batch."""
    out = []
    for s in load_manifest(corpus).shards:
        reader = ShardReader(str(corpus / s.path))
        for b in range(reader.num_record_batches):
            rb = reader._reader.get_batch(b)
            out.append(np.flatnonzero(hash_unit_interval(rb.column("dataset_id"), rb.column("cell_id")) < val_fraction))
        reader.close()
    return out


def test_setup_reads_no_record_batch_and_hashes_no_shard(corpus, reads):
    """The writer made the index at conversion: setup is size + footer per shard, and the split from the index."""
    assert len(list((corpus / INDEX_DIR).glob("*.npz"))) == len(load_manifest(corpus).shards)
    dm = CorpusDataModule(corpus=str(corpus), val_fraction=0.3, verify_checksums=True)
    val = _split(dm)
    assert reads == {"batches": 0, "sha256": 0}
    manifest = load_manifest(corpus)
    got = {(i, b): rows if rows is not None else list(range(manifest.shards[i].record_batch_rows[b]))
           for i, b, rows in val}
    units = [(i, b) for i, s in enumerate(manifest.shards) for b in range(s.n_record_batches)]
    want = {u: rows.tolist() for u, rows in zip(units, _expected_val_rows(corpus, 0.3)) if len(rows)}
    assert got == want and 0 < sum(map(len, want.values())) < manifest.n_cells


def test_deep_check_reads_everything_and_gives_the_same_split(corpus, reads):
    fast = _split(CorpusDataModule(corpus=str(corpus), val_fraction=0.3))
    deep = _split(CorpusDataModule(corpus=str(corpus), val_fraction=0.3, deep_check=True))
    assert fast == deep
    n_batches = sum(s.n_record_batches for s in load_manifest(corpus).shards)
    assert reads["sha256"] == len(SHARDS) and reads["batches"] >= 2 * n_batches  # rows check + cell hashes


def test_a_corpus_without_index_builds_it_once(corpus, reads):
    shutil.rmtree(corpus / INDEX_DIR)
    first = _split(CorpusDataModule(corpus=str(corpus), val_fraction=0.3))
    assert reads["sha256"] == len(SHARDS) and reads["batches"] > 0
    reads.update(batches=0, sha256=0)
    again = _split(CorpusDataModule(corpus=str(corpus), val_fraction=0.3))
    assert again == first and reads == {"batches": 0, "sha256": 0}


def test_a_changed_shard_is_hashed_again_and_fails(corpus):
    _split(CorpusDataModule(corpus=str(corpus), val_fraction=0.3))  # stamped
    shard = corpus / "shards" / "part-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # same size, new mtime
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="part-00000.arrow: sha256"):
        CorpusDataModule(corpus=str(corpus), val_fraction=0.3).setup()


def test_an_index_for_another_file_is_ignored(corpus, reads):
    info = load_manifest(corpus).shards[0]
    path = shards.shard_index_path(corpus, info)
    shards.write_shard_index(corpus, info, np.zeros(info.n_cells), verified=(info.bytes, 0))
    assert path.is_file() and shards.read_shard_index(corpus, info) is not None
    other = type(info)(**{**vars(info), "sha256": "0" * 64})
    assert shards.read_shard_index(corpus, other) is None  # another digest: stale
    CorpusDataModule(corpus=str(corpus), val_fraction=0.3).setup()  # the stamp's mtime is not the file's: re-hash
    assert reads["sha256"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_corpus_still_sets_up(corpus):
    shutil.rmtree(corpus / INDEX_DIR)
    os.chmod(corpus, 0o555)
    try:
        dm = CorpusDataModule(corpus=str(corpus), val_fraction=0.3)
        dm.setup()
        assert dm.val_index.n_cells + dm.train_index.n_cells == sum(s.n_cells for s in load_manifest(corpus).shards)
    finally:
        os.chmod(corpus, 0o755)
