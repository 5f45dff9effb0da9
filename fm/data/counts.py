"""The raw-count rule shared by conversion (`fm prep convert`) and prediction (`fm predict`): one check, one message.

    .venv/bin/python -c "import numpy as np; from fm.data.counts import find_bad_count; \
print(find_bad_count(np.log1p(np.array([0., 3., 7.])), allow_non_integer=False))"

A count layer must be finite and non-negative and, unless the caller allows it, integer. Non-integer values are what
normalised, log1p-transformed or imputed data look like; fm tokenises counts by normalising and log-transforming them
itself, so such data would be transformed twice and give nonsense without an error. Both entry points refuse them
with the same message, which names the file, the layer, the cell and the gene, and the flag that overrides.

Shapes: R rows (cells) of the block checked, G genes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

NON_INTEGER_HINT = ("; non-integer counts (normalised data?) are accepted with --allow-non-integer "
                    "(allow_non_integer=True), but fm expects raw counts")


@dataclass(frozen=True)
class BadCount:
    """The first value of an array that breaks the rule."""

    index: int  # position in the flattened values
    value: float
    what: str  # e.g. "a negative count"
    hint: str  # how to override ("" when nothing may)


def find_bad_count(values: np.ndarray, allow_non_integer: bool) -> BadCount | None:
    """The first NaN/infinite, then negative, then (unless allowed) non-integer value; None when all are counts."""
    values = np.asarray(values).ravel()
    finite = np.isfinite(values)
    problems = [(~finite, "a NaN or infinite count", ""), (values < 0, "a negative count", "")]
    if not allow_non_integer and values.dtype.kind == "f":  # integer dtypes hold integers
        problems.append((finite & (values != np.round(values)), "a non-integer count", NON_INTEGER_HINT))
    for bad, what, hint in problems:
        if bad.any():
            k = int(np.argmax(bad))
            return BadCount(k, float(values[k]), what, hint)
    return None


def check_counts(x_RG, where: str, allow_non_integer: bool, cell_name: Callable[[int], str],
                 gene_name: Callable[[int], str], row_offset: int = 0, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` naming ``where`` (the file and layer), the cell and the gene of the first bad value.

    Args:
        x_RG: a block of a count layer, CSR or dense.
        where: how the message names the layer, e.g. ``"pancreas.h5ad: layers['spliced']"``.
        allow_non_integer: accept non-integer values (normalised or imputed data).
        cell_name, gene_name: the name of row r / column c of the block (called only on error).
        row_offset: the block's first row in the file (the message gives the file's row).
        error: the exception class raised (a ValueError, e.g. the converter's ConversionError).
    """
    csr = sp.issparse(x_RG)
    values = x_RG.data if csr else np.asarray(x_RG)
    bad = find_bad_count(values, allow_non_integer)
    if bad is None:
        return
    if csr:
        row, col = int(np.searchsorted(x_RG.indptr, bad.index, side="right") - 1), int(x_RG.indices[bad.index])
    else:
        row, col = divmod(bad.index, values.shape[1])
    raise error(f"{where} has {bad.what} ({bad.value}) at cell {str(cell_name(row))!r} (row {row_offset + row}), "
                f"gene {str(gene_name(col))!r}{bad.hint}")


def normalisation_scales(lib_s_N: np.ndarray, lib_u_N: np.ndarray, size_factor_N: np.ndarray | None,
                         normalization: str, target_sum: float, cell_name: Callable[[int], str]) -> np.ndarray:
    """Per-cell multipliers [2, N] (float64) so that normalised = counts * scale, per modality (spliced, unspliced):
    the one normalisation rule of the tokenizer and the neighbourhoods (DESIGN §4, §9).

    ``total``: each modality by its own library size, times ``target_sum`` (a zero library gives zeros);
    ``size_factor``: divided by the cell's factor, which must be positive and finite (else a ValueError naming the
    cell by ``cell_name``); ``none``: ones.
    """
    N = len(lib_s_N)
    if normalization == "none":
        return np.ones((2, N))
    if normalization == "size_factor":
        sf = np.full(N, np.nan) if size_factor_N is None else np.asarray(size_factor_N, np.float64)
        bad = ~(np.isfinite(sf) & (sf > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"normalization='size_factor' but cell {cell_name(i)} has size_factor={float(sf[i])} "
                             f"(needs a positive number; {int(bad.sum())} of {N} cells lack one)")
        return np.broadcast_to(1.0 / sf, (2, N))
    lib_2N = np.stack([lib_s_N, lib_u_N]).astype(np.float64)
    out_2N = np.zeros((2, N))
    np.divide(target_sum, lib_2N, out=out_2N, where=lib_2N > 0)
    return out_2N


def stored_entries(s_RG: sp.csr_matrix, u_RG: sp.csr_matrix, moments: tuple[sp.csr_matrix, sp.csr_matrix] | None = None
                   ) -> tuple[sp.csr_matrix, np.ndarray | None, np.ndarray | None]:
    """The genes each cell stores (docs/FORMAT.md): those with s + u > 0, with their moments when given.

    Returns ``c`` [R, G] complex CSR with ``s + i*u`` at every stored gene, sorted indices, and the moments (Ms, Mu)
    at those genes, aligned with ``c.data`` (None without moments). Conversion (data_prep.shard_tasks) and prediction
    (fm.predict) store a cell's genes by this one rule. A gene the cell did not detect is not stored, even where its
    neighbours' moments are nonzero: tokens are measurements (stored, such genes were zero-count tokens that more
    than halved held-out spliced-unspliced retrieval after pretraining, and they multiplied a corpus's entries by
    ~2.4; docs/FORMAT.md).
    """
    # counts are >= 0, so s + i*u is 0 exactly where s + u = 0: its pattern is the set of genes with counts
    c = sp.csr_matrix(sp.csr_matrix(s_RG, dtype=np.float64) + 1j * sp.csr_matrix(u_RG, dtype=np.float64))
    c.sum_duplicates()
    c.eliminate_zeros()
    c.sort_indices()
    if moments is None:
        return c, None, None
    return c, values_at(c, moments[0]), values_at(c, moments[1])


def values_at(pattern: sp.csr_matrix, m: sp.spmatrix) -> np.ndarray:
    """Values of ``m`` at the stored positions of ``pattern`` (sorted CSR; 0 where ``m`` stores nothing), float32."""
    m = sp.csr_matrix(m)
    m.sum_duplicates()
    ncol = pattern.shape[1]
    key_p = np.repeat(np.arange(pattern.shape[0], dtype=np.int64), np.diff(pattern.indptr)) * ncol + pattern.indices
    key_m = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr)) * ncol + m.indices
    pos = np.minimum(np.searchsorted(key_m, key_p), max(len(key_m) - 1, 0))
    out = np.zeros(len(key_p), dtype=np.float32)
    if len(key_m):
        hit = key_m[pos] == key_p
        out[hit] = m.data[pos[hit]]
    return out
