"""`fm velocity --method stochastic` vs scVelo's stochastic mode, on raw counts from scVelo's own simulator.

    .venv/bin/python -m bench.velocity_teachers                    # 3 seeds x 2 sizes, ~2 minutes on 2 cores
    .venv/bin/python -m bench.velocity_teachers --sizes 500x50 --seeds 0   # a look

Data: ``scvelo.datasets.simulation`` (one induction then repression per gene, switching times cycled as scVelo
does; here beta and gamma drawn log-normally per gene so genes differ, and the time span fixed, ``--t-max`` 25,
where scVelo's grows with the number of cells and leaves most cells of a large simulation at steady state). Its
continuous u, s (with scVelo's normal noise) are turned into raw counts: Poisson(size_factor x u),
Poisson(size_factor x s), the size factor log-normal (sd 0.3) per cell and given in ``obs['size_factor']``.
Truth: ds/dt = beta u - gamma s on the noise-free solution at each cell's time. Both tools read the same file
in the same run:

- fm: ``fm velocity FILE --method stochastic --normalization size_factor`` (counts divided by the given factors).
- scVelo: its default preprocessing on the same raw counts (``pp.normalize_per_cell``, scanpy's ``pp.log1p``,
  ``pp.moments(n_pcs=30, n_neighbors=30)``, which normalise by library size, not by the given factors) then
  ``tl.velocity(mode='stochastic')``.
- fm with its default ``--normalization total`` (each modality by its own library size, as scVelo's default), for
  the share of the difference that the given size factors make.

Scored (fm.metrics.velocity) on the genes both give a velocity for: the median over genes of Spearman's rho with the
truth, the mean scaled cosine, the sign accuracy. Prints a markdown table (docs/VELOCITY.md holds the latest).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def simulate_counts(n_cells: int, n_genes: int, seed: int, t_max: float = 25.0):
    """scVelo's simulation turned into raw counts with given size factors, and its true ds/dt [N, G]."""
    import anndata as ad
    import scipy.sparse as sp
    import scvelo as scv
    from scvelo.core import SplicingDynamics
    from scvelo.datasets._simulate import vectorize

    rng = np.random.default_rng(seed)
    beta = 0.5 * np.exp(0.4 * rng.standard_normal(n_genes))
    gamma = 0.3 * np.exp(0.4 * rng.standard_normal(n_genes))
    sim = scv.datasets.simulation(n_obs=n_cells, n_vars=n_genes, beta=beta, gamma=gamma, t_max=t_max,
                                  random_seed=seed)
    t, t_ = sim.obs["true_t"].to_numpy(np.float64), sim.var["true_t_"].to_numpy(np.float64)
    v_true = np.zeros((n_cells, n_genes), np.float32)
    for g in range(n_genes):  # the noise-free solution, as the simulator computes it before adding noise
        tau, alpha_vec, u0, s0 = vectorize(t, t_[g], 5.0, beta[g], gamma[g], alpha_=0, u0=0, s0=0)
        u, s = SplicingDynamics(alpha=alpha_vec, beta=beta[g], gamma=gamma[g],
                                initial_state=[u0, s0]).get_solution(tau, stacked=False)
        v_true[:, g] = beta[g] * u - gamma[g] * s
    sf = np.exp(0.3 * rng.standard_normal(n_cells))
    counts = {name: sp.csr_matrix(rng.poisson(sf[:, None] * np.asarray(sim.layers[name])).astype(np.int32))
              for name in ("spliced", "unspliced")}
    a = ad.AnnData(X=counts["spliced"].copy(), layers={**counts, "velocity_true": v_true})
    a.obs["size_factor"] = sf
    a.obs["true_t"] = t
    a.var_names = [f"g{i}" for i in range(n_genes)]
    return a


def scvelo_stochastic(path: Path) -> np.ndarray:
    import anndata as ad
    import scanpy as sc
    import scvelo as scv

    a = ad.read_h5ad(path)
    del a.layers["velocity_true"]
    scv.pp.normalize_per_cell(a)
    sc.pp.log1p(a)  # scVelo 0.3 dropped its own pp.log1p
    scv.pp.moments(a, n_pcs=30, n_neighbors=30)
    scv.tl.velocity(a, mode="stochastic")
    v = np.asarray(a.layers["velocity"], np.float32)
    if "velocity_genes" in a.var:  # scVelo writes the column only when some gene is not a velocity gene
        v[:, ~a.var["velocity_genes"].to_numpy(bool)] = np.nan  # score the genes each tool offers
    return v


def fm_stochastic(path: Path, out: Path, normalization: str = "size_factor") -> np.ndarray:
    import anndata as ad

    from fm.cli import main

    code = main(["velocity", str(path), "--out", str(out), "--method", "stochastic", "--normalization",
                 normalization, "--size-factor-key", "size_factor", "--overwrite"])
    if code:
        raise RuntimeError(f"fm velocity failed on {path} (exit {code})")
    a = ad.read_h5ad(out)
    v = np.asarray(a.layers["velocity"], np.float32)
    v[:, ~a.var["velocity_genes"].to_numpy(bool)] = np.nan
    return v


def score(v_NG: np.ndarray, truth_NG: np.ndarray, genes_G: np.ndarray) -> dict:
    from fm.metrics.velocity import gene_spearman, scaled_cosine, sign_accuracy

    v, t = v_NG[:, genes_G], truth_NG[:, genes_G]
    return {"spearman": gene_spearman(v, t)["median"], "cosine": scaled_cosine(v, t)["mean"],
            "sign": sign_accuracy(v, t)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["1000x100", "3000x200"], help="CELLSxGENES")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--t-max", type=float, default=25.0,
                   help="simulated time span (scVelo's default grows with the cells: ~0.1 per cell)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import scvelo as scv

    scv.settings.verbosity = 0
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.h5ad"  # numba compiles scanpy's graph code on first use: not part of either time
        simulate_counts(200, 20, 0).write_h5ad(warm)
        fm_stochastic(warm, Path(tmp) / "warm_fm.h5ad")
        scvelo_stochastic(warm)
        for size in args.sizes:
            n_cells, n_genes = (int(x) for x in size.split("x"))
            for seed in args.seeds:
                path = Path(tmp) / f"sim_{size}_{seed}.h5ad"
                a = simulate_counts(n_cells, n_genes, seed, args.t_max)
                a.write_h5ad(path)
                t0 = time.perf_counter()
                v_fm = fm_stochastic(path, Path(tmp) / f"fm_{size}_{seed}.h5ad")
                t1 = time.perf_counter()
                v_scv = scvelo_stochastic(path)
                t2 = time.perf_counter()
                v_total = fm_stochastic(path, Path(tmp) / f"fm_{size}_{seed}.h5ad", "total")
                truth = np.asarray(a.layers["velocity_true"])
                both = np.isfinite(v_fm).all(0) & np.isfinite(v_scv).all(0)
                rows.append((size, seed, int(both.sum()), score(v_fm, truth, both), score(v_scv, truth, both),
                             t1 - t0, t2 - t1, score(v_total, truth, both & np.isfinite(v_total).all(0))))
    print("| cells x genes | seed | genes scored | fm Spearman / cosine / sign | scVelo Spearman / cosine / sign "
          "| fm s | scVelo s | fm --normalization total |")
    print("|---|---|---|---|---|---|---|---|")
    for size, seed, n, f, s, tf, ts, ft in rows:
        print(f"| {size} | {seed} | {n} | {f['spearman']:.3f} / {f['cosine']:.3f} / {f['sign']:.3f} "
              f"| {s['spearman']:.3f} / {s['cosine']:.3f} / {s['sign']:.3f} | {tf:.1f} | {ts:.1f} "
              f"| {ft['spearman']:.3f} / {ft['cosine']:.3f} / {ft['sign']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
