"""Velocity decoder: per-gene RNA velocity and cell-specific kinetic rates (alpha, beta, gamma) from encoder states.

Two ways to learn it (``mode``), both giving per gene and cell ds/dt (``velocity``), du/dt (``velocity_u``) and
rates: a dynamical model of the cell's moments, self-supervised (the default: real data has no velocity truth), or
a supervised decoder on a target (a simulation's truth, or a teacher's velocity: distillation).

Training modes (``mode``):
- ``dynamical`` (default, self-supervised, no target): the transcription-splicing-degradation model of scVelo's
  dynamical mode, as fm's dynamical teacher fits it (fm.velocity.dynamical, whose docstring says what makes it
  identifiable), learnt from the stream. The head holds, per vocabulary gene, the switching kinetics (alpha on/off,
  beta, gamma, the u scaling rho, onset and switch on the clock) and the noise sd of each modality, in units of the
  gene's scale (the 99th percentile of its moments); each cell has one time on a clock [0, 1]. The loss is the
  Gaussian negative log-likelihood of the cell's moments (Mu, Ms) under the analytic solution, over the genes the
  cell detected (its tokens), in minibatches: each batch, every cell's time is the grid point of the clock with the
  least weighted residual over its genes under the current kinetics (an exhaustive search: one matrix product, no
  local minima; scVelo's E-step), then the kinetics take a gradient step (the M-step) and a clock network on the
  encoder's cell embedding learns that time (``clock_weight`` x its squared error). Before the first step the
  kinetics are warm-started (``warm_start``) by fm's dynamical fit on a sample of ``warm_start_cells`` training
  cells, which also picks the genes the model fits (the steady-state velocity genes: velocity elsewhere is NaN, as
  scVelo's dynamical mode). Prediction: the time of a cell is the clock fit on its moments (``clock="fit"``), or the
  network's (``clock="network"``: one pass, no moments needed); velocity ds/dt = beta u - gamma s and du/dt =
  rho (alpha(t) - beta u) at the fitted state, in the units of the moments (normalised counts: counts per
  ``target_sum`` of library under ``total``) per unit of the clock; confidence exp(-r^2 / 2), r^2 the
  variance-scaled squared residual of the cell's (Mu, Ms) of the gene. One set of kinetics per gene: on a corpus of
  several datasets they are shared (fine-tune on one dataset for a per-dataset fit, as scVelo).
- ``supervised`` on ``B_VELOCITY`` (and ``B_VELOCITY_U`` when present), NaN entries masked: the truth of a
  simulation, or a teacher's velocity written by conversion (``fm prep convert --velocity-teacher``; genes the
  teacher could not fit are NaN, so ignored), which distils the teacher into a model that predicts velocity for a
  new dataset in one pass. Loss: MSE after dividing every gene by the standard deviation of its target over the
  batch. Why: velocity magnitudes differ by orders of magnitude between genes (they scale with expression and
  rates), so raw MSE would fit a handful of genes; the evaluation (per-gene Spearman, sign accuracy, per-gene-scaled
  cosine, DESIGN.md §8) weighs every gene equally, and the per-gene-scaled MSE is the loss that matches it.
  ``cosine_mse`` adds ``cosine_weight`` x (1 - per-cell cosine of the scaled vectors), which stresses each cell's
  direction (what CBDir and projections read) but alone is blind to how velocity varies across cells within a
  gene, hence only as an addition. The decoder is the expression decoder's gene-query cross-attention pooling
  (:class:`fm.heads.expression.GeneQueryDecoder`), five numbers per (cell, gene): a free ds/dt and du/dt and logits
  of alpha, beta, gamma. ``velocity_param``: ``direct`` (default) the free ds/dt, du/dt; ``rates`` the kinetic form
  on the cell's state (normalised values, the tokenizer's log1p undone, in the units of a teacher's target and of
  the ``Ms`` layers ``fm predict`` writes), ds/dt = beta u - gamma s, du/dt = alpha - beta u, with positive
  per-cell rates (``rate_max`` x sigmoid, as cellDancer's).

The kinetic (cellDancer-style) objective that was here, "the velocity points at some neighbour in the batch", was
removed: measured on a simulation it scored the true velocity (0.752) no better than its negation (0.750), and
fine-tuning on it moved away from the truth (issue 15).

(u, s) are the moments over the dataset's neighbourhood (``B_MU``, ``B_MS``, fm.velocity.neighbours) wherever the
batch has them, as every peer works on moments, and the cell's own values otherwise (``rates``); the dynamical mode
needs them (a corpus converted with neighbourhoods).

Shapes: B cells, Q query genes (the batch's G tokens), U genes of the batch's union, T clock grid points, D width,
V vocabulary genes.

    python -m pytest tests/unit/test_heads.py -q -k velocity
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fm import keys
from fm.heads.base import Head, LossOutput, PredictLayer, check_fields, param_groups
from fm.heads.expression import GeneQuery, GeneQueryDecoder, batch_union, build_config, densify
from fm.velocity.dynamical import PARAMS, kinetic_rates, switching_state

log = logging.getLogger(__name__)

_EPS = 1e-8
# the parameters of a gene the warm start did not fit (never used for velocity: such a gene's velocity is NaN)
_DEFAULT_PARAMS = {"log_alpha": 0.0, "logit_off": -4.0, "log_beta": math.log(3.0), "log_gamma": math.log(3.0),
                   "log_rho": 0.0, "t0": -0.05, "log_dur": 0.0}


@dataclass
class VelocityConfig:
    """Velocity decoder settings."""

    mode: str = "dynamical"  # dynamical (self-supervised, on the moments) | supervised (on B_VELOCITY)
    velocity_param: str = "auto"  # supervised: direct (free ds/dt, du/dt) | rates (beta u - gamma s) | auto (direct)
    supervised_loss: str = "mse"  # mse (per-gene scaled) | cosine_mse (adds cosine_weight * (1 - per-cell cosine))
    cosine_weight: float = 1.0  # weight of the cosine term of cosine_mse
    velocity_u_weight: float = 1.0  # weight of the du/dt term when the batch has B_VELOCITY_U (0: ignore it)
    min_cells_for_std: int = 3  # a gene with fewer known targets in the batch is scaled by the median gene std
    rate_max: float = 10.0  # supervised rates: upper bound of alpha, beta, gamma
    n_heads: int = 4  # heads of the cross-attention pooling
    hidden_mult: int = 2  # MLP hidden width = hidden_mult * D
    clock: str = "fit"  # dynamical, at prediction: fit (each cell's time fitted on its moments) | network
    n_grid: int = 500  # dynamical: points of the clock [0, 1] a cell's time is searched on
    min_sd: float = 0.02  # dynamical: floor of a gene's noise sd, in units of its scale
    clock_weight: float = 1.0  # dynamical: weight of the clock network's squared error to the fitted time
    kinetics_lr: float = 0.01  # dynamical: peak learning rate of the per-gene kinetics (the clock network: optim.lr)
    warm_start_cells: int = 4096  # dynamical: training cells the kinetics are warm-started on (fm_dynamical's fit)
    warm_start_rounds: int = 10  # dynamical: rounds of that fit

    def __post_init__(self) -> None:
        check_fields(self)
        choices = {
            "mode": ("dynamical", "supervised"),
            "velocity_param": ("direct", "rates", "auto"),
            "supervised_loss": ("mse", "cosine_mse"),
            "clock": ("fit", "network"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"VelocityConfig.{name}: must be one of {valid}, got {getattr(self, name)!r}")
        if self.velocity_param == "auto":
            self.velocity_param = "direct"
        for name in ("n_heads", "hidden_mult", "min_cells_for_std", "warm_start_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"VelocityConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.n_grid < 10 or self.warm_start_cells < 50:
            raise ValueError(f"VelocityConfig: n_grid must be >= 10 and warm_start_cells >= 50, got {self.n_grid} "
                             f"and {self.warm_start_cells}")
        for name in ("cosine_weight", "velocity_u_weight", "clock_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"VelocityConfig.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("rate_max", "min_sd", "kinetics_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VelocityConfig.{name}: must be > 0, got {getattr(self, name)}")


def per_gene_std(target_BQ: Tensor, known_BQ: Tensor, col_BQ: Tensor, n_cols: int, min_cells: int) -> Tensor:
    """Std over the batch of each union gene's known targets [U]; sparse or constant genes get the median std."""
    t_BQ = torch.where(known_BQ, target_BQ, torch.zeros_like(target_BQ))
    cnt_U = densify(known_BQ.to(t_BQ.dtype), col_BQ, known_BQ, n_cols).sum(0)
    s1_U = densify(t_BQ, col_BQ, known_BQ, n_cols).sum(0)
    s2_U = densify(t_BQ * t_BQ, col_BQ, known_BQ, n_cols).sum(0)
    mean_U = s1_U / cnt_U.clamp(min=1)
    std_U = (s2_U / cnt_U.clamp(min=1) - mean_U**2).clamp(min=0).sqrt()
    ok_U = (cnt_U >= min_cells) & (std_U > _EPS)
    fallback = std_U[ok_U].median() if ok_U.any() else t_BQ.new_tensor(1.0)
    return torch.where(ok_U, std_U, fallback)


def kinetic_state(batch: dict) -> tuple[Tensor, Tensor]:
    """(u, s) [B, G] the kinetics act on: the moments over the dataset's neighbourhood (B_MU, B_MS) where the batch has
    them, else the cell's own values (a dataset converted without neighbourhood); both normalised and log1p'd."""
    u_BQ, s_BQ = batch[keys.B_UNSPLICED], batch[keys.B_SPLICED]
    if keys.B_MS in batch and keys.B_MU in batch:
        ms_BQ, mu_BQ = batch[keys.B_MS], batch[keys.B_MU]
        u_BQ = torch.where(torch.isfinite(mu_BQ), mu_BQ, u_BQ)
        s_BQ = torch.where(torch.isfinite(ms_BQ), ms_BQ, s_BQ)
    return u_BQ, s_BQ


def batch_moments(batch: dict) -> tuple[Tensor, Tensor]:
    """The batch's moments (Mu, Ms) [B, G] in normalised units (the tokenizer's log1p undone), NaN where unknown."""
    if keys.B_MS not in batch or keys.B_MU not in batch:
        raise KeyError(f"VelocityHead(mode='dynamical') needs the moments {keys.B_MS!r}, {keys.B_MU!r} in the batch: "
                       "convert the corpus with neighbourhoods (fm prep convert --neighbours K, K > 0)")
    return torch.expm1(batch[keys.B_MU]), torch.expm1(batch[keys.B_MS])


class GeneKineticsTable(nn.Module):
    """Per vocabulary gene: the switching kinetics (PARAMS, fm.velocity.dynamical), the log noise sd of u and s, the
    scales of Mu and Ms, and whether the gene is fitted. Parameters are 1-D [V] (no weight decay)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.params = nn.ParameterDict(
            {k: nn.Parameter(torch.full((vocab_size,), _DEFAULT_PARAMS[k])) for k in PARAMS})
        self.log_sd_u = nn.Parameter(torch.full((vocab_size,), math.log(0.1)))
        self.log_sd_s = nn.Parameter(torch.full((vocab_size,), math.log(0.1)))
        self.register_buffer("scale_u", torch.ones(vocab_size))
        self.register_buffer("scale_s", torch.ones(vocab_size))
        self.register_buffer("fitted", torch.zeros(vocab_size, dtype=torch.bool))

    def at(self, ids: Tensor) -> list[Tensor]:
        """The PARAMS at gene ids (any shape), in PARAMS order, kept in fm_dynamical's bounds (rates within e^+-10,
        onset within a clock length of the data, the switch no later than twice its end)."""
        p = {k: self.params[k][ids] for k in PARAMS}
        for k in ("log_alpha", "log_beta", "log_gamma", "log_rho"):
            p[k] = p[k].clamp(-10.0, 10.0)
        p["t0"] = p["t0"].clamp(-1.0, 1.0)
        p["log_dur"] = p["log_dur"].clamp(math.log(1e-3), math.log(2.0))
        return [p[k] for k in PARAMS]

    def sd(self, ids: Tensor, min_sd: float) -> tuple[Tensor, Tensor]:
        return self.log_sd_u[ids].exp().clamp(min=min_sd), self.log_sd_s[ids].exp().clamp(min=min_sd)


class VelocityHead(Head):
    """Per-gene velocity, du/dt, rates and (dynamical) confidence; dynamical or supervised loss by config.

    Args:
        dim: the encoder's width D.
        vocab_size: rows of the gene vocabulary (index 0 is padding).
        config: a :class:`VelocityConfig` (or a mapping of its fields).
    """

    def __init__(self, dim: int, vocab_size: int, config: VelocityConfig | Mapping | None = None):
        super().__init__()
        self.config = c = build_config(VelocityConfig, config)
        self._cell_cache = None  # (gene ids, z_global, per-cell results) of the last batch seen without gradients
        if c.mode == "dynamical":
            self.kinetics = GeneKineticsTable(vocab_size)
            self.clock_net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        else:
            self.decoder = GeneQueryDecoder(dim, vocab_size, c.n_heads, 5, c.hidden_mult)

    def predict_layers(self) -> dict[str, PredictLayer]:
        if self.config.mode == "dynamical":
            unit = "per unit of the cell clock [0, 1] (latent time)"
            return {
                "velocity": PredictLayer(keys.LAYER_VELOCITY, "ds/dt at the fitted state of the dynamical model, in "
                                         f"the units of layers['Ms'] (normalised counts) {unit}; NaN at genes the "
                                         "model does not fit"),
                "velocity_u": PredictLayer(keys.LAYER_VELOCITY_U, f"du/dt, in the units of layers['Mu'] {unit}"),
                "confidence": PredictLayer(keys.LAYER_VELOCITY_CONFIDENCE,
                                           "exp(-r^2/2), r^2 the noise-scaled squared distance of the cell's (Mu, Ms) "
                                           "from the gene's fitted curve at its time: 1 on it, -> 0 far from it"),
                "alpha": PredictLayer(keys.LAYER_ALPHA, f"transcription rate in force at the cell's time (Ms units "
                                      f"{unit})"),
                "beta": PredictLayer(keys.LAYER_BETA, f"splicing rate of the gene ({unit.replace('per unit', 'per')})"),
                "gamma": PredictLayer(keys.LAYER_GAMMA, f"degradation rate of the gene "
                                      f"({unit.replace('per unit', 'per')})"),
            }
        how = self.config.velocity_param
        rate = "rate {} per cell and gene (model units, in (0, rate_max))"
        return {
            "velocity": PredictLayer(keys.LAYER_VELOCITY,
                                     f"ds/dt in the units of the training target (velocity_param={how})"),
            "velocity_u": PredictLayer(keys.LAYER_VELOCITY_U,
                                       f"du/dt in the units of the training target (velocity_param={how})"),
            "alpha": PredictLayer(keys.LAYER_ALPHA, "transcription " + rate.format("alpha")),
            "beta": PredictLayer(keys.LAYER_BETA, "splicing " + rate.format("beta")),
            "gamma": PredictLayer(keys.LAYER_GAMMA, "degradation " + rate.format("gamma")),
        }

    def predict_obs(self) -> dict[str, PredictLayer]:
        if self.config.mode != "dynamical":
            return {}
        how = ("fitted on the cell's moments under the learnt kinetics" if self.config.clock == "fit"
               else "the clock network's, from the encoder's cell embedding")
        return {"latent_time": PredictLayer("latent_time", f"the cell's time on the dynamical model's clock [0, 1], "
                                                           f"{how} (scVelo's obs['latent_time'])")}

    def gene_table(self) -> nn.Embedding | None:
        return None if self.config.mode == "dynamical" else self.decoder.gene_queries

    @property
    def moment_units(self) -> str:
        """The units of the moments the velocity is in: ``normalised`` counts, in every mode (the dynamical model's
        state; a teacher's target, computed on normalised moments; the rates' kinetics on the undone log1p)."""
        return "normalised"

    def forward(self, batch: dict, encoder_output, query: GeneQuery | None = None) -> dict[str, Tensor]:
        """Per query gene: velocity (ds/dt), velocity_u (du/dt), alpha, beta, gamma (and, dynamical, confidence and
        the cell's latent_time), and the query mask.

        ``query``: predict these genes (with their own u, s values) instead of the batch's tokens (fm.predict).
        """
        if self.config.mode == "dynamical":
            return self._dynamical_forward(batch, encoder_output, query)
        c = self.config
        if query is None:
            raw_BQ5, _ = self.decoder(batch[keys.B_GENE_IDS], encoder_output)
            u_BQ, s_BQ = kinetic_state(batch)
            query_BQ = batch[keys.B_GENE_MASK].bool()
        else:
            raw_BQ5, _ = self.decoder(query.gene_ids_BQ, encoder_output, query.token_BQ)
            u_BQ, s_BQ, query_BQ = query.unspliced_BQ, query.spliced_BQ, query.mask_BQ.bool()
        alpha_BQ, beta_BQ, gamma_BQ = (c.rate_max * torch.sigmoid(raw_BQ5[..., 2:])).unbind(-1)
        if c.velocity_param == "rates":  # the kinetics act on normalised values (the tokenizer's log1p undone), as
            u_BQ, s_BQ = torch.expm1(u_BQ), torch.expm1(s_BQ)  # a teacher's target and the moments' layers are
            velocity_BQ, velocity_u_BQ = beta_BQ * u_BQ - gamma_BQ * s_BQ, alpha_BQ - beta_BQ * u_BQ
        else:
            velocity_BQ, velocity_u_BQ = raw_BQ5[..., 0], raw_BQ5[..., 1]
        return {
            "velocity": velocity_BQ,  # ds/dt [B, Q]
            "velocity_u": velocity_u_BQ,  # du/dt [B, Q]
            "alpha": alpha_BQ,
            "beta": beta_BQ,
            "gamma": gamma_BQ,
            "query_mask": query_BQ,
        }

    # --- dynamical ---------------------------------------------------------------------------------------------------
    def _scaled(self, ids_BQ: Tensor, mu_BQ: Tensor, ms_BQ: Tensor) -> tuple[Tensor, Tensor]:
        k = self.kinetics
        return mu_BQ / k.scale_u[ids_BQ], ms_BQ / k.scale_s[ids_BQ]

    @torch.no_grad()
    def fit_clock(self, ids_BG: Tensor, u_BG: Tensor, s_BG: Tensor, obs_BG: Tensor) -> tuple[Tensor, Tensor]:
        """Each cell's time [B]: the grid point of the clock with the least noise-weighted squared residual over its
        observed genes (``obs_BG``; scaled moments ``u_BG``, ``s_BG``), and whether it had any [B] bool."""
        c, k = self.config, self.kinetics
        ids_U, col_BG = batch_union(ids_BG, obs_BG)
        grid_T = torch.linspace(0, 1, c.n_grid, device=u_BG.device, dtype=u_BG.dtype)
        uo_TU, so_TU, *_ = switching_state(grid_T[:, None], *k.at(ids_U))
        sd_u_U, sd_s_U = k.sd(ids_U, c.min_sd)
        n = ids_U.numel()
        m_BU = densify(obs_BG.to(u_BG.dtype), col_BG, obs_BG, n)
        zero = torch.zeros_like(u_BG)
        u_BU = densify(torch.where(obs_BG, u_BG, zero), col_BG, obs_BG, n) / sd_u_U**2
        s_BU = densify(torch.where(obs_BG, s_BG, zero), col_BG, obs_BG, n) / sd_s_U**2
        cost_BT = (m_BU / sd_u_U**2) @ (uo_TU * uo_TU).T + (m_BU / sd_s_U**2) @ (so_TU * so_TU).T
        cost_BT = cost_BT - 2 * (u_BU @ uo_TU.T + s_BU @ so_TU.T)
        return grid_T[cost_BT.argmin(1)], obs_BG.any(1)

    def _observed(self, ids_BG: Tensor, mask_BG: Tensor, u_BG: Tensor, s_BG: Tensor) -> Tensor:
        return mask_BG & torch.isfinite(u_BG) & torch.isfinite(s_BG) & self.kinetics.fitted[ids_BG]

    def _dynamical_forward(self, batch: dict, encoder_output, query: GeneQuery | None) -> dict[str, Tensor]:
        c, k = self.config, self.kinetics
        ids_BG, mask_BG = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK].bool()
        cached = self._cell_cache
        if cached is not None and cached[0] is ids_BG and cached[1] is encoder_output.z_global:
            u_BG, s_BG, obs_BG, t_fit_B, has_B, t_net_B = cached[2]  # the same batch, another chunk of query genes
        else:
            mu_BG, ms_BG = batch_moments(batch)
            u_BG, s_BG = self._scaled(ids_BG, mu_BG, ms_BG)
            obs_BG = self._observed(ids_BG, mask_BG, u_BG, s_BG)
            t_fit_B, has_B = self.fit_clock(ids_BG, u_BG, s_BG, obs_BG)
            t_net_B = torch.sigmoid(self.clock_net(encoder_output.z_global).squeeze(-1).float())
            # prediction queries a batch's genes in chunks: its cells' times are computed once. The cache holds the
            # batch's tensors themselves, so an identity match cannot be a new batch at a reused address.
            self._cell_cache = None if torch.is_grad_enabled() else (
                ids_BG, encoder_output.z_global, (u_BG, s_BG, obs_BG, t_fit_B, has_B, t_net_B))
        if self.training or c.clock == "fit":
            t_B = torch.where(has_B, t_fit_B, t_net_B.detach())
        else:
            t_B = t_net_B
        if query is None:
            q_ids_BQ, u_BQ, s_BQ, query_BQ = ids_BG, u_BG, s_BG, mask_BG
        else:  # the query's values are the tokenizer's (log1p) moments
            q_ids_BQ, query_BQ = query.gene_ids_BQ, query.mask_BQ.bool()
            u_BQ, s_BQ = self._scaled(q_ids_BQ, torch.expm1(query.unspliced_BQ), torch.expm1(query.spliced_BQ))
        # unknown moments (a gene the cell did not detect, padding) enter no residual: a NaN there would make the
        # gradient NaN through the masked-out entries
        finite_BQ = torch.isfinite(u_BQ) & torch.isfinite(s_BQ)
        u_BQ, s_BQ = torch.where(finite_BQ, u_BQ, 0.0), torch.where(finite_BQ, s_BQ, 0.0)
        p = k.at(q_ids_BQ)
        uo_BQ, so_BQ, um_BQ, sm_BQ, alpha_t_BQ = switching_state(t_B[:, None].to(u_BQ.dtype), *p)
        _, _, beta_BQ, gamma_BQ, rho_BQ, _, _ = kinetic_rates(*p)
        sc_u_BQ, sc_s_BQ = k.scale_u[q_ids_BQ], k.scale_s[q_ids_BQ]
        sd_u_BQ, sd_s_BQ = k.sd(q_ids_BQ, c.min_sd)
        r2_BQ = ((u_BQ - uo_BQ) / sd_u_BQ) ** 2 + ((s_BQ - so_BQ) / sd_s_BQ) ** 2
        nan = torch.full_like(uo_BQ, float("nan"))
        fitted_BQ = k.fitted[q_ids_BQ]

        def known(x_BQ: Tensor) -> Tensor:
            return torch.where(fitted_BQ, x_BQ, nan)

        return {
            "velocity": known(sc_s_BQ * (beta_BQ * um_BQ - gamma_BQ * sm_BQ)),  # ds/dt [B, Q], Ms units
            "velocity_u": known(sc_u_BQ * rho_BQ * (alpha_t_BQ - beta_BQ * um_BQ)),  # du/dt, Mu units
            "confidence": known(torch.exp(-0.5 * r2_BQ)),
            "alpha": known(sc_s_BQ * alpha_t_BQ),
            "beta": known(beta_BQ),
            "gamma": known(gamma_BQ),
            "latent_time": t_B,  # [B]
            "clock_network": t_net_B,
            "clock_fit": t_fit_B,
            "clock_known": has_B,
            "observed": obs_BG if query is None else fitted_BQ & finite_BQ,
            "residual_u": (u_BQ - uo_BQ) / sd_u_BQ,
            "residual_s": (s_BQ - so_BQ) / sd_s_BQ,
            "log_sd": torch.log(sd_u_BQ) + torch.log(sd_s_BQ),
            "query_mask": query_BQ,
        }

    def _dynamical_loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        obs_BQ = outputs["observed"] & outputs["query_mask"]
        if not obs_BQ.any():
            raise ValueError("VelocityHead(mode='dynamical'): no token of the batch has moments of a fitted gene "
                             "(was the head warm-started? does the corpus have moments?)")
        ru, rs = outputs["residual_u"][obs_BQ], outputs["residual_s"][obs_BQ]
        nll = (0.5 * (ru * ru + rs * rs) + outputs["log_sd"][obs_BQ]).mean()
        has_B = outputs["clock_known"]
        clock = ((outputs["clock_network"] - outputs["clock_fit"]) ** 2)[has_B].mean() if has_B.any() \
            else nll.new_zeros(())
        metrics = {"confidence": torch.exp(-0.5 * (ru * ru + rs * rs)).mean().detach()}
        return LossOutput(loss=nll + self.config.clock_weight * clock, parts={"nll": nll, "clock": clock},
                          metrics=metrics)

    def optim_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Parameter groups with their peak learning rates: the kinetics at ``kinetics_lr`` without decay (per-gene
        rates; a fit, as fm_dynamical's Adam at 0.05), the rest at ``lr`` (``param_groups``' decay rule)."""
        if self.config.mode != "dynamical":
            return [{**g, "lr": lr} for g in param_groups(self, weight_decay) if g["params"]]
        kin = [p for p in self.kinetics.parameters() if p.requires_grad]
        rest = [{**g, "lr": lr} for g in param_groups(self.clock_net, weight_decay) if g["params"]]
        return ([{"params": kin, "weight_decay": 0.0, "lr": self.config.kinetics_lr}] if kin else []) + rest

    def needs_warm_start(self) -> bool:
        return self.config.mode == "dynamical" and not bool(self.kinetics.fitted.any())

    def warm_start(self, batches: Iterable[dict]) -> dict[str, Tensor]:
        """The kinetics table's state fitted by fm's dynamical model on the cells of ``batches`` (up to
        ``warm_start_cells``; load it with ``load_state_dict(..., strict=False)``).

        The fit needs every gene's moment in every cell, and the corpus stores moments only where a cell detected the
        gene (docs/FORMAT.md; on pancreas 38% of the entries; zero-filling the rest made 840 genes pass the
        steady-state selection instead of 354). So the sample's moments are recomputed from its own counts (the
        batch's normalised values, exact zeros where a gene was not detected), scVelo's way, over the sample's own
        kNN graph (30 nearest cells on 30 PCs of log1p normalised spliced, scikit-learn's exact search; the graph
        symmetrised, each cell and its neighbours averaged): for a dataset of at most ``warm_start_cells`` cells
        these are its moments; for a larger one a subsample's, coarser but unbiased, and the stream's steps then fit
        the corpus's own. Genes: the steady-state velocity genes of the sample (scVelo's dynamical model fits those).
        """
        import scipy.sparse as sp
        from sklearn.neighbors import kneighbors_graph

        from fm.velocity.dynamical import DynamicalConfig, fit_dynamics
        from fm.velocity.teachers import TeacherConfig, steady_state

        c = self.config
        ids, us, ss_, n = [], [], [], 0
        for batch in batches:
            mask_BG = batch[keys.B_GENE_MASK].bool()
            s_BG, u_BG = torch.expm1(batch[keys.B_SPLICED].double()), torch.expm1(batch[keys.B_UNSPLICED].double())
            for i in range(mask_BG.shape[0]):
                m = mask_BG[i]
                ids.append(batch[keys.B_GENE_IDS][i][m].numpy())
                ss_.append(s_BG[i][m].numpy())
                us.append(u_BG[i][m].numpy())
            n += mask_BG.shape[0]
            if n >= c.warm_start_cells:
                break
        N = min(n, c.warm_start_cells)
        if N < 50:
            raise ValueError(f"VelocityHead warm start: {N} training cells, fewer than 50")
        genes_U, inv = np.unique(np.concatenate(ids[:N]), return_inverse=True)
        rows = np.repeat(np.arange(N), [len(x) for x in ids[:N]])
        S = sp.csr_matrix((np.concatenate(ss_[:N]), (rows, inv)), shape=(N, len(genes_U)))
        U = sp.csr_matrix((np.concatenate(us[:N]), (rows, inv)), shape=(N, len(genes_U)))
        x = np.log1p(S.toarray())
        top = np.argsort(-x.var(0), kind="stable")[:2000]
        x = x[:, top] - x[:, top].mean(0)
        n_pcs = int(max(1, min(30, x.shape[1] - 1, N - 1)))
        _, v = np.linalg.eigh(x.T @ x)  # the covariance's eigenvectors (LAPACK's SVD is slow on some CPUs)
        pcs = x @ v[:, ::-1][:, :n_pcs]
        conn = kneighbors_graph(pcs, min(30, N - 1), mode="connectivity", include_self=False)
        conn = conn.maximum(conn.T).tocsr()
        op = conn + sp.identity(N, format="csr")
        op = sp.diags(1.0 / np.asarray(op.sum(1)).ravel()) @ op
        Ms, Mu = np.asarray(op @ S.toarray()), np.asarray(op @ U.toarray())
        ss = steady_state(Ms, Mu, TeacherConfig("steady_state"), where="velocity head warm start")
        keep = np.flatnonzero(ss.velocity_genes)
        if keep.size == 0:
            raise ValueError(f"VelocityHead warm start: none of {len(genes_U)} genes of {N} cells is a steady-state "
                             "velocity gene; nothing to fit")
        fit = fit_dynamics(Ms[:, keep], Mu[:, keep], ss.gamma[keep].astype(np.float64), conn,
                           DynamicalConfig(rounds=c.warm_start_rounds))
        ok = np.isfinite(fit.velocity).all(0) & np.all([np.isfinite(v) for v in fit.params.values()], axis=0)
        k = self.kinetics
        state = {name: t.detach().clone() for name, t in k.state_dict().items()}
        g = torch.as_tensor(genes_U[keep][ok])
        for name in PARAMS:
            state[f"params.{name}"][g] = torch.as_tensor(fit.params[name][ok], dtype=torch.float32)
        for name, x_G in (("log_sd_u", fit.sd_u), ("log_sd_s", fit.sd_s)):
            state[name][g] = torch.as_tensor(np.log(x_G[ok]), dtype=torch.float32)
        for name, x_G in (("scale_u", fit.scale_u), ("scale_s", fit.scale_s)):
            state[name][g] = torch.as_tensor(x_G[ok], dtype=torch.float32)
        state["fitted"][g] = True
        log.info("velocity head warm start: %d cells, %d of %d genes fitted (median r2 %.3f)", N, int(ok.sum()),
                 len(genes_U), float(np.median(fit.r2[ok])) if ok.any() else float("nan"))
        return {f"kinetics.{name}": t for name, t in state.items()}

    # --- losses ------------------------------------------------------------------------------------------------------
    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        if self.config.mode == "dynamical":
            return self._dynamical_loss(batch, outputs)
        return self._supervised_loss(batch, outputs)

    def _scaled_pair(self, batch, outputs, target_key, pred_key) -> tuple[Tensor, Tensor, Tensor] | None:
        query_BQ = outputs["query_mask"]
        target_BQ = batch[target_key]
        known_BQ = torch.isfinite(target_BQ) & query_BQ
        if not known_BQ.any():
            return None
        ids_U, col_BQ = batch_union(batch[keys.B_GENE_IDS], query_BQ)
        std_U = per_gene_std(target_BQ, known_BQ, col_BQ, ids_U.numel(), self.config.min_cells_for_std)
        scale_BQ = std_U[col_BQ]
        y_BQ = torch.where(known_BQ, target_BQ, torch.zeros_like(target_BQ)) / scale_BQ
        p_BQ = torch.where(known_BQ, outputs[pred_key] / scale_BQ, torch.zeros_like(y_BQ))
        return p_BQ, y_BQ, known_BQ

    def _supervised_loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        c = self.config
        if keys.B_VELOCITY not in batch:
            raise KeyError(f"VelocityHead(mode='supervised') needs the batch entry {keys.B_VELOCITY!r}")
        pair = self._scaled_pair(batch, outputs, keys.B_VELOCITY, "velocity")
        if pair is None:
            raise ValueError(f"VelocityHead: the batch has no known {keys.B_VELOCITY!r} target (all NaN)")
        p_BQ, y_BQ, known_BQ = pair
        parts = {"velocity_mse": ((p_BQ - y_BQ) ** 2)[known_BQ].mean()}
        total = parts["velocity_mse"]
        if c.supervised_loss == "cosine_mse":
            has_B = known_BQ.any(1)
            cos_B = (p_BQ * y_BQ).sum(1) / (p_BQ.norm(dim=1) * y_BQ.norm(dim=1)).clamp(min=_EPS)
            parts["velocity_cosine"] = (1.0 - cos_B)[has_B].mean()
            total = total + c.cosine_weight * parts["velocity_cosine"]
        if c.velocity_u_weight > 0 and keys.B_VELOCITY_U in batch:
            pair_u = self._scaled_pair(batch, outputs, keys.B_VELOCITY_U, "velocity_u")
            if pair_u is not None:
                pu_BQ, yu_BQ, known_u_BQ = pair_u
                parts["velocity_u_mse"] = ((pu_BQ - yu_BQ) ** 2)[known_u_BQ].mean()
                total = total + c.velocity_u_weight * parts["velocity_u_mse"]
        nonzero_BQ = known_BQ & (y_BQ != 0)
        metrics = {}
        if nonzero_BQ.any():
            metrics["sign_accuracy"] = (torch.sign(p_BQ) == torch.sign(y_BQ))[nonzero_BQ].float().mean().detach()
        return LossOutput(loss=total, parts=parts, metrics=metrics)
