"""Tiny synthetic corpora for the stream tests, written through fm.data.writer (the one way a corpus is made)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from fm import keys
from fm.data.schema import DatasetInfo
from fm.data.vocab import GeneVocab
from fm.data.writer import shard_name, write_manifest, write_shard


def synthetic_table(n_cells: int, n_genes: int, *, dataset_id: str, rng: np.random.Generator, max_nnz: int = 40,
                    velocity: bool = False, prefix: str = "c") -> pa.Table:
    genes, s, u, v = [], [], [], []
    for _ in range(n_cells):
        nnz = int(rng.integers(1, max_nnz + 1))
        g = np.sort(rng.choice(n_genes, size=nnz, replace=False)).astype(np.int32)
        sc = rng.integers(0, 20, size=nnz).astype(np.float32)
        uc = rng.integers(0, 10, size=nnz).astype(np.float32)
        uc[(sc + uc) == 0] = 1.0
        genes.append(g)
        s.append(sc)
        u.append(uc)
        v.append(rng.normal(size=nnz).astype(np.float32))
    cols = {
        keys.CELL_ID: [f"{prefix}{i}" for i in range(n_cells)],
        keys.DATASET_ID: [dataset_id] * n_cells,
        keys.GENE_INDEX: genes,
        keys.SPLICED: s,
        keys.UNSPLICED: u,
        keys.LIBRARY_SIZE_SPLICED: np.array([x.sum() for x in s], np.float32),
        keys.LIBRARY_SIZE_UNSPLICED: np.array([x.sum() for x in u], np.float32),
        keys.SIZE_FACTOR: rng.uniform(0.5, 2.0, n_cells).astype(np.float32),
        keys.TIME: rng.uniform(0, 1, n_cells).astype(np.float32),
        keys.CELL_TYPE: [f"t{i % 3}" for i in range(n_cells)],
    }
    if velocity:
        cols[keys.VELOCITY] = v
    return pa.table(cols)


def write_corpus(root: str | Path, shard_cells: list[int], *, record_batch_size: int = 8, n_genes: int = 50,
                 seed: int = 0, datasets: list[str] | None = None, max_nnz: int = 40) -> Path:
    """A corpus with one shard per entry of ``shard_cells``; shard i belongs to ``datasets[i]`` (default d0, d1...)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    vocab = GeneVocab([f"ENSG{i:05d}" for i in range(n_genes)], [f"G{i}" for i in range(n_genes)])
    datasets = datasets or [f"d{i}" for i in range(len(shard_cells))]
    infos = []
    for i, n in enumerate(shard_cells):
        table = synthetic_table(n, n_genes, dataset_id=datasets[i], rng=rng, max_nnz=max_nnz, velocity=i % 2 == 0,
                                prefix=f"s{i}c")
        infos.append(write_shard(root / "shards" / shard_name(i), table, record_batch_size=record_batch_size,
                                 dataset_id=datasets[i]))
    ds_infos = [DatasetInfo(d, f"{d}.h5ad", 0, 0, n_genes, n_genes, 0) for d in dict.fromkeys(datasets)]
    write_manifest(root, vocab, infos, ds_infos, record_batch_size=record_batch_size)
    return root


def batch_signature(batch) -> list:
    """What a batch holds, JSON-able: its cells, and checksums of the chosen genes and values."""
    return [batch[keys.B_CELL_ID], int(batch[keys.B_GENE_IDS].sum()), round(float(batch[keys.B_SPLICED].sum()), 4)]


def resume_worker(corpus: str, out: str, step: str, k: int = 5) -> None:
    """Run in a fresh process by the resume test: ``stop`` reads k batches and saves the state; ``resume`` loads
    it and reads the rest of that epoch and the next one."""
    from fm.data.schema import load_manifest
    from fm.data.shards import UnitIndex
    from fm.data.stream import ShardedArrowDataset, ShardedDataLoader
    from fm.data.tokenize import TokenizerConfig

    out = Path(out)
    for num_workers in (0, 2):
        index = UnitIndex.from_manifest(corpus, load_manifest(corpus))
        ds = ShardedArrowDataset(index, batch_size=3, tokenizer=TokenizerConfig(max_genes=10), shuffle_buffer=8,
                                 rank=0, world_size=1)
        dl = ShardedDataLoader(ds, num_workers=num_workers)
        if step == "stop":
            it = iter(dl)
            head = [batch_signature(next(it)) for _ in range(k)]
            (out / f"head-{num_workers}.json").write_text(json.dumps(head))
            (out / f"state-{num_workers}.json").write_text(json.dumps(dl.state_dict()))
        else:
            dl.load_state_dict(json.loads((out / f"state-{num_workers}.json").read_text()))
            tail = [batch_signature(b) for _ in range(2) for b in dl]
            (out / f"tail-{num_workers}.json").write_text(json.dumps(tail))
