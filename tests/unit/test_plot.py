"""`fm plot` and the scVelo projection behind it: known directions, simulated truth, the PNGs, and bad input.

    python -m pytest -q tests/unit/test_plot.py
"""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest

from fm import keys
from fm.cli import main
from fm.metrics.velocity import (
    embed_velocity,
    knn_indices,
    recursive_neighbours,
    transition_matrix,
    velocity_graph,
)
from fm.plot import DPI, FIGSIZE, ExpressionSpace, loss_curves, project_onto_embedding, velocity_embedding
from tests.conftest import PANCREAS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def simulated(n_cells: int = 300, n_genes: int = 50, seed: int = 0):
    """Simulated cells with their true ds/dt as ``layers['velocity']`` and the library factor as size factor."""
    from data_prep.simulate import simulate

    adata = simulate(n_cells, n_genes, regime="bifurcation", seed=seed)
    adata.layers[keys.LAYER_VELOCITY] = adata.layers[keys.LAYER_VELOCITY_TRUE]
    adata.obs[keys.SIZE_FACTOR] = adata.obs[keys.OBS_LIBRARY_SIZE]  # expected count = factor x noise-free amount
    return adata


@pytest.fixture(scope="module")
def sim_with_velocity(tmp_path_factory):
    adata = simulated(200, 30)
    path = tmp_path_factory.mktemp("plot") / "sim_velocity.h5ad"
    adata.write_h5ad(path)
    return path


# --- the projection ----------------------------------------------------------------------------------------------
def line_cells(n: int = 60, n_genes: int = 20, seed: int = 0):
    """Cells along a line in gene space (x = 5 + t d + noise) and a 2-D embedding (t, noise)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n)
    d = rng.standard_normal(n_genes)  # varies across genes: a common shift would carry no direction
    x = 5.0 + t[:, None] * d + 0.01 * rng.standard_normal((n, n_genes))
    emb = np.stack([t, 0.01 * rng.standard_normal(n)], 1)
    return x, np.tile(d, (n, 1)), emb


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_velocity_along_a_line_projects_along_it(sign):
    x, v, emb = line_cells()
    neighbours = knn_indices(x, 8)
    v_emb = embed_velocity(emb, transition_matrix(velocity_graph(x, sign * v, neighbours)))
    inner = v_emb[8:-8]  # the ends have neighbours on one side only
    assert (sign * inner[:, 0] > 0).all()
    assert (np.abs(inner[:, 0]) > 5 * np.abs(inner[:, 1])).all()


def test_transition_rows_are_normalised_and_zero_velocity_stays_put():
    x, v, emb = line_cells(30)
    v[3] = 0.0
    t = transition_matrix(velocity_graph(x, v, knn_indices(x, 6)))
    assert np.allclose(np.asarray(abs(t).sum(1)).ravel(), 1.0)
    assert t[3, 3] == pytest.approx(1.0)  # no direction: all its probability stays on itself
    assert np.allclose(embed_velocity(emb, t)[3], 0.0)


def test_recursive_neighbours_are_neighbours_of_neighbours():
    nb = np.array([[0, 1], [1, 2], [2, 3], [3, 0]])
    assert recursive_neighbours(nb, 0, 1).tolist() == [1]
    assert recursive_neighbours(nb, 0, 2).tolist() == [1, 2]


def time_gradient_agreement(adata, emb, v_emb, k: int = 15) -> float:
    """Share of cells whose projected velocity has a positive cosine with the local gradient of the true time."""
    t = adata.obs[keys.OBS_TIME_TRUE].to_numpy()
    nb = knn_indices(emb, k)
    grad = np.stack([np.linalg.lstsq(emb[nb[c]] - emb[c], t[nb[c]] - t[c], rcond=None)[0] for c in range(len(emb))])
    return float(((v_emb * grad).sum(1) > 0).mean())


def test_true_velocity_points_along_increasing_time():
    # measured over simulation seeds 0-4: true 0.93-0.97, reversed 0.03-0.07, random 0.46-0.55
    adata = simulated()
    emb = np.asarray(adata.obsm[keys.OBSM_SIM_EMBEDDING], dtype=np.float64)
    space = ExpressionSpace("size_factor")
    share = {}
    for name, v in (("true", adata.layers[keys.LAYER_VELOCITY_TRUE]), ("reversed", -adata.layers[
            keys.LAYER_VELOCITY_TRUE]), ("random", np.random.default_rng(0).standard_normal(adata.shape))):
        adata.layers[keys.LAYER_VELOCITY] = v
        share[name] = time_gradient_agreement(adata, emb, project_onto_embedding(adata, emb, space=space))
    assert share["true"] > 0.85, share
    assert share["reversed"] < 0.15, share
    assert 0.3 < share["random"] < 0.7, share


def test_genes_outside_the_vocabulary_are_left_out():
    adata = simulated(150, 20)
    v = np.array(adata.layers[keys.LAYER_VELOCITY], dtype=np.float32)
    v[:, :5] = np.nan
    adata.layers[keys.LAYER_VELOCITY] = v
    adata.var["fm_in_vocab"] = np.arange(20) >= 5
    fig = velocity_embedding(adata, basis=keys.OBSM_SIM_EMBEDDING, kind="arrows")
    assert "15 genes" in fig.axes[0].get_title()
    adata.var["fm_in_vocab"] = np.arange(20) >= 8  # the recorded vocabulary narrows it further
    assert "12 genes" in velocity_embedding(adata, basis=keys.OBSM_SIM_EMBEDDING, kind="arrows").axes[0].get_title()


def test_space_follows_uns_fm():
    adata = simulated(50, 10)
    assert ExpressionSpace.from_adata(adata) == ExpressionSpace()
    adata.uns[keys.UNS_FM] = {"models": {"0": {"head": "velocity",
                                               "tokenizer": {"normalization": "total", "target_sum": 1e4}}}}
    assert ExpressionSpace.from_adata(adata) == ExpressionSpace("total", log1p=True, target_sum=1e4)
    with pytest.raises(ValueError, match="normalization"):
        ExpressionSpace("median")


# --- figures -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["stream", "arrows", "grid"])
def test_cli_velocity_writes_a_png(sim_with_velocity, tmp_path, kind):
    out = tmp_path / f"v_{kind}.png"
    assert main(["plot", "velocity", str(sim_with_velocity), "--out", str(out), "--basis", "X_sim",
                 "--kind", kind, "--normalization", "size_factor"]) == 0
    assert png_size(out) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    assert not list(tmp_path.glob(".*tmp*"))


def test_default_embedding_is_a_pca_and_numeric_colour_gets_a_colour_bar(sim_with_velocity):
    import anndata as ad

    adata = ad.read_h5ad(sim_with_velocity)
    fig = velocity_embedding(adata, color=keys.OBS_TIME_TRUE, kind="arrows")
    assert "PCA" in fig.axes[0].get_title() and "PCA" in fig.axes[0].get_xlabel()
    assert len(fig.axes) == 2  # the colour bar
    high_dim = adata.copy()
    high_dim.obsm["X_fm"] = np.random.default_rng(0).standard_normal((adata.n_obs, 8))
    assert "PCA of X_fm" in velocity_embedding(high_dim, basis="X_fm", kind="arrows").axes[0].get_title()


def test_draws_into_given_axes_with_scanpy_colours(sim_with_velocity):
    import anndata as ad
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    adata = ad.read_h5ad(sim_with_velocity)
    categories = adata.obs[keys.OBS_CLUSTERS].cat.categories
    adata.uns["clusters_colors"] = [f"#{i:02x}{i:02x}80" for i in range(len(categories))]
    fig = Figure()
    _, ax = fig.subplots(1, 2)
    assert velocity_embedding(adata, basis="X_sim", kind="arrows", ax=ax) is fig
    points = {c.get_label(): c.get_facecolor()[0] for c in ax.collections if c.get_label() in set(categories)}
    assert points == {str(c): pytest.approx(to_rgba(h)) for c, h in zip(categories, adata.uns["clusters_colors"])}


def write_lightning_csv(run_dir, n_steps: int = 30, val_every: int = 10):
    """A run folder as fm's CSV logger (configs/logger/csv.yaml) writes it, through Lightning's own CSVLogger."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(run_dir), name="csv", version="")
    for step in range(n_steps):
        logger.log_metrics({"train/loss": 5.0 - 0.1 * step, "train/modality": 3.0 - 0.05 * step,
                            "lr-AdamW/pg1": 1e-4}, step=step)
        if step % val_every == val_every - 1:
            logger.log_metrics({"val/loss": 5.5 - 0.1 * step, "epoch": step // val_every}, step=step)
    logger.save()
    return run_dir / "csv" / "metrics.csv"


def test_cli_loss_writes_a_png_of_runs_and_csvs(tmp_path):
    csv_a = write_lightning_csv(tmp_path / "run_a")
    write_lightning_csv(tmp_path / "run_b", n_steps=20)
    out = tmp_path / "loss.png"
    assert main(["plot", "loss", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--out", str(out)]) == 0
    assert png_size(out) == (round(2 * 4.2 * DPI), round(3.2 * DPI))  # two families: loss, modality
    fig = loss_curves([csv_a], keys=["loss"])
    (ax,) = fig.axes
    assert ax.get_title() == "loss"
    assert sorted(line.get_label() for line in ax.get_lines()) == ["run_a train", "run_a val"]
    train = next(line for line in ax.get_lines() if line.get_label() == "run_a train")
    assert len(train.get_xdata()) == 30


# --- bad input ---------------------------------------------------------------------------------------------------
def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_no_velocity_layer_says_run_fm_predict(tmp_path, capsys):
    adata = simulated(40, 10)
    del adata.layers[keys.LAYER_VELOCITY]
    path = tmp_path / "raw.h5ad"
    adata.write_h5ad(path)
    code, err = run_cli(["plot", "velocity", str(path), "--out", str(tmp_path / "v.png")], capsys)
    assert code == 2 and str(path) in err and "layers['velocity']" in err and "fm predict" in err
    assert not (tmp_path / "v.png").exists()


def test_unknown_basis_and_colour_list_what_there_is(sim_with_velocity, tmp_path, capsys):
    out = tmp_path / "v.png"
    code, err = run_cli(["plot", "velocity", str(sim_with_velocity), "--out", str(out), "--basis", "X_umap"], capsys)
    assert code == 2 and "obsm['X_umap']" in err and "X_sim" in err
    code, err = run_cli(["plot", "velocity", str(sim_with_velocity), "--out", str(out), "--color", "celltype"],
                        capsys)
    assert code == 2 and "obs['celltype']" in err and "clusters" in err and "time_true" in err
    code, err = run_cli(["plot", "velocity", str(tmp_path / "absent.h5ad"), "--out", str(out)], capsys)
    assert code == 2 and "absent.h5ad" in err
    assert not out.exists()


def test_bad_loss_inputs_name_the_file(tmp_path, capsys):
    out = tmp_path / "loss.png"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, err = run_cli(["plot", "loss", str(empty), "--out", str(out)], capsys)
    assert code == 2 and "empty.csv" in err and "empty" in err
    no_metrics = tmp_path / "other.csv"
    pd.DataFrame({"step": [0, 1], "perf/cells_per_s": [1.0, 2.0]}).to_csv(no_metrics, index=False)
    code, err = run_cli(["plot", "loss", str(no_metrics), "--out", str(out)], capsys)
    assert code == 2 and "other.csv" in err and "train/" in err
    (tmp_path / "run").mkdir()
    code, err = run_cli(["plot", "loss", str(tmp_path / "run"), "--out", str(out)], capsys)
    assert code == 2 and "metrics.csv" in err and "run" in err
    code, err = run_cli(["plot", "loss", str(tmp_path / "nowhere"), "--out", str(out)], capsys)
    assert code == 2 and "nowhere" in err
    write_lightning_csv(tmp_path / "ok", n_steps=3, val_every=2)
    code, err = run_cli(["plot", "loss", str(tmp_path / "ok"), "--keys", "fusion", "--out", str(out)], capsys)
    assert code == 2 and "fusion" in err and "modality" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not PANCREAS.is_file(), reason="../shared/data is absent")
def test_pancreas_steady_state_flows_down_the_known_transitions(tmp_path):
    # measured (PCA embedding): Ngn3 high EP -> Pre-endocrine 1.00, Pre-endocrine -> Beta 0.93,
    # Pre-endocrine back towards Ngn3 high EP 0.08
    import anndata as ad

    from bench.figures import baseline_velocity
    from fm.plot import embedding_2d, expression_space, save_figure

    adata = ad.read_h5ad(PANCREAS)
    adata.layers[keys.LAYER_VELOCITY] = baseline_velocity(adata)
    neighbourhood = expression_space(adata)
    emb, _ = embedding_2d(adata, None, neighbourhood[1])
    v_emb = project_onto_embedding(adata, emb, neighbourhood=neighbourhood)
    labels = adata.obs[keys.OBS_CLUSTERS].to_numpy()

    def towards(source: str, target: str) -> float:
        cells = labels == source
        return float((((emb[labels == target].mean(0) - emb[cells]) * v_emb[cells]).sum(1) > 0).mean())

    assert towards("Ngn3 high EP", "Pre-endocrine") > 0.9
    assert towards("Pre-endocrine", "Beta") > 0.8
    assert towards("Pre-endocrine", "Ngn3 high EP") < 0.2
    out = save_figure(velocity_embedding(adata, kind="stream"), tmp_path / "pancreas.png")
    assert png_size(out) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_loss_of_a_run_too_short_to_log_says_why(tmp_path, capsys):
    """A run that stopped before its first logged step: say what the run holds and why nothing is plotted (it said
    "no metrics.csv" as if the folder were not a run)."""
    run = tmp_path / "run"
    for folder in ("csv", ".hydra", "checkpoints"):
        (run / folder).mkdir(parents=True)
    (run / "csv" / "hparams.yaml").write_text("{}\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / ".hydra" / "config.yaml").write_text("trainer:\n  log_every_n_steps: 10\n  max_steps: 3\n")
    assert main(["plot", "loss", str(run), "--out", str(tmp_path / "loss.png")]) == 2
    err = capsys.readouterr().err
    assert "no step was logged" in err and "log_every_n_steps=10, max_steps=3" in err, err
    assert "hparams.yaml" in err and "checkpoints/" in err and "trainer.log_every_n_steps=1" in err
