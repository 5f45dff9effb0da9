"""Attention backends and cross-attention pooling, below the encoder."""

import pytest
import torch

from fm.model.attention import FlexBackend, MultiHeadSelfAttention, SdpaBackend, get_attention_backend
from fm.model.pooling import CrossAttentionPooling
from tests.tolerance import assert_close_rounding


def gene_mask(lengths, G):
    return torch.arange(G)[None, :] < torch.tensor(lengths)[:, None]


def qkv(B, H, L, Dh, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, Dh, generator=g) for _ in range(3)]


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="sdpa, flex, blocks, flash"):
        get_attention_backend("xformers")


def test_padding_queries_read_only_themselves():
    gm = gene_mask([3, 0], 5)
    q, k, v = qkv(2, 2, 2 * 5 + 2, 8)
    o = SdpaBackend().prepare(gm, 2)(q, k, v)
    pad = torch.cat([~gm, ~gm, torch.zeros(2, 2, dtype=torch.bool)], 1)
    torch.testing.assert_close(o.transpose(1, 2)[pad], v.transpose(1, 2)[pad])


def test_eager_flex_matches_sdpa_with_large_blocks():
    """Over 128-token blocks (several per modality), with a cell without genes."""
    G, Fu = 150, 4
    gm = gene_mask([150, 70, 0], G)
    q, k, v = qkv(3, 2, 2 * G + Fu, 8)
    ref = SdpaBackend().prepare(gm, Fu)(q, k, v)
    out = FlexBackend(compile=False).prepare(gm, Fu)(q, k, v)
    assert_close_rounding(out, ref, terms=k.shape[-2])  # flex sums over the keys in other blocks than sdpa


@pytest.mark.slow
def test_compiled_cpu_flex_forward_matches_sdpa():
    """The compiled CPU kernel reads the block tables (the eager path reads only mask_mod): check it skips correctly."""
    G, Fu = 150, 4
    gm = gene_mask([150, 70, 0, 129], G)
    q, k, v = qkv(4, 2, 2 * G + Fu, 16)
    ref = SdpaBackend().prepare(gm, Fu)(q, k, v)
    with torch.no_grad():
        out = FlexBackend(compile=True).prepare(gm, Fu)(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_self_attention_layer_has_no_backend_state():
    layer = MultiHeadSelfAttention(16, 2)
    assert set(layer.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_pooling_with_external_queries_and_a_keyless_cell():
    torch.manual_seed(0)
    pool = CrossAttentionPooling(16, 4, n_queries=0)
    queries = torch.randn(3, 5, 16, requires_grad=True)
    keys_ = torch.randn(3, 7, 16, requires_grad=True)
    mask = gene_mask([7, 2, 0], 7)
    out = pool(queries, keys_, mask)
    assert out.shape == (3, 5, 16)
    assert (out[2] == 0).all()
    out.square().sum().backward()
    assert torch.isfinite(queries.grad).all() and torch.isfinite(keys_.grad).all()
    assert (keys_.grad[1, 2:] == 0).all()  # masked keys get no gradient
    with pytest.raises(ValueError, match="no queries"):
        pool(None, keys_, mask)


def test_pooling_learned_queries_ignore_masked_keys():
    torch.manual_seed(0)
    pool = CrossAttentionPooling(16, 2, n_queries=2)
    keys_ = torch.randn(2, 6, 16)
    mask = gene_mask([6, 3], 6)
    noisy = keys_.clone()
    noisy[1, 3:] = 100.0
    torch.testing.assert_close(pool(None, noisy, mask), pool(None, keys_, mask))
    assert pool(None, keys_, mask).shape == (2, 2, 16)


def reference_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
    """``flash_attn_varlen_func``'s contract, written out: q [total_q, H, Dh], k/v [total_k, H, Dh]; sequence i is
    rows cu[i]:cu[i+1]; softmax scale 1/sqrt(Dh), not causal; a query with no key gets 0; rows past cu_q[-1] are left
    unwritten (NaN here, so a caller that reads them fails)."""
    assert not kwargs.get("causal", False) and kwargs.get("softmax_scale") is None
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and len(cu_seqlens_q) == len(cu_seqlens_k)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = [torch.full_like(q[: max(0, q.shape[0] - cq[-1])], float("nan"))]
    rows = []
    for i in range(len(cq) - 1):
        nq, nk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        assert 0 <= nq <= max_seqlen_q and 0 <= nk <= max_seqlen_k
        qi, ki, vi = (t.transpose(0, 1) for t in (q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]))
        rows.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1) if nk
                    else torch.zeros_like(q[cq[i]:cq[i + 1]]))
    return torch.cat([*rows, *out])


@pytest.mark.parametrize("prefix", [True, False])
def test_flash_glue_matches_sdpa_outputs_and_gradients(prefix):
    """The flash backend's packing (argsort, offsets, bounds) through a reference varlen function on CPU: ragged
    cells, a cell with no genes and, without ``prefix``, real genes scattered as in split views."""
    from fm.model.attention import FlashBackend

    G, Fu = 11, 3
    gm = gene_mask([11, 6, 0, 1], G)
    if not prefix:
        gm = gm[:, torch.randperm(G, generator=torch.Generator().manual_seed(1))]
    results = []
    for backend in (SdpaBackend(), FlashBackend(varlen_func=reference_flash_varlen)):
        q, k, v = (t.double().requires_grad_() for t in qkv(4, 2, 2 * G + Fu, 8))
        o = backend.prepare(gm, Fu)(q, k, v)
        (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum().backward()
        results.append((o.detach(), q.grad, k.grad, v.grad))
    for name, want, got in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(got).all(), name
        assert_close_rounding(got, want, terms=2 * G + Fu, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_refuses_float32():
    pytest.importorskip("flash_attn")
    gm = gene_mask([3, 0], 5).cuda()
    q, k, v = (t.cuda() for t in qkv(2, 2, 2 * 5 + 2, 8))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        get_attention_backend("flash").prepare(gm, 2)(q, k, v)
