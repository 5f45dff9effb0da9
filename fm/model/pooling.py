"""Cross-attention pooling: queries read a set of keys (masked), as in Perceiver / set transformers.

The encoder pools each modality with one learned query; decoders reuse it with gene-embedding queries.

Shapes: B cells, Q queries, L keys, D width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionPooling(nn.Module):
    """Multi-head cross-attention from queries to masked keys.

    Args:
        d_model: width D of queries, keys and output.
        n_heads: heads H (d_model divisible by n_heads).
        n_queries: learned queries held by the module, used when ``forward`` gets ``queries_BQD=None`` (0: none).
    """

    def __init__(self, d_model: int, n_heads: int, n_queries: int = 1, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"CrossAttentionPooling: d_model={d_model} not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * 0.02) if n_queries > 0 else None
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self, queries_BQD: torch.Tensor | None, keys_BLD: torch.Tensor, key_mask_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pool ``keys_BLD`` where ``key_mask_BL`` is True into [B, Q, D].

        A cell with no real key gets a zero output (and zero gradient), never NaN.
        ``queries_BQD=None`` uses the module's learned queries.
        """
        B, L, D = keys_BLD.shape
        if queries_BQD is None:
            if self.queries is None:
                raise ValueError("CrossAttentionPooling: no queries given and the module has none (n_queries=0)")
            queries_BQD = self.queries.expand(B, -1, -1).to(keys_BLD.dtype)
        Q, H = queries_BQD.shape[1], self.n_heads
        q_BHQD = self.q(queries_BQD).view(B, Q, H, D // H).transpose(1, 2)
        k_BHLD, v_BHLD = self.kv(keys_BLD).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        if key_mask_BL is None:
            o_BHQD = F.scaled_dot_product_attention(q_BHQD, k_BHLD, v_BHLD)
            return self.proj(o_BHQD.transpose(1, 2).reshape(B, Q, D))
        key_mask_BL = key_mask_BL.bool()
        has_key_B = key_mask_BL.any(dim=1)
        # an empty row would give NaN: let keyless cells read everything, then zero their output
        mask_B11L = (key_mask_BL | ~has_key_B[:, None])[:, None, None, :]
        o_BHQD = F.scaled_dot_product_attention(q_BHQD, k_BHLD, v_BHLD, attn_mask=mask_B11L)
        out_BQD = self.proj(o_BHQD.transpose(1, 2).reshape(B, Q, D))
        return torch.where(has_key_B[:, None, None], out_BQD, torch.zeros_like(out_BQD))
