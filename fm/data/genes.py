"""A dataset's genes on a corpus vocabulary, the one rule the converter and `fm predict` share.

A dataset names its genes in ``var`` (``.h5ad``) or the row attributes (``.loom``): the first column of
``GENE_ID_COLUMNS`` it has holds stable ids, the first of ``GENE_SYMBOL_COLUMNS`` symbols (else ``var_names``).
:func:`map_onto` maps them onto a vocabulary as :meth:`fm.data.vocab.GeneVocab.map_genes` does (by stable id, then
by symbol), and makes sure two genes of the dataset never share a vocabulary gene:

    index, mapping = map_onto(vocab, ids, symbols, keep)      # index[g] = vocabulary index or -1
    print(mapping.summary())
"""

from __future__ import annotations

import logging

import numpy as np

from fm import keys
from fm.data.vocab import GeneMapping, GeneVocab

log = logging.getLogger(__name__)

# var columns that hold a stable gene id, and those that hold a symbol, first found wins
GENE_ID_COLUMNS = (keys.VAR_GENE_ID, "gene_ids", "Accession", "gene_id_ensembl")
GENE_SYMBOL_COLUMNS = ("Gene", "gene_symbols", "gene_symbol", "gene_name")


def map_onto(
    vocab: GeneVocab, gene_ids: list[str] | None, symbols: list[str], keep: np.ndarray | None = None
) -> tuple[np.ndarray, GeneMapping]:
    """Map the kept genes of a dataset onto ``vocab``; two genes never share an index.

    Args:
        gene_ids, symbols: the dataset's genes (all of them).
        keep: bool [n_genes], the genes that passed the filters (None: all).
    Returns:
        index [n_genes] int64 (vocabulary index, -1 for genes not kept or not matched), and the report over the kept
        genes. When two genes of the dataset reach the same vocabulary gene (e.g. one by id, another by symbol), the
        first keeps it and the second counts as unmatched.
    """
    n = len(symbols)
    keep = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    kept = np.flatnonzero(keep)
    sub_ids = [gene_ids[i] for i in kept] if gene_ids is not None else None
    sub_index, mapping = vocab.map_genes(sub_ids, [symbols[i] for i in kept])
    # resolve collisions: genes matched by id first, then file order
    by_id = np.zeros(len(kept), dtype=bool)
    if sub_ids is not None:
        id_index = {g: i for i, g in enumerate(vocab.gene_ids)}
        by_id = np.array([id_index.get(g, -2) == j for g, j in zip(sub_ids, sub_index, strict=True)], dtype=bool)
    order = np.lexsort((np.arange(len(kept)), ~by_id))  # id matches first, then file order
    seen: set[int] = set()
    collided = []
    for k in order:
        j = int(sub_index[k])
        if j < 0:
            continue
        if j in seen:
            collided.append(k)
            sub_index[k] = -1
        else:
            seen.add(j)
    if collided:
        names = [symbols[kept[k]] for k in sorted(collided)]
        log.warning("%d genes map onto a vocabulary gene already taken by another gene: %s", len(names), names[:5])
        n_by_id = int((by_id & (sub_index >= 0)).sum())
        mapping = GeneMapping(
            n_genes=len(kept),
            n_by_id=n_by_id,
            n_by_symbol=int((sub_index >= 0).sum()) - n_by_id,
            unmatched=[symbols[kept[k]] for k in np.flatnonzero(sub_index < 0)],
        )
    index = np.full(n, -1, dtype=np.int64)
    index[kept] = sub_index
    return index, mapping
