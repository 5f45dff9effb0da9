"""The README's main job, `fm demo`, end to end on tiny settings: simulate → convert → validate → stream → pretrain →
fine-tune → export → predict → evaluate → plot.

    python -m pytest -q tests/integration/test_demo.py
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from fm import keys
from fm.cli import main
from fm.data.schema import load_manifest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One small demo run (enough fine-tuning steps for a velocity field with a direction), shared by the tests."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out), "--cells", "400", "--genes", "30", "--steps", "40"]) == 0
    return out


def test_demo_runs_the_whole_pipeline(demo):
    out = demo
    manifest = load_manifest(out / "corpus")
    assert manifest.n_cells > 0 and manifest.n_genes == 30
    for run in ("pretrain", "finetune"):
        metrics = (out / run / "csv" / "metrics.csv").read_text().splitlines()
        assert "train/loss" in metrics[0] and len(metrics) > 1  # the CSV log has a training row (every 10 steps)
        assert (out / run / "checkpoints" / "last.ckpt").is_file()
    assert (out / "release" / "model.safetensors").is_file()
    predicted, heldout = ad.read_h5ad(out / "heldout_predicted.h5ad"), ad.read_h5ad(out / "sim_heldout.h5ad")
    assert predicted.layers[keys.LAYER_VELOCITY].shape == heldout.shape
    fitted = predicted.var[keys.VAR_VELOCITY_GENES].to_numpy()  # the genes the dynamical model fits
    assert fitted.sum() >= 5 and np.isfinite(predicted.layers[keys.LAYER_VELOCITY][:, fitted]).all()
    assert np.isnan(predicted.layers[keys.LAYER_VELOCITY][:, ~fitted]).all()
    conf = predicted.layers[keys.LAYER_VELOCITY_CONFIDENCE][:, fitted]
    assert ((conf >= 0) & (conf <= 1)).all() and predicted.obs["latent_time"].between(0, 1).all()
    scores = json.loads((out / "heldout_metrics.json").read_text())
    assert -1 <= scores["velocity"]["median_gene_spearman"] <= 1 and "embedding" in scores
    for png in ("heldout_velocity.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reruns_into_the_same_folder(tmp_path):
    out = tmp_path / "demo"
    for _ in range(2):
        assert main(["demo", "--out", str(out), "--cells", "200", "--genes", "20", "--steps", "0"]) == 0
    assert load_manifest(out / "corpus").n_genes == 20


def test_scvelo_reads_fm_predict_output_as_is(demo, tmp_path):
    """scVelo's velocity_graph, velocity_pseudotime and stream plot on fm predict's output, with no glue: the graph
    sends the root lineage's cells forward in the simulator's time, and the pseudotime from the root follows it
    (before fm predict wrote Ms in the velocity's units, scVelo measured displacements in raw counts and the root's
    arrows pointed backwards)."""
    scv = pytest.importorskip("scvelo")
    from scipy.stats import spearmanr

    adata = ad.read_h5ad(demo / "heldout_predicted.h5ad")
    scv.tl.velocity_graph(adata, n_jobs=1)
    t = adata.obs[keys.OBS_TIME_TRUE].to_numpy()
    T = scv.utils.get_transition_matrix(adata)  # row-stochastic transitions along the velocity
    ahead = np.asarray(T @ t).ravel() - t  # expected change of true time in one step of the chain
    root = (adata.obs[keys.OBS_LINEAGE] == "root").to_numpy()
    assert root.sum() > 10 and ahead[root].mean() > 0, ahead[root].mean()
    scv.tl.velocity_pseudotime(adata, root_key=int(np.argmin(t)))
    pt = adata.obs["velocity_pseudotime"].to_numpy()
    assert spearmanr(pt, t)[0] > 0.5
    assert pt[root].mean() < pt[~root].mean()
    scv.pl.velocity_embedding_stream(adata, basis="sim", show=False, save=str(tmp_path / "stream.png"))
    assert list(tmp_path.rglob("*stream.png"))
