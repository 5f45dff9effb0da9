"""cellDancer (Li et al. 2023) as an fm head: one small network per gene, every gene trained at once.

For each gene g a network (u, s) -> 100 -> 100 -> 3 (leaky ReLU, then sigmoid) gives per-cell rates; as in the package,
the three outputs are (β, γ, α) scaled by (1, γ0, α0) with α0 = 2·u_max and γ0 = u_max / s_max. One Euler step of du/dt
= α − βu, ds/dt = βu − γs with dt = 0.5 predicts the next (u, s), in coordinates divided by the gene's maxima over the
data, as the package's (not over a batch: a cell's velocity would then depend on the cells batched with it). The maxima
are those of the cells trained on, raised batch by batch (the dataset's after one epoch), kept in buffers saved with
the weights and used unchanged at prediction. A cell's cost is 1 − the largest cosine between its predicted
displacement and the displacements toward its neighbours: the 30 nearest points of the gene's (u, s) plane, the cell
itself included and then dropped (29 others), as ``sklearn.NearestNeighbors`` does there; a zero-length displacement
counts as cosine 1, as in the package. When training with ``norm_cell_distribution`` (the package default), points are
rounded to a 0.01 grid of the normalised plane and duplicates are dropped, so a gene is fitted on its distinct points.

The weights of all genes live in [V, ...] tensors used through batched matmuls, so one step trains every gene, and
gene g's weights only ever see gene g's data (a test checks this). The loss is the *sum* over genes of each gene's
mean cost, so each gene's gradient is the one its own network would get alone.

Each gene stops early as in the package (PyTorch Lightning's ``EarlyStopping`` on its smoothed cost): a gene's cost
is smoothed as ``0.9 · cost + 0.1 · previous`` at every step it has points, every ``check_every`` (10) steps the
smoothed cost is compared with the gene's best, and after ``patience`` (3) checks in a row without a new best the
gene stops: its network is no longer run and ``GeneAdam`` (Adam that updates only running genes' rows) leaves its
weights as they were. The state is in buffers, so it is checkpointed. The package also starts each gene from one of
two pretrained networks; here every gene starts from PyTorch's default ``nn.Linear`` initialisation (seeded).

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
from fm.heads.base import Head, LossOutput, PredictLayer, check_fields

log = logging.getLogger(__name__)
PREDICT_TILE = 1 << 14  # points (cell-gene pairs) per tile of the networks when predicting
VIEW_ROW_NUMEL = 4096  # GeneAdam: parameters with rows this large are updated in place, run by run of running rows


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
    gene_chunk: int = 64  # genes per block of the networks and the kNN (memory: gene_chunk · B² distances)
    patience: int = 3  # a gene stops after this many checks without a new best smoothed cost; 0: never stops
    check_every: int = 10  # steps between checks (the package's check_val_every_n_epoch)
    smooth_weight: float = 0.9  # smoothed cost = w · cost + (1 − w) · previous (the package's cost_type='smooth')

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "n_genes", "n_hidden", "dt", "initial_zoom", "initial_stretch", "gene_chunk",
                       "check_every")  # fmt: skip
        if self.patience < 0:
            raise ValueError(f"CellDancerConfig.patience: must be >= 0 (0: never stop), got {self.patience!r}")
        if not 0 < self.smooth_weight <= 1:
            raise ValueError(f"CellDancerConfig.smooth_weight: must be in (0, 1], got {self.smooth_weight!r}")
        if not 0 < self.fit_fraction <= 1:
            raise ValueError(f"CellDancerConfig.fit_fraction: must be in (0, 1], got {self.fit_fraction!r}")
        if self.n_neighbors < 2:
            raise ValueError(
                f"CellDancerConfig.n_neighbors: must be >= 2 (the cell and one other), got {self.n_neighbors}"
            )


class CellDancerHead(Head):
    """Per-gene kinetic networks; ``forward`` gives per cell-gene α, β, γ and velocity, ``loss`` the cosine cost."""

    uses_encoder = False

    def predict_layers(self) -> dict[str, PredictLayer]:
        units = ("normalised counts (counts / library * target_sum)" if self.config.input == "normalized"
                 else "raw counts")  # fmt: skip
        rate = "cellDancer's {} rate per cell and gene, in the plane of each gene's (u, s) over its training maxima"
        return {
            "velocity": PredictLayer(keys.LAYER_VELOCITY, f"cellDancer's ds/dt, spliced {units} per unit time"),
            "velocity_u": PredictLayer(keys.LAYER_VELOCITY_U, f"cellDancer's du/dt, unspliced {units} per unit time"),
            "alpha": PredictLayer(keys.LAYER_ALPHA, rate.format("transcription")),
            "beta": PredictLayer(keys.LAYER_BETA, rate.format("splicing")),
            "gamma": PredictLayer(keys.LAYER_GAMMA, rate.format("degradation")),
        }

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
        # per-gene early stopping (the package's EarlyStopping), advanced by ``loss`` in training mode
        self.register_buffer("running", torch.ones(V, dtype=torch.bool))  # genes still training
        # finite "none yet" values: a checkpoint holding NaN or inf is refused (fm.tasks.callbacks.NanGuard)
        self.register_buffer("smoothed_cost", torch.zeros(V))
        self.register_buffer("has_cost", torch.zeros(V, dtype=torch.bool))  # smoothed_cost holds a cost
        self.register_buffer("best_cost", torch.full((V,), torch.finfo(torch.float32).max))
        self.register_buffer("bad_checks", torch.zeros(V, dtype=torch.long))
        self.register_buffer("stopped_at", torch.full((V,), -1, dtype=torch.long))  # step a gene stopped, -1: running
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # each gene's largest u and s over the cells trained on (the package normalises by the dataset's maxima; a
        # batch's own would make a cell's prediction depend on the cells batched with it); saved with the weights
        self.register_buffer("u_max", torch.zeros(V))
        self.register_buffer("s_max", torch.zeros(V))

    def optimizer(self) -> torch.optim.Optimizer:
        """The package's Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8, L2 weight decay 4e-3), on running genes only."""
        c = self.config
        return GeneAdam(self.parameters(), lambda: self.running, lr=c.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=c.weight_decay)  # fmt: skip

    @torch.no_grad()
    def track(self, cost_V: Tensor, has_points_V: Tensor) -> None:
        """One step of every running gene's early stopping: smooth its cost (genes with points in this batch), and
        every ``check_every`` steps count a check without a new best; ``patience`` of them in a row stop the gene."""
        c = self.config
        if c.patience == 0:
            return
        upd = self.running & has_points_V
        prev = torch.where(self.has_cost, self.smoothed_cost, cost_V)
        smoothed = c.smooth_weight * cost_V + (1 - c.smooth_weight) * prev
        self.smoothed_cost.copy_(torch.where(upd, smoothed, self.smoothed_cost))
        self.has_cost |= upd
        self.steps += 1
        if int(self.steps) % c.check_every:
            return
        better = self.running & self.has_cost & (self.smoothed_cost < self.best_cost)  # never had points: not better
        self.best_cost.copy_(torch.where(better, self.smoothed_cost, self.best_cost))
        self.bad_checks.copy_(torch.where(better, 0, self.bad_checks + self.running.long()))
        stop = self.running & (self.bad_checks >= c.patience)
        self.stopped_at.masked_fill_(stop, int(self.steps))
        self.running &= ~stop

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
            h = F.leaky_relu_(h) if i < 2 else torch.sigmoid_(h)  # in place: a pass and a [V, B, H] array less
        return h[..., 2] * alpha0_V1, h[..., 0], h[..., 1] * gamma0_V1

    def _displacement(self, u, s, umax, smax, params) -> dict[str, Tensor]:
        c = self.config
        alpha, beta, gamma = self.rates(u, s, c.initial_zoom * umax, c.initial_stretch * umax / smax, params)
        return {"alpha": alpha, "beta": beta, "gamma": gamma,
                "du": (alpha - beta * u) * c.dt, "ds": (beta * u - gamma * s) * c.dt}  # fmt: skip

    def forward(self, batch: dict, encoder_output=None) -> dict[str, Tensor]:
        """Training: the fitted points of each running gene that has some, compacted to [L, P] (``valid`` marks real
        ones; ``genes`` [L] the genes' indices, by decreasing number of points), for ``loss``. Evaluation: per
        cell-gene α, β, γ (normalised plane) and velocities (input units per unit time), [B, V]."""
        c = self.config
        if not self.training:
            return self._predict(*self._points(batch, fitting=False))
        un_VB, sn_VB, umax_V1, smax_V1, gene_N, cell_N = self._points(batch, fitting=True)
        # this step's points: the running genes' fittable points (N, in gene order), a random share of them
        gene_K, cell_K = self._running_points(gene_N, cell_N)  # a stopped gene is not run
        if c.fit_fraction < 1:  # the package keeps round(fraction · n) of a gene's n points; a Bernoulli draw has
            keep_K = torch.rand(gene_K.shape, device=gene_K.device) < c.fit_fraction  # that mean, and no sort
            gene_K, cell_K = gene_K[keep_K], cell_K[keep_K]
        n_V = torch.bincount(gene_K, minlength=c.n_genes)
        # the genes with points, sorted by their number of points, so that each block of networks runs on about its
        # own width; each gene's points left-aligned in its row
        genes_L = torch.argsort(n_V, descending=True, stable=True)[: int((n_V > 0).sum())]
        n_L = n_V[genes_L]
        P = max(int(n_L[0]), 1) if len(genes_L) else 1
        row_V = torch.empty_like(n_V).index_copy_(0, genes_L, torch.arange(len(genes_L), device=n_V.device))
        slot_K = torch.arange(len(gene_K), device=n_V.device) - (torch.cumsum(n_V, 0) - n_V)[gene_K]
        flat_K = row_V[gene_K] * P + slot_K
        u_LP, s_LP = (un_VB.new_zeros(len(genes_L) * P).index_copy_(0, flat_K, x[gene_K, cell_K]).view(-1, P)
                      for x in (un_VB, sn_VB))  # fmt: skip
        valid_LP = torch.arange(P, device=n_V.device)[None, :] < n_L[:, None]
        out = {"u": u_LP, "s": s_LP, "valid": valid_LP, "u_max": umax_V1[genes_L], "s_max": smax_V1[genes_L],
               "genes": genes_L}  # fmt: skip
        if not len(genes_L):
            return {**out, "du": u_LP.clone(), "ds": s_LP.clone()}
        chunks = [gather_rows(t, genes_L, c.gene_chunk)
                  for pair in zip(self.weights, self.biases, strict=True) for t in pair]  # fmt: skip
        du_parts, ds_parts = [], []
        for i, g in enumerate(torch.arange(len(genes_L), device=n_V.device).split(c.gene_chunk)):
            p = int(n_L[g[0]])  # the block's widest gene
            layers = [x[i] for x in chunks]
            block = list(zip(layers[0::2], layers[1::2], strict=True))
            d = self._displacement(u_LP[g, :p], s_LP[g, :p], out["u_max"][g], out["s_max"][g], block)
            du_parts.append(F.pad(d["du"], (0, P - p)))
            ds_parts.append(F.pad(d["ds"], (0, P - p)))
        return {**out, "du": torch.cat(du_parts), "ds": torch.cat(ds_parts)}

    @torch.no_grad()
    def _running_points(self, gene_N: Tensor, cell_N: Tensor) -> tuple[Tensor, Tensor]:
        """The running genes' points of ``_points``, kept until the batch or the running genes change (at most
        every ``check_every`` steps), so that a step's cost follows the genes still running."""
        stamp = (self.running.data_ptr(), self.running._version)
        cached = self.__dict__.get("_running_cache")  # (stamp, gene_N, cell_N, kept)
        if cached is None or cached[0] != stamp or cached[1] is not gene_N or cached[2] is not cell_N:
            keep_N = self.running[gene_N]
            cached = (stamp, gene_N, cell_N, (gene_N[keep_N], cell_N[keep_N]))
            self._running_cache = cached
        return cached[3]

    @torch.no_grad()
    def _points(self, batch: dict, fitting: bool) -> tuple[Tensor, ...]:
        """Each gene's plane: u, s [V, B] divided by the recorded maxima [V, 1] (raised to this batch's first when
        fitting), and (fitting) the points to fit as gene and cell indices [N] in gene order: distinct points of the
        0.01 grid with ``norm_cell_distribution``, else all.

        These depend on the batch and the maxima only, so the last batch's are kept: training on one batch again and
        again (as the package's epochs over one table, and bench/baselines) reuses them instead of redoing them at
        every step. Inference tensors (torch.inference_mode, as fm predict runs) have no version to check: not kept.
        """
        inputs = [batch[k] for k in (keys.B_GENE_IDS, keys.B_GENE_MASK, keys.B_SPLICED, keys.B_UNSPLICED,
                                     keys.B_SPLICED_COUNTS, keys.B_UNSPLICED_COUNTS)]  # fmt: skip
        keep = not any(x.is_inference() for x in inputs)

        def stamp():  # the maxima's versions too: training, or loading weights, changes them in place
            return (fitting, self.weights[0].dtype, self.u_max._version, self.s_max._version,
                    *(x._version for x in inputs))  # fmt: skip

        cached = self.__dict__.get("_points_cache")  # (stamp, inputs, points): the inputs held, so ids stay unique
        if (keep and cached is not None and cached[0] == stamp()
                and all(a is b for a, b in zip(cached[1], inputs, strict=True))):
            return cached[2]
        u_BV, s_BV = self.dense_us(batch)
        u_VB, s_VB = u_BV.T.contiguous(), s_BV.T.contiguous()
        if fitting:
            self._record_maxima(u_VB.amax(dim=1), s_VB.amax(dim=1))
        # a gene never seen with counts: divide by 1 instead of 0 (all its points coincide; its cost is 0)
        umax_V1, smax_V1 = (torch.where(m > 0, m, torch.ones_like(m)).to(u_VB.dtype)[:, None]
                            for m in (self.u_max, self.s_max))  # fmt: skip
        un_VB, sn_VB = u_VB / umax_V1, s_VB / smax_V1
        if not fitting:
            out = (un_VB, sn_VB, umax_V1, smax_V1)
        else:  # the points to fit, as (gene, cell) pairs in gene order
            fit_VB = torch.ones_like(un_VB, dtype=torch.bool)
            if self.config.norm_cell_distribution:
                un_VB, sn_VB = torch.round(un_VB, decimals=2), torch.round(sn_VB, decimals=2)
                fit_VB = first_occurrence(un_VB, sn_VB)
            out = (un_VB, sn_VB, umax_V1, smax_V1, *fit_VB.nonzero(as_tuple=True))
        if keep:
            self._points_cache = (stamp(), inputs, out)
        return out

    @torch.no_grad()
    def observe(self, batch: dict) -> None:
        """Raise the recorded per-gene maxima to this batch's without fitting it: the package normalises by the
        maxima over all of a dataset's cells, also those it does not fit (bench/baselines fits a subset)."""
        u_BV, s_BV = self.dense_us(batch)
        self._record_maxima(u_BV.amax(dim=0), s_BV.amax(dim=0))

    @torch.no_grad()
    def _record_maxima(self, u_V: Tensor, s_V: Tensor) -> None:
        """Raise the recorded per-gene maxima to this batch's (over the global batch under torch.distributed, so the
        ranks agree). Written only when one grows, so that a batch seen again reuses its points."""
        both = torch.stack([u_V, s_V]).to(self.u_max.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        for buf, m in zip((self.u_max, self.s_max), both, strict=True):
            if bool((m > buf).any()):
                torch.maximum(buf, m, out=buf)

    @torch.no_grad()
    def _predict(self, un_VB: Tensor, sn_VB: Tensor, umax_V1: Tensor, smax_V1: Tensor) -> dict[str, Tensor]:
        c, (V, B) = self.config, un_VB.shape
        # tiles of at most PREDICT_TILE points, so that a hidden layer (tile x 100 floats, 6.5 MB) stays in cache
        n_genes = max(1, min(c.gene_chunk, PREDICT_TILE // max(B, 1)))
        n_cells = max(1, PREDICT_TILE // n_genes)
        rows = []
        for g0 in range(0, V, n_genes):
            g = slice(g0, g0 + n_genes)
            block = [(w[g], b[g]) for w, b in zip(self.weights, self.biases, strict=True)]
            tiles = [self._displacement(un_VB[g, b0 : b0 + n_cells], sn_VB[g, b0 : b0 + n_cells], umax_V1[g],
                                        smax_V1[g], block) for b0 in range(0, B, n_cells)]  # fmt: skip
            rows.append({k: torch.cat([tile[k] for tile in tiles], dim=1) for k in tiles[0]})
        out = {k: torch.cat([row[k] for row in rows]) for k in rows[0]}
        return {
            "u": un_VB, "s": sn_VB, "du": out["du"], "ds": out["ds"], "valid": torch.ones_like(un_VB, dtype=torch.bool),
            "u_max": umax_V1, "s_max": smax_V1,
            "alpha": out["alpha"].T, "beta": out["beta"].T, "gamma": out["gamma"].T,
            "velocity": (out["ds"] / c.dt * smax_V1).T, "velocity_u": (out["du"] / c.dt * umax_V1).T,
        }  # fmt: skip

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        cost_VB = cosine_cost(
            outputs["u"], outputs["s"], outputs["du"], outputs["ds"], outputs["valid"],
            outputs["u_max"], outputs["s_max"], self.config.n_neighbors, self.config.gene_chunk, left_aligned=True,
        )  # fmt: skip  # forward's points: valid ones first (training: compacted; evaluation: all valid)
        valid = outputs["valid"].to(cost_VB.dtype)
        n_V = valid.sum(dim=1)
        per_gene_V = (cost_VB * valid).sum(dim=1) / n_V.clamp(min=1)  # over the genes run (all, in evaluation)
        parts = {"cosine_cost": per_gene_V.detach().mean() if len(per_gene_V) else per_gene_V.sum().detach()}
        if self.training:
            self._track_batch(outputs["genes"], (cost_VB * valid).sum(dim=1).detach(), n_V.detach())
            parts["running_genes"] = self.running.sum().float()
        loss = per_gene_V.sum()
        if not loss.requires_grad and torch.is_grad_enabled():  # no gene ran (all stopped): a zero with a graph
            loss = loss + 0 * sum(w.view(-1)[0] for w in self.weights)
        return LossOutput(loss=loss, parts=parts)

    def _track_batch(self, genes_R: Tensor, cost_sum_R: Tensor, n_R: Tensor) -> None:
        """Early stopping on each gene's mean cost over the global batch: under torch.distributed the ranks' sums
        are added first, so every rank stops the same genes and the ranks' weights stay equal."""
        both = torch.zeros(2, len(self.running), dtype=self.smoothed_cost.dtype, device=self.running.device)
        both = both.index_copy(1, genes_R, torch.stack([cost_sum_R, n_R]).to(both.dtype))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(both)
        self.track(both[0] / both[1].clamp(min=1), both[1] > 0)

    @property
    def finished(self) -> bool:
        """Every gene has stopped early (a trainer may end the run, as the package's does)."""
        return not bool(self.running.any())


class GeneAdam(torch.optim.Optimizer):
    """torch's Adam with L2 weight decay (its fused kernel) that updates only the rows (dim 0: genes) for which
    ``rows()`` is True; the other rows, and their moments, stay as they are.

    torch.optim.Adam moves every row at every step (momentum and weight decay act without a gradient), so a stopped
    gene's weights would drift; here a step's cost also follows the genes still running. ``zero_grad`` zeroes the
    running rows of dense gradients in place, so that the head's per-block gradients (``gather_rows``) add into
    them instead of a new whole-weight tensor each step; the step reads the running rows only. A parameter with large
    rows (the hidden layers' weights) is updated in place, the kernel given views of each run of consecutive running
    rows; gathering its running rows and scattering them back cost ~10x the update itself once some genes stopped.
    """

    def __init__(self, params, rows, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.rows = rows

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        rows = self.rows()
        idx = None if bool(rows.all()) else rows.nonzero().squeeze(1)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.grad.is_sparse:
                    p.grad = torch.zeros_like(p)
                elif idx is None:
                    p.grad.zero_()
                else:
                    p.grad.index_fill_(0, idx, 0)

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim.adam import adam

        loss = closure() if closure is not None else None
        rows = self.rows()
        idx = None if bool(rows.all()) else rows.nonzero().squeeze(1)
        if idx is not None and not len(idx):
            return loss
        bounds = None  # the running rows' runs, as tensor_split boundaries: [start, end, start, end, ...]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            kwargs = dict(fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)  # fmt: skip
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # a float step tensor, as the fused kernel wants; it counts the steps taken
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad  # sparse: after a module.zero_grad()
                tensors = (p, grad, state["exp_avg"], state["exp_avg_sq"])
                if idx is None:
                    adam(*([x] for x in tensors), [], [state["step"]], **kwargs)
                elif p[0].numel() >= VIEW_ROW_NUMEL:  # large rows: the kernel runs in place on views of the runs
                    if bounds is None:
                        edge = torch.diff(rows.to(torch.int8), prepend=rows.new_zeros(1, dtype=torch.int8),
                                          append=rows.new_zeros(1, dtype=torch.int8))  # fmt: skip
                        bounds = edge.nonzero().squeeze(1).tolist()
                    views = [list(x.tensor_split(bounds)[1::2]) for x in tensors]
                    steps = list(state["step"].repeat(len(views[0])).unbind())  # each view's own, all equal
                    adam(*views, [], steps, **kwargs)
                    state["step"] += 1
                else:  # small rows: gather the running ones, update, scatter back
                    w, g, m, v = (x.index_select(0, idx) for x in tensors)
                    adam([w], [g], [m], [v], [], [state["step"]], **kwargs)
                    for dst, src in zip((p, state["exp_avg"], state["exp_avg_sq"]), (w, m, v), strict=True):
                        dst.index_copy_(0, idx, src)
        return loss


class _GatherRows(torch.autograd.Function):
    """``weight.index_select(0, rows)`` whose gradient is added into the rows of ``weight.grad`` in place.

    The head gathers each block of genes on its own; returned as sparse tensors, the blocks' gradients would be
    summed by autograd into a dense whole-weight tensor per block (~1.5x a step's cost). Adding them into the
    dense ``.grad`` that GeneAdam keeps is what the accumulation would do, without it (hooks on the parameter's
    gradient are not run; ``gather_rows`` uses this only outside torch.distributed).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.weight = weight
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        if ctx.weight.grad is None or ctx.weight.grad.is_sparse:  # reset since the forward (module.zero_grad())
            return torch.sparse_coo_tensor(rows[None], grad, ctx.weight.shape, check_invariants=False), None
        ctx.weight.grad.index_add_(0, rows, grad)
        return None, None


def gather_rows(weight: Tensor, rows: Tensor, block: int) -> list[Tensor]:
    """Rows of a [V, ...] weight, in blocks of ``block`` rows. When the weight already has a dense ``.grad``
    (GeneAdam's zero_grad keeps them), each block is gathered on its own with a row-sparse gradient that adds into
    that one in place: a block's rows are then fresh in cache for its matmuls, and the backward neither builds a
    zero tensor of the whole weight nor concatenates the blocks. Otherwise (no gradient yet, another optimiser,
    torch.distributed, whose reduction wants dense gradients) one plain ``index_select``, split: a dense gradient per
    block would be a whole-weight tensor each."""
    dense_grad = weight.grad is not None and not weight.grad.is_sparse
    if not dense_grad or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(weight.index_select(0, rows).split(block))
    return [_GatherRows.apply(weight, r) for r in rows.split(block)]


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
    umax_V1: Tensor, smax_V1: Tensor, n_neighbors: int, gene_chunk: int, left_aligned: bool = False,
) -> Tensor:  # fmt: skip
    """cellDancer's per-cell cost [V, B]: 1 − max cosine between (du, ds) and the displacements to the neighbours.

    Neighbours are searched among a gene's valid points in its unnormalised (u, s) plane (the package's "embedding"),
    while the displacements are taken in the normalised plane, as the package does. Invalid points get cost 0.
    Genes are processed in blocks of similar valid-point counts, each block compacted to its valid points, so the
    B² neighbour search runs over the distinct points only. ``left_aligned``: each gene's valid points come first
    (as ``forward`` gives them), so a block is a slice and needs no compaction.
    """
    n_valid_V = valid_VB.sum(dim=1)
    gene_order = torch.argsort(n_valid_V, descending=True, stable=True)
    blocks = [torch.zeros(0, u_VB.shape[1], dtype=u_VB.dtype, device=u_VB.device)]  # no gene: [0, B]
    for g0 in range(0, u_VB.shape[0], gene_chunk):
        g = gene_order[g0 : g0 + gene_chunk]
        n = int(n_valid_V[g].max())
        if n < 2:  # no gene of the block has a neighbour to compare with
            blocks.append(torch.zeros(len(g), u_VB.shape[1], dtype=u_VB.dtype, device=u_VB.device))
            continue
        if left_aligned:
            u, s, du, ds = (x[g, :n] for x in (u_VB, s_VB, du_VB, ds_VB))
            cost = _block_cost(u, s, du, ds, valid_VB[g, :n], umax_V1[g], smax_V1[g], n_neighbors)
            blocks.append(F.pad(cost, (0, u_VB.shape[1] - n)))
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
    """``cosine_cost`` on one block of genes, [V, B] each.

    The neighbours, and the displacements toward them, do not depend on the networks; the best neighbour is found
    without gradient (the largest dot product with the predicted displacement over the neighbour's distance: the
    cosine times a positive factor), and the gradient then flows through the one cosine taken, as it does through a
    max. Few passes over the [V, B, K] neighbour arrays: they are the step's largest after the distances.
    """
    with torch.no_grad():
        n, inf = u.shape[1], float("inf")
        # invalid points placed at infinity: no valid point has them as neighbours (their own rows are not scored)
        pu, ps = (x.masked_fill(~valid, inf) for x in (u * umax_V1, s * smax_V1))
        d_VBB = (pu[:, :, None] - pu[:, None, :]).square_()  # squared distances, in place (NaN between two invalid)
        d_VBB += (ps[:, :, None] - ps[:, None, :]).square_()
        d_VBB.diagonal(dim1=1, dim2=2).fill_(inf)  # the cell itself is dropped, as indices[:, 1:]
        if n <= n_neighbors:  # every other point is a neighbour: no search (self and invalid ones are at inf)
            dist_VBK, idx_VBK = d_VBB, torch.arange(n, device=u.device).expand(*d_VBB.shape)
        else:
            dist_VBK, idx_VBK = torch.topk(d_VBB, n_neighbors - 1, dim=2, largest=False, sorted=False)
        # after a search every valid point has n_neighbors - 1 valid ones when each gene has n_neighbors points
        few = n <= n_neighbors or int(valid.sum(dim=1).min()) < n_neighbors
        has_VBK = torch.isfinite(dist_VBK) if few else None
        # a zero-length displacement toward a neighbour gives cosine 1, as in the package: the max is then 1
        ones_VB = dist_VBK.amin(dim=2) == 0
        del d_VBB, dist_VBK
        un_VBK = torch.gather(u, 1, idx_VBK.flatten(1)).view_as(idx_VBK).sub_(u[..., None])
        sn_VBK = torch.gather(s, 1, idx_VBK.flatten(1)).view_as(idx_VBK).sub_(s[..., None])
        norm_VBK = torch.hypot(un_VBK, sn_VBK).clamp_(min=1e-30)
        dot_VBK = (un_VBK * du.detach()[..., None]).addcmul_(sn_VBK, ds.detach()[..., None]).div_(norm_VBK)
        if has_VBK is not None:
            dot_VBK.masked_fill_(~has_VBK, -inf)
        best_VB1 = dot_VBK.argmax(dim=2, keepdim=True)
        has_VB = has_VBK.any(dim=2) if has_VBK is not None else torch.full_like(valid, n > 1)
        nb_VB = torch.gather(norm_VBK, 2, best_VB1)[..., 0]
        eu_VB, es_VB = (torch.gather(x, 2, best_VB1)[..., 0] / nb_VB for x in (un_VBK, sn_VBK))
    sq_VB = du**2 + ds**2
    ones_VB = ones_VB | (sq_VB.detach() == 0)  # a zero-length prediction: every cosine is 1
    cos_VB = (eu_VB * du + es_VB * ds) / torch.sqrt(sq_VB.masked_fill(ones_VB, 1.0))  # no 0/0 in the gradient
    cos_VB = torch.where(ones_VB, torch.ones_like(cos_VB), cos_VB)
    return torch.where(has_VB & valid, 1 - cos_VB, torch.zeros_like(cos_VB))
