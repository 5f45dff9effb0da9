"""Build a corpus vocabulary from datasets' genes (mapping a dataset onto one is fm.data.genes.map_onto).

The converter calls this; ``fm prep convert A.h5ad B.loom --out corpus/`` builds the union of the genes that pass
each dataset's filters, ``--vocab vocab.tsv`` maps onto a given one instead. By hand:

    vocab = build_vocab([(ids_a, symbols_a), (None, symbols_b)])      # union, sorted by gene id

Matching follows :meth:`fm.data.vocab.GeneVocab.map_genes`: by stable id, then by symbol. A dataset without ids
contributes its symbols as ids; datasets with ids are merged first. The result is sorted by gene id, so the same
datasets give the same vocabulary whatever order they are listed in.
"""

from __future__ import annotations

from collections.abc import Iterable

from fm.data.vocab import GeneVocab


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
