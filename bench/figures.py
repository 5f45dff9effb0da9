"""The README's figures: velocity on the pancreas embedding, and loss curves of a small run (docs/img/).

    python bench/figures.py pancreas                                  # steady-state baseline, 1-3 min on 2 CPUs
    python bench/figures.py pancreas --input pancreas_fm.h5ad         # `fm predict` output instead
    python bench/figures.py loss runs/debug_pretrain                  # a run folder with csv/metrics.csv

docs/img/loss_curves.png comes from a 150-step debug pretraining with validation on the demo corpus (~3 min CPU):
``fm demo --out runs/demo --cells 300 --genes 50 --steps 20``, then ``fm pretrain data.corpus=runs/demo/corpus
output_dir=runs/debug_pretrain model=debug logger=csv data.num_workers=0 data.max_genes=50 trainer.max_steps=150
trainer.log_every_n_steps=5 data.val_fraction=0.2 trainer.val_check_interval=25 seed=0``.

``pancreas``: the pancreas file (/work/shared/data, or $FM_SHARED_DATA) has no ``X_umap``, and umap-learn is not a
dependency, so the embedding is a t-SNE (scikit-learn, seed 0) of the top 30 principal components of log1p
normalised spliced counts, unless the input has ``X_umap``. The velocity is ``layers['velocity']`` of ``--input``
(`fm predict` output; its displacement units from ``uns['fm']``), or else the steady-state baseline (the recipe
of bench/velocity_quality.py's ``steady_state``: v = u - gamma s on kNN moments of total-count normalised counts),
restricted as scVelo's ``velocity_genes`` are (gamma > 0.01 and R^2 > 0.01 of the steady-state fit). The title
says which. Drawn by fm.plot (velocity projected as scVelo does), written atomically, 100 dpi.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fm import keys  # noqa: E402

log = logging.getLogger("bench.figures")

PANCREAS = Path(os.environ.get("FM_SHARED_DATA", "/work/shared/data")) / "pancreas_supercell_3696x2000.h5ad"
IMG = REPO / "docs" / "img"


def tsne(adata, seed: int = 0) -> np.ndarray:
    """t-SNE [N, 2] of the expression PCA fm.plot uses for its kNN."""
    from sklearn.manifold import TSNE

    from fm.plot import expression_space

    pcs_NP = expression_space(adata)[1]
    return TSNE(n_components=2, perplexity=30, init="pca", random_state=seed).fit_transform(pcs_NP)


def baseline_velocity(adata, min_gamma: float = 0.01, min_r2: float = 0.01) -> np.ndarray:
    """Steady-state velocity [N, G] on kNN moments, NaN outside scVelo's ``velocity_genes`` rule.

    The recipe of bench/velocity_quality.py's ``steady_state(smooth=True)``: each layer scaled per cell to its median
    library size, means over the 30 nearest cells in 30 PCs of log1p spliced (fm.plot.expression_space computes the
    same), v = Mu - gamma Ms. Genes with gamma <= ``min_gamma`` or R^2 = 1 - sum (Mu - gamma Ms)^2 / sum
    (Mu - mean Mu)^2 <= ``min_r2`` are NaN (not velocity genes).
    """
    from fm.metrics.velocity import steady_state_gamma
    from fm.plot import expression_space

    ms_NG, _, neighbours_NK = expression_space(adata, 30)
    u = adata.layers[keys.LAYER_UNSPLICED]
    u_NG = np.asarray(u.toarray() if hasattr(u, "toarray") else u, dtype=np.float64)
    total_N1 = u_NG.sum(1, keepdims=True)
    mu_NG = (u_NG / np.maximum(total_N1, 1) * np.median(total_N1))[neighbours_NK].mean(1)
    gamma_G = steady_state_gamma(mu_NG, ms_NG)
    v_NG = mu_NG - gamma_G * ms_NG
    ss_tot = ((mu_NG - mu_NG.mean(0)) ** 2).sum(0)
    r2_G = np.where(ss_tot > 0, 1 - (v_NG**2).sum(0) / np.maximum(ss_tot, 1e-12), 0.0)
    keep = (gamma_G > min_gamma) & (r2_G > min_r2)
    log.info("steady state: %d of %d genes pass gamma > %g and R^2 > %g", keep.sum(), keep.size, min_gamma, min_r2)
    return np.where(keep, v_NG, np.nan)


def pancreas_figure(input_path: Path | None, out: Path, kind: str = "stream") -> Path:
    import anndata as ad

    from fm.plot import save_figure, velocity_embedding

    source = input_path or PANCREAS
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (the pancreas data lives in /work/shared/data)")
    adata = ad.read_h5ad(source)
    t0 = time.perf_counter()
    if keys.LAYER_VELOCITY in adata.layers:
        what = "fm velocity"
    else:
        adata.layers[keys.LAYER_VELOCITY] = baseline_velocity(adata)
        what = "steady-state baseline velocity (fm predict output to come)"
    if "X_umap" in adata.obsm:
        basis, described = "X_umap", "UMAP"
    else:
        adata.obsm["X_tsne"] = tsne(adata)
        basis, described = "X_tsne", "t-SNE"
    log.info("velocity and embedding in %.0f s", time.perf_counter() - t0)
    title = f"Pancreas: {what} on {described}"
    fig = velocity_embedding(adata, basis=basis, kind=kind, title=title)
    return save_figure(fig, out, dpi=100)


def loss_figure(runs: list[str], out: Path) -> Path:
    from fm.plot import loss_curves, save_figure

    return save_figure(loss_curves(runs), out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    figures = parser.add_subparsers(dest="figure", required=True)
    p = figures.add_parser("pancreas", help="velocity on the pancreas embedding")
    p.add_argument("--input", type=Path, help="`fm predict` output on the pancreas file (default: the raw file, "
                                              "steady-state baseline velocity)")
    p.add_argument("--out", type=Path, default=IMG / "pancreas_velocity.png")
    p.add_argument("--kind", default="stream", choices=("stream", "arrows", "grid"))
    loss = figures.add_parser("loss", help="loss curves of runs (folders with csv/metrics.csv, or CSV files)")
    loss.add_argument("runs", nargs="+")
    loss.add_argument("--out", type=Path, default=IMG / "loss_curves.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.figure == "pancreas":
        path = pancreas_figure(args.input, args.out, args.kind)
    else:
        path = loss_figure(args.runs, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
