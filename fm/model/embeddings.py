"""Token embeddings: gene id (one table, shared by both modalities) + value of that modality + modality; fusion tokens.

Shapes: B cells, G genes per modality, F fusion tokens, L = 2G + F tokens, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from fm.model.config import ZorroConfig


class ValueEmbedding(nn.Module):
    """One modality's normalised log1p value -> D: a small MLP of the scalar, or fixed-edge bins -> embedding."""

    def __init__(self, cfg: ZorroConfig) -> None:
        super().__init__()
        self.encoding = cfg.value_encoding
        if self.encoding == "continuous":
            self.mlp = nn.Sequential(nn.Linear(1, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))
        else:
            # bin 0: value <= 0; bins 1..n_bins-1 split (0, max_value] evenly; larger values go to the last bin
            self.register_buffer("edges", torch.linspace(0.0, cfg.max_value, cfg.n_bins - 1), persistent=False)
            self.table = nn.Embedding(cfg.n_bins, cfg.d_model)

    def forward(self, values_BG: torch.Tensor) -> torch.Tensor:
        if self.encoding == "continuous":
            return self.mlp(values_BG.unsqueeze(-1).to(self.mlp[0].weight.dtype))
        return self.table(torch.bucketize(values_BG.float().contiguous(), self.edges))


class TokenEmbedding(nn.Module):
    """Builds the token sequence ``[spliced G | unspliced G | fusion F]`` -> [B, L, D]."""

    def __init__(self, cfg: ZorroConfig) -> None:
        super().__init__()
        self.gene = nn.Embedding(cfg.vocab_size, cfg.d_model)  # index 0 is a real gene; padding is masked
        self.value_spliced = ValueEmbedding(cfg)
        self.value_unspliced = ValueEmbedding(cfg)
        self.modality = nn.Embedding(2, cfg.d_model)  # 0 spliced, 1 unspliced
        self.fusion = nn.Parameter(torch.zeros(cfg.n_fusion, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, gene_ids_BG: torch.Tensor, spliced_BG: torch.Tensor, unspliced_BG: torch.Tensor) -> torch.Tensor:
        gene_BGD = self.gene(gene_ids_BG)
        s_BGD = gene_BGD + self.value_spliced(spliced_BG) + self.modality.weight[0]
        u_BGD = gene_BGD + self.value_unspliced(unspliced_BG) + self.modality.weight[1]
        f_BFD = self.fusion.expand(gene_ids_BG.shape[0], -1, -1).to(s_BGD.dtype)
        return self.dropout(torch.cat([s_BGD, u_BGD, f_BFD], dim=1))
