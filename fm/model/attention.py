"""Attention backends for the Zorro mask, behind one interface, and the multi-head self-attention layer.

A backend is a stateless object: ``attend = backend.prepare(gene_mask_BG, n_fusion)`` builds the batch's mask once
(dense mask, flex BlockMask or flash segment offsets) and returns ``attend(q_BHLD, k_BHLD, v_BHLD) -> o_BHLD``, which
every layer calls. Backends hold no parameters, so checkpoint keys never depend on the backend.

- ``sdpa``: ``F.scaled_dot_product_attention`` with the dense boolean mask [B, 1, L, L]. The reference.
- ``flex``: ``flex_attention`` with a BlockMask whose tables skip the masked blocks (about half of the L x L grid).
  torch.compile'd once (cached) where torch has a fused kernel: CUDA (forward and backward) and CPU without grad.
  torch 2.13 has no CPU flex backward (the public API raises, and inductor's backward lowering is Triton-only), so
  on CPU with grad it runs the flex higher-order op eagerly: torch's unfused math implementation, same mask_mod,
  exact gradients, but O(L^2) memory and slow. For tests and parity, not for CPU training (use sdpa there).
  ``compile=False`` (config ``flex_compile``) runs that eager path everywhere: no compile wait, for tests.
- ``blocks``: exact SDPA over the mask's non-empty blocks only: spliced x spliced and unspliced x unspliced (one
  call, the modality folded into the batch) and fusion x all. About half the work of ``sdpa``'s dense L x L grid,
  with autograd on any device: the CPU training path that skips masked blocks (the CPU analogue of ``flash``).
- ``flash``: flash-attn varlen on CUDA: one call over the per-cell, per-modality segments of real modality tokens,
  one with the fusion queries over the cell's real tokens. fp16/bf16 inputs only (fp32 is refused); no host sync.
  Optional import.

Padding queries read only themselves in every backend, so their output is their own value vector.

Shapes: B cells, G genes per modality, F fusion tokens, L = 2G + F tokens, H heads, D width, Dh head width.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from fm.model.masks import (
    SEG_FUSION,
    build_zorro_mask,
    token_is_real,
    token_segments,
    zorro_block_tables,
    zorro_mask_mod,
)

log = logging.getLogger(__name__)

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SdpaBackend:
    """Dense boolean mask + ``F.scaled_dot_product_attention``: the reference."""

    name = "sdpa"

    def prepare(self, gene_mask_BG: torch.Tensor, n_fusion: int) -> AttendFn:
        mask_B1LL = build_zorro_mask(gene_mask_BG, n_fusion)[:, None]

        def attend(q_BHLD, k_BHLD, v_BHLD):
            return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=mask_B1LL)

        return attend


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)  # one kernel for every length: batches vary in G


class FlexBackend:
    """FlexAttention with a block mask built from the Zorro segment structure (see :mod:`fm.model.masks`)."""

    name = "flex"
    block_size = 128

    def __init__(self, compile: bool = True) -> None:
        self.compile = compile

    def build_block_mask(self, gene_mask_BG: torch.Tensor, n_fusion: int):
        from torch.nn.attention.flex_attention import BlockMask

        B, G = gene_mask_BG.shape
        L = 2 * G + n_fusion
        padded = -(-L // self.block_size) * self.block_size
        # mask_mod may be called past L inside the last block: pad with non-real tokens (they read only themselves)
        seg_P = F.pad(token_segments(G, n_fusion, gene_mask_BG.device), (0, padded - L), value=SEG_FUSION)
        real_BP = F.pad(token_is_real(gene_mask_BG.bool(), n_fusion), (0, padded - L), value=False)
        kv_num, kv_idx, full_num, full_idx = zorro_block_tables(gene_mask_BG, n_fusion, self.block_size)
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=self.block_size,
            mask_mod=zorro_mask_mod(seg_P, real_BP), seq_lengths=(L, L),
        )

    def prepare(self, gene_mask_BG: torch.Tensor, n_fusion: int) -> AttendFn:
        block_mask = self.build_block_mask(gene_mask_BG, n_fusion)

        def attend(q_BHLD, k_BHLD, v_BHLD):
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHLD, k_BHLD, v_BHLD))
            cpu_grad = q_BHLD.device.type == "cpu" and needs_grad
            if self.compile and not cpu_grad:
                if not needs_grad:  # flex refuses CPU inputs that require grad, even under no_grad
                    q_BHLD, k_BHLD, v_BHLD = q_BHLD.detach(), k_BHLD.detach(), v_BHLD.detach()
                return _compiled_flex_attention()(q_BHLD, k_BHLD, v_BHLD, block_mask=block_mask)
            if cpu_grad:
                _warn_cpu_flex_grad()
            return _flex_eager(q_BHLD, k_BHLD, v_BHLD, block_mask)

        return attend


_warned_cpu_flex_grad = False


def _warn_cpu_flex_grad() -> None:
    global _warned_cpu_flex_grad
    if not _warned_cpu_flex_grad:
        log.warning("flex attention on CPU with grad runs torch's unfused math implementation (torch has no CPU flex "
                    "backward kernel); use attention=sdpa for CPU training")
        _warned_cpu_flex_grad = True


def _flex_eager(q_BHLD, k_BHLD, v_BHLD, block_mask) -> torch.Tensor:
    """The flex higher-order op run eagerly: torch's math implementation, with autograd (its only CPU backward)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op

    kernel_options = {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False}
    scale = q_BHLD.shape[-1] ** -0.5
    out, _, _ = flex_attention_op(q_BHLD, k_BHLD, v_BHLD, _identity_score, block_mask.as_tuple(), scale, kernel_options)
    return out


def _import_flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ImportError(
            "attention='flash' needs the flash-attn package (pip install 'fm[gpu]' or pip install flash-attn, on a "
            "CUDA machine); use attention='sdpa' or 'flex' without it"
        ) from e
    return flash_attn_varlen_func


class FlashBackend:
    """flash-attn varlen over packed real tokens: modality segments, then fusion queries over each cell.

    No host sync in the forward: the packing is a stable argsort (size B·L, known on the host) that moves each
    segment's real tokens to the front in (cell, segment) order, the offsets are cumulative sums on the device (a cell
    with no genes gives zero-length segments, which flash-attn skips), and the maximum lengths are the padded shape's
    bounds (G per modality segment, L per cell). Rows past the last offset are never read back. fp16/bf16 only: fp32
    inputs are refused, not silently rounded to bf16 (run under bf16 autocast, or choose another backend).
    """

    name = "flash"

    def __init__(self, varlen_func: Callable | None = None) -> None:
        """``varlen_func``: a function with ``flash_attn_varlen_func``'s contract, for tests (then any device and
        dtype); default: flash-attn's, CUDA and fp16/bf16 only."""
        self.varlen_func = varlen_func

    def prepare(self, gene_mask_BG: torch.Tensor, n_fusion: int) -> AttendFn:
        flash_attn_varlen_func = self.varlen_func or _import_flash_varlen()
        half_only = self.varlen_func is None
        if half_only and not gene_mask_BG.is_cuda:
            raise RuntimeError("attention='flash' runs on CUDA only; got a batch on " + str(gene_mask_BG.device))
        B, G = gene_mask_BG.shape
        L = 2 * G + n_fusion
        gm_BG = gene_mask_BG.bool()
        real_BL = token_is_real(gm_BG, n_fusion)
        seg_L = token_segments(G, n_fusion, gm_BG.device)
        cell_B1 = torch.arange(B, device=gm_BG.device)[:, None]
        # modality pass: real modality tokens sorted by (cell, modality) first, everything else after
        modality_BL = real_BL & (seg_L != SEG_FUSION)
        perm_modality = torch.argsort(torch.where(modality_BL, 2 * cell_B1 + seg_L, 2 * B).flatten(), stable=True)
        unperm_modality = torch.argsort(perm_modality)
        # fusion pass: every real token of a cell (its keys), cells in order, padding after
        perm_cell = torch.argsort(torch.where(real_BL, cell_B1, B).flatten(), stable=True)
        n_genes_B = gm_BG.sum(1, dtype=torch.int32)
        cu_modality = _offsets(n_genes_B.repeat_interleave(2))  # spliced, unspliced of cell 0, then cell 1, ...
        cu_cell = _offsets(2 * n_genes_B + n_fusion)
        cu_fusion = torch.arange(B + 1, dtype=torch.int32, device=gm_BG.device) * n_fusion
        keep_B2G1 = modality_BL[:, : 2 * G, None, None]  # real modality query rows (per head, per width)

        def attend(q_BHLD, k_BHLD, v_BHLD):
            if half_only and q_BHLD.dtype not in (torch.float16, torch.bfloat16):
                raise TypeError(
                    f"attention='flash' needs float16 or bfloat16 q/k/v, got {q_BHLD.dtype}: run under "
                    "torch.autocast('cuda', dtype=torch.bfloat16) (trainer precision bf16-mixed), or use "
                    "attention='sdpa' or 'flex' in float32"
                )
            H, Dh = q_BHLD.shape[1], q_BHLD.shape[3]
            q, k, v = (t.transpose(1, 2).reshape(B * L, H, Dh) for t in (q_BHLD, k_BHLD, v_BHLD))  # [B*L, H, Dh]
            o_packed = flash_attn_varlen_func(q[perm_modality], k[perm_modality], v[perm_modality],
                                              cu_modality, cu_modality, G, G)
            o_modality = o_packed[unperm_modality].view(B, L, H, Dh)[:, : 2 * G]
            # padding queries read only themselves: their output is their value
            o_modality = torch.where(keep_B2G1, o_modality, v.view(B, L, H, Dh)[:, : 2 * G])
            o_fusion = flash_attn_varlen_func(q.view(B, L, H, Dh)[:, 2 * G :].reshape(B * n_fusion, H, Dh),
                                              k[perm_cell], v[perm_cell], cu_fusion, cu_cell, n_fusion, L)
            o_BLHD = torch.cat([o_modality, o_fusion.view(B, n_fusion, H, Dh)], dim=1)
            return o_BLHD.transpose(1, 2)

        return attend


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """flash-attn's cu_seqlens: [0, cumsum(lengths)] in int32, on the lengths' device."""
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


class BlocksBackend:
    """SDPA over the Zorro mask's non-empty blocks: each modality with itself, and the fusion queries with all."""

    name = "blocks"

    def prepare(self, gene_mask_BG: torch.Tensor, n_fusion: int) -> AttendFn:
        gm_BG = gene_mask_BG.bool()
        B, G = gm_BG.shape
        eye_GG = torch.eye(G, dtype=torch.bool, device=gm_BG.device)
        # a modality query reads the real tokens of its modality; a padding query reads only itself
        modality_B1GG = ((gm_BG[:, :, None] & gm_BG[:, None, :]) | eye_GG)[:, None]
        modality_2B1GG = modality_B1GG.repeat(2, 1, 1, 1)  # spliced cells, then unspliced cells
        fusion_B1FL = token_is_real(gm_BG, n_fusion)[:, None, None, :]  # fusion queries read every real token

        def attend(q_BHLD, k_BHLD, v_BHLD):
            H, Dh = q_BHLD.shape[1], q_BHLD.shape[3]

            def by_modality(t_BHLD):  # [B, H, 2G, Dh] -> [2B, H, G, Dh]
                return t_BHLD[:, :, : 2 * G].unflatten(2, (2, G)).permute(2, 0, 1, 3, 4).reshape(2 * B, H, G, Dh)

            o_2BHGD = F.scaled_dot_product_attention(
                by_modality(q_BHLD), by_modality(k_BHLD), by_modality(v_BHLD), attn_mask=modality_2B1GG
            )
            o_modality_BHLD = o_2BHGD.view(2, B, H, G, Dh).permute(1, 2, 0, 3, 4).reshape(B, H, 2 * G, Dh)
            o_fusion_BHFD = F.scaled_dot_product_attention(
                q_BHLD[:, :, 2 * G :], k_BHLD, v_BHLD, attn_mask=fusion_B1FL
            )
            return torch.cat([o_modality_BHLD, o_fusion_BHFD], dim=2)

        return attend


BACKENDS = {"sdpa": SdpaBackend, "flex": FlexBackend, "blocks": BlocksBackend, "flash": FlashBackend}


def get_attention_backend(name: str, flex_compile: bool = True):
    """The backend called ``name`` (one of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    return FlexBackend(compile=flex_compile) if name == "flex" else BACKENDS[name]()


class MultiHeadSelfAttention(nn.Module):
    """Fused qkv projection, a backend's ``attend``, output projection. Parameters do not depend on the backend."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x_BLD: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.n_heads, D // self.n_heads)
        q_BHLD, k_BHLD, v_BHLD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o_BHLD = attend(q_BHLD, k_BHLD, v_BHLD)
        return self.proj(o_BHLD.transpose(1, 2).reshape(B, L, D))
