"""Tokenization: gene choice, normalisation, log1p, padding and masks.

    python -m pytest -q tests/unit/test_tokenize.py
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fm import keys
from fm.data.tokenize import _LOG_PIECE, CellBlock, Segments, TokenizerConfig, _uniform_subsets, tokenize_block


def _block(cells: list[tuple[list[int], list[float], list[float]]], size_factor=None, velocity=False) -> CellBlock:
    lens = [len(g) for g, _, _ in cells]
    cat = lambda i, dt: np.concatenate([np.asarray(c[i], dt) for c in cells]) if cells else np.zeros(0, dt)
    s, u = cat(1, np.float32), cat(2, np.float32)
    B = len(cells)
    v = s * 0.5 if velocity else np.full(len(s), np.nan, np.float32)
    return CellBlock(
        offsets_B1=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), gene_index_N=cat(0, np.int32),
        spliced_N=s, unspliced_N=u, velocity_N=v, velocity_u_N=np.full(len(s), np.nan, np.float32),
        library_size_spliced_B=np.array([sum(c[1]) for c in cells], np.float32),
        library_size_unspliced_B=np.array([sum(c[2]) for c in cells], np.float32),
        size_factor_B=np.asarray(size_factor if size_factor is not None else [np.nan] * B, np.float32),
        time_B=np.full(B, np.nan, np.float32), cell_id=[f"c{i}" for i in range(B)], dataset_id=["d"] * B,
        cell_type=[None] * B,
    )


CELLS = [([1, 4, 7], [2.0, 0.0, 8.0], [1.0, 3.0, 0.0]), ([2], [5.0], [0.0])]


def test_shapes_dtypes_padding_and_masks():
    out = tokenize_block(_block(CELLS), TokenizerConfig(), np.random.default_rng(0))
    assert out[keys.B_GENE_IDS].dtype == torch.int64 and out[keys.B_GENE_IDS].shape == (2, 3)
    assert out[keys.B_GENE_MASK].tolist() == [[True] * 3, [True, False, False]]
    assert out[keys.B_GENE_IDS].tolist() == [[1, 4, 7], [2, 0, 0]]
    assert out[keys.B_SPLICED_COUNTS].tolist() == [[2, 0, 8], [5, 0, 0]]
    for k in (keys.B_SPLICED, keys.B_UNSPLICED, keys.B_SPLICED_COUNTS, keys.B_VELOCITY, keys.B_LIBRARY_SIZE_SPLICED):
        assert out[k].dtype == torch.float32
    assert torch.isnan(out[keys.B_VELOCITY]).all() and torch.isnan(out[keys.B_TIME]).all()
    assert out[keys.B_LIBRARY_SIZE_SPLICED].tolist() == [10.0, 5.0]
    assert out[keys.B_CELL_ID] == ["c0", "c1"] and out[keys.B_CELL_TYPE] == [None, None]
    assert out[keys.B_UNSPLICED][1].tolist() == [0.0, 0.0, 0.0]  # zero unspliced library: zeros, no NaN


def test_velocity_nan_only_where_unknown_and_at_padding():
    out = tokenize_block(_block(CELLS, velocity=True), TokenizerConfig(), np.random.default_rng(0))
    v = out[keys.B_VELOCITY]
    assert v[0].tolist() == [1.0, 0.0, 4.0] and v[1, 0] == 2.5 and torch.isnan(v[1, 1:]).all()


@pytest.mark.parametrize("normalization", ["total", "size_factor", "none"])
def test_normalisation_then_log1p(normalization):
    cfg = TokenizerConfig(normalization=normalization, target_sum=100.0)
    out = tokenize_block(_block(CELLS, size_factor=[2.0, 0.5]), cfg, np.random.default_rng(0))
    s = np.array([[2.0, 0.0, 8.0], [5.0, 0, 0]])
    u = np.array([[1.0, 3.0, 0.0], [0, 0, 0]])
    if normalization == "total":
        s_n, u_n = s / s.sum(1, keepdims=True) * 100, u / np.maximum(u.sum(1, keepdims=True), 1) * 100
    elif normalization == "size_factor":
        sf = np.array([[2.0], [0.5]])
        s_n, u_n = s / sf, u / sf
    else:
        s_n, u_n = s, u
    np.testing.assert_allclose(out[keys.B_SPLICED].numpy(), np.log1p(s_n), rtol=1e-6)
    np.testing.assert_allclose(out[keys.B_UNSPLICED].numpy(), np.log1p(u_n), rtol=1e-6)


def test_size_factor_missing_names_the_cell():
    with pytest.raises(ValueError, match="'c1'.*size_factor"):
        tokenize_block(_block(CELLS, size_factor=[1.0, np.nan]), TokenizerConfig(normalization="size_factor"),
                       np.random.default_rng(0))


def test_max_genes_random_is_a_seeded_sorted_subset_shared_by_modalities():
    rng = np.random.default_rng(1)
    genes = np.sort(rng.choice(1000, 300, replace=False))
    s, u = rng.integers(1, 50, 300).astype(float), rng.integers(0, 50, 300).astype(float)
    cells = [(genes.tolist(), s.tolist(), u.tolist()), ([3, 5], [1.0, 1.0], [1.0, 1.0])]
    cfg = TokenizerConfig(max_genes=64)
    a = tokenize_block(_block(cells), cfg, np.random.default_rng(7))
    b = tokenize_block(_block(cells), cfg, np.random.default_rng(7))
    c = tokenize_block(_block(cells), cfg, np.random.default_rng(8))
    ids = a[keys.B_GENE_IDS][0].numpy()
    assert a[keys.B_GENE_IDS].shape == (2, 64) and a[keys.B_GENE_MASK][0].all()
    assert np.all(np.diff(ids) > 0) and set(ids) <= set(genes)
    assert torch.equal(a[keys.B_GENE_IDS], b[keys.B_GENE_IDS]) and not torch.equal(a[keys.B_GENE_IDS],
                                                                                     c[keys.B_GENE_IDS])
    pos = np.searchsorted(genes, ids)  # both modalities carry the chosen genes' own counts
    np.testing.assert_array_equal(a[keys.B_SPLICED_COUNTS][0].numpy(), s[pos])
    np.testing.assert_array_equal(a[keys.B_UNSPLICED_COUNTS][0].numpy(), u[pos])
    assert a[keys.B_GENE_MASK][1].sum() == 2  # a short cell keeps all its genes


def test_max_genes_top_expressed_keeps_the_largest():
    cells = [([0, 1, 2, 3, 4], [1.0, 9.0, 0.0, 5.0, 2.0], [0.0, 0.0, 1.0, 5.0, 0.0])]
    out = tokenize_block(_block(cells), TokenizerConfig(max_genes=2, gene_sampling="top_expressed"),
                         np.random.default_rng(0))
    assert out[keys.B_GENE_IDS].tolist() == [[1, 3]]
    # library size is the whole cell's, not the chosen genes'
    np.testing.assert_allclose(out[keys.B_SPLICED].numpy(), np.log1p(np.array([[9.0, 5.0]]) / 17 * 1e4), rtol=1e-6)


def test_all_empty_cells():
    out = tokenize_block(_block([([], [], []), ([], [], [])]), TokenizerConfig(), np.random.default_rng(0))
    assert out[keys.B_GENE_MASK].shape == (2, 1) and not out[keys.B_GENE_MASK].any()


@pytest.mark.parametrize("field,value", [("max_genes", 0), ("gene_sampling", "first"), ("normalization", "cpm"),
                                         ("target_sum", -1.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TokenizerConfig.{field}"):
        TokenizerConfig(**{field: value})


def _dense(cells, vocab: int = 12) -> tuple[np.ndarray, np.ndarray]:
    s, u = np.zeros((len(cells), vocab), np.float32), np.zeros((len(cells), vocab), np.float32)
    for b, (genes, sv, uv) in enumerate(cells):
        s[b, genes], u[b, genes] = sv, uv
    return s, u


@pytest.mark.parametrize("sampling", ["random", "top_expressed"])
@pytest.mark.parametrize("max_genes", [16, 3])
def test_batch_gene_set_gives_every_cell_the_same_genes(sampling, max_genes):
    cells = [([1, 4, 7], [2.0, 0.0, 8.0], [1.0, 3.0, 0.0]), ([2, 7], [5.0, 1.0], [0.0, 2.0]), ([], [], []),
             ([0, 4, 9, 11], [1.0, 1.0, 6.0, 2.0], [4.0, 0.0, 1.0, 1.0])]
    cfg = TokenizerConfig(gene_set="batch", max_genes=max_genes, gene_sampling=sampling, normalization="none")
    out = tokenize_block(_block(cells, velocity=True), cfg, np.random.default_rng(3))
    ids, mask = out[keys.B_GENE_IDS].numpy(), out[keys.B_GENE_MASK].numpy()
    union = sorted({g for genes, _, _ in cells for g in genes})
    panel = ids[0]
    assert (ids == panel).all() and mask.all()  # the same genes, all real, in every row (the empty cell too)
    assert len(panel) == min(max_genes, len(union)) and set(panel) <= set(union) and list(panel) == sorted(panel)
    if sampling == "top_expressed" and max_genes == 3:  # summed s + u over the batch: gene 7 (11), 9 (7), 1/4/0 (5)
        assert {7, 9} <= set(panel)
    dense_s, dense_u = _dense(cells)
    np.testing.assert_array_equal(out[keys.B_SPLICED_COUNTS].numpy(), dense_s[:, panel])  # zero where a cell lacks it
    np.testing.assert_array_equal(out[keys.B_UNSPLICED_COUNTS].numpy(), dense_u[:, panel])
    np.testing.assert_allclose(out[keys.B_SPLICED].numpy(), np.log1p(dense_s[:, panel]), rtol=1e-6)
    velocity = out[keys.B_VELOCITY].numpy()  # known (s * 0.5) for a cell's stored genes, NaN elsewhere
    stored = np.zeros_like(dense_s, bool)
    for b, (genes, _, _) in enumerate(cells):
        stored[b, genes] = True
    np.testing.assert_array_equal(np.isnan(velocity), ~stored[:, panel])
    np.testing.assert_array_equal(velocity[stored[:, panel]], (dense_s[:, panel] * 0.5)[stored[:, panel]])


def test_unknown_gene_set_is_named():
    with pytest.raises(ValueError, match="gene_set"):
        TokenizerConfig(gene_set="union")


def _chi2_pvalue(counts: np.ndarray) -> float:
    """p-value of counts (every category, zeros included) against equal probabilities."""
    from scipy.stats import chisquare

    return float(chisquare(counts).pvalue)


@pytest.mark.parametrize("n,k", [(6, 2), (7, 3), (9, 1), (8, 8), (5, 0)])
def test_uniform_subsets_are_exact_and_uniform(n, k):
    """Every row gets exactly k distinct members of [0, n), and each of the C(n, k) subsets equally often."""
    from itertools import combinations

    rows = 12_000
    mask = _uniform_subsets(np.random.default_rng(11), np.full(rows, n), np.full(rows, k)).reshape(rows, n)
    assert (mask.sum(1) == k).all()
    codes = mask @ (1 << np.arange(n))
    subsets = [sum(1 << i for i in c) for c in combinations(range(n), k)]
    counts = np.array([(codes == c).sum() for c in subsets])
    assert counts.sum() == rows  # nothing outside the C(n, k) subsets
    if len(subsets) > 1:
        assert _chi2_pvalue(counts) > 1e-4, counts


def test_uniform_subsets_rows_of_different_lengths_stay_in_their_row():
    n_b, k_b = np.array([3, 10, 1, 7, 10]), np.array([1, 9, 1, 0, 5])
    mask = _uniform_subsets(np.random.default_rng(0), n_b, k_b)
    assert len(mask) == n_b.sum()
    assert [int(m.sum()) for m in np.split(mask, np.cumsum(n_b)[:-1])] == k_b.tolist()


def test_random_sampling_is_uniform_over_a_long_cells_genes():
    """max_genes=8 of 11 genes (the 3 to drop are drawn) and of 20 (the 8 to keep are drawn), in one block: each
    8-subset of the 11 genes is kept equally often, and each of the 20 genes with probability 8 / 20."""
    from itertools import combinations

    B, K = 3000, 8
    short, mid, wide = ([1, 2], [1.0, 1.0], [0.0, 1.0]), list(range(100, 111)), list(range(200, 220))
    cells = [(mid, [1.0] * 11, [1.0] * 11), (wide, [1.0] * 20, [1.0] * 20)] * B + [short]
    out = tokenize_block(_block(cells), TokenizerConfig(max_genes=K), np.random.default_rng(5), targets=())
    ids, mask = out[keys.B_GENE_IDS].numpy(), out[keys.B_GENE_MASK].numpy()
    assert mask[:-1].all() and (np.diff(ids[:-1], axis=1) > 0).all()  # K genes each, in corpus order
    assert ids[-1, :2].tolist() == [1, 2] and mask[-1].sum() == 2  # the short cell keeps its genes
    codes = ((1 << (ids[0:-1:2] - 100)).sum(1)).tolist()
    subsets = [sum(1 << i for i in c) for c in combinations(range(11), K)]
    counts = np.array([codes.count(c) for c in subsets])
    assert counts.sum() == B and _chi2_pvalue(counts) > 1e-4
    kept = np.bincount((ids[1:-1:2] - 200).ravel(), minlength=20)
    assert kept.sum() == B * K and _chi2_pvalue(kept) > 1e-4


def test_random_sampling_is_reproducible_and_differs_by_seed():
    rng = np.random.default_rng(4)
    cells = []
    for n in (40, 9, 57, 33):  # three cells over max_genes=12, one under
        genes = np.sort(rng.choice(500, n, replace=False))
        cells.append((genes.tolist(), rng.integers(1, 9, n).tolist(), rng.integers(0, 9, n).tolist()))
    cfg = TokenizerConfig(max_genes=12)
    a, b, c = (tokenize_block(_block(cells), cfg, np.random.default_rng(s)) for s in (3, 3, 4))
    _assert_same(a, b)
    assert not torch.equal(a[keys.B_GENE_IDS], c[keys.B_GENE_IDS])


def test_log1p_matches_numpy_within_an_ulp_over_many_values():
    """The values cross several of the pieces the log is applied in (fm.data.tokenize._LOG_PIECE)."""
    rng = np.random.default_rng(8)
    cells = [(list(range(n)), rng.poisson(3.0, n).astype(float).tolist(), rng.poisson(1.0, n).astype(float).tolist())
             for n in rng.integers(900, 1100, 80)]
    block = _block(cells)
    out = tokenize_block(block, TokenizerConfig(max_genes=2048), np.random.default_rng(0), targets=())
    assert out[keys.B_SPLICED].numel() > 2 * _LOG_PIECE
    for key, counts_key, lib in ((keys.B_SPLICED, keys.B_SPLICED_COUNTS, block.library_size_spliced_B),
                                 (keys.B_UNSPLICED, keys.B_UNSPLICED_COUNTS, block.library_size_unspliced_B)):
        scale = np.where(lib > 0, 1e4 / np.where(lib > 0, lib.astype(np.float64), 1.0), 0.0).astype(np.float32)
        ref = np.log(out[counts_key].numpy() * scale[:, None] + np.float32(1))  # float32 throughout, as before
        got = out[key].numpy()
        assert got.dtype == ref.dtype == np.float32
        ulps = np.abs(got.view(np.int32).astype(np.int64) - ref.view(np.int32))
        assert ulps.max() <= 1


def _as_segments(block: CellBlock) -> CellBlock:
    """The same cells with each flat array held as per-cell pieces (as the stream passes them)."""
    cut = lambda a: None if a is None else Segments(np.split(a, block.offsets_B1[1:-1]), a.dtype)
    return dataclasses.replace(block, gene_index_N=cut(block.gene_index_N), spliced_N=cut(block.spliced_N),
                               unspliced_N=cut(block.unspliced_N), velocity_N=cut(block.velocity_N),
                               velocity_u_N=cut(block.velocity_u_N))


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            x, y = (a[k], b[k]) if a[k].dtype == torch.bool else (a[k].view(torch.uint8), b[k].view(torch.uint8))
            assert torch.equal(x, y), k  # bitwise, so NaN targets compare too
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("gene_set", ["cell", "batch"])
@pytest.mark.parametrize("sampling", ["random", "top_expressed"])
def test_cells_as_segments_give_the_same_batch_as_flat_arrays(gene_set, sampling):
    rng = np.random.default_rng(6)
    cells = []
    for n in (40, 0, 9, 57, 12, 33, 1):  # long, empty, short, and exactly max_genes cells
        genes = np.sort(rng.choice(500, n, replace=False))
        cells.append((genes.tolist(), rng.integers(0, 9, n).tolist(), rng.integers(0, 9, n).tolist()))
    block = _block(cells, velocity=True)
    cfg = TokenizerConfig(max_genes=12, gene_set=gene_set, gene_sampling=sampling)
    flat = tokenize_block(block, cfg, np.random.default_rng(2))
    pieces = tokenize_block(_as_segments(block), cfg, np.random.default_rng(2))
    _assert_same(pieces, flat)
    assert torch.isnan(flat[keys.B_VELOCITY][~flat[keys.B_GENE_MASK]]).all()  # padding: NaN targets, zero counts
    assert (flat[keys.B_SPLICED_COUNTS][~flat[keys.B_GENE_MASK]] == 0).all()
    np.testing.assert_array_equal(np.asarray(_as_segments(block).spliced_N), block.spliced_N)


def test_a_tiny_library_keeps_padding_at_zero():
    """target_sum / a tiny library overflows float32: stored genes get what the arithmetic gives, padding stays 0."""
    block = _block(CELLS)
    block.library_size_spliced_B[1] = 1e-40
    with np.errstate(over="ignore", invalid="ignore"):
        out = tokenize_block(block, TokenizerConfig(), np.random.default_rng(0))
    s, mask = out[keys.B_SPLICED].numpy(), out[keys.B_GENE_MASK].numpy()
    assert np.isinf(s[1, 0]) and (s[1, ~mask[1]] == 0).all()  # 5 counts * inf; two padding slots
    np.testing.assert_allclose(s[0], np.log1p(np.array([2.0, 0.0, 8.0]) / 10 * 1e4), rtol=1e-6)


@pytest.mark.parametrize("gene_set", ["cell", "batch"])
def test_padding_to_a_multiple_changes_no_output(gene_set):
    """pad_to_multiple widens G with masked slots only: the same real tokens, and the same encoder outputs."""
    from fm.model.config import ZorroConfig
    from fm.model.zorro import ZorroEncoder
    from tests.tolerance import assert_close_rounding

    block = _block(CELLS + [([3, 5, 9, 11], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 2.0])])
    plain, padded = (tokenize_block(block, TokenizerConfig(gene_set=gene_set, pad_to_multiple=m),
                                    np.random.default_rng(0)) for m in (1, 16))
    G = plain[keys.B_GENE_MASK].shape[1]
    assert padded[keys.B_GENE_MASK].shape[1] == 16 and G < 16
    for k in (keys.B_GENE_IDS, keys.B_GENE_MASK, keys.B_SPLICED, keys.B_UNSPLICED):
        assert torch.equal(padded[k][:, :G], plain[k]), k
    assert not padded[keys.B_GENE_MASK][:, G:].any() and (padded[keys.B_GENE_IDS][:, G:] == 0).all()
    torch.manual_seed(0)
    enc = ZorroEncoder(ZorroConfig.from_name("debug", vocab_size=16)).eval()
    with torch.no_grad():
        a, b = enc(plain), enc(padded)
    for f in ("z_spliced", "z_unspliced", "z_fusion", "z_global"):
        assert_close_rounding(getattr(b, f), getattr(a, f), terms=4 * 32 * 2, msg=f)
    assert_close_rounding(b.h_spliced[:, :G], a.h_spliced, terms=4 * 32 * 2)


def test_batch_bound_covers_the_padded_width():
    from fm.data.tokenize import batch_nbytes, padded_width

    cfg = TokenizerConfig(max_genes=100, pad_to_multiple=64)
    assert padded_width(100, cfg) == 128 and padded_width(0, cfg) == 64
    assert batch_nbytes(2, cfg, ()) > batch_nbytes(2, TokenizerConfig(max_genes=100), ())
