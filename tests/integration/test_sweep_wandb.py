"""A Hydra sweep (`fm pretrain -m`) logs each job to its own wandb run (offline, no key needed).

    python -m pytest tests/integration/test_sweep_wandb.py -q
"""

from __future__ import annotations

import sys

import pytest

from tests.integration.pretrain_helpers import build_corpus, run_module

pytestmark = pytest.mark.slow


def test_each_sweep_job_logs_to_its_own_wandb_run(tmp_path):
    """Before: wandb's run stayed open after a job, and the next job's WandbLogger logged into it."""
    corpus = build_corpus(tmp_path / "data", n_cells=120, n_genes=20)
    sweep = tmp_path / "sweep"
    run_module([sys.executable, "-m", "fm.cli", "pretrain", "-m", f"data.corpus={corpus}", "model.depth=1,2",
                "logger=wandb", "trainer.max_steps=2", "data.batch_size=8", "data.max_genes=16",
                "data.num_workers=0", "data.val_fraction=0.0", "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", f"hydra.sweep.dir={sweep}"],
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = {job: sorted((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1")}
    assert all(len(r) == 1 for r in runs.values()), runs
    assert runs["0"][0].name != runs["1"][0].name
    for job, (run,) in runs.items():
        assert list(run.glob("*.wandb")), f"job {job}: nothing logged in {run}"
