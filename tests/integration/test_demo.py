"""The README's main job, `fm demo`, end to end on tiny settings: simulate → convert → validate → stream → pretrain →
fine-tune → export → predict → evaluate → plot.

    python -m pytest -q tests/integration/test_demo.py
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np

from fm import keys
from fm.cli import main
from fm.data.schema import load_manifest


def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--cells", "300", "--genes", "30", "--steps", "10"]) == 0
    manifest = load_manifest(out / "corpus")
    assert manifest.n_cells > 0 and manifest.n_genes == 30
    for run in ("pretrain", "finetune"):
        metrics = (out / run / "csv" / "metrics.csv").read_text().splitlines()
        assert "train/loss" in metrics[0] and len(metrics) > 1  # the CSV log has a training row (every 10 steps)
        assert (out / run / "checkpoints" / "last.ckpt").is_file()
    assert (out / "release" / "model.safetensors").is_file()
    predicted, heldout = ad.read_h5ad(out / "heldout_predicted.h5ad"), ad.read_h5ad(out / "sim_heldout.h5ad")
    assert predicted.layers[keys.LAYER_VELOCITY].shape == heldout.shape
    assert np.isfinite(predicted.layers[keys.LAYER_VELOCITY]).all()  # every simulated gene is in the vocabulary
    scores = json.loads((out / "heldout_metrics.json").read_text())
    assert -1 <= scores["velocity"]["median_gene_spearman"] <= 1 and "embedding" in scores
    for png in ("heldout_velocity.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reruns_into_the_same_folder(tmp_path):
    out = tmp_path / "demo"
    for _ in range(2):
        assert main(["demo", "--out", str(out), "--cells", "200", "--genes", "20", "--steps", "0"]) == 0
    assert load_manifest(out / "corpus").n_genes == 20
