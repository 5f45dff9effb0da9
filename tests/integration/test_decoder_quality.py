"""The generative decoder, briefly fine-tuned on a tiny simulation, moves held-out cells towards their true future.

    python -m pytest tests/integration/test_decoder_quality.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.decoder_quality import generative_distances, time_neighbour_means
from fm import finetune, train
from tests.integration.pretrain_helpers import TINY, compose

pytestmark = pytest.mark.slow


def test_time_neighbour_means_follow_the_lineage():
    from data_prep.simulate import simulate

    adata = simulate(300, 8, regime="bifurcation", seed=0)
    t = adata.obs["time_true"].to_numpy(np.float64)
    values = {"s": t[:, None].repeat(8, 1), "u": -t[:, None].repeat(8, 1)}  # a value that is the cell's time
    s, u, valid = time_neighbour_means(adata, values, 1.0, k=5)
    assert valid.any() and not valid.all()  # root cells past the branching and late cells have no future
    # the mean time of the neighbours is close to t + 1 (5 neighbours among ~100 cells per lineage)
    assert np.abs(s[valid, 0] - (t[valid] + 1.0)).max() < 0.5
    np.testing.assert_allclose(u[valid], -s[valid])


def test_generated_future_is_closer_than_the_present(tmp_path):
    from data_prep.convert import convert
    from data_prep.gene_table import make_gene_table
    from data_prep.simulate import simulate, write

    table = make_gene_table(30, seed=0)
    train_ad = simulate(500, 30, regime="bifurcation", seed=0, gene_table=table)
    heldout = simulate(150, 30, regime="bifurcation", seed=1, gene_table=table, jitter=0.05, capture=0.5)
    convert([write(train_ad, tmp_path / "train.h5ad")], tmp_path / "train", dataset_ids=["train"], progress=False)
    convert([write(heldout, tmp_path / "heldout.h5ad")], tmp_path / "heldout", vocab=tmp_path / "train/vocab.tsv",
            dataset_ids=["heldout"], progress=False)
    train.run(compose(tmp_path / "train", tmp_path / "pretrain", "trainer.max_steps=4"))
    overrides = [o for o in TINY if not o.startswith(("model=", "task.", "data.max_genes"))]
    cfg = train.compose([f"data.corpus={tmp_path / 'train'}", f"output_dir={tmp_path / 'ft'}",
                         f"checkpoint={tmp_path / 'pretrain/checkpoints/last.ckpt'}", "head=generative",
                         "task.finetune.encoder=full", *overrides, "data.max_genes=32", "trainer.max_steps=30",
                         "task.optim.warmup_steps=5", "task.optim.lr=3e-3"], "finetune")
    task = finetune.run(cfg)["task"]
    r = generative_distances(task, tmp_path / "heldout", "heldout", heldout, max_genes=32, dt=1.0, k=5)
    assert r["n_cells"] > 50
    assert r["rmse"]["generated"] < r["rmse"]["present (observed)"]
    assert r["win_vs_present"] > 0.5
