"""Build a corpus vocabulary from datasets' genes, and map a dataset's genes onto a vocabulary.

The converter calls these; ``fm prep convert A.h5ad B.loom --out corpus/`` builds the union of the genes that pass
each dataset's filters, ``--vocab vocab.tsv`` maps onto a given one instead. By hand:

    vocab = build_vocab([(ids_a, symbols_a), (None, symbols_b)])      # union, sorted by gene id
    index, mapping = map_onto(vocab, ids_a, symbols_a, keep_a)        # index[g] = vocabulary index or -1

Matching follows :meth:`fm.data.vocab.GeneVocab.map_genes`: by stable id, then by symbol. A dataset without ids
contributes its symbols as ids; datasets with ids are merged first. The result is sorted by gene id, so the same
datasets give the same vocabulary whatever order they are listed in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from fm.data.vocab import GeneMapping, GeneVocab

log = logging.getLogger(__name__)


def build_vocab(gene_sets: Iterable[tuple[list[str] | None, list[str]]]) -> GeneVocab:
    """Union of several datasets' genes, merged by id then symbol, sorted by gene id.

    Args:
        gene_sets: per dataset, (stable ids or None, symbols) of the genes to include (already filtered).
    """
    ids: list[str] = []
    symbols: list[str] = []
    by_id: dict[str, int] = {}
    by_symbol: dict[str, int] = {}
    gene_sets = list(gene_sets)
    # datasets with stable ids first, so that symbol-only datasets join their genes whatever the input order
    gene_sets = [g for g in gene_sets if g[0] is not None] + [g for g in gene_sets if g[0] is None]
    for gene_ids, syms in gene_sets:
        for i, sym in enumerate(syms):
            gid = gene_ids[i] if gene_ids is not None else sym
            # the lookups of GeneVocab.map_genes: id, symbol as an id, symbol, symbol ignoring case
            if gid in by_id or sym in by_id or sym in by_symbol or sym.upper() in by_symbol:
                continue
            by_id[gid] = len(ids)
            by_symbol.setdefault(sym, len(ids))
            by_symbol.setdefault(sym.upper(), len(ids))
            ids.append(gid)
            symbols.append(sym)
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return GeneVocab([ids[i] for i in order], [symbols[i] for i in order])


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
