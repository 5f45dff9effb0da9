"""CorpusDataModule.sample_batches (what a head warm-starts on): whole cells, shuffled, about the cells asked for, and
the training loader's stream untouched.

    python -m pytest tests/unit/test_datamodule_sample.py -q
"""

from __future__ import annotations

import numpy as np

from fm import keys
from fm.data.datamodule import CorpusDataModule


def test_sample_batches_show_whole_cells(sim_corpus):
    dm = CorpusDataModule(corpus=str(sim_corpus), batch_size=16, max_genes=4, verify_checksums=False)
    batches = list(dm.sample_batches(40))
    n = sum(b[keys.B_GENE_MASK].shape[0] for b in batches)
    assert 40 <= n < 40 + 16  # stops at the first batch past the cells asked for
    lens = np.concatenate([b[keys.B_GENE_MASK].sum(1).numpy() for b in batches])
    assert lens.max() > 4  # every stored gene is a token, not max_genes of them
    assert all(keys.B_MS in b for b in batches)  # the corpus's moments come with them
    ids = [c for b in batches for c in b[keys.B_CELL_ID]]
    assert len(set(ids)) == len(ids)  # no cell twice within one pass
    assert dm._train_loader is None  # the training loader was not created or advanced
