"""Velocity decoder: per-gene RNA velocity and cell-specific kinetic rates (alpha, beta, gamma) from encoder states.

The same gene-query cross-attention pooling as the expression decoder (:class:`fm.heads.expression.GeneQueryDecoder`)
gives, for every token (cell i, gene g), five numbers: a free ds/dt and du/dt, and logits of alpha, beta, gamma
(rates = ``rate_max * sigmoid(logit)``, positive and bounded, as cellDancer's sigmoid-scaled rates).
``velocity_param`` picks what the velocity is:
- ``direct``: the free ds/dt, du/dt;
- ``rates``: the kinetic model on the input values, ds/dt = beta u - gamma s, du/dt = alpha - beta u (cellDancer);
- ``auto`` (default): ``direct`` when supervised, ``rates`` when kinetic, resolved on construction. Why: the kinetic
  loss only asks that the velocity point at some neighbour, which a free velocity satisfies pointing backwards as
  well as forwards; positive rates tie the direction to the kinetics (ds/dt > 0 above the gene's steady-state line
  u = gamma/beta s). On a simulation of new kinetics (bench/velocity_quality.py's NEW_KINETICS, 400 steps) the
  kinetic mode reached Spearman 0.15, sign accuracy 0.53 with ``direct`` and 0.20, 0.57 with ``rates``.

Training modes (``mode``):
- ``supervised`` on ``B_VELOCITY`` (and ``B_VELOCITY_U`` when present), NaN entries masked. Loss: MSE after dividing
  every gene by the standard deviation of its target over the batch. Why: velocity magnitudes differ by orders of
  magnitude between genes (they scale with expression and rates), so raw MSE would fit a handful of genes; the
  evaluation (per-gene Spearman, sign accuracy, per-gene-scaled cosine, DESIGN.md §8) weighs every gene equally,
  and the per-gene-scaled MSE is the loss that matches it. ``cosine_mse`` adds ``cosine_weight`` x (1 - per-cell
  cosine of the scaled vectors), which stresses each cell's direction (what CBDir and projections read) but alone is
  blind to how velocity varies across cells within a gene, hence only as an addition.
- ``kinetic`` (self-supervised, no target; cellDancer, Li et al. 2023): the predicted one-step displacement of
  token (i, g) in the gene's (u, s) plane, (du/dt, ds/dt), should point at one of the cell's neighbours j:
  loss = mean over tokens of 1 - max_j cos((du, ds)_ig, (u_jg - u_ig, s_jg - s_ig)). Neighbours come from the batch:
  ``neighbour_space="gene"`` takes the k nearest cells in that gene's (u, s) plane (cellDancer), ``"expression"`` the
  k nearest cells in the batch's log1p expression.

(u, s) are the moments over the dataset's neighbourhood (``B_MU``, ``B_MS``, fm.velocity.neighbours) wherever the
batch has them, as every peer works on moments, and the cell's own values otherwise; this holds for the ``rates``
velocity and for the kinetic loss alike.

Shapes: B cells, Q query genes (the batch's G tokens), K neighbours, U genes of the batch's union, D width.

    python -m pytest tests/unit/test_heads.py -q -k velocity
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fm import keys
from fm.heads.base import Head, LossOutput, PredictLayer, check_fields
from fm.heads.expression import GeneQuery, GeneQueryDecoder, batch_union, build_config, densify

log = logging.getLogger(__name__)

_EPS = 1e-8


@dataclass
class VelocityConfig:
    """Velocity decoder settings."""

    mode: str = "supervised"  # supervised (on B_VELOCITY) | kinetic (self-supervised, cellDancer-style)
    velocity_param: str = "auto"  # direct (free ds/dt, du/dt) | rates (beta u - gamma s, alpha - beta u) | auto
    supervised_loss: str = "mse"  # mse (per-gene scaled) | cosine_mse (adds cosine_weight * (1 - per-cell cosine))
    cosine_weight: float = 1.0  # weight of the cosine term of cosine_mse
    velocity_u_weight: float = 1.0  # weight of the du/dt term when the batch has B_VELOCITY_U (0: ignore it)
    min_cells_for_std: int = 3  # a gene with fewer known targets in the batch is scaled by the median gene std
    n_neighbours: int = 8  # kinetic: neighbours K per cell (or per token in the gene plane)
    neighbour_space: str = "gene"  # kinetic: gene ((u, s) plane of each gene) | expression (log1p of the batch)
    rate_max: float = 10.0  # upper bound of alpha, beta, gamma
    n_heads: int = 4  # heads of the cross-attention pooling
    hidden_mult: int = 2  # MLP hidden width = hidden_mult * D

    def __post_init__(self) -> None:
        check_fields(self)
        choices = {
            "mode": ("supervised", "kinetic"),
            "velocity_param": ("direct", "rates", "auto"),
            "supervised_loss": ("mse", "cosine_mse"),
            "neighbour_space": ("gene", "expression"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"VelocityConfig.{name}: must be one of {valid}, got {getattr(self, name)!r}")
        if self.velocity_param == "auto":  # see the module docstring
            self.velocity_param = "rates" if self.mode == "kinetic" else "direct"
        for name in ("n_neighbours", "n_heads", "hidden_mult", "min_cells_for_std"):
            if getattr(self, name) < 1:
                raise ValueError(f"VelocityConfig.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("cosine_weight", "velocity_u_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"VelocityConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if self.rate_max <= 0:
            raise ValueError(f"VelocityConfig.rate_max: must be > 0, got {self.rate_max}")


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


@torch.no_grad()
def kinetic_neighbours(batch: dict, k: int, space: str) -> tuple[Tensor, Tensor]:
    """(u, s) of each token's neighbours at the same gene: ([B, Q, K], [B, Q, K]), K = min(k, B - 1)."""
    ids_BQ, mask_BQ = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK].bool()
    u_BQ, s_BQ = kinetic_state(batch)
    B = ids_BQ.shape[0]
    if B < 2:
        raise ValueError("kinetic loss needs at least 2 cells in the batch")
    ids_U, col_BQ = batch_union(ids_BQ, mask_BQ)
    u_BU = densify(u_BQ, col_BQ, mask_BQ, ids_U.numel())
    s_BU = densify(s_BQ, col_BQ, mask_BQ, ids_U.numel())
    if space == "gene":
        K = min(k, B - 1)
        # every cell's (u, s) at each token's gene: [B_j, B_i, Q] -> [B_i, Q, B_j]
        u_BQB, s_BQB = u_BU[:, col_BQ].permute(1, 2, 0), s_BU[:, col_BQ].permute(1, 2, 0)
        d_BQB = (u_BQB - u_BQ[..., None]) ** 2 + (s_BQB - s_BQ[..., None]) ** 2
        eye_B1B = torch.eye(B, dtype=torch.bool, device=d_BQB.device)[:, None, :]
        idx_BQK = d_BQB.masked_fill(eye_B1B, float("inf")).topk(K, dim=-1, largest=False).indices
        return u_BQB.gather(-1, idx_BQK), s_BQB.gather(-1, idx_BQK)
    x_BX = torch.cat([s_BU, u_BU], dim=1)
    d_BB = torch.cdist(x_BX, x_BX).fill_diagonal_(float("inf"))
    idx_BK = d_BB.topk(min(k, B - 1), dim=-1, largest=False).indices
    # neighbour j's value at cell i's genes: dense[j, col[i, q]]
    return u_BU[idx_BK[:, None, :], col_BQ[..., None]], s_BU[idx_BK[:, None, :], col_BQ[..., None]]


def max_neighbour_cosine(
    u_BQ: Tensor, s_BQ: Tensor, vu_BQ: Tensor, vs_BQ: Tensor, nb_u_BQK: Tensor, nb_s_BQK: Tensor
) -> Tensor:
    """max_j cos((vu, vs), (u_j - u, s_j - s)) per token [B, Q]; a zero displacement or velocity scores 0."""
    du_BQK, ds_BQK = nb_u_BQK - u_BQ[..., None], nb_s_BQK - s_BQ[..., None]
    dot_BQK = du_BQK * vu_BQ[..., None] + ds_BQK * vs_BQ[..., None]
    norm_BQK = torch.sqrt(du_BQK**2 + ds_BQK**2 + _EPS**2) * torch.sqrt(vu_BQ**2 + vs_BQ**2 + _EPS**2)[..., None]
    return (dot_BQK / norm_BQK).max(dim=-1).values


class VelocityHead(Head):
    """Per-gene velocity and cell-specific alpha, beta, gamma; supervised or kinetic loss by config.

    Args:
        dim: the encoder's width D.
        vocab_size: rows of the gene vocabulary (index 0 is padding).
        config: a :class:`VelocityConfig` (or a mapping of its fields).
    """

    def __init__(self, dim: int, vocab_size: int, config: VelocityConfig | Mapping | None = None):
        super().__init__()
        self.config = c = build_config(VelocityConfig, config)
        self.decoder = GeneQueryDecoder(dim, vocab_size, c.n_heads, 5, c.hidden_mult)

    def predict_layers(self) -> dict[str, PredictLayer]:
        how = self.config.velocity_param
        rate = "rate {} per cell and gene (model units, in (0, rate_max))"
        return {
            "velocity": PredictLayer(keys.LAYER_VELOCITY,
                                     f"ds/dt, normalised log1p spliced units per unit time (velocity_param={how})"),
            "velocity_u": PredictLayer(keys.LAYER_VELOCITY_U,
                                       f"du/dt, normalised log1p unspliced units per unit time (velocity_param={how})"),
            "alpha": PredictLayer(keys.LAYER_ALPHA, "transcription " + rate.format("alpha")),
            "beta": PredictLayer(keys.LAYER_BETA, "splicing " + rate.format("beta")),
            "gamma": PredictLayer(keys.LAYER_GAMMA, "degradation " + rate.format("gamma")),
        }

    def forward(self, batch: dict, encoder_output, query: GeneQuery | None = None) -> dict[str, Tensor]:
        """Per query gene: velocity (ds/dt), velocity_u (du/dt), alpha, beta, gamma, and the query mask.

        ``query``: predict these genes (with their own u, s values) instead of the batch's tokens (fm.predict).
        """
        c = self.config
        if query is None:
            raw_BQ5, _ = self.decoder(batch[keys.B_GENE_IDS], encoder_output)
            u_BQ, s_BQ = kinetic_state(batch)
            query_BQ = batch[keys.B_GENE_MASK].bool()
        else:
            raw_BQ5, _ = self.decoder(query.gene_ids_BQ, encoder_output, query.token_BQ)
            u_BQ, s_BQ, query_BQ = query.unspliced_BQ, query.spliced_BQ, query.mask_BQ.bool()
        alpha_BQ, beta_BQ, gamma_BQ = (c.rate_max * torch.sigmoid(raw_BQ5[..., 2:])).unbind(-1)
        if c.velocity_param == "rates":
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

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        if self.config.mode == "kinetic":
            return self._kinetic_loss(batch, outputs)
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

    def _kinetic_loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        c = self.config
        nb_u_BQK, nb_s_BQK = kinetic_neighbours(batch, c.n_neighbours, c.neighbour_space)
        u_BQ, s_BQ = kinetic_state(batch)
        cos_BQ = max_neighbour_cosine(
            u_BQ,
            s_BQ,
            outputs["velocity_u"],
            outputs["velocity"],
            nb_u_BQK,
            nb_s_BQK,
        )
        query_BQ = outputs["query_mask"]
        kinetic = (1.0 - cos_BQ)[query_BQ].mean()
        return LossOutput(
            loss=kinetic, parts={"kinetic": kinetic}, metrics={"max_cosine": cos_BQ[query_BQ].mean().detach()}
        )
