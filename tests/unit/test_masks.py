"""The Zorro mask: its rules, the flex mask_mod and the flex block tables agree with the dense mask."""

import pytest
import torch

from fm.model.masks import build_zorro_mask, token_segments, zorro_block_tables, zorro_mask_mod


def gene_mask(lengths, G):
    return torch.arange(G)[None, :] < torch.tensor(lengths)[:, None]


def test_rules_on_a_tiny_cell():
    G, Fu = 3, 2
    m = build_zorro_mask(gene_mask([2], G), Fu)[0]  # gene 2 is padding
    s, u, f = [0, 1], [3, 4], [6, 7]
    pad_s, pad_u = 2, 5
    for q in s:
        assert m[q, s].all() and not m[q, u].any() and not m[q, f].any() and not m[q, pad_s]
    for q in u:
        assert m[q, u].all() and not m[q, s].any() and not m[q, f].any() and not m[q, pad_u]
    for q in f:
        assert m[q, s + u + f].all() and not m[q, pad_s] and not m[q, pad_u]
    for q in (pad_s, pad_u):  # padding reads only itself, and no real query reads it
        assert m[q].sum() == 1 and m[q, q]
        assert m[:, q].sum() == 1


def test_every_row_has_a_key_even_without_genes():
    m = build_zorro_mask(gene_mask([0, 5, 3], 5), 4)
    assert m.any(-1).all()


def test_mask_mod_equals_dense_mask():
    G, Fu = 7, 3
    gm = gene_mask([7, 2, 0], G)
    real = torch.cat([gm, gm, torch.ones(3, Fu, dtype=torch.bool)], 1)
    mod = zorro_mask_mod(token_segments(G, Fu), real)
    L = 2 * G + Fu
    b, q, k = torch.arange(3)[:, None, None], torch.arange(L)[None, :, None], torch.arange(L)[None, None, :]
    assert torch.equal(mod(b, 0, q, k), build_zorro_mask(gm, Fu))


@pytest.mark.parametrize("G,Fu,block", [(20, 4, 8), (13, 3, 8), (64, 16, 16), (5, 1, 16)])
def test_block_tables_cover_the_mask(G, Fu, block):
    gm = gene_mask([G, G // 2, 0, 1], G)
    dense = build_zorro_mask(gm, Fu)
    B, L = dense.shape[0], dense.shape[1]
    nb = -(-L // block)
    padded = torch.zeros(B, nb * block, nb * block, dtype=torch.bool)
    padded[:, :L, :L] = dense
    blocks = padded.view(B, nb, block, nb, block)
    any_blk, all_blk = blocks.any(dim=(2, 4)), blocks.all(dim=(2, 4))
    kv_num, kv_idx, full_num, full_idx = zorro_block_tables(gm, Fu, block)

    def selected(num, idx):
        sel = torch.zeros(B, nb, nb, dtype=torch.bool)
        for b in range(B):
            for i in range(nb):
                sel[b, i, idx[b, 0, i, : num[b, 0, i]].long()] = True
        return sel

    partial, full = selected(kv_num, kv_idx), selected(full_num, full_idx)
    assert not (partial & full).any()
    assert torch.equal(any_blk & ~(partial | full), torch.zeros_like(any_blk))  # nothing allowed is skipped
    assert (all_blk | ~full).all()  # a full block is entirely allowed
    assert (partial | full).sum() < nb * nb * B or nb == 1  # something is skipped


def test_parenthesised_precedence_trap():
    """``a | b == c`` parses as ``(a | b) == c``; the mask must not depend on that."""
    gm = gene_mask([4], 4)
    m = build_zorro_mask(gm, 2)[0]
    assert m[:8, 8:].sum() == 0  # modality tokens never read fusion tokens
