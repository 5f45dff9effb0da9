"""scVI (Lopez et al. 2018) as an fm head: a ZINB variational autoencoder on one modality's counts.

Matches scvi-tools' ``VAE`` defaults: 128 hidden units, 10 latent dimensions, 1 layer, dropout 0.1 (encoder only),
per-gene dispersion, observed library size, log1p input, batch norm (momentum 0.01, eps 1e-3) in encoder and decoder,
a batch covariate one-hot injected into the decoder, posterior variance ``exp(.) + 1e-4``. The loss is scvi-tools'
``mean(reconstruction + kl_weight * KL(q(z|x) || N(0, I)))`` with the KL weight warmed up linearly over
``n_epochs_kl_warmup`` epochs (the task or bench calls ``set_epoch``);
``optimizer()`` is scvi-tools' Adam. The head ignores the encoder output.

    .venv/bin/python -m pytest -q tests/unit/test_baselines.py -k scvi     # CPU, seconds

Legend: B cells, G gene tokens per cell, V modelled genes (vocabulary), D latent dimensions, N batches (datasets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm import keys
from fm.baselines.common import check_positive, dense_counts, imputed_layer, mlp_block
from fm.distributions import nb_log_prob, zinb_log_prob
from fm.heads.base import Head, LossOutput, PredictLayer, check_fields

log = logging.getLogger(__name__)


@dataclass
class SCVIConfig:
    """scVI settings (defaults as scvi-tools' SCVI model and training plan)."""

    n_genes: int  # V, genes modelled: vocabulary indices 0..V-1
    modality: Literal["spliced", "unspliced", "total"] = "spliced"  # which counts to model (total = s + u)
    n_hidden: int = 128  # hidden units of encoder and decoder
    n_latent: int = 10  # latent dimensions
    n_layers: int = 1  # hidden layers of encoder and decoder
    dropout: float = 0.1  # dropout of the encoder's hidden layers (the decoder has none, as in scvi-tools)
    likelihood: Literal["zinb", "nb"] = "zinb"  # count model of the decoder
    batch_ids: list[str] = field(default_factory=list)  # dataset ids that form the batch covariate; empty = none
    n_epochs_kl_warmup: int = 400  # KL weight rises linearly from 0 to 1 over these epochs (0 = always 1)
    var_eps: float = 1e-4  # added to the posterior variance
    learning_rate: float = 1e-3  # scvi-tools' TrainingPlan: Adam lr 1e-3, eps 0.01, weight decay 1e-6 (optimizer())
    adam_eps: float = 0.01
    weight_decay: float = 1e-6

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "n_genes", "n_hidden", "n_latent", "n_layers", "learning_rate", "adam_eps")
        if self.weight_decay < 0:
            raise ValueError(f"SCVIConfig.weight_decay: must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"SCVIConfig.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.n_epochs_kl_warmup < 0:
            raise ValueError(f"SCVIConfig.n_epochs_kl_warmup: must be >= 0, got {self.n_epochs_kl_warmup!r}")
        if len(set(self.batch_ids)) != len(self.batch_ids):
            raise ValueError(f"SCVIConfig.batch_ids: duplicate dataset ids in {self.batch_ids!r}")


def _stack(n_in: int, n_hidden: int, n_layers: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(*[mlp_block(n_in if i == 0 else n_hidden, n_hidden, dropout) for i in range(n_layers)])


class SCVIHead(Head):
    """ZINB VAE; ``forward`` returns the posterior and the decoder's parameters, ``loss`` the (warmed-up) ELBO."""

    uses_encoder = False

    def predict_layers(self) -> dict[str, PredictLayer]:
        c = self.config
        return {"imputed": PredictLayer(imputed_layer(c.modality), (
            f"scVI's imputed {c.modality} counts: the decoder's mean at the posterior mean and the observed library "
            f"size{', times 1 - the zero-inflation probability' if c.likelihood == 'zinb' else ''}"))}

    def __init__(self, config: SCVIConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else SCVIConfig(**kwargs)
        c = self.config
        self.n_batch = len(c.batch_ids)
        self._batch_index = {b: i for i, b in enumerate(c.batch_ids)}
        self.encoder = _stack(c.n_genes, c.n_hidden, c.n_layers, c.dropout)
        self.z_mean = nn.Linear(c.n_hidden, c.n_latent)
        self.z_logvar = nn.Linear(c.n_hidden, c.n_latent)
        # scvi-tools injects the one-hot batch into every decoder layer; each layer here is (Linear, BN, ReLU)
        self.decoder = nn.ModuleList(
            mlp_block((c.n_latent if i == 0 else c.n_hidden) + self.n_batch, c.n_hidden, 0.0) for i in range(c.n_layers)
        )
        self.px_scale = nn.Linear(c.n_hidden, c.n_genes)
        self.px_dropout = nn.Linear(c.n_hidden, c.n_genes)
        self.px_r = nn.Parameter(torch.randn(c.n_genes))  # log inverse dispersion per gene (scvi-tools' init)
        self.kl_weight = 1.0 if c.n_epochs_kl_warmup == 0 else 0.0

    def optimizer(self) -> torch.optim.Optimizer:
        """scvi-tools' training plan: Adam (lr 1e-3, eps 0.01, L2 weight decay 1e-6), no schedule."""
        c = self.config
        return torch.optim.Adam(self.parameters(), lr=c.learning_rate, eps=c.adam_eps, weight_decay=c.weight_decay)

    def set_epoch(self, epoch: int) -> None:
        """KL warm-up as scvi-tools: weight = min(1, epoch / n_epochs_kl_warmup)."""
        n = self.config.n_epochs_kl_warmup
        self.kl_weight = 1.0 if n == 0 else min(1.0, epoch / n)

    def batch_onehot(self, batch: dict, n_cells: int, device) -> Tensor | None:
        """One-hot [B, N] of each cell's dataset, or None without a batch covariate."""
        if not self.n_batch:
            return None
        ids = batch[keys.B_DATASET_ID]
        missing = [d for d in ids if d not in self._batch_index]
        if missing:
            raise KeyError(
                f"SCVIHead: dataset id {missing[0]!r} is not in SCVIConfig.batch_ids {self.config.batch_ids}"
            )
        index = torch.tensor([self._batch_index[d] for d in ids], device=device)
        return F.one_hot(index, self.n_batch).float()

    def decode(self, z_BD: Tensor, library_B1: Tensor, onehot_BN: Tensor | None) -> dict[str, Tensor]:
        h = z_BD
        for layer in self.decoder:
            h = layer(h if onehot_BN is None else torch.cat([h, onehot_BN], dim=-1))
        scale_BV = torch.softmax(self.px_scale(h), dim=-1)
        return {"px_scale": scale_BV, "px_rate": torch.exp(library_B1) * scale_BV, "px_dropout": self.px_dropout(h)}

    def forward(self, batch: dict, encoder_output=None) -> dict[str, Tensor]:
        x_BV = dense_counts(batch, self.config.modality, self.config.n_genes)
        library_B1 = torch.log(x_BV.sum(dim=1, keepdim=True))  # observed library size, as scvi-tools
        onehot_BN = self.batch_onehot(batch, x_BV.shape[0], x_BV.device)
        q = self.encoder(torch.log1p(x_BV))
        z_mean_BD = self.z_mean(q)
        z_var_BD = torch.exp(self.z_logvar(q)) + self.config.var_eps
        z_BD = z_mean_BD + z_var_BD.sqrt() * torch.randn_like(z_mean_BD)
        out = {"counts": x_BV, "library": library_B1, "z_mean": z_mean_BD, "z_var": z_var_BD, "z": z_BD}
        out.update(self.decode(z_BD, library_B1, onehot_BN))
        out["theta"] = torch.exp(self.px_r)
        if not self.training:  # the decoder at the posterior mean: normalised and imputed expression
            px = self.decode(z_mean_BD, library_B1, onehot_BN)
            pi = torch.sigmoid(px["px_dropout"]) if self.config.likelihood == "zinb" else 0.0
            out["normalized_expression"] = px["px_scale"]
            out["imputed"] = (1 - pi) * px["px_rate"]
        return out

    def elbo_terms(self, outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-cell reconstruction loss [B] (-log p(x|z)) and KL [B]."""
        x, mu, theta = outputs["counts"], outputs["px_rate"], outputs["theta"]
        if self.config.likelihood == "zinb":
            log_px = zinb_log_prob(x, mu, theta, outputs["px_dropout"])
        else:
            log_px = nb_log_prob(x, mu, theta)
        m, v = outputs["z_mean"], outputs["z_var"]
        kl_B = 0.5 * (v + m**2 - 1 - torch.log(v)).sum(dim=-1)
        return -log_px.sum(dim=-1), kl_B

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        rec_B, kl_B = self.elbo_terms(outputs)
        total = torch.mean(rec_B + self.kl_weight * kl_B)
        return LossOutput(
            loss=total,
            parts={"reconstruction": rec_B.mean(), "kl_z": kl_B.mean()},
            metrics={"elbo": (rec_B + kl_B).mean().detach(), "kl_weight": torch.tensor(float(self.kl_weight))},
        )
