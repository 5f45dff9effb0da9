"""cellDancer (Li et al. 2023) as an fm head: one small network per gene, every gene trained at once.

For each gene g a network (u, s) -> 100 -> 100 -> 3 (leaky ReLU, then sigmoid) gives per-cell rates; as in the
package, the three outputs are (β, γ, α) scaled by (1, γ0, α0) with α0 = 2·u_max and γ0 = u_max / s_max. One Euler step
of du/dt = α − βu, ds/dt = βu − γs with dt = 0.5 predicts the next (u, s), in coordinates divided by the gene's
maxima. A cell's cost is 1 − the largest cosine between its predicted displacement and the displacements toward its
neighbours: the 30 nearest points of the gene's (u, s) plane, the cell itself included and then dropped (29 others),
as ``sklearn.NearestNeighbors`` does there; a zero-length displacement counts as cosine 1, as in the package. When
training with ``norm_cell_distribution`` (the package default), points are rounded to a 0.01 grid of the normalised
plane and duplicates are dropped, so a gene is fitted on its distinct points.

The weights of all genes live in [V, ...] tensors used through batched matmuls, so one step trains every gene, and
gene g's weights only ever see gene g's data (a test checks this). The loss is the *sum* over genes of each gene's
mean cost, so each gene's gradient is the one its own network would get alone. The package also starts each gene
from one of two pretrained networks and stops each gene early; here every gene starts from PyTorch's default
``nn.Linear`` initialisation (seeded) and runs the steps it is given.

    .venv/bin/python -m pytest -q tests/unit/test_baselines.py -k celldancer     # CPU, seconds

Legend: B cells, G gene tokens per cell, V modelled genes, K neighbours, H hidden units.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm import keys
from fm.baselines.common import check_positive, densify
from fm.heads.base import Head, LossOutput, check_fields

log = logging.getLogger(__name__)


@dataclass
class CellDancerConfig:
    """cellDancer settings (defaults as the package's ``velocity``)."""

    n_genes: int  # V, genes modelled: vocabulary indices 0..V-1
    n_hidden: int = 100  # hidden units of both hidden layers
    n_neighbors: int = 30  # neighbours in each gene's (u, s) plane, the cell itself included (as sklearn)
    dt: float = 0.5  # Euler step
    initial_zoom: float = 2.0  # α0 = initial_zoom · u_max
    initial_stretch: float = 1.0  # γ0 = initial_stretch · u_max / s_max
    norm_cell_distribution: bool = True  # fit on the distinct points of a 0.01 grid of the normalised plane
    input: Literal["normalized", "counts"] = "normalized"  # normalised counts (expm1 of the log1p values) or raw
    learning_rate: float = 1e-3  # the package's Adam settings (for the task or bench that builds the optimiser)
    weight_decay: float = 4e-3
    fit_fraction: float = 1.0  # share of each gene's distinct points fitted per step (the package: 0.125 per epoch
    # over all cells; a streaming batch is already a sample)
    gene_chunk: int = 256  # genes per block of the networks and the kNN (memory: gene_chunk · B² distances)

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "n_genes", "n_hidden", "dt", "initial_zoom", "initial_stretch", "gene_chunk")
        if not 0 < self.fit_fraction <= 1:
            raise ValueError(f"CellDancerConfig.fit_fraction: must be in (0, 1], got {self.fit_fraction!r}")
        if self.n_neighbors < 2:
            raise ValueError(
                f"CellDancerConfig.n_neighbors: must be >= 2 (the cell and one other), got {self.n_neighbors}"
            )


class CellDancerHead(Head):
    """Per-gene kinetic networks; ``forward`` gives per cell-gene α, β, γ and velocity, ``loss`` the cosine cost."""

    def __init__(self, config: CellDancerConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else CellDancerConfig(**kwargs)
        V, H = self.config.n_genes, self.config.n_hidden
        shapes = [(2, H), (H, H), (H, 3)]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(V, a, b)) for a, b in shapes)  # [V, in, out]
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(V, 1, b)) for _, b in shapes)  # [V, 1, out]
        for w, b in zip(self.weights, self.biases, strict=True):  # nn.Linear's default: U(±1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def optimizer(self) -> torch.optim.Optimizer:
        """Adam with the package's settings (lr 1e-3, betas 0.9/0.999, eps 1e-8, L2 weight decay 4e-3)."""
        c = self.config
        return torch.optim.Adam(self.parameters(), lr=c.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=c.weight_decay)  # fmt: skip

    def dense_us(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Dense unspliced and spliced [B, V] in the configured units."""
        ids, mask, V = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK], self.config.n_genes
        if self.config.input == "counts":
            u, s = batch[keys.B_UNSPLICED_COUNTS], batch[keys.B_SPLICED_COUNTS]
        else:
            u, s = torch.expm1(batch[keys.B_UNSPLICED]), torch.expm1(batch[keys.B_SPLICED])
        dtype = self.weights[0].dtype
        return densify(ids, mask, u.to(dtype), V), densify(ids, mask, s.to(dtype), V)

    def rates(self, u_VB: Tensor, s_VB: Tensor, alpha0_V1: Tensor, gamma0_V1: Tensor, params=None):
        """Per-gene networks on normalised (u, s): α, β, γ, each [V, B]. ``params``: [(weight, bias)] per layer for
        these V genes (default: every gene's own)."""
        h = torch.stack([u_VB, s_VB], dim=-1)  # [V, B, 2]
        params = params if params is not None else list(zip(self.weights, self.biases, strict=True))
        for i, (w, b) in enumerate(params):
            h = torch.baddbmm(b, h, w)
            h = F.leaky_relu(h) if i < 2 else torch.sigmoid(h)
        return h[..., 2] * alpha0_V1, h[..., 0], h[..., 1] * gamma0_V1

    def _displacement(self, u, s, umax, smax, params) -> dict[str, Tensor]:
        c = self.config
        alpha, beta, gamma = self.rates(u, s, c.initial_zoom * umax, c.initial_stretch * umax / smax, params)
        return {"alpha": alpha, "beta": beta, "gamma": gamma,
                "du": (alpha - beta * u) * c.dt, "ds": (beta * u - gamma * s) * c.dt}  # fmt: skip

    def forward(self, batch: dict, encoder_output=None) -> dict[str, Tensor]:
        """Training: the fitted points of each gene, compacted to [V, P] (``valid`` marks real ones), for ``loss``.
        Evaluation: per cell-gene α, β, γ (normalised plane) and velocities (input units per unit time), [B, V]."""
        c = self.config
        u_BV, s_BV = self.dense_us(batch)
        u_VB, s_VB = u_BV.T.contiguous(), s_BV.T.contiguous()
        # a gene without counts in the batch: divide by 1 instead of 0 (all its points coincide; its cost is 0)
        umax_V1 = u_VB.amax(dim=1, keepdim=True)
        smax_V1 = s_VB.amax(dim=1, keepdim=True)
        umax_V1 = torch.where(umax_V1 > 0, umax_V1, torch.ones_like(umax_V1))
        smax_V1 = torch.where(smax_V1 > 0, smax_V1, torch.ones_like(smax_V1))
        un_VB, sn_VB = u_VB / umax_V1, s_VB / smax_V1
        if not self.training:
            return self._predict(un_VB, sn_VB, umax_V1, smax_V1)
        valid_VB = torch.ones_like(un_VB, dtype=torch.bool)
        if c.norm_cell_distribution:
            un_VB, sn_VB = torch.round(un_VB, decimals=2), torch.round(sn_VB, decimals=2)
            valid_VB = first_occurrence(un_VB, sn_VB)
        if c.fit_fraction < 1:
            valid_VB = subsample(valid_VB, c.fit_fraction)
        # compact each gene to its fitted points; networks run per block of genes with similar counts
        n_V = valid_VB.sum(dim=1)
        P = max(int(n_V.max()), 1)
        pos_VP = compact_positions(valid_VB, P)
        u_VP, s_VP = torch.gather(un_VB, 1, pos_VP), torch.gather(sn_VB, 1, pos_VP)
        valid_VP = torch.arange(P, device=n_V.device)[None, :] < n_V[:, None]
        # genes sorted by their number of points, so that each block of networks runs on about its own width;
        # one gather of the weights per step (a view per block), not one per block
        order = torch.argsort(n_V, descending=True, stable=True)
        params = [(w[order], b[order]) for w, b in zip(self.weights, self.biases, strict=True)]
        du_parts, ds_parts = [], []
        for g0 in range(0, len(order), c.gene_chunk):
            g = order[g0 : g0 + c.gene_chunk]
            p = max(int(n_V[g].max()), 1)
            block = [(w[g0 : g0 + c.gene_chunk], b[g0 : g0 + c.gene_chunk]) for w, b in params]
            out = self._displacement(u_VP[g, :p], s_VP[g, :p], umax_V1[g], smax_V1[g], block)
            du_parts.append(F.pad(out["du"], (0, P - p)))
            ds_parts.append(F.pad(out["ds"], (0, P - p)))
        inverse = torch.argsort(order)
        du_VP, ds_VP = torch.cat(du_parts)[inverse], torch.cat(ds_parts)[inverse]
        return {"u": u_VP, "s": s_VP, "du": du_VP, "ds": ds_VP, "valid": valid_VP, "u_max": umax_V1, "s_max": smax_V1}

    @torch.no_grad()
    def _predict(self, un_VB: Tensor, sn_VB: Tensor, umax_V1: Tensor, smax_V1: Tensor) -> dict[str, Tensor]:
        c, parts = self.config, []
        for g0 in range(0, un_VB.shape[0], c.gene_chunk):
            g = slice(g0, g0 + c.gene_chunk)
            block = [(w[g], b[g]) for w, b in zip(self.weights, self.biases, strict=True)]
            parts.append(self._displacement(un_VB[g], sn_VB[g], umax_V1[g], smax_V1[g], block))
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {
            "u": un_VB, "s": sn_VB, "du": out["du"], "ds": out["ds"], "valid": torch.ones_like(un_VB, dtype=torch.bool),
            "u_max": umax_V1, "s_max": smax_V1,
            "alpha": out["alpha"].T, "beta": out["beta"].T, "gamma": out["gamma"].T,
            "velocity": (out["ds"] / c.dt * smax_V1).T, "velocity_u": (out["du"] / c.dt * umax_V1).T,
        }  # fmt: skip

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        cost_VB = cosine_cost(
            outputs["u"], outputs["s"], outputs["du"], outputs["ds"], outputs["valid"],
            outputs["u_max"], outputs["s_max"], self.config.n_neighbors, self.config.gene_chunk,
        )  # fmt: skip
        valid = outputs["valid"].to(cost_VB.dtype)
        per_gene_V = (cost_VB * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        return LossOutput(loss=per_gene_V.sum(), parts={"cosine_cost": per_gene_V.mean()})


def subsample(valid_VB: Tensor, fraction: float) -> Tensor:
    """Keep each valid point with probability ``fraction`` (the package keeps exactly round(fraction · n) of a gene's
    n points; a Bernoulli draw has that mean and needs no per-gene sort)."""
    return valid_VB & (torch.rand(valid_VB.shape, device=valid_VB.device) < fraction)


def compact_positions(valid_VB: Tensor, width: int) -> Tensor:
    """[V, width] source positions of each gene's valid points, in order; padded with the position of the last."""
    slot_VB = (valid_VB.cumsum(dim=1) - 1).masked_fill(~valid_VB, width)
    src_VB = torch.arange(valid_VB.shape[1], device=valid_VB.device).expand_as(slot_VB)
    pos = torch.full((valid_VB.shape[0], width + 1), valid_VB.shape[1] - 1, dtype=torch.long, device=valid_VB.device)
    return pos.scatter_(1, slot_VB, src_VB)[:, :width]


def first_occurrence(u_VB: Tensor, s_VB: Tensor) -> Tensor:
    """True [V, B] at the first cell of each distinct (u, s) point of each gene (points on the 0.01 grid of [0, 1]²).

    A table of the 101 x 101 grid cells per gene holds the smallest cell index that lands there: O(V·B), no sort.
    """
    V, B = u_VB.shape
    key_VB = torch.round(u_VB * 100).long().clamp(0, 100) * 101 + torch.round(s_VB * 100).long().clamp(0, 100)
    cell_VB = torch.arange(B, dtype=torch.int32, device=u_VB.device).expand(V, B)
    table = torch.full((V, 101 * 101), B, dtype=torch.int32, device=u_VB.device)
    table.scatter_reduce_(1, key_VB, cell_VB, reduce="amin")
    return torch.gather(table, 1, key_VB) == cell_VB


def cosine_cost(
    u_VB: Tensor, s_VB: Tensor, du_VB: Tensor, ds_VB: Tensor, valid_VB: Tensor,
    umax_V1: Tensor, smax_V1: Tensor, n_neighbors: int, gene_chunk: int,
) -> Tensor:  # fmt: skip
    """cellDancer's per-cell cost [V, B]: 1 − max cosine between (du, ds) and the displacements to the neighbours.

    Neighbours are searched among a gene's valid points in its unnormalised (u, s) plane (the package's "embedding"),
    while the displacements are taken in the normalised plane, as the package does. Invalid points get cost 0.
    Genes are processed in blocks of similar valid-point counts, each block compacted to its valid points, so the
    B² neighbour search runs over the distinct points only.
    """
    n_valid_V = valid_VB.sum(dim=1)
    gene_order = torch.argsort(n_valid_V, descending=True, stable=True)
    blocks = []
    for g0 in range(0, u_VB.shape[0], gene_chunk):
        g = gene_order[g0 : g0 + gene_chunk]
        n = int(n_valid_V[g].max())
        if n < 2:  # no gene of the block has a neighbour to compare with
            blocks.append(torch.zeros(len(g), u_VB.shape[1], dtype=u_VB.dtype, device=u_VB.device))
            continue
        pos = compact_positions(valid_VB[g], n)  # valid points first
        u, s, du, ds = (torch.gather(x[g], 1, pos) for x in (u_VB, s_VB, du_VB, ds_VB))
        valid = torch.arange(n, device=pos.device)[None, :] < n_valid_V[g, None]
        cost = _block_cost(u, s, du, ds, valid, umax_V1[g], smax_V1[g], n_neighbors)
        # padding repeats a position with cost 0, so adding is exact
        blocks.append(
            torch.zeros(len(g), u_VB.shape[1], dtype=cost.dtype, device=cost.device).scatter_add(1, pos, cost)
        )
    return torch.cat(blocks)[torch.argsort(gene_order)]


def _block_cost(u, s, du, ds, valid, umax_V1, smax_V1, n_neighbors: int) -> Tensor:
    """``cosine_cost`` on one block of genes, [V, B] each."""
    with torch.no_grad():
        pts_VB2 = torch.stack([u * umax_V1, s * smax_V1], dim=-1)
        d_VBB = torch.cdist(pts_VB2, pts_VB2)
        d_VBB.masked_fill_(~valid[:, None, :], float("inf"))  # only valid points are neighbours
        d_VBB.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # the cell itself is dropped, as indices[:, 1:]
        k = min(n_neighbors - 1, u.shape[1] - 1)
        dist_VBK, idx_VBK = torch.topk(d_VBB, k, dim=2, largest=False)
        has_VBK = torch.isfinite(dist_VBK)
    un_VBK = torch.gather(u, 1, idx_VBK.flatten(1)).view_as(idx_VBK) - u[..., None]
    sn_VBK = torch.gather(s, 1, idx_VBK.flatten(1)).view_as(idx_VBK) - s[..., None]
    den_VBK = torch.sqrt(un_VBK**2 + sn_VBK**2) * torch.sqrt(du**2 + ds**2)[..., None]
    zero = den_VBK == 0  # a zero-length displacement: cosine 1, as the package
    dot_VBK = un_VBK * du[..., None] + sn_VBK * ds[..., None]
    cos_VBK = torch.where(zero, torch.ones_like(den_VBK), dot_VBK / den_VBK.masked_fill(zero, 1.0))
    best_VB = cos_VBK.masked_fill(~has_VBK, -float("inf")).amax(dim=2)
    return torch.where(torch.isfinite(best_VB) & valid, 1 - best_VB, torch.zeros_like(best_VB))
