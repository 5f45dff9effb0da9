"""Contrastive pretraining head: spliced <-> unspliced InfoNCE, a fusion term, optional masked-value reconstruction.

Terms (weights in :class:`ContrastiveConfig`):
- ``modality``: symmetric InfoNCE between the spliced and unspliced representations of the same cell, against every
  other cell of the *global* batch (negatives gathered across ranks with gradient, :func:`fm.distributed.
  all_gather_with_grad`). The two modalities see disjoint tokens (Zorro mask), so matching them needs what the
  spliced and unspliced states of a cell share: its position on the kinetic trajectory.
- ``fusion``: symmetric InfoNCE of the fusion representation against each modality's, and the same for the global
  one (the mean of the four). One forward pass, no second view: the fusion tokens read both modalities and must
  identify the cell from either, so z_fusion (and z_global, a projection of all three) holds what identifies a cell
  in both; z_fusion is what the lineage probe reads.
- ``recon`` (optional, weight 0 turns it off and skips the masking): a fraction of the real tokens of each modality
  get their value replaced by ``mask_value`` (-1, outside the range of log1p values) before the encoder; a linear
  read-out of the same token's state predicts the original value (MSE on masked tokens). Modality tokens only see
  their own modality, so the value is predicted from the other genes of the same modality.

Gene-set shortcut and ``split_views``: both modalities of a cell are tokenised over the same genes (those with
s + u > 0), so the *set* of gene ids alone identifies a cell, and matching spliced to unspliced can be solved from
it without reading a single value (held-out retrieval reaches 1.0 while a lineage probe gets worse than on a random
encoder; docs/BENCHMARKS.md). With ``split_views`` (off by default until it is shown to help) each cell's real
genes are dealt at random into two disjoint views; the encoder runs on both, spliced representations come from
view A, unspliced ones from view B, and the fusion term pairs across views only (fusion of A with unspliced of B,
global of B with spliced of A). Matching then needs what
the two modalities share: the cell's state. It costs a second encoder pass.

Projection statistics and the one collective: each projection (Linear-BatchNorm-GELU-Linear) normalises with batch
statistics, and with per-rank statistics a rank's cells share a shift that the other ranks' cells (63 of 64
negatives at 64 ranks) lack, so the positive can be told from most negatives by the statistics alone: the leak MoCo's
shuffled BN exists to stop. The head gathers the four pooled representations once per step ([B, 4, D] -> [N, 4, D],
one ``all_gather_with_grad`` instead of one per InfoNCE term and side) and projects the *global* batch on every
rank: the statistics are those of one process holding all N cells, the same on every rank (what SyncBatchNorm
gives, without its CUDA-only collective or one all-reduce per projection). The projections' cost, 4·N·D·(D + P)
per rank, is small beside the encoder's. A per-sample LayerNorm would also close the leak but does not remove the
direction all cells share at init, which BatchNorm is there to remove.

One learned temperature for all InfoNCE terms, log-parametrised (``logit_scale = log(1/T)``) and clamped to
``[t_min, t_max]``. Shapes: B cells (local), N = world * B cells (global), G tokens, D width, P projection width.

    python -m pytest tests/unit/test_contrastive.py -q
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm import keys
from fm.distributed import all_gather_with_grad, get_rank, get_world_size
from fm.heads.base import Head, LossOutput, check_fields

# private batch entries written by ``prepare`` (the masked positions and the values they hid)
RECON_MASK = {keys.B_SPLICED: "_recon_mask_spliced", keys.B_UNSPLICED: "_recon_mask_unspliced"}
RECON_TARGET = {keys.B_SPLICED: "_recon_target_spliced", keys.B_UNSPLICED: "_recon_target_unspliced"}


@dataclass
class ContrastiveConfig:
    """Contrastive head settings."""

    proj_dim: int = 128  # width P of the projection each representation gets before the dot product
    w_modality: float = 1.0  # weight of the spliced <-> unspliced InfoNCE
    w_fusion: float = 0.5  # weight of the fusion/global <-> modalities InfoNCE
    w_recon: float = 0.0  # weight of masked-value reconstruction (0: off, no masking)
    mask_fraction: float = 0.15  # fraction of real tokens per modality masked when w_recon > 0
    mask_value: float = -1.0  # value the masked tokens get (outside log1p's range)
    temperature_init: float = 0.1  # initial InfoNCE temperature
    t_min: float = 0.01  # clamp of the learned temperature
    t_max: float = 1.0
    learn_temperature: bool = True
    split_views: bool = False  # spliced and unspliced read disjoint random halves of each cell's genes (two passes)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.proj_dim < 1:
            raise ValueError(f"ContrastiveConfig.proj_dim must be >= 1, got {self.proj_dim}")
        for name in ("w_modality", "w_fusion", "w_recon"):
            if getattr(self, name) < 0:
                raise ValueError(f"ContrastiveConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.mask_fraction < 1:
            raise ValueError(f"ContrastiveConfig.mask_fraction must be in (0, 1), got {self.mask_fraction}")
        if not 0 < self.t_min <= self.temperature_init <= self.t_max:
            raise ValueError(
                f"ContrastiveConfig: need 0 < t_min <= temperature_init <= t_max, got "
                f"{self.t_min}, {self.temperature_init}, {self.t_max}"
            )


def info_nce(q_BP: Tensor, k_NP: Tensor, logit_scale: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """InfoNCE of local queries against global keys; query i's positive is key ``offset + i``.

    Returns the mean cross-entropy and the top-1 retrieval accuracy (fraction of queries whose best key is theirs).
    """
    logits_BN = logit_scale.exp() * q_BP @ k_NP.T
    labels_B = torch.arange(q_BP.shape[0], device=q_BP.device) + offset
    loss = F.cross_entropy(logits_BN.float(), labels_B)
    acc = (logits_BN.argmax(dim=1) == labels_B).float().mean()
    return loss, acc


def symmetric_info_nce(a_NP: Tensor, b_NP: Tensor, logit_scale: Tensor,
                       rows: slice | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of InfoNCE a->b and b->a over the global batch [N, P]; the local queries are ``rows`` (default: all).

    Returns (loss, acc a->b, acc b->a).
    """
    rows = rows or slice(0, a_NP.shape[0])
    loss_ab, acc_ab = info_nce(a_NP[rows], b_NP, logit_scale, rows.start)
    loss_ba, acc_ba = info_nce(b_NP[rows], a_NP, logit_scale, rows.start)
    return 0.5 * (loss_ab + loss_ba), acc_ab, acc_ba


def local_rows(n_global: int) -> slice:
    """This rank's rows of a global batch gathered in rank order."""
    b = n_global // get_world_size()
    return slice(get_rank() * b, (get_rank() + 1) * b)


def _projection(dim: int, proj_dim: int) -> nn.Module:
    # BatchNorm (as in SimCLR's projector) removes what all cells share: at init the pooled vectors of different
    # cells point almost the same way, every logit is equal, and without it InfoNCE sits at log(N) for many steps
    # (a per-sample LayerNorm does not remove a direction shared across cells, so it is no substitute).
    # Batch statistics always (no running buffers): projections only serve the loss, which is computed per batch,
    # and a skipped non-finite step then leaves no NaN behind in a buffer. The head runs it on the *global* batch
    # (see ContrastiveHead.forward), never on one rank's cells.
    return nn.Sequential(
        nn.Linear(dim, dim), nn.BatchNorm1d(dim, track_running_stats=False), nn.GELU(), nn.Linear(dim, proj_dim)
    )


class ContrastiveHead(Head):
    """Projections, learned temperature and the reconstruction read-out of contrastive pretraining.

    Args:
        dim: the encoder's width D.
        config: a :class:`ContrastiveConfig` (or a dict of its fields).
    """

    def __init__(self, dim: int, config: ContrastiveConfig | dict | None = None):
        super().__init__()
        config = ContrastiveConfig(**config) if isinstance(config, dict) else (config or ContrastiveConfig())
        self.config = config
        self.proj_spliced = _projection(dim, config.proj_dim)
        self.proj_unspliced = _projection(dim, config.proj_dim)
        self.proj_fusion = _projection(dim, config.proj_dim)
        self.proj_global = _projection(dim, config.proj_dim)
        # shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1.0 / config.temperature_init)), requires_grad=config.learn_temperature
        )
        if config.w_recon > 0:  # only when used: DDP insists every parameter gets a gradient
            self.recon = nn.ModuleDict({"spliced": nn.Linear(dim, 1), "unspliced": nn.Linear(dim, 1)})

    @property
    def temperature(self) -> float:
        return float(1.0 / self._clamped_scale().exp())

    def _clamped_scale(self) -> Tensor:
        c = self.config
        return self.logit_scale.clamp(math.log(1.0 / c.t_max), math.log(1.0 / c.t_min)).squeeze(0)

    def prepare(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Mask ``mask_fraction`` of each modality's real tokens when reconstruction is on (else no-op)."""
        if self.config.w_recon == 0:
            return batch
        batch = dict(batch)
        real_BG = batch[keys.B_GENE_MASK]
        for key in (keys.B_SPLICED, keys.B_UNSPLICED):
            values_BG = batch[key]
            u_BG = torch.rand(values_BG.shape, generator=generator, device="cpu").to(values_BG.device)
            mask_BG = (u_BG < self.config.mask_fraction) & real_BG
            batch[RECON_MASK[key]] = mask_BG
            batch[RECON_TARGET[key]] = values_BG
            batch[key] = torch.where(mask_BG, torch.full_like(values_BG, self.config.mask_value), values_BG)
        return batch

    def split(self, batch: dict, generator: torch.Generator | None = None) -> tuple[dict, dict]:
        """Two views with disjoint random halves of each cell's real genes (A for spliced, B for unspliced)."""
        real_BG = batch[keys.B_GENE_MASK]
        coin_BG = (torch.rand(real_BG.shape, generator=generator, device="cpu") < 0.5).to(real_BG.device)
        views = []
        for keep_BG, key in ((real_BG & coin_BG, keys.B_SPLICED), (real_BG & ~coin_BG, keys.B_UNSPLICED)):
            view = dict(batch)
            view[keys.B_GENE_MASK] = keep_BG
            view[keys.B_GENE_IDS] = batch[keys.B_GENE_IDS] * keep_BG
            if RECON_MASK[key] in batch:  # reconstruct only what the view that predicts it contains
                view[RECON_MASK[key]] = batch[RECON_MASK[key]] & keep_BG
            views.append(view)
        return views[0], views[1]

    def forward_views(self, view_a: dict, out_a, view_b: dict, out_b) -> dict[str, Tensor]:
        """Outputs from two views: spliced, fusion from A; unspliced, global from B (see ``split_views``)."""
        merged = type(out_a)(**{**vars(out_a), "z_unspliced": out_b.z_unspliced, "z_global": out_b.z_global,
                                "h_unspliced": out_b.h_unspliced})
        out = self.forward(view_a, merged)
        out["cross_view"] = torch.ones(())
        return out

    def forward(self, batch: dict, encoder_output) -> dict[str, Tensor]:
        """Projections of the global batch: ``p_*`` [N, P] (N = world * B, rank order), and the recon read-outs."""
        reps = (encoder_output.z_spliced, encoder_output.z_unspliced, encoder_output.z_fusion, encoder_output.z_global)
        z_N4D = all_gather_with_grad(torch.stack(reps, dim=1))  # the step's one collective: 4 reps, one call
        projections = (self.proj_spliced, self.proj_unspliced, self.proj_fusion, self.proj_global)
        out = {f"p_{name}": F.normalize(proj(z_N4D[:, i]), dim=-1)
               for i, (name, proj) in enumerate(zip(("spliced", "unspliced", "fusion", "global"), projections))}
        out["logit_scale"] = self._clamped_scale()
        if self.config.w_recon > 0:
            out["recon_spliced"] = self.recon["spliced"](encoder_output.h_spliced).squeeze(-1)  # [B, G]
            out["recon_unspliced"] = self.recon["unspliced"](encoder_output.h_unspliced).squeeze(-1)
        return out

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        c, scale = self.config, outputs["logit_scale"]
        s, u, f = outputs["p_spliced"], outputs["p_unspliced"], outputs["p_fusion"]
        rows = local_rows(s.shape[0])
        modality, acc_su, acc_us = symmetric_info_nce(s, u, scale, rows)
        g = outputs["p_global"]
        pairs = ((f, u), (g, s)) if "cross_view" in outputs else ((f, s), (f, u), (g, s), (g, u))
        fusion = sum(symmetric_info_nce(rep, mod, scale, rows)[0] for rep, mod in pairs) / len(pairs)
        parts = {"modality": modality, "fusion": fusion}
        total = c.w_modality * modality + c.w_fusion * fusion
        if c.w_recon > 0:
            recon = 0.5 * sum(
                _masked_mse(outputs[f"recon_{name}"], batch[RECON_TARGET[key]], batch[RECON_MASK[key]])
                for name, key in (("spliced", keys.B_SPLICED), ("unspliced", keys.B_UNSPLICED))
            )
            parts["recon"] = recon
            total = total + c.w_recon * recon
        metrics = {"acc_s2u": acc_su, "acc_u2s": acc_us, "temperature": 1.0 / scale.detach().exp()}
        return LossOutput(loss=total, parts=parts, metrics=metrics)


def _masked_mse(pred_BG: Tensor, target_BG: Tensor, mask_BG: Tensor) -> Tensor:
    mask = mask_BG.to(pred_BG.dtype)
    return ((pred_BG - target_BG) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)
