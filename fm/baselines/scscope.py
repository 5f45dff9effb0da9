"""scScope (Deng et al. 2019) as an fm head: a recurrent autoencoder whose imputer fills the zero entries.

Follows the authors' implementation (AltschulerWu-Lab/scScope): the batch-effect layer subtracts a learned per-batch
profile (initialised at zero); iteration 1 encodes ``relu(x - batch effect)``; every later iteration feeds the
previous decoder output through the imputer (V -> 64 -> V, ReLU between) and adds its values *only at the entries
where x is zero*, so observed values are never overwritten. Encoder and decoder weights are shared across the T
iterations. The loss is the sum over iterations of the Frobenius norm of the reconstruction error on the nonzero
entries; the latent is the T latents concatenated; the imputed expression is the mean of the T decoder outputs.
Weights start from N(0, 0.1²) and biases at zero as there; the authors train with Adam (lr 1e-4, beta1 0.05).

    .venv/bin/python -m pytest -q tests/unit/test_baselines.py -k scscope     # CPU, seconds

Legend: B cells, G gene tokens per cell, V modelled genes, D latent dimensions, N batches (datasets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm import keys
from fm.baselines.common import MODALITY_KEYS, check_positive, densify, imputed_layer
from fm.heads.base import Head, LossOutput, PredictLayer, check_fields

log = logging.getLogger(__name__)


@dataclass
class ScScopeConfig:
    """scScope settings (defaults as the authors' ``train``)."""

    n_genes: int  # V, genes modelled: vocabulary indices 0..V-1
    modality: Literal["spliced", "unspliced", "total"] = "spliced"  # normalised log1p input (total: of s + u)
    n_latent: int = 50  # latent dimensions per iteration (the authors' examples use 50)
    n_iterations: int = 2  # T, recurrent iterations
    encoder_layers: list[int] = field(default_factory=list)  # hidden widths before the latent layer (none)
    decoder_layers: list[int] = field(default_factory=list)  # hidden widths after the latent layer (none)
    imputer_hidden: int = 64  # hidden width of the imputer
    batch_ids: list[str] = field(default_factory=list)  # dataset ids of the batch-effect layer; empty = none
    init_std: float = 0.1  # standard deviation of the initial weights
    use_mask: bool = True  # loss on nonzero entries only (False: on every entry)
    learning_rate: float = 1e-4  # the authors' Adam: lr 1e-4, beta1 0.05 (optimizer())
    beta1: float = 0.05

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "n_genes", "n_latent", "n_iterations", "imputer_hidden", "init_std", "learning_rate")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"ScScopeConfig.beta1: must be in [0, 1), got {self.beta1!r}")
        for name in ("encoder_layers", "decoder_layers"):
            if any(int(w) <= 0 for w in getattr(self, name)):
                raise ValueError(f"ScScopeConfig.{name}: widths must be > 0, got {getattr(self, name)!r}")


def _relu_stack(widths: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))


class ScScopeHead(Head):
    """Recurrent imputing autoencoder; ``forward`` returns the T latents and outputs, ``loss`` the masked error."""

    uses_encoder = False

    def predict_layers(self) -> dict[str, PredictLayer]:
        m = self.config.modality
        return {"imputed": PredictLayer(imputed_layer(m), (
            f"scScope's imputed {m} expression: the mean of its {self.config.n_iterations} decoder outputs, in "
            "normalised log1p units (log1p(counts / library * target_sum))"))}

    def __init__(self, config: ScScopeConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else ScScopeConfig(**kwargs)
        c = self.config
        self._batch_index = {b: i for i, b in enumerate(c.batch_ids)}
        self.batch_effect = nn.Parameter(torch.zeros(len(c.batch_ids), c.n_genes))  # [N, V]
        self.encoder = _relu_stack([c.n_genes, *c.encoder_layers, c.n_latent])
        self.decoder = _relu_stack([c.n_latent, *c.decoder_layers, c.n_genes])
        self.imputer = _relu_stack([c.n_genes, c.imputer_hidden, c.n_genes])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=c.init_std)
                nn.init.zeros_(m.bias)

    def optimizer(self) -> torch.optim.Optimizer:
        """The authors' optimiser: Adam with lr 1e-4, beta1 0.05 (beta2 0.999, eps 1e-8: TensorFlow's defaults)."""
        return torch.optim.Adam(self.parameters(), lr=self.config.learning_rate, betas=(self.config.beta1, 0.999),
                                eps=1e-8)

    def expression(self, batch: dict) -> Tensor:
        """Dense normalised log1p expression [B, V] of the configured modality."""
        ids, mask, V = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK], self.config.n_genes
        if self.config.modality == "total":
            s, u = (densify(ids, mask, batch[MODALITY_KEYS[m][1]].float(), V) for m in ("spliced", "unspliced"))
            return torch.log1p(torch.expm1(s) + torch.expm1(u))
        return densify(ids, mask, batch[MODALITY_KEYS[self.config.modality][1]].float(), V)

    def batch_profile(self, batch: dict, x_BV: Tensor) -> Tensor:
        """The batch effect [B, V] to subtract (zeros without a batch covariate)."""
        if not self._batch_index:
            return torch.zeros_like(x_BV)
        ids = batch[keys.B_DATASET_ID]
        missing = [d for d in ids if d not in self._batch_index]
        if missing:
            raise KeyError(f"ScScopeHead: dataset id {missing[0]!r} is not in ScScopeConfig.batch_ids")
        index = torch.tensor([self._batch_index[d] for d in ids], device=x_BV.device)
        return self.batch_effect[index]

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor) -> Tensor:
        for layer in layers:
            h = F.relu(layer(h))
        return h

    def forward(self, batch: dict, encoder_output=None) -> dict[str, Tensor]:
        x_BV = self.expression(batch)
        effect_BV = self.batch_profile(batch, x_BV)
        zero_BV = (x_BV == 0).to(x_BV.dtype)  # 1 - sign(x): where the imputer may write
        latents, outputs = [], []
        input_BV = F.relu(x_BV - effect_BV)
        for t in range(self.config.n_iterations):
            if t > 0:
                h = F.relu(self.imputer[0](outputs[-1]))
                imputed_BV = zero_BV * self.imputer[1](h)  # no ReLU on the imputer's output, as the authors
                input_BV = F.relu(imputed_BV + x_BV - effect_BV)
            z_BD = self._run(self.encoder, input_BV)
            latents.append(z_BD)
            outputs.append(self._run(self.decoder, z_BD))
        return {
            "expression": x_BV,
            "corrected": x_BV - effect_BV,
            "outputs": torch.stack(outputs),  # [T, B, V]
            "latent": torch.cat(latents, dim=-1),  # [B, T*D]
            "imputed": torch.stack(outputs).mean(dim=0),  # [B, V], the authors' predict()
        }

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:
        target_BV = outputs["corrected"]
        mask_BV = torch.sign(target_BV) if self.config.use_mask else torch.ones_like(target_BV)
        per_iter = torch.stack([torch.linalg.norm(mask_BV * (out - target_BV)) for out in outputs["outputs"]])
        parts = {f"reconstruction_t{t + 1}": v for t, v in enumerate(per_iter)}
        return LossOutput(loss=per_iter.sum(), parts=parts)
