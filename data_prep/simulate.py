"""Kinetic simulator: spliced/unspliced counts with ground-truth RNA velocity.

    fm prep simulate --out sim.h5ad --cells 2000 --genes 200 --regime bifurcation --seed 0
    fm prep simulate --out sim2.h5ad --cells 2000 --genes 200 --regime boost --seed 1 \\
        --gene-table sim.genes.tsv --jitter 0.05        # same genes, kinetics equal up to a 5% jitter
    python -c "from data_prep.simulate import simulate; print(simulate(500, 50, regime='cycle'))"   # CPU, 1 s

Every gene follows du/dt = α(t) − βu, ds/dt = βu − γs with α piecewise constant in time (switching on and off,
scaled per lineage, boosted, or periodic), so the noise-free u(t), s(t) have a closed form on every piece and the
ground-truth velocities are du/dt and ds/dt at each cell's time. Kinetics come from a gene table with its own seed
(`make_gene_table`), written beside the data; datasets simulated from one table with a jitter share their genes
while their cells, lineages and library sizes differ. Counts are Poisson or negative binomial around the noise-free
amounts times a log-normal per-cell library-size factor, with dropout.

The closed-form kinetics live in `data_prep.kinetics`, the gene tables in `data_prep.gene_table`; this module holds
the configuration, the per-dataset jitter, the count noise, the AnnData assembly, `write` and the command.

Shapes: C cells, G genes, L lineages, K segments of a gene's α schedule, E switching events.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_prep.gene_table import (
    GENE_TABLE_COLUMNS,
    VAR_FLAGS,
    check_gene_table,
    gene_table_path,
    make_gene_table,
    read_gene_table,
)
from data_prep.kinetics import REGIMES, T_MAX, KineticModel, build_lineages
from fm import keys
from fm.io import atomic_path, write_h5ad_atomic

log = logging.getLogger(__name__)

NOISE_MODELS = ("nb", "poisson")
_JITTERED = ("alpha_on", "alpha_off", "beta", "gamma")  # rates that vary between datasets sharing a table

_CHUNK_CELLS = 2048  # fixed, so that results do not depend on the number of worker threads
_MU_DIRECT = 25.0  # expected counts above this go to numpy's sampler; below it, vectorised inversion is faster
_STREAM_CELLS, _STREAM_JITTER, _STREAM_NOISE, _STREAM_LAYOUT = range(4)  # independent seed streams


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate; checked on construction (errors name the field)."""

    n_cells: int
    n_genes: int
    regime: str = "bifurcation"  # one of REGIMES
    seed: int = 0  # cells, lineages, times, library sizes, count noise and the gene jitter
    gene_seed: int = 0  # the gene table (unused when a table is given)
    jitter: float = 0.0  # sd of the log-normal per-gene jitter of α_on, α_off, β, γ (0: the table exactly)
    noise: str = "nb"  # "nb" or "poisson"
    nb_shape: float = 10.0  # negative-binomial shape r: variance = μ + μ²/r
    dropout: float = 0.05  # probability that a count is zeroed, independently per entry and modality
    capture: float = 0.25  # median library-size factor
    library_sigma: float = 0.3  # sd of the log library-size factor
    branch_time: float = 3.5  # bifurcation: when the root splits into two lineages, in (0, T_MAX)
    boost_time: float = 5.0  # boost: when the boosted genes' α rises, in (0, T_MAX)
    cycle_period: float = T_MAX  # cycle: the period
    n_time_bins: int = 4  # clusters = lineage × this many time bins
    workers: int = 0  # threads (0: all cores); never changes the result

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"SimulationConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("n_cells", "n_genes", "n_time_bins"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        for name in ("seed", "gene_seed", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(name, "must be a non-negative integer")
        if self.regime not in REGIMES:
            fail("regime", f"unknown regime; valid: {', '.join(REGIMES)}")
        if self.noise not in NOISE_MODELS:
            fail("noise", f"unknown noise model; valid: {', '.join(NOISE_MODELS)}")
        for name in ("jitter", "library_sigma"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be finite and >= 0")
        for name in ("nb_shape", "capture", "cycle_period"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be finite and > 0")
        if not 0 <= self.dropout < 1:
            fail("dropout", "must be in [0, 1)")
        for name in ("branch_time", "boost_time"):
            if not 0 < getattr(self, name) < T_MAX:
                fail(name, f"must be in (0, {T_MAX})")


# --- per-dataset jitter -------------------------------------------------------------------------------------------


def jitter_gene_table(table: pd.DataFrame, jitter: float, seed: int) -> pd.DataFrame:
    """Multiply α_on, α_off, β and γ of every gene by exp(jitter · N(0, 1)), seeded by the cell seed."""
    out = table.copy()
    if jitter > 0:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_JITTER,)))
        for col in _JITTERED:
            out[col] = out[col].to_numpy(np.float64) * np.exp(jitter * rng.standard_normal(len(out)))
    return out


# --- count noise --------------------------------------------------------------------------------------------------


def sample_counts(mean: np.ndarray, rng: np.random.Generator, noise: str, nb_shape: float, dropout: float):
    """Integer counts (int32, same shape) drawn around ``mean``, zeroed with probability ``dropout``.

    One uniform per entry decides dropout and, rescaled to q, the count as the inverse CDF at q. P(0) >= 1 − mean
    under both models, so entries with q <= 1 − mean (most of them) are zeros without any further work; the rest
    walk up the CDF together, the active set shrinking each step. Large means use numpy's samplers. This is several
    times faster than numpy's per-element samplers on sparse data.
    """
    shape = mean.shape
    mean = mean.ravel()
    out = np.zeros(mean.size, np.int32)
    uniform = rng.random(mean.size, dtype=np.float32)
    # q = (uniform − dropout)/(1 − dropout) > 1 − mean  <=>  uniform > 1 − (1 − dropout)·mean; and not dropped
    threshold = mean * -(1.0 - dropout)
    threshold += 1.0
    np.maximum(threshold, dropout, out=threshold)
    active = np.flatnonzero(uniform > threshold)
    m = mean[active].astype(np.float64)
    q = (uniform[active] - dropout) / (1.0 - dropout)
    big = m > _MU_DIRECT
    if big.any():
        mb = m[big]
        nb = noise == "nb"
        out[active[big]] = rng.negative_binomial(nb_shape, nb_shape / (nb_shape + mb)) if nb else rng.poisson(mb)
        active, m, q = active[~big], m[~big], q[~big]
    if noise == "poisson":
        p = np.exp(-m)
        ratio = m  # p_k = p_{k−1} · m / k
    else:
        p = np.exp(-nb_shape * np.log1p(m / nb_shape))
        ratio = m / (nb_shape + m)  # p_k = p_{k−1} · (k − 1 + r)/k · m/(r + m)
    cdf = p.copy()
    count = np.zeros(active.size, np.int32)
    k = 0
    while active.size and k < 10_000:  # the bound only guards against rounding keeping the cdf below q
        more = q > cdf  # the cdf only grows, so an entry once stopped stays stopped: no need to drop it each step
        count += more
        n_more = np.count_nonzero(more)
        if n_more < active.size // 2:  # compact now and then, so the work follows the entries still walking
            out[active] = count
            active, q, p, cdf, ratio, count = (a[more] for a in (active, q, p, cdf, ratio, count))
        k += 1
        p *= ratio
        p *= 1.0 / k if noise == "poisson" else (k - 1 + nb_shape) / k
        cdf += p
    out[active] = count
    return out.reshape(shape)


def dense_to_csr(counts_CG: np.ndarray) -> sp.csr_matrix:
    """CSR of a dense count block (faster than scipy's generic conversion)."""
    C, G = counts_CG.shape
    flat = np.flatnonzero(counts_CG)
    indptr = np.searchsorted(flat, np.arange(C + 1) * G)
    return sp.csr_matrix((counts_CG.ravel().take(flat), (flat % G).astype(np.int32), indptr), shape=(C, G))


# --- simulate ------------------------------------------------------------------------------------------------------


def build_model(cfg: SimulationConfig, gene_table: pd.DataFrame) -> tuple[KineticModel, pd.DataFrame]:
    """The noise-free kinetics of ``cfg`` from a (shared, un-jittered) gene table, and the jittered table."""
    check_gene_table(gene_table, cfg.n_genes)
    table = jitter_gene_table(gene_table, cfg.jitter, cfg.seed)
    lineages = build_lineages(
        table, cfg.regime, branch_time=cfg.branch_time, boost_time=cfg.boost_time, cycle_period=cfg.cycle_period
    )
    return KineticModel(lineages, table["beta"].to_numpy(), table["gamma"].to_numpy()), table


def model_from_adata(adata) -> KineticModel:
    """Rebuild the noise-free kinetics of a simulated AnnData (also read back from .h5ad) from ``uns``.

    ``model.evaluate(adata.obs[keys.OBS_TIME_TRUE], adata.obs[keys.OBS_LINEAGE].cat.codes)`` gives the
    noise-free u, s, α of its cells; any other times give the trajectories between and beyond them.
    """
    params = adata.uns[keys.UNS_SIMULATION]
    casts = {"int": int, "float": float, "str": str}
    cfg = SimulationConfig(**{f.name: casts[f.type](params[f.name]) for f in fields(SimulationConfig)})
    table = params["gene_table"]
    table = table.reset_index() if "gene_id" not in table.columns else table
    return build_model(cfg, table.reset_index(drop=True))[0]


def simulate(
    n_cells: int,
    n_genes: int,
    regime: str = "bifurcation",
    seed: int = 0,
    gene_table: pd.DataFrame | None = None,
    gene_seed: int = 0,
    jitter: float = 0.0,
    noise: str = "nb",
    dropout: float = 0.05,
    **options,
):
    """Simulate a dataset and return it as an AnnData (layout in the module docstring and `fm.keys`).

    Args:
        gene_table: kinetics to use (``make_gene_table`` / ``read_gene_table``); drawn with ``gene_seed`` if None.
        jitter: per-dataset log-normal jitter of the table's rates, seeded by ``seed``.
        **options: any other `SimulationConfig` field (nb_shape, capture, library_sigma, branch_time, ...).
    """
    import anndata as ad

    cfg = SimulationConfig(
        n_cells=n_cells,
        n_genes=n_genes,
        regime=regime,
        seed=seed,
        gene_seed=gene_seed,
        jitter=jitter,
        noise=noise,
        dropout=dropout,
        **options,
    )
    t_start = time.perf_counter()
    base_table = make_gene_table(n_genes, gene_seed) if gene_table is None else gene_table.reset_index(drop=True)
    model, table = build_model(cfg, base_table)
    lineages = model.lineages

    C, G = cfg.n_cells, cfg.n_genes
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_STREAM_CELLS,)))
    weights = np.array([lin.weight for lin in lineages])
    lineage_C = rng.choice(len(lineages), size=C, p=weights / weights.sum())
    lo = np.array([lin.t_lo for lin in lineages])[lineage_C]
    hi = np.array([lin.t_hi for lin in lineages])[lineage_C]
    time_C = lo + (hi - lo) * rng.random(C)
    library_C = cfg.capture * np.exp(cfg.library_sigma * rng.standard_normal(C))

    velocity_s_CG = np.empty((C, G), np.float32)
    velocity_u_CG = np.empty((C, G), np.float32)
    alpha_CG = np.empty((C, G), np.float32)
    bounds = [(r0, min(r0 + _CHUNK_CELLS, C)) for r0 in range(0, C, _CHUNK_CELLS)]

    def run_chunk(chunk: int):
        r0, r1 = bounds[chunk]
        u, s, a = model.evaluate(time_C[r0:r1], lineage_C[r0:r1], dtype=np.float32)
        velocity_u_CG[r0:r1], velocity_s_CG[r0:r1] = model.velocity(u, s, a)
        alpha_CG[r0:r1] = a
        chunk_rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_STREAM_NOISE, chunk)))
        lib = library_C[r0:r1, None].astype(np.float32)
        return [dense_to_csr(sample_counts(x * lib, chunk_rng, cfg.noise, cfg.nb_shape, cfg.dropout)) for x in (s, u)]

    workers = min(cfg.workers or os.cpu_count() or 1, len(bounds))
    if workers == 1:
        parts = [run_chunk(chunk) for chunk in range(len(bounds))]
    else:  # numpy releases the GIL in the array work, so threads share the cores
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(run_chunk, range(len(bounds))))
    spliced = sp.vstack([p[0] for p in parts], format="csr", dtype=np.int32)
    unspliced = sp.vstack([p[1] for p in parts], format="csr", dtype=np.int32)

    names = np.array([lin.name for lin in lineages])
    span = hi - lo
    time_bin_C = np.minimum((cfg.n_time_bins * (time_C - lo) / span).astype(int), cfg.n_time_bins - 1)
    cluster_names = [f"{n}_{b}" for n in names for b in range(cfg.n_time_bins)]
    clusters = pd.Categorical.from_codes(lineage_C * cfg.n_time_bins + time_bin_C, categories=cluster_names)
    xy_C2 = np.zeros((C, 2))
    for i, lin in enumerate(lineages):
        rows = lineage_C == i
        xy_C2[rows] = lin.layout(time_C[rows])
    layout_rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_STREAM_LAYOUT,)))
    xy_C2 += 0.02 * layout_rng.standard_normal((C, 2))

    obs = pd.DataFrame(
        {
            keys.OBS_TIME_TRUE: time_C.astype(np.float32),
            keys.OBS_LINEAGE: pd.Categorical.from_codes(lineage_C, categories=names),
            keys.OBS_CLUSTERS: clusters,
            keys.OBS_LIBRARY_SIZE: library_C.astype(np.float32),
        },
        index=pd.Index([f"c{i:07d}" for i in range(C)]),
    )
    var = pd.DataFrame(
        {
            keys.VAR_GENE_ID: table["gene_id"].astype(str).to_numpy(),
            keys.VAR_BETA_TRUE: table["beta"].to_numpy(np.float32),
            keys.VAR_GAMMA_TRUE: table["gamma"].to_numpy(np.float32),
            **{flag: table[flag].to_numpy(bool) for flag in VAR_FLAGS},
        },
        index=pd.Index(table["symbol"].astype(str).to_numpy()),
    )
    adata = ad.AnnData(
        X=spliced.astype(np.float32),
        obs=obs,
        var=var,
        layers={
            keys.LAYER_SPLICED: spliced,
            keys.LAYER_UNSPLICED: unspliced,
            keys.LAYER_VELOCITY_TRUE: velocity_s_CG,
            keys.LAYER_VELOCITY_U_TRUE: velocity_u_CG,
            keys.LAYER_ALPHA_TRUE: alpha_CG,
        },
        obsm={keys.OBSM_SIM_EMBEDDING: xy_C2.astype(np.float32)},
    )
    adata.uns[keys.UNS_SIMULATION] = {
        **asdict(cfg),
        "t_max": T_MAX,
        "lineages": list(names),
        "gene_table_given": gene_table is not None,
        "gene_table": base_table.set_index("gene_id"),  # the shared (un-jittered) table, for `write`
    }
    log.debug("simulated %d x %d (%s) in %.1fs", C, G, cfg.regime, time.perf_counter() - t_start)
    return adata


def write(adata, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` (.h5ad) and its gene table beside it (``X.genes.tsv``), each atomically."""
    path = Path(path)
    table = adata.uns[keys.UNS_SIMULATION]["gene_table"]
    table = table.reset_index() if "gene_id" not in table.columns else table
    with atomic_path(gene_table_path(path)) as tmp:
        table[list(GENE_TABLE_COLUMNS)].to_csv(tmp, sep="\t", index=False)
    return write_h5ad_atomic(adata, path)


# --- CLI -----------------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``simulate`` on an argparse subparsers object (``fm prep simulate``)."""
    p = subparsers.add_parser("simulate", help="simulate spliced/unspliced counts with ground-truth velocity")
    p.add_argument("--out", required=True, help="output .h5ad (the gene table goes beside it as .genes.tsv)")
    p.add_argument("--cells", type=int, required=True)
    p.add_argument("--genes", type=int, required=True)
    p.add_argument("--regime", default="bifurcation", choices=REGIMES)
    p.add_argument("--seed", type=int, default=0, help="cells, library sizes, noise, jitter")
    p.add_argument("--gene-seed", type=int, default=0, help="the gene table (unless --gene-table)")
    p.add_argument("--gene-table", default=None, help="reuse a gene table (X.genes.tsv) instead of drawing one")
    p.add_argument("--jitter", type=float, default=0.0, help="log-normal jitter of the table's rates")
    p.add_argument("--noise", default="nb", choices=NOISE_MODELS)
    p.add_argument("--dropout", type=float, default=SimulationConfig.dropout)
    p.add_argument("--workers", type=int, default=0, help="threads (0: all cores)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """``fm prep simulate``: simulate, write, log a one-line summary."""
    t0 = time.perf_counter()
    table = read_gene_table(args.gene_table) if args.gene_table else None
    adata = simulate(
        args.cells,
        args.genes,
        regime=args.regime,
        seed=args.seed,
        gene_table=table,
        gene_seed=args.gene_seed,
        jitter=args.jitter,
        noise=args.noise,
        dropout=args.dropout,
        workers=args.workers,
    )
    t1 = time.perf_counter()
    write(adata, args.out)
    s, u = adata.layers[keys.LAYER_SPLICED], adata.layers[keys.LAYER_UNSPLICED]
    log.info(
        "simulated %s: %d cells x %d genes, regime %s, lineages %s, seed %d, noise %s, dropout %.2f, "
        "mean counts/cell s %.0f u %.0f, density s %.2f u %.2f; %.1fs simulate + %.1fs write",
        args.out,
        adata.n_obs,
        adata.n_vars,
        args.regime,
        ",".join(adata.obs[keys.OBS_LINEAGE].cat.categories),
        args.seed,
        args.noise,
        args.dropout,
        s.sum() / adata.n_obs,
        u.sum() / adata.n_obs,
        s.nnz / np.prod(s.shape),
        u.nnz / np.prod(u.shape),
        t1 - t0,
        time.perf_counter() - t1,
    )
    return 0
