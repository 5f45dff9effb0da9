"""The corpus stream: dealing, determinism, shuffle, remainder policies, resume, splits and bad input.

    python -m pytest -q tests/unit/test_stream.py
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fm import keys
from fm.data.datamodule import CorpusDataModule, DataConfig
from fm.data.schema import CorpusError, DatasetInfo, load_manifest
from fm.data.shards import EpochPlan, UnitIndex, batches_per_reader, check_shards, hash_unit_interval
from fm.data.stream import ShardedArrowDataset, ShardedDataLoader, _generator
from fm.data.tokenize import TokenizerConfig
from fm.data.vocab import GeneVocab
from tests.stream_helpers import batch_signature as _signature
from tests.stream_helpers import write_corpus

SHARDS = [30, 17, 25]  # 72 cells, record batches of 8 -> 11 units


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), SHARDS, record_batch_size=8)


def _index(corpus) -> UnitIndex:
    return UnitIndex.from_manifest(corpus, load_manifest(corpus))


def _dataset(corpus, **kw) -> ShardedArrowDataset:
    args = dict(batch_size=4, shuffle_buffer=8, rank=0, world_size=1)
    args.update(kw)
    return ShardedArrowDataset(_index(corpus), **args)


def _epoch_cells(corpus, world_size, num_workers, epoch=0, **kw) -> list[list[list[str]]]:
    """Per rank, the list of batches (cell ids) one epoch yields, read through the DataLoader."""
    out = []
    for rank in range(world_size):
        dl = ShardedDataLoader(_dataset(corpus, rank=rank, world_size=world_size, **kw), num_workers=num_workers)
        dl.set_epoch(epoch)
        out.append([b[keys.B_CELL_ID] for b in dl])
    return out


def test_units_and_plan_cover_every_cell_once(corpus):
    index = _index(corpus)
    assert index.n_units == 11 and index.n_cells == 72
    plan = EpochPlan(index, seed=0, epoch=0, n_readers=6, batch_size=1, remainder="drop")
    seen = Counter()
    for r in range(6):
        start, end = plan.reader_start(r), plan.reader_start(r + 1)
        for u, lo, hi in plan.pieces(start, end - start):
            seen.update((u, i) for i in range(lo, hi))
    assert len(seen) == 72 and set(seen.values()) == {1}


@pytest.mark.parametrize("remainder", ["drop", "wrap"])
@pytest.mark.parametrize("world_size,num_workers,batch_size", [(1, 0, 4), (2, 0, 5), (3, 0, 7), (2, 3, 4)])
def test_remainder_policies(corpus, remainder, world_size, num_workers, batch_size):
    ranks = _epoch_cells(corpus, world_size, num_workers, batch_size=batch_size, remainder=remainder)
    n_readers = world_size * max(1, num_workers)
    n_b = batches_per_reader(72, n_readers, batch_size, remainder)
    assert {len(r) for r in ranks} == {n_b * max(1, num_workers)}  # the same count on every rank
    counts = Counter(c for r in ranks for b in r for c in b)
    read = n_readers * n_b * batch_size
    if remainder == "drop":
        assert set(counts.values()) == {1} and len(counts) == read and 72 - read < n_readers * (batch_size + 1)
    else:
        assert len(counts) == 72 and sum(counts.values()) == read and read - 72 < n_readers * batch_size


def test_same_seed_same_order_other_epoch_or_seed_differs(corpus):
    a = _epoch_cells(corpus, 2, 0)
    assert a == _epoch_cells(corpus, 2, 0)
    assert a != _epoch_cells(corpus, 2, 0, epoch=1)
    assert a != _epoch_cells(corpus, 2, 0, seed=1)
    flat = lambda r: sorted(c for x in r for b in x for c in b)
    assert flat(a) == flat(_epoch_cells(corpus, 2, 0, epoch=1))  # wrap: same cells per epoch modulo fill


def test_stream_generators_are_default_rng_streams():
    """The stream builds its generators without default_rng's checks; the draws must stay default_rng's (resume)."""
    for seed in ([0, 0, 0, 5, 1], [7, 3, 2, 11, 0]):
        np.testing.assert_array_equal(_generator(seed).random(8), np.random.default_rng(seed).random(8))


def test_shuffle_mixes_within_reader_and_off_keeps_corpus_order(corpus):
    ordered = [c for b in _epoch_cells(corpus, 1, 0, shuffle=False, remainder="drop")[0] for c in b]
    names = [f"s{i}c{j}" for i, n in enumerate(SHARDS) for j in range(n)]
    assert ordered == names
    shuffled = [c for b in _epoch_cells(corpus, 1, 0, shuffle_buffer=16, remainder="drop")[0] for c in b]
    assert sorted(shuffled) == sorted(names) and shuffled != names
    # within a window of 16 cells, consecutive cells are not simply in unit order
    assert any(shuffled[i:i + 4] != sorted(shuffled[i:i + 4], key=names.index) for i in range(0, 64, 4))


def test_length_bucketing_keeps_cells_and_cuts_padding(corpus):
    def padding(**kw):
        dl = ShardedDataLoader(_dataset(corpus, shuffle_buffer=32, remainder="drop", **kw))
        ids, pad = [], 0
        for b in dl:
            ids += b[keys.B_CELL_ID]
            pad += int((~b[keys.B_GENE_MASK]).sum())
        return sorted(ids), pad

    plain, bucketed = padding(), padding(length_bucketing=True)
    assert plain[0] == bucketed[0] and bucketed[1] < plain[1]


def test_per_cell_columns_reach_the_batch_with_nulls_as_nan(tmp_path):
    """time and size_factor may be null for some cells (a dataset without pseudo-time): NaN in the batch, and the
    other cells' values (and library sizes) exactly as stored, whatever record batch they sit in."""
    import pyarrow as pa

    from fm.data.writer import shard_name, write_manifest, write_shard
    from tests.stream_helpers import synthetic_table

    rng = np.random.default_rng(3)
    table = synthetic_table(20, 50, dataset_id="d0", rng=rng)
    time_ = [None if i % 3 == 0 else float(i) / 10 for i in range(20)]
    sf = [None if i >= 12 else 1.0 + i for i in range(20)]  # whole record batches of nulls, and mixed ones
    table = table.set_column(table.schema.get_field_index(keys.TIME), keys.TIME, pa.array(time_, pa.float32()))
    table = table.set_column(table.schema.get_field_index(keys.SIZE_FACTOR), keys.SIZE_FACTOR,
                             pa.array(sf, pa.float32()))
    info = write_shard(tmp_path / "shards" / shard_name(0), table, record_batch_size=4, dataset_id="d0")
    write_manifest(tmp_path, GeneVocab([f"ENSG{i:05d}" for i in range(50)]), [info],
                   [DatasetInfo("d0", "d0.h5ad", 20, 20, 50, 50, 0)], record_batch_size=4)
    lib = dict(zip(table.column(keys.CELL_ID).to_pylist(), table.column(keys.LIBRARY_SIZE_SPLICED).to_pylist()))
    seen = {}
    for b in ShardedDataLoader(_dataset(tmp_path, remainder="drop")):
        for i, cell in enumerate(b[keys.B_CELL_ID]):
            seen[cell] = float(b[keys.B_TIME][i])
            assert float(b[keys.B_LIBRARY_SIZE_SPLICED][i]) == lib[cell]
    assert len(seen) == 20
    for i in range(20):
        got = seen[f"c{i}"]
        assert (np.isnan(got) if time_[i] is None else got == np.float32(time_[i])), (i, got)
    # size_factor: normalisation by it fails naming the first cell without one, so the nulls arrived as NaN
    bad = ShardedDataLoader(_dataset(tmp_path, remainder="drop", shuffle=False,
                                     tokenizer=TokenizerConfig(normalization="size_factor")))
    with pytest.raises(ValueError, match="cell 'c12'"):
        list(bad)


RESUME_KW = dict(batch_size=3, tokenizer=TokenizerConfig(max_genes=10))  # max_genes < nnz: sampling is resumed too


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_process(corpus, num_workers):
    kw = RESUME_KW
    full = ShardedDataLoader(_dataset(corpus, **kw), num_workers=num_workers)
    expected = [_signature(b) for _ in range(2) for b in full]
    for k in (0, 5, len(full)) if num_workers == 0 else (5,):
        first = ShardedDataLoader(_dataset(corpus, **kw), num_workers=num_workers)
        it = iter(first)
        got = [_signature(next(it)) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        assert state["batches_consumed"] == k and len(state["reader_batches"]) == max(1, num_workers)
        second = ShardedDataLoader(_dataset(corpus, **kw), num_workers=num_workers)
        second.load_state_dict(state)
        got += [_signature(b) for b in second]
        if k < len(full):
            got += [_signature(b) for b in second]  # the next epoch follows
        assert got == expected[: len(got)] and len(got) >= len(full)


def test_state_mismatch_fails(corpus):
    dl = ShardedDataLoader(_dataset(corpus), num_workers=0)
    it = iter(dl)
    next(it)
    state = dl.state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        ShardedDataLoader(_dataset(corpus), num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShardedDataLoader(_dataset(corpus, seed=3)).load_state_dict(state)
    state["batches_consumed"] = state["batches_per_epoch"]  # at an epoch end any worker count resumes
    other = ShardedDataLoader(_dataset(corpus), num_workers=2)
    other.load_state_dict(state)
    assert other.state_dict()["epoch"] == 1 and other.state_dict()["batches_consumed"] == 0


def test_hash_is_stable():
    import pyarrow as pa

    h = hash_unit_interval(pa.array(["d0", "d0", "d1"]), pa.array(["a", "b", "a"]))
    assert h.shape == (3,) and np.all((h >= 0) & (h < 1)) and len(set(h.tolist())) == 3
    assert np.array_equal(h, hash_unit_interval(pa.array(["d0", "d0", "d1"]), pa.array(["a", "b", "a"])))
    # the dataset id is part of the key, with a separator: ("d", "0a") != ("d0", "a")
    assert hash_unit_interval(pa.array(["d"]), pa.array(["0a"]))[0] != h[0]


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.3])
def test_hash_split_holds_out_the_fraction_asked_for_sequential_ids(fraction):
    import pyarrow as pa

    n = 20_000  # ids that differ only at the end, as real barcodes and simulator names do
    h = hash_unit_interval(pa.array(["sim"] * n), pa.array([f"cell{i}" for i in range(n)]))
    held_out = float((h < fraction).mean())
    assert abs(held_out - fraction) < 4 * (fraction * (1 - fraction) / n) ** 0.5 + 1e-3, held_out
    assert abs(float(np.median(h)) - 0.5) < 0.02  # uniform, not clustered


def _dm_ids(dm, loader) -> set:
    return {(d, c) for b in loader for d, c in zip(b[keys.B_DATASET_ID], b[keys.B_CELL_ID], strict=True)}


@pytest.mark.parametrize("split", ["hash", "dataset"])
def test_split_never_overlaps(corpus, split):
    extra = dict(val_fraction=0.3) if split == "hash" else dict(val_datasets=["d1"])
    dm = CorpusDataModule(corpus=str(corpus), batch_size=4, split=split, remainder="drop", **extra)
    assert len(dm.vocab) == 50 and dm.manifest.n_cells == 72  # before setup
    dm.setup("fit")
    train, val = dm.train_index, dm.val_index
    assert train.n_cells + val.n_cells == 72 and val.n_cells > 0 and train.n_cells > 0
    train_ids, val_ids = _dm_ids(dm, dm.train_dataloader()), _dm_ids(dm, dm.val_dataloader())
    assert not train_ids & val_ids
    if split == "dataset":
        assert {d for d, _ in val_ids} == {"d1"} and "d1" not in {d for d, _ in train_ids}
    dm2 = CorpusDataModule(corpus=str(corpus), batch_size=4, split=split, remainder="drop", **extra)
    dm2.setup()
    assert _dm_ids(dm2, dm2.val_dataloader()) == val_ids  # stable


def test_datamodule_config_errors_name_the_field(corpus):
    with pytest.raises(ValueError, match="DataConfig.remainder"):
        DataConfig(corpus=str(corpus), remainder="pad")
    with pytest.raises(ValueError, match="max_genes"):
        CorpusDataModule(corpus=str(corpus), max_genes=0)
    with pytest.raises(ValueError, match="val_datasets"):
        CorpusDataModule(corpus=str(corpus), split="dataset", val_datasets=["nope"])


def test_datamodule_state_roundtrip_and_checks(corpus):
    dm = CorpusDataModule(corpus=str(corpus), batch_size=4, val_fraction=0.0)
    dl = dm.train_dataloader()
    it = iter(dl)
    seen = [next(it)[keys.B_CELL_ID] for _ in range(3)]
    state = dm.state_dict()
    assert state["stream"]["batches_consumed"] == 3 and state["data_config"]["normalization"] == "total"
    rest = [b[keys.B_CELL_ID] for b in it]
    dm2 = CorpusDataModule(corpus=str(corpus), batch_size=4, val_fraction=0.0)
    dm2.load_state_dict(state)
    assert [b[keys.B_CELL_ID] for b in dm2.train_dataloader()] == rest and seen
    with pytest.raises(ValueError, match="normalization"):
        CorpusDataModule(corpus=str(corpus), normalization="none", val_fraction=0.0).load_state_dict(state)
    with pytest.raises(CorpusError, match="vocab_hash"):
        CorpusDataModule(corpus=str(corpus), val_fraction=0.0).load_state_dict({**state, "vocab_hash": "x"})


def _copy_corpus(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_fails_with_its_name_or_is_skipped(corpus, tmp_path, caplog):
    bad = _copy_corpus(corpus, tmp_path / "c")
    shard = bad / "shards" / "part-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    manifest = load_manifest(bad)
    with pytest.raises(CorpusError, match="part-00001.arrow"):
        check_shards(bad, manifest)
    with caplog.at_level(logging.WARNING):
        ok = check_shards(bad, manifest, tolerant=True)
    assert ok == [True, False, True] and "skipped 1 of 3 shards (17 cells)" in caplog.text
    dm = CorpusDataModule(corpus=str(bad), val_fraction=0.0, tolerant=True, batch_size=4)
    dm.setup()
    assert dm.train_index.n_cells == 72 - 17
    with pytest.raises(CorpusError, match="part-00001.arrow"):  # read-time failure names the file too
        list(ShardedArrowDataset(_index(bad), batch_size=4, rank=0, world_size=1, shuffle=False))


def test_checksum_schema_and_vocab_mismatch_fail_before_training(corpus, tmp_path):
    bad = _copy_corpus(corpus, tmp_path / "c")
    shard = bad / "shards" / "part-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    check_shards(bad, load_manifest(bad))  # size and footer are fine...
    with pytest.raises(CorpusError, match="part-00000.arrow: sha256"):
        CorpusDataModule(corpus=str(bad), verify_checksums=True).setup()
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "schema_version": 99}))
    with pytest.raises(CorpusError, match="schema_version"):
        CorpusDataModule(corpus=str(bad))
    (bad / "manifest.json").write_text(json.dumps(m))
    (bad / "vocab.tsv").write_text((bad / "vocab.tsv").read_text().replace("G7\n", "G7x\n"))
    with pytest.raises(CorpusError, match="vocab_hash"):
        CorpusDataModule(corpus=str(bad))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_moments_reach_the_batch_normalised_and_logged_as_the_counts(sim_corpus, num_workers):
    """Each token's Ms/Mu is the corpus's moment of that cell and gene (fractions of the library under `total`),
    times target_sum, log1p'd: the counts' rule."""
    import pyarrow as pa

    manifest = load_manifest(sim_corpus)
    want = {}
    for s in manifest.shards:
        with pa.memory_map(str(sim_corpus / s.path)) as f:
            t = pa.ipc.open_file(f).read_all().to_pydict()
        for i, cell in enumerate(t[keys.CELL_ID]):
            want[cell] = {g: (ms, mu, sp + un) for g, ms, mu, sp, un in zip(t[keys.GENE_INDEX][i], t[keys.MS][i],
                          t[keys.MU][i], t[keys.SPLICED][i], t[keys.UNSPLICED][i], strict=True)}  # fmt: skip
    cfg = TokenizerConfig(target_sum=500.0, max_genes=64)
    ds = ShardedArrowDataset(UnitIndex.from_manifest(sim_corpus, manifest), batch_size=16, tokenizer=cfg, rank=0,
                             world_size=1, remainder="drop")
    n_tokens = 0
    for b in ShardedDataLoader(ds, num_workers=num_workers):
        for i, cell in enumerate(b[keys.B_CELL_ID]):
            mask = b[keys.B_GENE_MASK][i]
            assert mask.any() and bool(torch.isnan(b[keys.B_MS][i][~mask]).all())
            for g, ms, mu in zip(b[keys.B_GENE_IDS][i][mask].tolist(), b[keys.B_MS][i][mask].tolist(),
                                 b[keys.B_MU][i][mask].tolist(), strict=True):  # fmt: skip
                w_ms, w_mu, counts = want[cell][g]
                assert ms == pytest.approx(np.log1p(w_ms * 500.0), rel=1e-5, abs=1e-6)
                assert mu == pytest.approx(np.log1p(w_mu * 500.0), rel=1e-5, abs=1e-6)
                n_tokens += 1
                assert counts > 0 and w_ms + w_mu > 0  # a stored gene has counts, so a moment (self included)
    assert n_tokens > 1000


def test_moments_in_another_normalisation_than_the_tokenizer_are_refused(sim_corpus):
    with pytest.raises(CorpusError, match="normalised by 'total'.*data.normalization=total"):
        CorpusDataModule(str(sim_corpus), normalization="none")
