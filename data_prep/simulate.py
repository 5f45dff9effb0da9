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

Shapes: C cells, G genes, L lineages, K segments of a gene's α schedule, E switching events.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fm import keys

log = logging.getLogger(__name__)

REGIMES = ("trajectory", "bifurcation", "boost", "cycle", "mixed")
NOISE_MODELS = ("nb", "poisson")
T_MAX = 10.0  # time span of a trajectory; the gene table's switching times live on [0, T_MAX]
GENE_TABLE_COLUMNS = tuple(
    "gene_id symbol alpha_on alpha_off beta gamma t_on t_off multi_kinetic alpha_mult_a alpha_mult_b boosted "
    "boost_mult cycling cycle_on cycle_off".split()
)  # the columns of a gene table (see `make_gene_table`), in the order written to X.genes.tsv
_JITTERED = ("alpha_on", "alpha_off", "beta", "gamma")  # rates that vary between datasets sharing a table
VAR_FLAGS = ("multi_kinetic", "boosted", "cycling")  # gene-table flags copied into .var

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


# --- gene table ---------------------------------------------------------------------------------------------------


def make_gene_table(
    n_genes: int,
    seed: int,
    *,
    multi_kinetic_fraction: float = 0.2,
    boost_fraction: float = 0.3,
    cycling_fraction: float = 0.5,
) -> pd.DataFrame:
    """Draw per-gene kinetics: rates, switching times, per-lineage α multipliers, boost and cycle programmes.

    Multi-kinetic genes are on across the default branch time, and after it one lineage raises their α
    (×1.5–3) while the other nearly shuts it (×0–0.3), as cellDancer's multi-kinetic genes. Non-cycling genes have
    the window [0, 1) (always on) in the cycle regime.
    """
    if not isinstance(n_genes, int) or n_genes < 1:
        raise ValueError(f"make_gene_table: n_genes={n_genes!r} must be a positive integer")
    rng = np.random.default_rng(seed)
    G = n_genes
    alpha_on = np.exp(rng.normal(np.log(2.0), 0.8, G))
    alpha_off = alpha_on * np.where(rng.random(G) < 0.5, 0.0, rng.uniform(0.0, 0.05, G))
    beta = np.exp(rng.normal(0.0, 0.5, G))
    gamma = np.exp(rng.normal(np.log(0.3), 0.5, G))
    t_on = rng.uniform(0.0, 0.5, G) * T_MAX
    t_off = t_on + rng.uniform(0.2, 0.9, G) * T_MAX  # past T_MAX: never switches off
    multi = rng.random(G) < multi_kinetic_fraction
    t_on = np.where(multi, rng.uniform(0.0, 0.3, G) * T_MAX, t_on)
    t_off = np.where(multi, rng.uniform(0.7, 1.2, G) * T_MAX, t_off)
    up_in_a = rng.random(G) < 0.5
    high, low = rng.uniform(1.5, 3.0, G), rng.uniform(0.0, 0.3, G)
    boosted = rng.random(G) < boost_fraction
    boost_mult = rng.uniform(2.0, 4.0, G)
    cycling = rng.random(G) < cycling_fraction
    cycle_on = rng.random(G)
    cycle_off = (cycle_on + rng.uniform(0.3, 0.7, G)) % 1.0
    width = max(5, len(str(G)))
    return pd.DataFrame(
        {
            "gene_id": [f"SIMG{i:0{width}d}" for i in range(1, G + 1)],
            "symbol": [f"SimG{i}" for i in range(1, G + 1)],
            "alpha_on": alpha_on,
            "alpha_off": alpha_off,
            "beta": beta,
            "gamma": gamma,
            "t_on": t_on,
            "t_off": t_off,
            "multi_kinetic": multi,
            "alpha_mult_a": np.where(multi, np.where(up_in_a, high, low), 1.0),
            "alpha_mult_b": np.where(multi, np.where(up_in_a, low, high), 1.0),
            "boosted": boosted,
            "boost_mult": np.where(boosted, boost_mult, 1.0),
            "cycling": cycling,
            "cycle_on": np.where(cycling, cycle_on, 0.0),
            "cycle_off": np.where(cycling, cycle_off, 1.0),
        }
    )


def check_gene_table(table: pd.DataFrame, n_genes: int) -> None:
    """Fail loudly on a gene table that lacks columns, has the wrong length or impossible values."""
    missing = [c for c in GENE_TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"gene_table: missing columns {missing}")
    if len(table) != n_genes:
        raise ValueError(f"gene_table: has {len(table)} rows but n_genes={n_genes}")
    for col in ("gene_id", "symbol"):
        if table[col].duplicated().any():
            dup = table[col][table[col].duplicated()].iloc[0]
            raise ValueError(f"gene_table.{col}: duplicate values, e.g. {dup!r}")
    for col in ("beta", "gamma"):
        if not (np.isfinite(table[col]).all() and (table[col] > 0).all()):
            raise ValueError(f"gene_table.{col}: must be finite and > 0")
    for col in ("alpha_on", "alpha_off", "alpha_mult_a", "alpha_mult_b", "boost_mult"):
        if not (np.isfinite(table[col]).all() and (table[col] >= 0).all()):
            raise ValueError(f"gene_table.{col}: must be finite and >= 0")


def read_gene_table(path: str | Path) -> pd.DataFrame:
    """Read a gene table written by `write` (``X.genes.tsv``)."""
    table = pd.read_csv(path, sep="\t", dtype={"gene_id": str, "symbol": str})
    for col in VAR_FLAGS:
        if col in table.columns:
            table[col] = table[col].astype(bool)
    return table


def gene_table_path(h5ad_path: str | Path) -> Path:
    """Where the gene table of ``X.h5ad`` lives: ``X.genes.tsv``."""
    path = Path(h5ad_path)
    return path.with_name(path.stem + ".genes.tsv")


def jitter_gene_table(table: pd.DataFrame, jitter: float, seed: int) -> pd.DataFrame:
    """Multiply α_on, α_off, β and γ of every gene by exp(jitter · N(0, 1)), seeded by the cell seed."""
    out = table.copy()
    if jitter > 0:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_JITTER,)))
        for col in _JITTERED:
            out[col] = out[col].to_numpy(np.float64) * np.exp(jitter * rng.standard_normal(len(out)))
    return out


# --- closed-form kinetics ----------------------------------------------------------------------------------------


def solve_kinetics(u0, s0, alpha, beta, gamma, tau):
    """State (u, s) after time ``tau`` at constant ``alpha``, from (u0, s0); all arguments broadcast.

    u(τ) = u∞ + (u0 − u∞)e^{−βτ},  s(τ) = s∞ + (s0 − s∞)e^{−γτ} + β(u0 − u∞)(e^{−βτ} − e^{−γτ})/(γ − β),
    with u∞ = α/β, s∞ = α/γ. Where γ ≈ β the fraction cancels badly, so there it is τe^{−βτ}(1 − x/2 + x²/6),
    x = (γ − β)τ, its series (exact at β = γ). Computes in the dtype of ``tau``.
    """
    e_beta, e_gamma = np.exp(-beta * tau), np.exp(-gamma * tau)
    u_inf, s_inf = alpha / beta, alpha / gamma
    du0 = u0 - u_inf
    d = gamma - beta
    near = np.abs(d) <= (1e-3 if np.result_type(tau) == np.float32 else 1e-6) * (beta + gamma)
    frac = (e_beta - e_gamma) / np.where(near, 1.0, d)
    if np.any(near):
        x = d * tau
        frac = np.where(near, tau * e_beta * (1.0 - x / 2 + x * x / 6), frac)
    return u_inf + du0 * e_beta, s_inf + (s0 - s_inf) * e_gamma + beta * du0 * frac


@dataclass(frozen=True)
class Lineage:
    """One lineage: where its cells lie in time, its α programme and its place in the 2-D layout."""

    name: str
    t_lo: float  # cells' times are uniform on [t_lo, t_hi]
    t_hi: float
    weight: float  # share of the cells (normalised over lineages)
    alpha: Callable[[np.ndarray], np.ndarray]  # times_GK -> α_GK (right-continuous in time)
    events_GE: np.ndarray  # the times at which α may jump, per gene
    layout: Callable[[np.ndarray], np.ndarray]  # times_C -> xy_C2
    period: float = 0.0  # > 0: periodic; the state at t = 0 is the limit cycle's


def build_lineages(cfg: SimulationConfig, table: pd.DataFrame) -> list[Lineage]:
    """The lineages of ``cfg.regime`` with the (jittered) kinetics of ``table``."""

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy(np.float64)[:, None]  # G1, broadcasts against times_GK

    a_on, a_off, t_on, t_off = col("alpha_on"), col("alpha_off"), col("t_on"), col("t_off")
    T, tb, tboost, P = T_MAX, cfg.branch_time, cfg.boost_time, cfg.cycle_period
    G = len(table)
    switches_GE = np.concatenate([t_on, t_off], axis=1)

    def base(t):
        return np.where((t_on <= t) & (t < t_off), a_on, a_off)

    def lineage_alpha(mult):
        return lambda t: base(t) * np.where(t >= tb, mult, 1.0)

    def boost_alpha(t):
        return base(t) + np.where(t >= tboost, (col("boost_mult") - 1.0) * a_on, 0.0)

    c_on, c_off = col("cycle_on"), col("cycle_off")

    def cycle_alpha(t):
        phase = np.mod(t, P) / P
        on = np.where(c_on <= c_off, (c_on <= phase) & (phase < c_off), (phase >= c_on) | (phase < c_off))
        return np.where(on, a_on, a_off)

    def line(dy: float, y0: float = 0.0):
        return lambda t: np.stack([t / T, y0 + dy * np.maximum(t - tb, 0.0) / T], axis=1)

    def circle(x0: float, y0: float):
        return lambda t: np.stack([x0 + 0.4 * np.cos(2 * np.pi * t / P), y0 + 0.4 * np.sin(2 * np.pi * t / P)], 1)

    branch_events = np.concatenate([switches_GE, np.full((G, 1), tb)], axis=1)
    groups = {
        "trajectory": [Lineage("trajectory", 0.0, T, T, base, switches_GE, line(0.0))],
        "bifurcation": [
            Lineage("root", 0.0, tb, tb, base, switches_GE, line(0.0)),
            Lineage("lineage_a", tb, T, T - tb, lineage_alpha(col("alpha_mult_a")), branch_events, line(0.8)),
            Lineage("lineage_b", tb, T, T - tb, lineage_alpha(col("alpha_mult_b")), branch_events, line(-0.8)),
        ],
        "boost": [
            Lineage(
                "boost", 0.0, T, T, boost_alpha, np.concatenate([switches_GE, np.full((G, 1), tboost)], 1), line(0.0)
            )
        ],
        "cycle": [Lineage("cycle", 0.0, P, P, cycle_alpha, np.concatenate([c_on, c_off], 1) * P, circle(0.5, 0.0), P)],
    }
    if cfg.regime != "mixed":
        return groups[cfg.regime]
    # mixed: the bifurcation, the boost and the cycle side by side, each a third of the cells
    out = []
    for name, dy in (("bifurcation", 0.0), ("boost", 1.2), ("cycle", -1.6)):
        span = sum(lin.weight for lin in groups[name])
        for lin in groups[name]:
            layout = _shifted(lin.layout, dy)
            out.append(
                Lineage(lin.name, lin.t_lo, lin.t_hi, lin.weight / span, lin.alpha, lin.events_GE, layout, lin.period)
            )
    return out


def _shifted(layout: Callable[[np.ndarray], np.ndarray], dy: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda t: layout(t) + np.array([0.0, dy])


class KineticModel:
    """Noise-free u, s, α of every lineage at any time: piecewise-constant α schedules solved in closed form.

    Per lineage and gene the schedule is K segments with start times, α and the state (u, s) at each start,
    propagated once over genes; a cell's state is then one closed-form step from the start of its segment.
    """

    def __init__(self, lineages: list[Lineage], beta_G: np.ndarray, gamma_G: np.ndarray):
        self.lineages = lineages
        self.beta_G = np.asarray(beta_G, np.float64)
        self.gamma_G = np.asarray(gamma_G, np.float64)
        self._cache: dict[np.dtype, dict[str, np.ndarray]] = {}
        G = len(self.beta_G)
        K = 1 + max(lin.events_GE.shape[1] for lin in lineages)
        L = len(lineages)
        self.start_LGK = np.full((L, G, K), np.inf)
        self.alpha_LGK = np.zeros((L, G, K))
        self.u_LGK = np.zeros((L, G, K))
        self.s_LGK = np.zeros((L, G, K))
        for i, lin in enumerate(lineages):
            events = np.sort(np.maximum(lin.events_GE, 0.0), axis=1)  # a schedule starts at t = 0
            start_GK = self.start_LGK[i]
            start_GK[:, 0] = 0.0
            start_GK[:, 1 : 1 + events.shape[1]] = events
            self.alpha_LGK[i] = lin.alpha(np.where(np.isfinite(start_GK), start_GK, 0.0))
            if lin.period > 0:
                u0, s0 = self._limit_cycle(i, lin.period)
            else:  # steady state of the first segment's α
                u0, s0 = self.alpha_LGK[i, :, 0] / self.beta_G, self.alpha_LGK[i, :, 0] / self.gamma_G
            self.u_LGK[i], self.s_LGK[i] = self._propagate(i, u0, s0)

    def _propagate(self, i: int, u0_G, s0_G, t_end: float = np.inf):
        """States at every segment start of lineage i (GK), then at t_end (G) if finite."""
        start_GK, alpha_GK = self.start_LGK[i], self.alpha_LGK[i]
        u_GK, s_GK = np.zeros_like(start_GK), np.zeros_like(start_GK)
        u, s = u0_G, s0_G
        K = start_GK.shape[1]
        for k in range(K):
            u_GK[:, k], s_GK[:, k] = u, s
            nxt = start_GK[:, k + 1] if k + 1 < K else np.full(len(u), np.inf)
            with np.errstate(invalid="ignore"):  # inf − inf on padding segments, which stay put
                tau = np.minimum(nxt, t_end) - start_GK[:, k]
            tau = np.where(np.isfinite(tau), np.maximum(tau, 0.0), 0.0)
            u, s = solve_kinetics(u, s, alpha_GK[:, k], self.beta_G, self.gamma_G, tau)
        if np.isfinite(t_end):  # the last step ran up to t_end from the last segment start before it
            return u, s
        return u_GK, s_GK

    def _limit_cycle(self, i: int, period: float):
        """State at t = 0 of the periodic solution: the fixed point of the (affine) map over one period."""
        G = len(self.beta_G)
        zero, one = np.zeros(G), np.ones(G)
        bu, bs = self._propagate(i, zero, zero, period)
        au, cs = self._propagate(i, one, zero, period)
        au, cs = au - bu, cs - bs  # u(P) = au·u0 + bu, s(P) = cs·u0 + e^{−γP}·s0 + bs
        u0 = bu / (1.0 - au)
        s0 = (cs * u0 + bs) / (1.0 - np.exp(-self.gamma_G * period))
        return u0, s0

    def evaluate(self, time_C: np.ndarray, lineage_C: np.ndarray, dtype=np.float64):
        """Noise-free (u_CG, s_CG, alpha_CG) of cells at ``time_C`` on lineages ``lineage_C`` (indices).

        Each cell-gene is one closed-form step from the start of its segment, written with per-segment
        coefficients: u = u∞ + Δu·e^{−βτ}, s = s∞ + Δs·e^{−γτ} + w·(e^{−βτ} − e^{−γτ}) (`solve_kinetics`).
        ``dtype`` float32 is about twice as fast (the simulator's outputs are float32); float64 for checks.
        """
        L, G, K = self.start_LGK.shape
        tab = self._tables(dtype)
        time_C = np.asarray(time_C, dtype)
        lineage_C = np.asarray(lineage_C)
        u_CG, s_CG, alpha_CG = (np.empty((len(time_C), G), dtype) for _ in range(3))
        near = np.flatnonzero(tab["near"])
        for i in np.unique(lineage_C):
            rows = np.flatnonzero(lineage_C == i)
            rows = slice(None) if rows.size == len(time_C) else rows  # no scatter for a one-lineage chunk
            t_n1 = time_C[rows][:, None]
            idx_nG = np.broadcast_to(tab["first"], (len(t_n1), G)).copy()  # segment index: last one started by t
            for k in range(1, K):
                idx_nG += tab["start"][i, :, k] <= t_n1
            tau = t_n1 - tab["start"][i].ravel().take(idx_nG)
            e_beta, e_gamma = np.exp(-tab["beta"] * tau), np.exp(-tab["gamma"] * tau)
            u_CG[rows] = tab["u_inf"][i].take(idx_nG) + tab["du"][i].take(idx_nG) * e_beta
            s_n = tab["s_inf"][i].take(idx_nG) + tab["ds"][i].take(idx_nG) * e_gamma
            s_n += tab["w"][i].take(idx_nG) * (e_beta - e_gamma)
            if near.size:  # β ≈ γ: the series of (e^{−βτ} − e^{−γτ})/(γ − β), see `solve_kinetics`
                x = tab["d"][near] * tau[:, near]
                series = tau[:, near] * e_beta[:, near] * (1.0 - x / 2 + x * x / 6)
                s_n[:, near] += tab["w_near"][i].take(idx_nG[:, near]) * series
            s_CG[rows] = s_n
            alpha_CG[rows] = tab["alpha"][i].take(idx_nG)
        return u_CG, s_CG, alpha_CG

    def _tables(self, dtype) -> dict[str, np.ndarray]:
        """Per-segment coefficients in ``dtype``, flattened per lineage to (L, G·K)."""
        dtype = np.dtype(dtype)
        if dtype not in self._cache:
            L, G, K = self.start_LGK.shape
            beta, gamma = self.beta_G[:, None], self.gamma_G[:, None]
            d = gamma - beta
            near = np.abs(d) <= (1e-3 if dtype == np.float32 else 1e-6) * (beta + gamma)
            u_inf, s_inf = self.alpha_LGK / beta, self.alpha_LGK / gamma
            du = self.u_LGK - u_inf
            w = np.where(near, 0.0, beta * du / np.where(near, 1.0, d))
            flat = {"u_inf": u_inf, "s_inf": s_inf, "du": du, "ds": self.s_LGK - s_inf, "w": w,
                    "w_near": np.where(near, beta * du, 0.0), "alpha": self.alpha_LGK}  # fmt: skip
            self._cache[dtype] = {
                **{name: a.reshape(L, G * K).astype(dtype) for name, a in flat.items()},
                "start": self.start_LGK.astype(dtype),
                "first": (np.arange(G) * K)[None, :],
                "near": near[:, 0],
                "d": d[:, 0].astype(dtype),
                "beta": self.beta_G.astype(dtype),
                "gamma": self.gamma_G.astype(dtype),
            }
        return self._cache[dtype]

    def velocity(self, u_CG, s_CG, alpha_CG):
        """(du/dt, ds/dt) at the given states, in their dtype."""
        beta, gamma = self.beta_G.astype(u_CG.dtype), self.gamma_G.astype(u_CG.dtype)
        bu = beta * u_CG
        return alpha_CG - bu, bu - gamma * s_CG


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
    return KineticModel(build_lineages(cfg, table), table["beta"].to_numpy(), table["gamma"].to_numpy()), table


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
    path.parent.mkdir(parents=True, exist_ok=True)
    table = adata.uns[keys.UNS_SIMULATION]["gene_table"]
    table = table.reset_index() if "gene_id" not in table.columns else table
    for target, save in (
        (gene_table_path(path), lambda p: table[list(GENE_TABLE_COLUMNS)].to_csv(p, sep="\t", index=False)),
        (path, lambda p: adata.write_h5ad(p)),
    ):
        tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}{target.suffix}")  # hidden, same extension
        try:
            save(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return path


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
