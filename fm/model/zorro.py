"""The Zorro encoder: spliced and unspliced gene tokens plus fusion tokens under the Zorro mask.

    python -c "from fm.model.config import ZorroConfig; from fm.model.zorro import ZorroEncoder; \
print(ZorroEncoder(ZorroConfig.from_name('base')).num_parameters())"

Pre-norm transformer blocks over ``[spliced G | unspliced G | fusion F]`` (see :mod:`fm.model.masks`); the spliced and
unspliced outputs are modality-pure (they never read the other modality, directly or through fusion tokens).

Outputs (:class:`EncoderOutput`):
- ``z_spliced``, ``z_unspliced``: each modality pooled over its real tokens (``pooling``: cross-attention with one
  learned query, or masked mean); a cell with no real gene gets zeros.
- ``z_fusion``: mean of the fusion tokens (they read both modalities).
- ``z_global``: ``Linear(3D -> D)`` of ``[z_spliced, z_unspliced, z_fusion]``, a cell-level summary of all three.
- ``h_spliced``, ``h_unspliced`` [B, G, D] (zero at padding), ``h_fusion`` [B, F, D], ``gene_mask`` [B, G].

Shapes: B cells, G genes per modality, F fusion tokens, L = 2G + F tokens, D width, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fm import keys
from fm.model.attention import AttendFn, MultiHeadSelfAttention, get_attention_backend
from fm.model.config import ZorroConfig
from fm.model.embeddings import TokenEmbedding
from fm.model.pooling import CrossAttentionPooling


@dataclass
class EncoderOutput:
    z_spliced: torch.Tensor  # [B, D]
    z_unspliced: torch.Tensor  # [B, D]
    z_fusion: torch.Tensor  # [B, D]
    z_global: torch.Tensor  # [B, D]
    h_spliced: torch.Tensor  # [B, G, D], zero at padding
    h_unspliced: torch.Tensor  # [B, G, D], zero at padding
    h_fusion: torch.Tensor  # [B, F, D]
    gene_mask: torch.Tensor  # bool [B, G]


def make_norm(cfg: ZorroConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.d_model)


class MLP(nn.Module):
    """Linear-GELU-Linear, or SwiGLU (hidden width 2/3 of mlp_ratio * D, as in LLaMA)."""

    def __init__(self, cfg: ZorroConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        if self.kind == "swiglu":
            hidden = int(2 * hidden / 3)
            self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=cfg.bias)
        else:
            self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(nn.functional.silu(gate) * up)
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ZorroConfig) -> None:
        super().__init__()
        self.norm_attn = make_norm(cfg)
        self.attn = MultiHeadSelfAttention(cfg.d_model, cfg.n_heads, bias=cfg.bias)
        self.norm_mlp = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        x_BLD = x_BLD + self.dropout(self.attn(self.norm_attn(x_BLD), attend))
        return x_BLD + self.dropout(self.mlp(self.norm_mlp(x_BLD)))


class ZorroEncoder(nn.Module):
    """Zorro encoder: ``encoder(batch) -> EncoderOutput``; batch keys from :mod:`fm.keys`."""

    def __init__(self, cfg: ZorroConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = get_attention_backend(cfg.attention, flex_compile=cfg.flex_compile)  # stateless
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = make_norm(cfg)
        if cfg.pooling == "attention":
            self.pool_spliced = CrossAttentionPooling(cfg.d_model, cfg.n_heads, n_queries=1, bias=cfg.bias)
            self.pool_unspliced = CrossAttentionPooling(cfg.d_model, cfg.n_heads, n_queries=1, bias=cfg.bias)
        self.global_proj = nn.Linear(3 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        elif isinstance(module, TokenEmbedding):
            nn.init.normal_(module.fusion, std=self.cfg.init_std)

    @property
    def gene_embedding(self) -> nn.Embedding:
        """The gene-id table (shared by both modalities), for decoders that query genes."""
        return self.embed.gene

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _pool(self, pool: CrossAttentionPooling | None, h_BGD: torch.Tensor, gene_mask_BG: torch.Tensor):
        if pool is not None:
            return pool(None, h_BGD, gene_mask_BG).squeeze(1)
        m_BG1 = gene_mask_BG.unsqueeze(-1).to(h_BGD.dtype)
        return (h_BGD * m_BG1).sum(1) / m_BG1.sum(1).clamp(min=1.0)

    def forward(self, batch: dict) -> EncoderOutput:
        gene_ids_BG, gene_mask_BG = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK].bool()
        spliced_BG, unspliced_BG = batch[keys.B_SPLICED], batch[keys.B_UNSPLICED]
        if gene_ids_BG.shape != gene_mask_BG.shape or spliced_BG.shape != gene_mask_BG.shape \
                or unspliced_BG.shape != gene_mask_BG.shape:
            raise ValueError(
                f"ZorroEncoder: batch shapes differ: {keys.B_GENE_IDS} {tuple(gene_ids_BG.shape)}, "
                f"{keys.B_GENE_MASK} {tuple(gene_mask_BG.shape)}, {keys.B_SPLICED} {tuple(spliced_BG.shape)}, "
                f"{keys.B_UNSPLICED} {tuple(unspliced_BG.shape)}")
        B, G = gene_mask_BG.shape
        x_BLD = self.embed(gene_ids_BG, spliced_BG, unspliced_BG)
        attend = self.backend.prepare(gene_mask_BG, self.cfg.n_fusion)  # the batch's mask, built once
        recompute = self.cfg.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # checkpointing keeps only each block's input; the RNG state is restored, so dropout masks match
            x_BLD = checkpoint(block, x_BLD, attend, use_reentrant=False) if recompute else block(x_BLD, attend)
        x_BLD = self.norm(x_BLD)
        keep_BG1 = gene_mask_BG.unsqueeze(-1)
        h_spliced = torch.where(keep_BG1, x_BLD[:, :G], torch.zeros((), dtype=x_BLD.dtype, device=x_BLD.device))
        h_unspliced = torch.where(keep_BG1, x_BLD[:, G:2 * G], torch.zeros((), dtype=x_BLD.dtype, device=x_BLD.device))
        h_fusion = x_BLD[:, 2 * G:]
        pooled = self.cfg.pooling == "attention"
        z_spliced = self._pool(self.pool_spliced if pooled else None, h_spliced, gene_mask_BG)
        z_unspliced = self._pool(self.pool_unspliced if pooled else None, h_unspliced, gene_mask_BG)
        z_fusion = h_fusion.mean(1)
        z_global = self.global_proj(torch.cat([z_spliced, z_unspliced, z_fusion], dim=-1))
        return EncoderOutput(z_spliced, z_unspliced, z_fusion, z_global, h_spliced, h_unspliced, h_fusion, gene_mask_BG)
