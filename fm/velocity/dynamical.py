"""fm's dynamical model: the transcription-splicing-degradation ODE fitted to a dataset's moments, all genes at once.

    .venv/bin/python -c "from data_prep.simulate import simulate; from fm.velocity.neighbours import \
NeighbourConfig, neighbourhood; from fm.velocity.teachers import TeacherConfig, run_teacher; a = simulate(600, 40); \
nb, s, u = neighbourhood(a.layers['spliced'], a.layers['unspliced'], NeighbourConfig()); \
r = run_teacher(TeacherConfig('fm_dynamical'), nb, s, u); print(r.velocity_genes.sum(), r.obs['latent_time'][:5])"

Model (per gene g, on the moments Ms, Mu divided by per-gene scales c_s, c_u so both are O(1)):

    du/dt = alpha(t) - beta u,  ds/dt = beta u - gamma s,   observed  Mu/c_u ~ rho u,  Ms/c_s ~ s

with transcription alpha_off before the onset t0 (the cell starts at that steady state), alpha_on from t0 to the
switch t_s, alpha_off (< alpha_on) after it; the analytic solution (scVelo's) is used, never an ODE solver. Every
cell has ONE time t in [0, 1] shared by all genes (a cell clock); genes differ by their onset, switch and rates, so
a gene that is already on when the data start has t0 < 0. The loss is the Gaussian negative log-likelihood of
(Mu, Ms) with a per-gene variance for each modality (which weights the genes: a noisy gene counts less).

Why it is identifiable, and what each piece is for (from scVelo's, veloVI's and UniTVelo's fits):

- rho (scVelo's ``scaling``) lets u and s have their own amplitudes, so alpha, beta, gamma are read from the shape of
  the phase portrait, not from the units of the two modalities.
- the clock is [0, 1] (a global rescaling of time and rates is a symmetry: fixed by the interval, as scVelo's
  latent time); a shared clock (UniTVelo's unified time) pools the time evidence of all genes, where scVelo fits a
  time per gene and per cell and averages afterwards.
- initialisation: gamma from the steady-state fit (the upper quantile of the phase portrait, teachers.steady_state);
  the cell clock from the moments alone: the steady-state velocity Mu - gamma Ms of neighbouring cells, projected on
  the displacement between them, gives a time increment along each kNN edge, and the clock is the least-squares
  solution of those increments on the graph (no root cell, no diffusion), rank-normalised to [0, 1]. The steady-state
  velocity has the right sign for most cells and genes; summed over genes along edges, its sign decides the clock's
  direction. The onset and switch come from the clock (u peaks at the switch).
- fitting alternates, as scVelo's EM: the cells' times by exhaustive search over a grid of the clock (the solution at
  the grid times costs T x G, and a cell's cost over the grid is one matrix product, so the search is global and
  cheap: a per-cell time moved by gradient steps stays in the local minimum where the phase curve passes near
  itself), then the gene parameters by Adam on minibatches of cells, then the variances in closed form.

Velocity: ds/dt = c_s (beta u - gamma s) at the fitted state at each cell's time (scVelo's ``mode='dynamical'``;
``velocity_at='observed'`` evaluates it at the observed moments instead), in the units of Ms; du/dt likewise in Mu
units. Confidence per cell and gene: exp(-r^2 / 2), r^2 the variance-scaled squared residual of (Mu, Ms): 1 on
the fitted curve, -> 0 far from it.

Shapes: N cells, G genes (fitted ones), T grid times. Vectorised over genes: no per-gene loop.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch

log = logging.getLogger(__name__)

VELOCITY_AT = ("fit", "observed")


@dataclass(frozen=True)
class DynamicalConfig:
    """Settings of fm's dynamical fit (``fm velocity --method fm_dynamical`` sets ``rounds`` from the teacher's
    ``max_iter`` and keeps the other defaults)."""

    rounds: int = 10  # alternations of (cell times by grid search, gene parameters by Adam, variances)
    steps: int = 100  # Adam steps on the gene parameters per round
    batch_size: int = 1024  # cells per Adam step
    lr: float = 0.05  # Adam learning rate (parameters are log rates and times in clock units)
    n_grid: int = 1000  # grid of the clock [0, 1] the cells' times are searched on
    min_sd: float = 0.02  # floor of the per-gene noise sd, in units of the gene's scale (no gene dominates the time)
    velocity_at: str = "fit"  # fit: at the fitted state (scVelo's dynamical); observed: at the observed moments
    device: str = "cpu"  # torch device
    threads: int = 1  # CPU threads during the fit: steps are small, and on busy cores more threads ran 40x slower
    seed: int = 0

    def __post_init__(self):
        for name, lo in (("rounds", 1), ("steps", 1), ("batch_size", 2), ("n_grid", 10), ("threads", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"DynamicalConfig.{name} must be an int >= {lo}, got {v!r}")
        for name in ("lr", "min_sd"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"DynamicalConfig.{name} must be a positive number, got {v!r}")
        if self.velocity_at not in VELOCITY_AT:
            raise ValueError(f"DynamicalConfig.velocity_at must be one of {VELOCITY_AT}, got {self.velocity_at!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DynamicalFit:
    """The fit on G genes, in scVelo's conventions: u = Mu / scaling is unspliced in the units of Ms, and
    ds/dt = beta u - gamma s, du/dt = alpha(t) - beta u (velocity_u = scaling du/dt, in Mu units)."""

    latent_time: np.ndarray  # [N] the cell clock, in [0, 1]
    velocity: np.ndarray  # [N, G] ds/dt in Ms units
    velocity_u: np.ndarray  # [N, G] du/dt in Mu units
    confidence: np.ndarray  # [N, G] in (0, 1]
    alpha: np.ndarray  # [G] transcription rate when on (Ms units per clock unit)
    alpha_off: np.ndarray  # [G] when off
    beta: np.ndarray  # [G] splicing rate (per clock unit)
    gamma: np.ndarray  # [G] degradation rate (per clock unit)
    scaling: np.ndarray  # [G] Mu / u (scVelo's fit_scaling)
    t0: np.ndarray  # [G] onset on the clock
    t_switch: np.ndarray  # [G] switch to repression on the clock (scVelo's t_)
    r2: np.ndarray  # [G] 1 - residual / total variance of (Mu, Ms) scaled, averaged over the two
    loss: float  # final mean negative log-likelihood per cell and gene
    # the model in its own units (u = Mu / scale_u, s = Ms / scale_s): the free parameters by name (PARAMS) and the
    # noise sd of each modality [G], as the velocity decoder's dynamical mode holds them
    params: dict[str, np.ndarray] | None = None
    scale_u: np.ndarray | None = None
    scale_s: np.ndarray | None = None
    sd_u: np.ndarray | None = None
    sd_s: np.ndarray | None = None


# --- the analytic solution ---------------------------------------------------------------------------------------
def solve(tau, u0, s0, alpha, beta, gamma):
    """u(tau), s(tau) of du/dt = alpha - beta u, ds/dt = beta u - gamma s from (u0, s0) (torch, broadcast).

    beta == gamma is the limit of the usual formula: (e^-gamma tau - e^-beta tau) / (gamma - beta) -> -tau e^-beta tau.
    """
    eb, eg = torch.exp(-beta * tau), torch.exp(-gamma * tau)
    u = u0 * eb + alpha / beta * (1 - eb)
    d = gamma - beta
    near = d.abs() < 1e-3 * beta
    d_safe = torch.where(near, torch.ones_like(d), d)
    frac = torch.where(near, -tau * eb * (1 - 0.5 * d * tau), (eg - eb) / d_safe)
    s = s0 * eg + alpha / gamma * (1 - eg) + (alpha - beta * u0) * frac
    return u, s


PARAMS = ("log_alpha", "logit_off", "log_beta", "log_gamma", "log_rho", "t0", "log_dur")  # per gene, in this order


def kinetic_rates(log_alpha, logit_off, log_beta, log_gamma, log_rho, t0, log_dur):
    """The rates, scaling, onset and switch of the free parameters (any shapes that broadcast):
    (alpha_on, alpha_off, beta, gamma, rho, t0, t_switch)."""
    alpha = log_alpha.exp()
    off = alpha * torch.sigmoid(logit_off)
    return alpha, off, log_beta.exp(), log_gamma.exp(), log_rho.exp(), t0, t0 + log_dur.exp()


def switching_state(t, log_alpha, logit_off, log_beta, log_gamma, log_rho, t0, log_dur):
    """(u_obs, s_obs, u, s, alpha_t) at clock times ``t``, broadcast against the per-gene parameters: the
    observed-scale state (rho u, s), the model state, and the transcription rate in force (alpha_on between the onset
    and the switch, alpha_off otherwise)."""
    alpha, alpha_off, beta, gamma, rho, t0, ts = kinetic_rates(log_alpha, logit_off, log_beta, log_gamma, log_rho,
                                                               t0, log_dur)
    u_off, s_off = alpha_off / beta, alpha_off / gamma
    dur = ts - t0
    tau = t - t0
    u_sw, s_sw = solve(dur, u_off, s_off, alpha, beta, gamma)
    u_i, s_i = solve(tau.clamp(min=0), u_off, s_off, alpha, beta, gamma)
    u_r, s_r = solve((tau - dur).clamp(min=0), u_sw, s_sw, alpha_off, beta, gamma)
    on = tau < dur
    u, s = torch.where(on, u_i, u_r), torch.where(on, s_i, s_r)
    return rho * u, s, u, s, torch.where(on & (tau >= 0), alpha, alpha_off)


class GeneKinetics:
    """Per-gene parameters [G] (torch leaves, named as ``PARAMS``) and the state at given clock times."""

    def __init__(self, log_alpha, logit_off, log_beta, log_gamma, log_rho, t0, log_dur):
        self.params = {k: torch.nn.Parameter(v) for k, v in dict(
            log_alpha=log_alpha, logit_off=logit_off, log_beta=log_beta, log_gamma=log_gamma, log_rho=log_rho,
            t0=t0, log_dur=log_dur).items()}

    def rates(self):
        return kinetic_rates(*(self.params[k] for k in PARAMS))

    def state(self, t_N1):
        """(u_obs, s_obs, u, s, alpha_t) at times [N, 1] -> [N, G] (:func:`switching_state`)."""
        return switching_state(t_N1, *(self.params[k] for k in PARAMS))


# --- initialisation ----------------------------------------------------------------------------------------------
def clock_from_moments(Ms_NG: np.ndarray, Mu_NG: np.ndarray, gamma_G: np.ndarray,
                       graph_NN: sp.spmatrix) -> np.ndarray:
    """A cell clock in [0, 1] from the steady-state velocity integrated on the kNN graph (module docstring) [N]."""
    from scipy.sparse.linalg import lsqr

    sd_s = Ms_NG.std(0) + 1e-12
    v = (Mu_NG - gamma_G * Ms_NG)
    v = v / (v.std(0) + 1e-12)
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
    x = Ms_NG / sd_s
    g = sp.coo_matrix(graph_NN)
    keep = g.row != g.col
    i, j = g.row[keep], g.col[keep]
    # time increment along an edge: the displacement projected on the mean unit velocity of its two ends
    dt_E = ((x[j] - x[i]) * 0.5 * (v[i] + v[j])).sum(1)
    E, N = len(i), Ms_NG.shape[0]
    A = sp.csr_matrix((np.r_[np.ones(E), -np.ones(E)], (np.r_[np.arange(E), np.arange(E)], np.r_[j, i])),
                      shape=(E, N))
    t = lsqr(A, dt_E, damp=1e-3, atol=1e-6, btol=1e-6, iter_lim=2000)[0]
    return (np.argsort(np.argsort(t, kind="stable"), kind="stable") + 0.5) / N


def _init_kinetics(u_NG: np.ndarray, s_NG: np.ndarray, t_N: np.ndarray, gamma_ss_G: np.ndarray) -> GeneKinetics:
    """Parameters from the clock and the steady-state ratio (u, s already divided by their scales)."""
    N, G = u_NG.shape
    top = np.argsort(-u_NG, axis=0)[: max(3, N // 20)]  # u peaks at the switch
    ts = np.clip(t_N[top].mean(0), 0.05, 1.0)
    t0 = np.full(G, -0.05)
    dur = ts - t0
    beta = 3.0 / dur  # most of the way to the on steady state by the switch
    ratio = np.clip(gamma_ss_G, 0.05, 20.0)  # u/s at steady state in scaled units = rho gamma / beta
    gamma = np.clip(ratio, 0.1, 10.0) * beta
    alpha = gamma * 1.0  # s_ss = alpha / gamma ~ the top of the scaled s
    rho = ratio * beta / gamma  # so that u_ss (rho alpha / beta) matches the steady-state line

    def f(x):
        return torch.as_tensor(np.asarray(x, np.float32))

    return GeneKinetics(f(np.log(alpha)), f(np.full(G, -4.0)), f(np.log(beta)), f(np.log(gamma)), f(np.log(rho)),
                        f(t0), f(np.log(dur)))


# --- the fit -----------------------------------------------------------------------------------------------------
def _grid_times(kin: GeneKinetics, u_NG, s_NG, wu_G, ws_G, grid_T, chunk: int = 4096):
    """Each cell's time: the grid point with the least weighted squared residual over all genes [N]."""
    with torch.no_grad():
        U_TG, S_TG, *_ = kin.state(grid_T[:, None])
        const_T = (U_TG * U_TG * wu_G).sum(1) + (S_TG * S_TG * ws_G).sum(1)
        out = []
        for a in range(0, u_NG.shape[0], chunk):
            u, s = u_NG[a:a + chunk], s_NG[a:a + chunk]
            cost = const_T[None, :] - 2 * ((u * wu_G) @ U_TG.T + (s * ws_G) @ S_TG.T)
            out.append(grid_T[cost.argmin(1)])
        return torch.cat(out)


def _variances(kin: GeneKinetics, u_NG, s_NG, t_N, min_sd: float):
    """Per-gene MLE variances of the u and s residuals (floored) [G] each, and the residuals."""
    with torch.no_grad():
        uo, so, *_ = kin.state(t_N[:, None])
        ru, rs = u_NG - uo, s_NG - so
        var_u = (ru * ru).mean(0).clamp(min=min_sd ** 2)
        var_s = (rs * rs).mean(0).clamp(min=min_sd ** 2)
    return var_u, var_s, ru, rs


def fit_dynamics(Ms_NG: np.ndarray, Mu_NG: np.ndarray, gamma_ss_G: np.ndarray, graph_NN: sp.spmatrix,
                 cfg: DynamicalConfig | None = None) -> DynamicalFit:
    """Fit the model (module docstring) to moments [N, G] of genes that can be fitted (finite, some signal).

    Args:
        Ms_NG, Mu_NG: first-order moments (fm.velocity.neighbours), dense.
        gamma_ss_G: the steady-state fit's gamma (Mu ~ gamma Ms) of each gene, for the initialisation.
        graph_NN: the kNN graph (connectivities) the clock is initialised on.
    """
    cfg = cfg or DynamicalConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _fit(Ms_NG, Mu_NG, gamma_ss_G, graph_NN, cfg)
    finally:
        torch.set_num_threads(threads)


def _fit(Ms_NG, Mu_NG, gamma_ss_G, graph_NN, cfg: DynamicalConfig) -> DynamicalFit:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    Ms, Mu = np.asarray(Ms_NG, np.float64), np.asarray(Mu_NG, np.float64)
    N, G = Ms.shape
    # per-gene scales: a high quantile, not the max, so one outlying cell does not squash the gene
    c_s = np.maximum(np.percentile(Ms, 99, axis=0), 1e-12)
    c_u = np.maximum(np.percentile(Mu, 99, axis=0), 1e-12)
    s_np, u_np = Ms / c_s, Mu / c_u
    t_np = clock_from_moments(Ms, Mu, gamma_ss_G, graph_NN)
    kin = _init_kinetics(u_np, s_np, t_np, gamma_ss_G * c_s / c_u)

    dev = torch.device(cfg.device)
    params = list(kin.params.values())
    for p in params:
        p.data = p.data.to(dev)
    u_t = torch.as_tensor(u_np, dtype=torch.float32, device=dev)
    s_t = torch.as_tensor(s_np, dtype=torch.float32, device=dev)
    t_N = torch.as_tensor(t_np, dtype=torch.float32, device=dev)
    grid_T = torch.linspace(0, 1, cfg.n_grid, device=dev)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    var_u, var_s, _, _ = _variances(kin, u_t, s_t, t_N, cfg.min_sd)
    B = min(cfg.batch_size, N)
    for r in range(cfg.rounds):
        if r:  # the first round fits the genes to the initial clock
            t_N = _grid_times(kin, u_t, s_t, 1 / var_u, 1 / var_s, grid_T)
        for _ in range(cfg.steps):
            idx = torch.as_tensor(rng.choice(N, B, replace=False), device=dev)
            uo, so, *_ = kin.state(t_N[idx, None])
            nll = 0.5 * ((u_t[idx] - uo) ** 2 / var_u + (s_t[idx] - so) ** 2 / var_s).mean()
            opt.zero_grad(set_to_none=True)
            nll.backward()
            opt.step()
            with torch.no_grad():  # onset within a clock length before the data; no switch past twice its end
                kin.params["t0"].clamp_(-1.0, 1.0)
                kin.params["log_dur"].clamp_(math.log(1e-3), math.log(2.0))
        var_u, var_s, ru, rs = _variances(kin, u_t, s_t, t_N, cfg.min_sd)
        log.debug("dynamical fit round %d: batch nll %.4f", r, nll.item())
    t_N = _grid_times(kin, u_t, s_t, 1 / var_u, 1 / var_s, grid_T)
    var_u, var_s, ru, rs = _variances(kin, u_t, s_t, t_N, cfg.min_sd)
    with torch.no_grad():
        alpha, alpha_off, beta, gamma, rho, t0, ts = kin.rates()
        uo, so, um, sm, alpha_t = kin.state(t_N[:, None])
        if cfg.velocity_at == "observed":
            um, sm = u_t / rho, s_t
        v = beta * um - gamma * sm
        vu = rho * (alpha_t - beta * um)
        r2q = ru * ru / var_u + rs * rs / var_s
        conf = torch.exp(-0.5 * r2q)
        nll = float((0.5 * r2q).mean() + 0.5 * (torch.log(var_u) + torch.log(var_s)).mean())
        r2 = 1 - 0.5 * ((ru * ru).mean(0) / u_t.var(0).clamp(min=1e-12) + (rs * rs).mean(0) / s_t.var(0).clamp(
            min=1e-12))

    def out(x):
        return x.detach().cpu().numpy().astype(np.float64)

    alpha, alpha_off, beta, gamma, rho, t0, ts = map(out, (alpha, alpha_off, beta, gamma, rho, t0, ts))
    fit = DynamicalFit(
        latent_time=out(t_N), velocity=(out(v) * c_s).astype(np.float32),
        velocity_u=(out(vu) * c_u).astype(np.float32), confidence=out(conf).astype(np.float32),
        # the model's s is Ms / c_s and its u is Mu / (rho c_u): in Ms units u = Mu / scaling, alpha scales by c_s
        alpha=alpha * c_s, alpha_off=alpha_off * c_s, beta=beta, gamma=gamma, scaling=rho * c_u / c_s,
        t0=t0, t_switch=ts, r2=out(r2), loss=nll,
        params={k: out(v) for k, v in kin.params.items()}, scale_u=c_u, scale_s=c_s,
        sd_u=out(var_u.sqrt()), sd_s=out(var_s.sqrt()))
    log.info("dynamical fit: %d cells x %d genes in %.1f s (%d rounds x %d steps), nll %.4f, median r2 %.3f",
             N, G, time.perf_counter() - t_start, cfg.rounds, cfg.steps, nll, float(np.median(fit.r2)))
    return fit
