"""The Zorro attention mask: which token may read which, as a dense mask, a flex mask_mod and flex block tables.

Token layout of one cell: ``[spliced G | unspliced G | fusion F]``, L = 2G + F.
- a spliced token reads the real spliced tokens of its cell; an unspliced token, the real unspliced tokens;
- a fusion token reads every real token of its cell (spliced, unspliced, fusion);
- modality tokens never read fusion tokens (which keeps spliced and unspliced outputs modality-pure);
- padding keys are never read by real queries, and a padding query reads only itself;
- every token reads itself, so no query row is empty (SDPA gives NaN on an empty row), even in a cell with no genes.

Shapes: B cells, G genes per modality, F fusion tokens, L = 2G + F tokens, nQ/nK blocks of ``block_size`` tokens.
"""

from __future__ import annotations

import torch

SEG_SPLICED, SEG_UNSPLICED, SEG_FUSION = 0, 1, 2
N_CODES = 6  # token code = 2 * segment + is_real


def token_segments(n_genes: int, n_fusion: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Segment id (SEG_*) of each token position: int64 [L]."""
    return torch.cat([
        torch.full((n_genes,), SEG_SPLICED, dtype=torch.long, device=device),
        torch.full((n_genes,), SEG_UNSPLICED, dtype=torch.long, device=device),
        torch.full((n_fusion,), SEG_FUSION, dtype=torch.long, device=device),
    ])


def token_is_real(gene_mask_BG: torch.Tensor, n_fusion: int) -> torch.Tensor:
    """True for real tokens (genes in ``gene_mask`` twice, then the always-real fusion tokens): bool [B, L]."""
    fusion_BF = torch.ones(gene_mask_BG.shape[0], n_fusion, dtype=torch.bool, device=gene_mask_BG.device)
    return torch.cat([gene_mask_BG, gene_mask_BG, fusion_BF], dim=1)


def _segment_rule(seg_q: torch.Tensor, seg_k: torch.Tensor) -> torch.Tensor:
    """Segment-level rule (before padding): same modality, or a fusion query. Broadcasts."""
    return ((seg_q == seg_k) & (seg_q != SEG_FUSION)) | (seg_q == SEG_FUSION)


def build_zorro_mask(gene_mask_BG: torch.Tensor, n_fusion: int) -> torch.Tensor:
    """Dense Zorro mask, True = may attend: bool [B, L, L] (query, key)."""
    B, G = gene_mask_BG.shape
    seg_L = token_segments(G, n_fusion, gene_mask_BG.device)
    real_BL = token_is_real(gene_mask_BG.bool(), n_fusion)
    rule_LL = _segment_rule(seg_L[:, None], seg_L[None, :])
    eye_LL = torch.eye(seg_L.numel(), dtype=torch.bool, device=gene_mask_BG.device)
    return (rule_LL[None] & (real_BL[:, :, None] & real_BL[:, None, :])) | eye_LL[None]


def zorro_mask_mod(seg_L: torch.Tensor, real_BL: torch.Tensor):
    """The same mask as a flex ``mask_mod(b, h, q_idx, kv_idx)``.

    ``seg_L`` and ``real_BL`` may be longer than L (padded to whole blocks): pad with non-real tokens so an index past
    the end reads only itself.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        rule = _segment_rule(seg_L[q_idx], seg_L[kv_idx])
        return (rule & (real_BL[b, q_idx] & real_BL[b, kv_idx])) | (q_idx == kv_idx)

    return mask_mod


def _code_rule() -> torch.Tensor:
    """allowed[code_q, code_k] for code = 2 * segment + is_real, ignoring the diagonal: bool [6, 6]."""
    code = torch.arange(N_CODES)
    seg, real = code // 2, (code % 2).bool()
    return _segment_rule(seg[:, None], seg[None, :]) & (real[:, None] & real[None, :])


def zorro_block_tables(
    gene_mask_BG: torch.Tensor, n_fusion: int, block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flex block tables of the Zorro mask, from per-block code histograms, in O(B L) (no L x L mask is built).

    A block (q-block i, k-block j) is *partial* (mask_mod applied) when some allowed pair may lie in it and *full*
    (no mask_mod) when every pair is allowed; other blocks are skipped. Positions past L count as padding.

    Returns:
        kv_num_blocks [B, 1, nQ], kv_indices [B, 1, nQ, nK], full_kv_num_blocks, full_kv_indices (int32).
    """
    B, G = gene_mask_BG.shape
    device = gene_mask_BG.device
    L = 2 * G + n_fusion
    n_blocks = -(-L // block_size)
    seg_L = token_segments(G, n_fusion, device)
    code_BL = 2 * seg_L[None, :] + token_is_real(gene_mask_BG.bool(), n_fusion).long()
    code_BL = torch.nn.functional.pad(code_BL, (0, n_blocks * block_size - L), value=2 * SEG_SPLICED)  # padding code
    onehot = torch.nn.functional.one_hot(code_BL, N_CODES).view(B, n_blocks, block_size, N_CODES)
    present_BNC = onehot.amax(dim=2).float()  # which codes occur in each block
    rule_CC = _code_rule().to(device).float()
    allowed_pairs = torch.einsum("bic,cd,bjd->bij", present_BNC, rule_CC, present_BNC)
    forbidden_pairs = torch.einsum("bic,cd,bjd->bij", present_BNC, 1.0 - rule_CC, present_BNC)
    diagonal = torch.eye(n_blocks, dtype=torch.bool, device=device)[None]
    any_BIJ = (allowed_pairs > 0) | diagonal
    full_BIJ = forbidden_pairs == 0
    partial_BIJ = any_BIJ & ~full_BIJ

    def tables(sel_BIJ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = sel_BIJ.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~sel_BIJ).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # selected blocks first
        return num[:, None], idx[:, None]

    return (*tables(partial_BIJ), *tables(full_BIJ))
