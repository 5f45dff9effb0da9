"""Velocity teachers on a dataset's moments: scVelo's steady-state and stochastic models, and its dynamical fit.

    .venv/bin/python -c "from data_prep.simulate import simulate; from fm.velocity.neighbours import \
NeighbourConfig, neighbourhood; from fm.velocity.teachers import TeacherConfig, run_teacher; a = simulate(400, 40); \
nb, s, u = neighbourhood(a.layers['spliced'], a.layers['unspliced'], NeighbourConfig()); \
print(run_teacher(TeacherConfig('stochastic'), nb, s, u).velocity_genes.sum())"

``steady_state`` and ``stochastic`` are scVelo's ``tl.velocity(mode='deterministic' | 'stochastic')`` with its
defaults, computed here for all genes at once (no per-gene loop), so that they equal scVelo's on the same moments:

- steady state: gamma per gene by least squares through the origin (``fit_offset=False``) on the cells in the upper
  extreme quantile of s/max(s) + u/max(u) (``perc=[5, 95]`` reduces to the 95th percentile without an offset);
  velocity = Mu - gamma * Ms. r2 is that fit's coefficient of determination over all cells (scVelo's
  ``r2_adjusted=None``); velocity genes have r2 > ``min_r2`` (0.01), gamma > ``min_ratio`` (0.01) and some cell with
  Ms > 0 and some with Mu > 0; when fewer than two genes pass, those with r2 above its 80th percentile (scVelo's
  fallback). scVelo also intersects with ``var['highly_variable']`` when present; fm does not.
- stochastic: on the steady-state velocity genes, gamma by generalized least squares over the first-order pair
  (Mu ~ gamma Ms on the extreme quantile of (Ms, Mu) or of Ms) stacked with the second-order pair
  (2 Mus + Mu ~ gamma (2 Mss - Ms) over all cells), each block weighted by the inverse of its residual's standard
  deviation; the other genes keep the steady-state gamma.
- dynamical: scVelo's own ``tl.recover_dynamics`` then ``tl.velocity(mode='dynamical')`` on an AnnData carrying the
  same normalised layers, moments and graph (needs scVelo: ``pip install "fm[velocity]"``).
- fm_dynamical: fm's own dynamical model (fm.velocity.dynamical: one cell clock shared by all genes, fitted with
  torch on all steady-state velocity genes at once); also writes ``obs['latent_time']``, scVelo's ``var['fit_*']``
  rates and ``layers['velocity_confidence']``.

A gene a teacher cannot fit (non-finite or all-zero moments, detected in fewer than ``min_cells`` cells, no spliced
signal where gamma is fitted, or not fitted by scVelo's dynamical model) is NaN in ``velocity``, False in
``velocity_genes`` and listed in ``TeacherResult.unfit`` with the reason; the rest are kept and a summary is logged.

Units: velocity is ds/dt (and ``velocity_u`` du/dt) in the units of ``Ms``/``Mu`` (fm.velocity.neighbours).
Shapes: N cells, G genes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from fm.velocity.neighbours import NeighbourConfig, Neighbourhood, moments, second_order_moments

log = logging.getLogger(__name__)

METHODS = ("steady_state", "stochastic", "dynamical", "fm_dynamical")
BLOCK_ELEMENTS = 1 << 24  # cells x genes per block of a fit
SCVELO_EXTRA = 'scVelo is needed for --method dynamical: pip install "fm[velocity]" (or pip install scvelo)'


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher and its settings (scVelo's defaults); recorded in ``uns['fm']`` and corpora."""

    method: str = "stochastic"  # steady_state | stochastic | dynamical | fm_dynamical
    perc: float = 95.0  # extreme-quantile percentile of the gamma fit (scVelo perc=[5, 95] without offset)
    min_r2: float = 0.01  # velocity genes: r2 of the steady-state fit above this
    min_ratio: float = 0.01  # velocity genes: steady-state gamma above this
    min_cells: int = 3  # a gene needs Ms > 0 and Mu > 0 in at least this many cells to be fitted
    min_likelihood: float = 1e-3  # dynamical: velocity genes have scVelo's fit likelihood above this
    max_iter: int = 10  # dynamical: EM iterations of scVelo's recover_dynamics
    n_top_genes: int | None = None  # dynamical: fit only this many steady-state velocity genes (None: all of them)
    n_jobs: int = 1  # dynamical: scVelo's parallel jobs

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"TeacherConfig.method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.perc, (int, float)) and 0 < self.perc < 100):
            raise ValueError(f"TeacherConfig.perc must be a percentile in (0, 100), got {self.perc!r}")
        for name in ("min_r2", "min_ratio", "min_likelihood"):
            if not (isinstance(getattr(self, name), (int, float)) and np.isfinite(getattr(self, name))):
                raise ValueError(f"TeacherConfig.{name} must be a finite number, got {getattr(self, name)!r}")
        for name, lo in (("min_cells", 1), ("max_iter", 1), ("n_jobs", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"TeacherConfig.{name} must be an int >= {lo}, got {v!r}")
        if self.n_top_genes is not None and (not isinstance(self.n_top_genes, int) or self.n_top_genes < 1):
            raise ValueError(f"TeacherConfig.n_top_genes must be None or an int >= 1, got {self.n_top_genes!r}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class TeacherError(ValueError):
    """A teacher cannot run on a dataset at all (as opposed to a gene it cannot fit); the message says why."""


@dataclass
class TeacherResult:
    """A teacher's output for one dataset; NaN / False at the genes in ``unfit``."""

    method: str
    velocity: np.ndarray  # [N, G] float32, ds/dt in Ms units
    velocity_u: np.ndarray | None  # [N, G] float32, du/dt (dynamical only)
    gamma: np.ndarray  # [G] float32, degradation / splicing ratio (scVelo's var['velocity_gamma'] / fit_gamma)
    r2: np.ndarray  # [G] float32, r2 of the steady-state fit (scVelo's var['velocity_r2'] / fit_r2)
    velocity_genes: np.ndarray  # [G] bool, scVelo's var['velocity_genes']
    unfit: dict[int, str] = field(default_factory=dict)  # gene index -> why it has no velocity
    # further outputs in scVelo's names (fm_dynamical: latent_time; fit_alpha, ...; velocity_confidence), NaN at unfit
    obs: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N]
    var: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [G]
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N, G]


# --- shared pieces ---------------------------------------------------------------------------------------------------
def extreme_quantile(x_NG: np.ndarray, y_NG: np.ndarray | None, perc: float) -> np.ndarray:
    """Cells in the upper ``perc`` quantile of x/max(x) (+ y/max(y)), per gene [N, G] bool: scVelo's ``get_weight``.

    Computed in float32 as scVelo does, so that the cells at the boundary are the same ones.
    """
    x = np.asarray(x_NG, np.float32)
    norm = x / np.clip(x.max(0), 1e-3, None)
    if y_NG is not None:
        y = np.asarray(y_NG, np.float32)
        norm = norm + y / np.clip(y.max(0), 1e-3, None)
    return norm >= np.percentile(norm, perc, axis=0)


def _ratio(num_G: np.ndarray, den_G: np.ndarray) -> np.ndarray:
    """num / den with 0 where the ratio is undefined (scVelo replaces NaN gammas by 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num_G / den_G
    return np.where(np.isfinite(out), out, 0.0)


def _gene_name(genes: Sequence[str] | None, g: int) -> str:
    return str(genes[g]) if genes is not None else f"#{g}"


def report_unfit(unfit: dict[int, str], n_genes: int, method: str, genes: Sequence[str] | None, where: str) -> None:
    """Log how many genes a teacher left without velocity, naming a few with the reason."""
    if not unfit:
        return
    shown = ", ".join(f"{_gene_name(genes, g)!r} ({why})" for g, why in list(unfit.items())[:5])
    more = f" and {len(unfit) - 5} more" if len(unfit) > 5 else ""
    log.warning("%s: %s teacher could not fit %d of %d genes (NaN velocity, not velocity genes): %s%s",
                where or "dataset", method, len(unfit), n_genes, shown, more)


def unfit_genes(finite_G: np.ndarray, n_s_G: np.ndarray, n_u_G: np.ndarray, min_cells: int) -> dict[int, str]:
    """Genes no teacher can fit, with the reason, from per-gene statistics: all moments finite, the number of cells
    with Ms > 0 and with Mu > 0."""
    out: dict[int, str] = {}
    for g in np.flatnonzero(~finite_G):
        out[int(g)] = "non-finite moments"
    for g in np.flatnonzero(finite_G & ((n_s_G == 0) | (n_u_G == 0))):
        out[int(g)] = "all-zero " + ("spliced" if n_s_G[g] == 0 else "unspliced") + " moments"
    for g in np.flatnonzero(finite_G & (n_s_G > 0) & (n_u_G > 0) & (np.minimum(n_s_G, n_u_G) < min_cells)):
        out[int(g)] = f"signal in {int(min(n_s_G[g], n_u_G[g]))} cells, fewer than min_cells={min_cells}"
    return out


def gene_blocks(n_cells: int, columns: np.ndarray) -> list[np.ndarray]:
    """``columns`` cut into blocks of at most BLOCK_ELEMENTS cells x genes: the fits' float64 temporaries stay
    bounded (~128 MiB each) on a million-cell dataset while each block is still one vectorised step."""
    step = max(1, BLOCK_ELEMENTS // max(n_cells, 1))
    return [columns[a:a + step] for a in range(0, len(columns), step)]


def _columns_ready(x_NG):
    """Dense as it is; sparse moments (neighbourhood(dense=False)) as CSC, whose gene blocks slice cheaply."""
    return sp.csc_matrix(x_NG, dtype=np.float32) if sp.issparse(x_NG) else np.asarray(x_NG)


def _block(x_NG, cols) -> np.ndarray:
    """Columns ``cols`` (a slice or indices) of dense or CSC moments, dense [N, b]."""
    out = x_NG[:, cols]
    return out.toarray() if sp.issparse(out) else np.asarray(out)


def _check_moments(Ms_NG, Mu_NG, where: str, *others) -> tuple[np.ndarray, np.ndarray]:
    Ms, Mu = _columns_ready(Ms_NG), _columns_ready(Mu_NG)
    for name, x in (("Mu", Mu), *others):
        if np.shape(x) != Ms.shape:
            raise TeacherError(f"{where}: {name} has shape {np.shape(x)}, Ms has {Ms.shape}")
    if Ms.ndim != 2 or Ms.shape[0] < 2:
        raise TeacherError(f"{where}: a teacher needs a cells x genes matrix with at least 2 cells, got {Ms.shape}")
    return Ms, Mu


def _finish(method: str, Ms, Mu, gamma_G, r2_G, vgenes_G, unfit, genes, where, velocity_u=None) -> TeacherResult:
    """velocity = Mu - gamma Ms (float32, as scVelo's layer), NaN at unfit genes; the summary logged."""
    bad = np.zeros(Ms.shape[1], bool)
    bad[list(unfit)] = True
    gamma = np.where(bad, np.nan, gamma_G).astype(np.float32)
    velocity = np.empty(Ms.shape, np.float32)
    for cols in gene_blocks(Ms.shape[0], np.arange(Ms.shape[1])):
        sl = slice(cols[0], cols[-1] + 1)
        with np.errstate(invalid="ignore"):
            velocity[:, sl] = _block(Mu, sl).astype(np.float32) - gamma[sl] * _block(Ms, sl).astype(np.float32)
    report_unfit(unfit, Ms.shape[1], method, genes, where)
    return TeacherResult(method=method, velocity=velocity, velocity_u=velocity_u, gamma=gamma,
                         r2=np.where(bad, np.nan, r2_G).astype(np.float32), velocity_genes=vgenes_G & ~bad,
                         unfit=dict(sorted(unfit.items())))


# --- steady state ----------------------------------------------------------------------------------------------------
def _steady_state_block(Ms: np.ndarray, Mu: np.ndarray, perc: float) -> np.ndarray:
    """Per-gene statistics of a block of genes [N, b]: rows gamma, r2, sum of w s^2, cells with Ms > 0, with Mu > 0,
    all moments finite -> [6, b]."""
    w = extreme_quantile(Ms, Mu, perc)
    s, u = Ms.astype(np.float64), Mu.astype(np.float64)
    ss = (w * s * s).sum(0)
    gamma = _ratio((w * s * u).sum(0), ss)
    res = u - gamma * s
    tot = u - u.mean(0)
    tt = (tot * tot).sum(0)
    r2 = 1.0 - _ratio((res * res).sum(0), tt)
    r2 = np.where(np.isfinite(r2) & (tt > 0), r2, 0.0)  # scVelo: an undefined r2 is 0
    finite = np.isfinite(s).all(0) & np.isfinite(u).all(0)
    return np.stack([gamma, r2, ss, (Ms > 0).sum(0), (Mu > 0).sum(0), finite])


def _steady_state_fit(Ms: np.ndarray, Mu: np.ndarray, cfg: TeacherConfig):
    """scVelo's compute_deterministic: (gamma, r2, velocity genes) [G] as scVelo computes them (unfit genes
    included, so that its fallback threshold is the same), and the genes that cannot be fitted, with the reason."""
    stats = np.concatenate([_steady_state_block(_block(Ms, slice(c[0], c[-1] + 1)),
                                                _block(Mu, slice(c[0], c[-1] + 1)), cfg.perc)
                            for c in gene_blocks(Ms.shape[0], np.arange(Ms.shape[1]))], axis=1)
    gamma_G, r2_G, ss_G, n_s_G, n_u_G, finite_G = stats
    vgenes = (r2_G > cfg.min_r2) & (gamma_G > cfg.min_ratio) & (n_s_G > 0) & (n_u_G > 0)
    if vgenes.sum() < 2:  # scVelo's fallback for weak splicing signal
        threshold = np.percentile(r2_G, 80)
        vgenes = r2_G > threshold
        log.warning("steady-state fit: fewer than 2 genes pass min_r2=%g and min_ratio=%g; velocity genes are "
                    "those with r2 > %.4g (the 80th percentile, as scVelo); interpret with care",
                    cfg.min_r2, cfg.min_ratio, threshold)
    unfit = unfit_genes(finite_G.astype(bool), n_s_G, n_u_G, cfg.min_cells)
    for g in np.flatnonzero(~(ss_G > 0)):
        unfit.setdefault(int(g), "no spliced signal in the extreme-quantile cells")
    return gamma_G, r2_G, vgenes, unfit


def steady_state(Ms_NG: np.ndarray, Mu_NG: np.ndarray, cfg: TeacherConfig | None = None,
                 genes: Sequence[str] | None = None, where: str = "") -> TeacherResult:
    """scVelo's ``tl.velocity(mode='deterministic')`` on first-order moments [N, G] (dense or sparse)."""
    cfg = cfg or TeacherConfig("steady_state")
    Ms, Mu = _check_moments(Ms_NG, Mu_NG, where)
    gamma_G, r2_G, vgenes, unfit = _steady_state_fit(Ms, Mu, cfg)
    return _finish("steady_state", Ms, Mu, gamma_G, r2_G, vgenes, unfit, genes, where)


# --- stochastic ------------------------------------------------------------------------------------------------------
def _stochastic_block(Ms, Mu, Mss, Mus, gamma_ss: np.ndarray, perc: float) -> tuple[np.ndarray, np.ndarray]:
    """scVelo's leastsq_generalized on a block of genes [N, b]: (gamma [b], fitted [b] bool)."""
    s, u = Ms.astype(np.float64), Mu.astype(np.float64)
    var_ss = 2 * Mss.astype(np.float64) - s
    cov_us = 2 * Mus.astype(np.float64) + u
    gamma2 = _ratio((var_ss * cov_us).sum(0), (var_ss * var_ss).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        # generalized least squares: each half of the stacked regression scaled by 1 / its residual's sd
        w1 = 1.0 / (u - gamma_ss * s).std(0) ** 2
        w2 = 1.0 / (cov_us - gamma2 * var_ss).std(0) ** 2
        w = extreme_quantile(Ms, Mu, perc) | extreme_quantile(Ms, None, perc)
        num = w1 * (w * s * u).sum(0) + w2 * (var_ss * cov_us).sum(0)
        den = w1 * (w * s * s).sum(0) + w2 * (var_ss * var_ss).sum(0)
    fitted = np.isfinite(den) & (den > 0) & np.isfinite(num)
    return np.where(fitted, _ratio(num, den), 0.0), fitted


def stochastic(Ms_NG: np.ndarray, Mu_NG: np.ndarray, Mss_NG: np.ndarray, Mus_NG: np.ndarray,
               cfg: TeacherConfig | None = None, genes: Sequence[str] | None = None, where: str = "") -> TeacherResult:
    """scVelo's ``tl.velocity(mode='stochastic')`` from first- and second-order moments [N, G] (dense or sparse).

    ``Mss``, ``Mus``: moments of s*s and u*s (fm.velocity.neighbours.second_order_moments).
    """
    cfg = cfg or TeacherConfig("stochastic")
    Ms, Mu = _check_moments(Ms_NG, Mu_NG, where, ("Mss", Mss_NG), ("Mus", Mus_NG))
    Mss, Mus = _columns_ready(Mss_NG), _columns_ready(Mus_NG)
    gamma_G, r2_G, vgenes, unfit = _steady_state_fit(Ms, Mu, cfg)
    idx = np.flatnonzero(vgenes) if vgenes.any() else np.arange(Ms.shape[1])
    gamma_G = gamma_G.copy()
    for cols in gene_blocks(Ms.shape[0], idx):
        gamma_b, fitted = _stochastic_block(_block(Ms, cols), _block(Mu, cols), _block(Mss, cols),
                                            _block(Mus, cols), gamma_G[cols], cfg.perc)
        gamma_G[cols] = gamma_b
        for g in cols[~fitted]:
            unfit.setdefault(int(g), "second-order fit undefined (zero or non-finite residual spread)")
    return _finish("stochastic", Ms, Mu, gamma_G, r2_G, vgenes, unfit, genes, where)


# --- dynamical (scVelo's fit) ----------------------------------------------------------------------------------------
def import_scvelo():
    """scVelo, or a TeacherError saying how to install it."""
    try:
        import scvelo
    except ImportError as e:
        raise TeacherError(SCVELO_EXTRA) from e
    return scvelo


def scanpy_neighbors_uns(cfg: NeighbourConfig) -> dict:
    """``uns['neighbors']`` as scanpy's ``pp.neighbors`` writes it for fm's graph (scVelo reads its params)."""
    return {"connectivities_key": "connectivities", "distances_key": "distances",
            "params": {"n_neighbors": cfg.n_neighbours, "method": "umap", "random_state": cfg.seed,
                       "metric": "euclidean", "use_rep": "X_pca"}}


def velocity_anndata(spliced_NG: sp.spmatrix, unspliced_NG: sp.spmatrix, nb: Neighbourhood, cfg: NeighbourConfig,
                     var_names: Sequence[str] | None = None):
    """An AnnData in scVelo's layout: normalised ``spliced``/``unspliced``, ``Ms``/``Mu``, the graph and ``X_pca``.

    scVelo leaves non-integer layers as they are (its ``not_yet_normalized`` test), so it works on fm's
    normalisation, moments and neighbours.
    """
    import anndata as ad
    import pandas as pd

    N, G = nb.Ms.shape
    var = pd.DataFrame(index=pd.Index([str(g) for g in var_names] if var_names is not None else
                                      [f"g{i}" for i in range(G)]))
    a = ad.AnnData(X=sp.csr_matrix(spliced_NG, dtype=np.float32), var=var,
                   layers={"spliced": sp.csr_matrix(spliced_NG, dtype=np.float32),
                           "unspliced": sp.csr_matrix(unspliced_NG, dtype=np.float32), "Ms": nb.Ms, "Mu": nb.Mu},
                   obsm={"X_pca": nb.X_pca}, obsp={"distances": nb.distances, "connectivities": nb.connectivities})
    a.uns["neighbors"] = scanpy_neighbors_uns(cfg)
    return a


def dynamical(spliced_NG: sp.spmatrix, unspliced_NG: sp.spmatrix, nb: Neighbourhood, ncfg: NeighbourConfig,
              cfg: TeacherConfig | None = None, genes: Sequence[str] | None = None, where: str = "") -> TeacherResult:
    """scVelo's ``tl.recover_dynamics`` + ``tl.velocity(mode='dynamical')`` on fm's normalised counts and moments."""
    cfg = cfg or TeacherConfig("dynamical")
    scv = import_scvelo()
    Ms, Mu = _check_moments(nb.Ms, nb.Mu, where)
    a = velocity_anndata(spliced_NG, unspliced_NG, nb, ncfg)  # gene names g0..: unique, whatever the input's are
    gamma_G, r2_G, vgenes, unfit = _steady_state_fit(Ms, Mu, cfg)
    candidates = vgenes.copy()
    candidates[list(unfit)] = False
    if not candidates.any():
        raise TeacherError(f"{where}: no gene passes the steady-state velocity-gene selection; the dynamical model "
                           "has nothing to fit")
    a.var["velocity_genes"] = candidates  # the genes scVelo's recover_dynamics fits by default
    a.var["fit_r2"] = r2_G
    scv.tl.recover_dynamics(a, var_names="velocity_genes", n_top_genes=cfg.n_top_genes, max_iter=cfg.max_iter,
                            n_jobs=cfg.n_jobs, show_progress_bar=False)
    scv.tl.velocity(a, mode="dynamical", min_r2=cfg.min_r2, min_likelihood=cfg.min_likelihood)
    fit_gamma = a.var["fit_gamma"].to_numpy(np.float64)
    v = np.asarray(a.layers["velocity"], np.float32)
    vu = np.asarray(a.layers["velocity_u"], np.float32)
    for g in np.flatnonzero(~np.isfinite(fit_gamma) | ~np.isfinite(v).all(0)):
        if g not in unfit:
            unfit[int(g)] = ("not fitted by the dynamical model" if candidates[g] else
                             "not a steady-state velocity gene (the dynamical model fits those)")
    bad = np.zeros(Ms.shape[1], bool)
    bad[list(unfit)] = True
    v[:, bad] = np.nan
    vu[:, bad] = np.nan
    vg = a.var["velocity_genes"].to_numpy(bool) & ~bad
    report_unfit(unfit, Ms.shape[1], "dynamical", genes, where)
    return TeacherResult(method="dynamical", velocity=v, velocity_u=vu,
                         gamma=np.where(bad, np.nan, fit_gamma).astype(np.float32),
                         r2=np.where(bad, np.nan, r2_G).astype(np.float32), velocity_genes=vg,
                         unfit=dict(sorted(unfit.items())))


# --- fm's dynamical model (fm.velocity.dynamical) ---------------------------------------------------------------
def fm_dynamical(nb: Neighbourhood, cfg: TeacherConfig | None = None, genes: Sequence[str] | None = None,
                 where: str = "") -> TeacherResult:
    """fm's dynamical model on the steady-state velocity genes (scVelo's dynamical teacher fits the same genes).

    Velocity genes: fitted genes whose fit explains more than ``min_r2`` of the scaled (Mu, Ms) variance.
    """
    from fm.velocity.dynamical import DynamicalConfig, fit_dynamics  # torch: imported only when this teacher runs

    cfg = cfg or TeacherConfig("fm_dynamical")
    Ms, Mu = _check_moments(nb.Ms, nb.Mu, where)
    N, G = Ms.shape
    gamma_G, r2_G, vgenes, unfit = _steady_state_fit(Ms, Mu, cfg)
    fit = vgenes.copy()
    fit[list(unfit)] = False
    if cfg.n_top_genes is not None and fit.sum() > cfg.n_top_genes:
        fit[np.flatnonzero(fit)[np.argsort(-r2_G[fit], kind="stable")[cfg.n_top_genes:]]] = False
    idx = np.flatnonzero(fit)
    if idx.size == 0:
        raise TeacherError(f"{where}: no gene passes the steady-state velocity-gene selection; the dynamical model "
                           "has nothing to fit")
    for g in np.flatnonzero(~fit):
        unfit.setdefault(int(g), "not a steady-state velocity gene (the dynamical model fits those)"
                         if not vgenes[g] else f"not among the n_top_genes={cfg.n_top_genes} by r2")
    f = fit_dynamics(_block(Ms, idx), _block(Mu, idx), gamma_G[idx], nb.connectivities,
                     DynamicalConfig(rounds=cfg.max_iter))
    bad = ~np.isfinite(f.velocity).all(0) | ~np.isfinite(f.gamma)
    for g in idx[bad]:
        unfit[int(g)] = "the dynamical fit diverged (non-finite rates or velocity)"

    def full(x_G, dtype=np.float32):
        out = np.full(G, np.nan, dtype)
        out[idx] = x_G
        out[idx[bad]] = np.nan
        return out

    def full_NG(x_NG):
        out = np.full((N, G), np.nan, np.float32)
        out[:, idx[~bad]] = x_NG[:, ~bad]
        return out

    vg = np.zeros(G, bool)
    vg[idx] = (f.r2 > cfg.min_r2) & ~bad
    report_unfit(unfit, G, "fm_dynamical", genes, where)
    return TeacherResult(
        method="fm_dynamical", velocity=full_NG(f.velocity), velocity_u=full_NG(f.velocity_u),
        gamma=full(f.gamma), r2=np.where(np.isin(np.arange(G), list(unfit)), np.nan, r2_G).astype(np.float32),
        velocity_genes=vg, unfit=dict(sorted(unfit.items())),
        obs={"latent_time": f.latent_time.astype(np.float32)},
        var={"fit_alpha": full(f.alpha), "fit_alpha_off": full(f.alpha_off), "fit_beta": full(f.beta),
             "fit_gamma": full(f.gamma), "fit_scaling": full(f.scaling), "fit_t0": full(f.t0),
             "fit_t_": full(f.t_switch), "fit_r2": full(f.r2)},
        layers={"velocity_confidence": full_NG(f.confidence)})


# --- one entry point for conversion and the command --------------------------------------------------------------
def _run_steady_state(cfg, nb, s, u, ncfg, genes, where):
    return steady_state(nb.Ms, nb.Mu, cfg, genes, where)


def _run_stochastic(cfg, nb, s, u, ncfg, genes, where):
    if sp.issparse(nb.Ms):  # a sparse neighbourhood (dense=False): second-order moments sparse as well
        s32, u32 = sp.csr_matrix(s, dtype=np.float32), sp.csr_matrix(u, dtype=np.float32)
        Mss, Mus = moments(nb.operator, s32.multiply(s32), dense=False), moments(nb.operator, s32.multiply(u32),
                                                                               dense=False)
    else:
        Mss, Mus = second_order_moments(nb.operator, s, u)
    return stochastic(nb.Ms, nb.Mu, Mss, Mus, cfg, genes, where)


def _run_dynamical(cfg, nb, s, u, ncfg, genes, where):
    return dynamical(s, u, nb, ncfg, cfg, genes, where)


def _run_fm_dynamical(cfg, nb, s, u, ncfg, genes, where):
    return fm_dynamical(nb, cfg, genes, where)


TEACHERS: dict[str, Callable[..., TeacherResult]] = {
    "steady_state": _run_steady_state, "stochastic": _run_stochastic, "dynamical": _run_dynamical,
    "fm_dynamical": _run_fm_dynamical,
}


def run_teacher(cfg: TeacherConfig, nb: Neighbourhood, spliced_NG: sp.spmatrix, unspliced_NG: sp.spmatrix,
                ncfg: NeighbourConfig | None = None, genes: Sequence[str] | None = None,
                where: str = "") -> TeacherResult:
    """Run ``cfg.method`` on one dataset's neighbourhood and normalised counts (``fm.velocity.neighbours``'s output).

    Args:
        nb: the neighbourhood (moments, operator, graph).
        spliced_NG, unspliced_NG: the normalised counts the moments were computed from [N, G].
        ncfg: the neighbourhood's settings (scVelo's dynamical fit reads the number of neighbours from them).
        genes: gene names for the per-gene report; where: the file, for messages.
    """
    return TEACHERS[cfg.method](cfg, nb, spliced_NG, unspliced_NG, ncfg or NeighbourConfig(), genes, where)
