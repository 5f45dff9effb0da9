"""Tokenization: gene choice, normalisation, log1p, padding and masks.

    python -m pytest -q tests/unit/test_tokenize.py
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fm import keys
from fm.data.tokenize import CellBlock, Segments, TokenizerConfig, tokenize_block


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


@pytest.mark.parametrize("tied", [False, True])
def test_random_sampling_keeps_the_cells_smallest_draws_even_with_ties(tied):
    """The kept genes of a long cell are those with its max_genes smallest draws (argsort order, the reference)."""
    rng = np.random.default_rng(4)
    cells = []
    for n in (40, 9, 57, 33):  # three cells over max_genes=12, one under
        genes = np.sort(rng.choice(500, n, replace=False))
        cells.append((genes.tolist(), rng.integers(1, 9, n).tolist(), rng.integers(0, 9, n).tolist()))
    block, cfg = _block(cells), TokenizerConfig(max_genes=12)
    long_b = [0, 2, 3]
    draws = np.random.default_rng(5).random((len(long_b), 57))
    if tied:  # a repeated draw straddling the cut: exactly max_genes genes must still be kept
        order = np.argsort(draws[0, :40])
        draws[0, order[12]] = draws[0, order[11]]

    class Draws:  # the generator tokenize_block is given, returning the draws above
        def random(self, shape):
            assert shape == draws.shape
            return draws.copy()

    out = tokenize_block(block, cfg, Draws())
    for i, b in enumerate(long_b):
        n = len(cells[b][0])
        mask = out[keys.B_GENE_MASK][b].numpy()
        assert mask.sum() == 12
        kept = set(out[keys.B_GENE_IDS][b][mask].tolist())
        if not tied or i:
            assert kept == set(np.asarray(cells[b][0])[np.argsort(draws[i, :n], kind="stable")[:12]].tolist())
        else:  # either of the tied genes, never both
            tie = set(np.asarray(cells[b][0])[np.argsort(draws[i, :n], kind="stable")[:13]].tolist())
            assert kept < tie and len(tie - kept) == 1
    assert out[keys.B_GENE_MASK][1].sum() == 9


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
