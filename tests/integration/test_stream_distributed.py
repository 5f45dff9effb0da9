"""The stream across real processes: 2 ranks x 3 DataLoader workers (gloo), and resume in a new process.

    python -m pytest -q -m multiprocess tests/integration/test_stream_distributed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from fm import keys
from fm.data.schema import load_manifest
from fm.data.shards import UnitIndex
from fm.data.stream import ShardedArrowDataset, ShardedDataLoader
from fm.data.tokenize import TokenizerConfig
from tests.stream_helpers import batch_signature, write_corpus

ROOT = Path(__file__).resolve().parents[2]
WORLD, WORKERS, BATCH = 2, 3, 4
SHARDS = [30, 17, 25]  # 72 cells in 11 units of <= 8: not a multiple of 6 readers


def _rank_main(rank: int, corpus: str, out: str, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        result = {}
        for remainder in ("drop", "wrap"):
            # no rank/world given: the dataset asks the job (torch.distributed here)
            ds = ShardedArrowDataset(UnitIndex.from_manifest(corpus, load_manifest(corpus)), batch_size=BATCH,
                                     remainder=remainder, shuffle_buffer=8)
            dl = ShardedDataLoader(ds, num_workers=WORKERS)
            result[remainder] = {"len": len(dl), "epochs": [[b[keys.B_CELL_ID] for b in dl] for _ in range(2)]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_three_workers_every_cell_once(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", SHARDS, record_batch_size=8)
    assert UnitIndex.from_manifest(corpus, load_manifest(corpus)).n_units % (WORLD * WORKERS) != 0
    # fork, as ranks started by torchrun are ordinary processes whose DataLoader workers fork; under mp.spawn every
    # worker would be a new interpreter importing torch (minutes on 2 cores)
    mp.start_processes(_rank_main, args=(str(corpus), str(tmp_path), f"file://{tmp_path / 'init'}"), nprocs=WORLD,
                       join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    n_readers = WORLD * WORKERS
    for remainder in ("drop", "wrap"):
        for epoch in range(2):
            batches = [r[remainder]["epochs"][epoch] for r in ranks]
            assert len(batches[0]) == len(batches[1]) == ranks[0][remainder]["len"]  # same count on both ranks
            counts = Counter(c for rank in batches for b in rank for c in b)
            read = sum(len(b) for rank in batches for b in rank)
            if remainder == "drop":  # each cell at most once; 72 // 6 = 12 cells -> 3 batches of 4 per reader
                assert set(counts.values()) == {1} and read == n_readers * 3 * BATCH == 72
            else:  # every cell at least once; the wrap fill is the only repeat
                assert len(counts) == 72 and read == n_readers * 3 * BATCH
        assert ranks[0][remainder]["epochs"][0] != ranks[0][remainder]["epochs"][1]


def _stream(corpus, num_workers) -> ShardedDataLoader:
    index = UnitIndex.from_manifest(corpus, load_manifest(corpus))
    ds = ShardedArrowDataset(index, batch_size=3, tokenizer=TokenizerConfig(max_genes=10), shuffle_buffer=8,
                             rank=0, world_size=1)
    return ShardedDataLoader(ds, num_workers=num_workers)


@pytest.mark.multiprocess
def test_resume_in_new_process(tmp_path):
    """Stop after k batches, save the state, restore in a new process: the rest equals an uninterrupted run."""
    corpus = write_corpus(tmp_path / "corpus", SHARDS, record_batch_size=8)
    code = "import sys; from tests.stream_helpers import resume_worker; resume_worker(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for step in ("stop", "resume"):
        subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path), step], check=True, cwd=ROOT, env=env,
                       timeout=120)
    for num_workers in (0, 2):
        full = _stream(corpus, num_workers)
        expected = [batch_signature(b) for _ in range(2) for b in full]
        head = json.loads((tmp_path / f"head-{num_workers}.json").read_text())
        tail = json.loads((tmp_path / f"tail-{num_workers}.json").read_text())
        assert len(head) == 5 and head + tail == expected
