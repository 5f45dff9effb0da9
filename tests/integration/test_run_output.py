"""What a user reads from a short `fm pretrain`: each log line once, and the progress bar's epoch without "/-2".

    python -m pytest tests/integration/test_run_output.py -q
"""

from __future__ import annotations

import sys

import pytest

from tests.integration.pretrain_helpers import build_corpus, run_module

pytestmark = pytest.mark.slow


def test_short_run_prints_each_line_once_and_a_plain_epoch(tmp_path):
    corpus = build_corpus(tmp_path / "data", n_cells=120, n_genes=20)
    proc = run_module([sys.executable, "-m", "fm.cli", "pretrain", f"data.corpus={corpus}",
                       f"hydra.run.dir={tmp_path / 'run'}", "logger=csv", "trainer.max_steps=2", "data.batch_size=8",
                       "data.max_genes=16", "data.num_workers=0", "data.val_fraction=0.0",
                       "trainer.limit_val_batches=0"])
    output = proc.stdout + proc.stderr
    # `import lightning` adds a console handler of its own; with Hydra's root handler each line came twice
    assert output.count("Seed set to 0") == 1, output[-3000:]
    assert output.count("`Trainer.fit` stopped") == 1, output[-3000:]
    # max_epochs=-1 (steps bound the run): Lightning's bar said "Epoch 0/-2"
    assert "Epoch 0" in output and "/-2" not in output, output[-3000:]
