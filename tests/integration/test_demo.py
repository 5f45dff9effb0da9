"""The README's main job, `fm demo`, end to end on tiny settings: simulate, convert, validate, stream, pretrain.

    python -m pytest -q tests/integration/test_demo.py
"""

from __future__ import annotations

from fm.cli import main
from fm.data.schema import load_manifest


def test_demo_runs_the_pipeline(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--cells", "300", "--genes", "30", "--steps", "10"]) == 0
    manifest = load_manifest(out / "corpus")
    assert manifest.n_cells > 0 and manifest.n_genes == 30
    assert (out / "sim_bifurcation.h5ad").is_file()
    metrics = (out / "pretrain" / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in metrics[0] and len(metrics) > 1  # the CSV log has a training row (every 10 steps)
    assert (out / "pretrain" / "checkpoints" / "last.ckpt").is_file()
