"""bench/loader: the anndata path it compares against does the same work as fm's (same cells -> same batch), in
process and in DataLoader workers.

    python -m pytest -q tests/unit/test_bench_loader.py
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.loader import _AnndataBatches, _fm_loader, make_data, time_anndata
from fm import keys
from fm.data.tokenize import TokenizerConfig

SAME = (keys.B_GENE_IDS, keys.B_GENE_MASK, keys.B_SPLICED, keys.B_UNSPLICED, keys.B_SPLICED_COUNTS,
        keys.B_UNSPLICED_COUNTS, keys.B_LIBRARY_SIZE_SPLICED, keys.B_LIBRARY_SIZE_UNSPLICED)


def test_anndata_path_gives_fm_batches_for_the_same_cells(tmp_path):
    corpus, h5ad = make_data(tmp_path, n_cells=64, n_genes=120, nnz=30)
    tok = TokenizerConfig(max_genes=64)  # every cell fits: no sampling, so the two paths must agree exactly
    fm_loader = _fm_loader(corpus, 0, 16, tok)
    fm_loader.dataset.shuffle = False  # corpus order, so batch i holds cells 16 i .. 16 i + 15
    fm_batches = list(fm_loader)
    ann_batches = list(_AnndataBatches(h5ad, np.arange(64), 16, tok))
    assert len(fm_batches) == len(ann_batches) == 4
    for f, a in zip(fm_batches, ann_batches):
        assert f[keys.B_CELL_ID] == a[keys.B_CELL_ID]
        for k in SAME:
            assert torch.equal(f[k], a[k]), k


def test_anndata_path_in_workers_reads_every_cell_once(tmp_path):
    _, h5ad = make_data(tmp_path, n_cells=64, n_genes=120, nnz=30)
    tok = TokenizerConfig(max_genes=64)
    seen = [c for b in torch.utils.data.DataLoader(_AnndataBatches(h5ad, np.arange(64)[::-1].copy(), 16, tok),
                                                   batch_size=None, num_workers=2) for c in b[keys.B_CELL_ID]]
    assert sorted(seen) == sorted(f"c{i}" for i in range(64))
    rates = time_anndata(h5ad, 64, 16, tok, budget=64, workers=2)
    assert all(math.isfinite(rates[k]) and rates[k] > 0 for k in ("wall", "main_cpu", "worker_cpu"))
    rates = time_anndata(h5ad, 64, 16, tok, budget=64)
    assert math.isnan(rates["worker_cpu"]) and rates["read_ms"] > 0
