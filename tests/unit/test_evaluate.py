"""`fm evaluate` on predicted AnnData files: the sections it scores, what it skips, its table and JSON, bad input.

The model-driven part (``--checkpoint``, imputation) is exercised in tests/integration/test_predict.py's pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.simulate import simulate
from fm import keys
from fm.cli import main
from fm.evaluate import evaluate, parse_transitions


@pytest.fixture(scope="module")
def sim():
    adata = simulate(400, 40, regime="bifurcation", seed=0)
    adata.obsm["X_umap"] = np.asarray(adata.obsm[keys.OBSM_SIM_EMBEDDING])
    return adata


def with_velocity(adata, v_NG, embedding=None):
    out = adata.copy()
    out.layers[keys.LAYER_VELOCITY] = np.asarray(v_NG, dtype=np.float32)
    if embedding is not None:
        out.obsm[keys.OBSM_EMBEDDING] = embedding
    return out


def test_true_velocity_scores_perfectly_and_noise_scores_lower(sim):
    truth = np.asarray(sim.layers[keys.LAYER_VELOCITY_TRUE])
    perfect = evaluate(with_velocity(sim, truth))["velocity"]
    assert perfect["median_gene_spearman"] == pytest.approx(1.0)
    assert perfect["sign_accuracy"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = evaluate(with_velocity(sim, truth + rng.normal(size=truth.shape) * truth.std(0)))["velocity"]
    assert 0.2 < noisy["median_gene_spearman"] < 0.9
    assert 0.5 < noisy["sign_accuracy"] < 0.95
    flipped = evaluate(with_velocity(sim, -truth))["velocity"]
    assert flipped["sign_accuracy"] == pytest.approx(0.0) and flipped["median_gene_spearman"] == pytest.approx(-1.0)


def test_genes_outside_the_vocabulary_are_left_out(sim):
    v = np.asarray(sim.layers[keys.LAYER_VELOCITY_TRUE]).copy()
    v[:, :5] = np.nan  # what fm predict writes for genes outside the vocabulary
    result = evaluate(with_velocity(sim, v))["velocity"]
    assert result["n_genes"] == sim.n_vars - 5 and result["median_gene_spearman"] == pytest.approx(1.0)


def test_cbdir_prefers_velocity_along_time_to_its_reverse(sim):
    truth = np.asarray(sim.layers[keys.LAYER_VELOCITY_TRUE])
    clusters = sorted(set(sim.obs[keys.OBS_CLUSTERS]))
    # consecutive stages of one lineage: lineage_a_1 -> lineage_a_2 -> ...
    stages = [c for c in clusters if c.startswith("lineage_a")]
    edges = list(zip(stages[:-1], stages[1:]))
    forward = evaluate(with_velocity(sim, truth), transitions=edges)["transitions"]
    backward = evaluate(with_velocity(sim, -truth), transitions=edges)["transitions"]
    assert forward["cbdir_mean"] > 0.2 > -0.2 > backward["cbdir_mean"]
    assert set(forward["cbdir"]) == {f"{a}>{b}" for a, b in edges}


def test_embedding_section_tells_informative_from_random(sim):
    rng = np.random.default_rng(0)
    informative = np.c_[np.asarray(sim.obs[keys.OBS_TIME_TRUE]), sim.obs[keys.OBS_LINEAGE].cat.codes * 5.0]
    good = evaluate(with_velocity(sim, sim.layers[keys.LAYER_VELOCITY_TRUE], informative + rng.normal(size=(400, 2))
                                  * 0.1))["embedding"]
    bad = evaluate(with_velocity(sim, sim.layers[keys.LAYER_VELOCITY_TRUE], rng.normal(size=(400, 8))))["embedding"]
    assert good["ari"] > bad["ari"] + 0.2 and bad["ari"] < 0.1


def test_what_cannot_be_scored_is_skipped_or_refused(sim):
    result = evaluate(with_velocity(sim, sim.layers[keys.LAYER_VELOCITY_TRUE]))
    assert "embedding" in result["skipped"] and "transitions" in result["skipped"]
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(sim[:, :].copy())
    with pytest.raises(KeyError, match="no_such_layer"):
        evaluate(with_velocity(sim, sim.layers[keys.LAYER_VELOCITY_TRUE]), truth_layer="no_such_layer")
    with pytest.raises(ValueError, match="Nowhere"):
        evaluate(with_velocity(sim, sim.layers[keys.LAYER_VELOCITY_TRUE]), transitions=[("Nowhere", "lineage_a_1")])


def test_parse_transitions():
    assert parse_transitions("Ductal>Ngn3 low EP; Pre-endocrine>Alpha, Beta") == [
        ("Ductal", "Ngn3 low EP"), ("Pre-endocrine", "Alpha"), ("Pre-endocrine", "Beta")]
    with pytest.raises(ValueError, match="SOURCE>TARGET"):
        parse_transitions("A>B>C")


def test_cli_prints_a_table_and_writes_json(sim, tmp_path, capsys):
    path = tmp_path / "pred.h5ad"
    with_velocity(sim, sim.layers[keys.LAYER_VELOCITY_TRUE]).write_h5ad(path)
    assert main(["evaluate", str(path), "--out", str(tmp_path / "m.json")]) == 0
    assert "median_gene_spearman" in capsys.readouterr().out
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["velocity"]["median_gene_spearman"] == pytest.approx(1.0) and result["input"] == str(path)
    assert main(["evaluate", str(tmp_path / "absent.h5ad")]) == 2
    assert "absent.h5ad" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--hold-out", "0.1"]) == 2


def test_without_an_umap_the_basis_is_computed(sim):
    adata = with_velocity(sim, sim.layers[keys.LAYER_VELOCITY_TRUE])
    del adata.obsm["X_umap"]
    result = evaluate(adata, transitions=[("lineage_a_1", "lineage_a_2")])["transitions"]
    assert result["basis"].startswith("PCA") and np.isfinite(result["cbdir_mean"])


PANCREAS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pancreas_supercell_3696x2000.h5ad"


@pytest.mark.slow
@pytest.mark.skipif(not PANCREAS.is_file(), reason="../shared/data (pancreas) not present")
def test_pancreas_preset_scores_the_steady_state_baseline():
    import anndata as ad

    from fm.metrics.velocity import steady_state_velocity

    adata = ad.read_h5ad(PANCREAS)
    u = np.asarray(adata.layers[keys.LAYER_UNSPLICED].toarray(), dtype=np.float64)
    s = np.asarray(adata.layers[keys.LAYER_SPLICED].toarray(), dtype=np.float64)
    adata.layers[keys.LAYER_VELOCITY] = steady_state_velocity(u, s).astype(np.float32)
    result = evaluate(adata, transitions=parse_transitions("pancreas"))["transitions"]
    assert len(result["cbdir"]) == 7 and all(np.isfinite(v) for v in result["cbdir"].values())
    assert -1 <= result["cbdir_mean"] <= 1 and set(result["iccoh"]) == set(adata.obs["clusters"])


def test_several_inputs_are_scored_side_by_side(sim, tmp_path, capsys, monkeypatch):
    """Truth, a teacher and its reverse in one table: a column each, the same rows, scored by the same code."""
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long metric names on a narrow terminal
    rng = np.random.default_rng(0)
    truth = sim.layers[keys.LAYER_VELOCITY_TRUE]
    files = {"truth": truth, "noisy": truth + rng.normal(0, 2 * truth.std(), truth.shape), "reverse": -truth}
    paths = []
    for name, v in files.items():
        paths.append(tmp_path / f"{name}.h5ad")
        with_velocity(sim, v).write_h5ad(paths[-1])
    out = tmp_path / "compare.json"
    args = ["evaluate", *map(str, paths), "--name", "T", "--name", "N", "--name", "R", "--out", str(out),
            "--transitions", "root>lineage_a", "--clusters", keys.OBS_LINEAGE]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in "TNR") and "median_gene_spearman" in table
    got = json.loads(out.read_text())["compare"]
    rho = {k: got[k]["velocity"]["median_gene_spearman"] for k in "TNR"}
    assert rho["T"] == pytest.approx(1.0) and rho["R"] == pytest.approx(-1.0) and rho["R"] < rho["N"] < rho["T"]
    assert got["T"]["transitions"]["cbdir_mean"] > 0 > got["R"]["transitions"]["cbdir_mean"]
    assert main(["evaluate", *map(str, paths), "--name", "only-one"]) == 2  # a name per input
