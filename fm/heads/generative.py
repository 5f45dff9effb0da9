"""Generative decoder: a cell's future expression after a pseudo-time step, by iterative masked generation.

For each of the cell's genes a future token = the head's own gene embedding + an embedding of the gene's present
(s, u) + an embedding of the step dt + either the embedding of an already generated future (s, u) or a learned
[MASK] vector. A small transformer decoder (self-attention over the future tokens, cross-attention to all encoder
states, padding masked) predicts for every token a Gaussian over the future (s, u): mean = present + delta, and a
log-variance whose negative is the token's confidence.

Training (MaskGIT, Chang et al. 2022): pairs (cell i, later cell j) come from the batch: j is the nearest cell to i
in log1p expression among i's ``n_neighbours`` nearest that have a later ``B_TIME`` (a cell with none is left out),
dt = t_j - t_i, and the target is j's (s, u) at i's genes. A random fraction r = cos(pi/2 * U), U ~ Uniform(0, 1), of
the tokens is masked; the loss is the Gaussian NLL on the masked tokens.

Generation (``generate``): all future tokens start masked; each of ``n_iterations`` rounds predicts every token and
unmasks the most confident of the still-masked ones, so that after round t a fraction cos(pi/2 * t / T) stays masked
(at least one token is unmasked per round, none stays masked after the last).
``rollout`` repeats generate -> re-encode to give a trajectory.

Shapes: B cells, Q query genes (the batch's G tokens), L encoder states, D width, U genes of the batch's union,
T steps of a rollout.

    python -m pytest tests/unit/test_heads.py -q -k generative
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm import keys
from fm.heads.base import Head, LossOutput, check_fields
from fm.heads.expression import batch_union, build_config, densify, encoder_states

log = logging.getLogger(__name__)

_COUNT_KEYS = (
    keys.B_SPLICED_COUNTS,
    keys.B_UNSPLICED_COUNTS,
    keys.B_LIBRARY_SIZE_SPLICED,
    keys.B_LIBRARY_SIZE_UNSPLICED,
)


@dataclass
class GenerativeConfig:
    """Generative decoder settings."""

    n_layers: int = 2  # transformer decoder blocks (self-attention over future tokens + cross-attention)
    n_heads: int = 4  # attention heads
    mlp_ratio: int = 4  # MLP width = mlp_ratio * D
    dropout: float = 0.0
    n_iterations: int = 8  # generation rounds T
    n_neighbours: int = 8  # training pairs: the later partner is sought among this many nearest cells
    logvar_min: float = -8.0  # clamp of the predicted log-variance
    logvar_max: float = 4.0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("n_layers", "n_heads", "mlp_ratio", "n_iterations", "n_neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"GenerativeConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GenerativeConfig.dropout: must be in [0, 1), got {self.dropout}")
        if self.logvar_min >= self.logvar_max:
            raise ValueError(f"GenerativeConfig.logvar_min: must be < logvar_max, got {self.logvar_min}")


@torch.no_grad()
def later_partners(batch: dict, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each cell, the nearest of its k nearest cells (log1p expression) that is later in ``B_TIME``.

    Returns:
        (partner_B int64, valid_B bool, dt_B float; dt and partner are 0 where no later neighbour exists).
    """
    if keys.B_TIME not in batch:
        raise KeyError(f"GenerativeHead needs the batch entry {keys.B_TIME!r} to pair cells with later cells")
    ids_BG, mask_BG = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK].bool()
    t_B = batch[keys.B_TIME].float()
    ids_U, col_BG = batch_union(ids_BG, mask_BG)
    x_BX = torch.cat(
        [
            densify(batch[keys.B_SPLICED], col_BG, mask_BG, ids_U.numel()),
            densify(batch[keys.B_UNSPLICED], col_BG, mask_BG, ids_U.numel()),
        ],
        dim=1,
    )
    B = x_BX.shape[0]
    d_BB = torch.cdist(x_BX.float(), x_BX.float()).fill_diagonal_(float("inf"))
    idx_BK = d_BB.topk(min(k, max(B - 1, 1)), dim=1, largest=False).indices  # nearest first
    later_BK = t_B[idx_BK] > t_B[:, None]  # NaN times compare False
    valid_B = later_BK.any(1)
    first_B = later_BK.float().argmax(1)  # first True = nearest later neighbour
    partner_B = torch.where(valid_B, idx_BK.gather(1, first_B[:, None]).squeeze(1), torch.zeros_like(first_B))
    dt_B = torch.where(valid_B, t_B[partner_B] - t_B, torch.zeros_like(t_B))
    return partner_B, valid_B, dt_B


def cell_values_at(batch: dict, partner_B: Tensor) -> Tensor:
    """The partner cells' (s, u) at each cell's own genes: [B, G, 2] (0 where the partner lacks the gene)."""
    ids_BG, mask_BG = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK].bool()
    ids_U, col_BG = batch_union(ids_BG, mask_BG)
    out = []
    for key in (keys.B_SPLICED, keys.B_UNSPLICED):
        dense_BU = densify(batch[key], col_BG, mask_BG, ids_U.numel())
        out.append(dense_BU[partner_B[:, None], col_BG])
    return torch.stack(out, dim=-1)


class GenerativeHead(Head):
    """Future-state generator with MaskGIT-style iterative decoding and cross-attention to the encoder.

    Args:
        dim: the encoder's width D.
        vocab_size: rows of the gene vocabulary (index 0 is padding).
        config: a :class:`GenerativeConfig` (or a mapping of its fields).
    """

    def __init__(self, dim: int, vocab_size: int, config: GenerativeConfig | Mapping | None = None):
        super().__init__()
        self.config = c = build_config(GenerativeConfig, config)
        self.gene_embedding = nn.Embedding(vocab_size, dim)  # index 0 is a real gene; padding is masked
        nn.init.normal_(self.gene_embedding.weight, std=0.02)
        self.present_proj = nn.Linear(2, dim)
        self.future_proj = nn.Linear(2, dim)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.dt_mlp = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.memory_norm = nn.LayerNorm(dim)
        layer = nn.TransformerDecoderLayer(
            dim, c.n_heads, c.mlp_ratio * dim, c.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, c.n_layers, norm=nn.LayerNorm(dim))
        self.out = nn.Linear(dim, 4)  # delta (s, u), log-variance (s, u)

    def gene_table(self) -> nn.Embedding:
        return self.gene_embedding

    def decode(
        self, batch: dict, encoder_output, dt_B: Tensor, future_BG2: Tensor, known_BG: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One prediction pass: (mean [B, G, 2], logvar [B, G, 2]) of the future (s, u) of every token."""
        mask_BG = batch[keys.B_GENE_MASK].bool()
        present_BG2 = torch.stack([batch[keys.B_SPLICED], batch[keys.B_UNSPLICED]], dim=-1)
        value_BGD = torch.where(known_BG[..., None], self.future_proj(future_BG2), self.mask_token)
        dt_B1D = self.dt_mlp(dt_B.to(present_BG2.dtype)[:, None, None])
        x_BGD = self.gene_embedding(batch[keys.B_GENE_IDS]) + self.present_proj(present_BG2) + value_BGD + dt_B1D
        states_BLD, states_mask_BL = encoder_states(encoder_output)
        has_key_B = states_mask_BL.any(1, keepdim=True)
        y_BGD = self.blocks(
            x_BGD,
            self.memory_norm(states_BLD),
            tgt_key_padding_mask=~(mask_BG | ~mask_BG.any(1, keepdim=True)),  # an empty cell attends to padding
            memory_key_padding_mask=~(states_mask_BL | ~has_key_B),
        )
        out_BG4 = self.out(y_BGD)
        mean_BG2 = present_BG2 + out_BG4[..., :2]
        logvar_BG2 = out_BG4[..., 2:].clamp(self.config.logvar_min, self.config.logvar_max)
        return mean_BG2, logvar_BG2

    def forward(self, batch: dict, encoder_output) -> dict[str, Tensor]:
        """Training pass: pair cells with later cells, mask a random fraction of the future tokens, predict them."""
        partner_B, valid_B, dt_B = later_partners(batch, self.config.n_neighbours)
        target_BG2 = cell_values_at(batch, partner_B)
        mask_BG = batch[keys.B_GENE_MASK].bool()
        ratio_B = torch.cos(0.5 * math.pi * torch.rand(mask_BG.shape[0], device=mask_BG.device))
        masked_BG = (torch.rand(mask_BG.shape, device=mask_BG.device) < ratio_B[:, None]) & mask_BG
        mean_BG2, logvar_BG2 = self.decode(batch, encoder_output, dt_B, target_BG2, ~masked_BG)
        return {
            "mean": mean_BG2,
            "logvar": logvar_BG2,
            "target": target_BG2,
            "loss_mask": masked_BG & valid_B[:, None],
            "dt": dt_B,
        }

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        sel_BG = outputs["loss_mask"]
        if not sel_BG.any():
            raise ValueError(f"GenerativeHead.loss: no cell has a later neighbour in the batch (check {keys.B_TIME!r})")
        mean, logvar, target = outputs["mean"][sel_BG], outputs["logvar"][sel_BG], outputs["target"][sel_BG]
        nll = F.gaussian_nll_loss(mean, target, logvar.exp(), full=False, reduction="mean")
        mse = F.mse_loss(mean, target)
        return LossOutput(loss=nll, parts={"nll": nll}, metrics={"mse": mse.detach()})

    @torch.no_grad()
    def generate(self, batch: dict, encoder_output, dt: float | Tensor, n_iterations: int | None = None) -> dict:
        """The future (s, u) of every token after ``dt`` by iterative unmasking.

        Returns:
            dict with ``spliced`` and ``unspliced`` [B, G] (clamped >= 0, 0 at padding) and ``n_masked`` [T + 1]
            (the count of still-masked real tokens before the first and after every round).
        """
        T = n_iterations or self.config.n_iterations
        mask_BG = batch[keys.B_GENE_MASK].bool()
        B, G = mask_BG.shape
        dt_B = torch.as_tensor(dt, dtype=torch.float32, device=mask_BG.device).expand(B).clone()
        future_BG2 = torch.zeros(B, G, 2, device=mask_BG.device, dtype=batch[keys.B_SPLICED].dtype)
        known_BG = ~mask_BG  # padding counts as known so it is never picked
        n_real_B = mask_BG.sum(1)
        n_masked = [int(mask_BG.sum())]
        for it in range(T):
            mean_BG2, logvar_BG2 = self.decode(batch, encoder_output, dt_B, future_BG2, known_BG)
            keep_masked_B = torch.floor(n_real_B * math.cos(0.5 * math.pi * (it + 1) / T)).long()
            if it == T - 1:
                keep_masked_B = torch.zeros_like(keep_masked_B)
            n_unknown_B = (~known_BG).sum(1)
            # at least one token per round while any is masked (MaskGIT), so the rounds never stall
            n_unmask_B = torch.minimum((n_unknown_B - keep_masked_B).clamp(min=1), n_unknown_B)
            conf_BG = (-logvar_BG2.sum(-1)).masked_fill(known_BG, float("-inf"))
            rank_BG = conf_BG.argsort(1, descending=True).argsort(1)
            pick_BG = (rank_BG < n_unmask_B[:, None]) & ~known_BG
            future_BG2 = torch.where(pick_BG[..., None], mean_BG2.clamp(min=0), future_BG2)
            known_BG = known_BG | pick_BG
            n_masked.append(int((~known_BG).sum()))
        future_BG2 = future_BG2 * mask_BG[..., None]
        return {"spliced": future_BG2[..., 0], "unspliced": future_BG2[..., 1], "n_masked": torch.tensor(n_masked)}

    @torch.no_grad()
    def rollout(self, encoder, batch: dict, steps: int, dt: float, n_iterations: int | None = None) -> dict:
        """Generate ``steps`` successive future states, re-encoding each one.

        Returns:
            dict with ``spliced`` and ``unspliced`` [T + 1, B, G] (the present first) and ``time`` [T + 1].
        """
        if steps < 1:
            raise ValueError(f"rollout: steps must be >= 1, got {steps}")
        # counts and library sizes describe the present cell only; a generated state has none
        current = {k: v for k, v in batch.items() if k not in _COUNT_KEYS}
        spliced, unspliced = [current[keys.B_SPLICED]], [current[keys.B_UNSPLICED]]
        for _ in range(steps):
            gen = self.generate(current, encoder(current), dt, n_iterations)
            current = {**current, keys.B_SPLICED: gen["spliced"], keys.B_UNSPLICED: gen["unspliced"]}
            spliced.append(gen["spliced"])
            unspliced.append(gen["unspliced"])
        return {
            "spliced": torch.stack(spliced),
            "unspliced": torch.stack(unspliced),
            "time": torch.arange(steps + 1, dtype=torch.float32) * dt,
        }
