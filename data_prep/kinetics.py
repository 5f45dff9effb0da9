"""Closed-form kinetics of the simulator: du/dt = α(t) − βu, ds/dt = βu − γs with α piecewise constant in time.

    python -c "from data_prep.kinetics import solve_kinetics; print(solve_kinetics(0, 0, 2.0, 1.0, 0.3, 5.0))"  # CPU

On each piece of constant α the noise-free u(t), s(t) have a closed form (`solve_kinetics`). A lineage is a span of
time with its own α programme per gene (`Lineage`; the programmes of each regime come from `build_lineages`), and
`KineticModel` solves every lineage's schedule once, then gives u, s, α and the velocities at any time.

Shapes: C cells, G genes, L lineages, K segments of a gene's α schedule, E switching events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

REGIMES = ("trajectory", "bifurcation", "boost", "cycle", "mixed")
T_MAX = 10.0  # time span of a trajectory; the gene table's switching times live on [0, T_MAX]


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


def build_lineages(
    table: pd.DataFrame, regime: str, *, branch_time: float, boost_time: float, cycle_period: float
) -> list[Lineage]:
    """The lineages of ``regime`` (one of REGIMES) with the (jittered) kinetics of ``table``.

    Args:
        table: gene table (`data_prep.gene_table`), one row per gene.
        branch_time: bifurcation: when the root splits into two lineages.
        boost_time: boost: when the boosted genes' α rises.
        cycle_period: cycle: the period.
    """

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy(np.float64)[:, None]  # G1, broadcasts against times_GK

    a_on, a_off, t_on, t_off = col("alpha_on"), col("alpha_off"), col("t_on"), col("t_off")
    T, tb, tboost, P = T_MAX, branch_time, boost_time, cycle_period
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
    if regime != "mixed":
        return groups[regime]
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
