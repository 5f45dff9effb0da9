"""The gene vocabulary: one gene per row (stable id, symbol), a corpus-wide index, and its hash.

Datasets map their genes onto a vocabulary by stable id first, then by symbol (case-sensitive, then
case-insensitive); genes that match nothing are reported with a count, never dropped silently.

    vocab = GeneVocab.load("corpus/vocab.tsv")
    index, report = vocab.map_genes(ids, symbols)   # index[i] = vocabulary index or -1
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fm.data.errors import CorpusError
from fm.io import atomic_write_text

HEADER = "gene_id\tsymbol"


@dataclass
class GeneMapping:
    """How a dataset's genes map onto a vocabulary."""

    n_genes: int
    n_by_id: int
    n_by_symbol: int
    unmatched: list[str]  # names of the dataset's genes found in neither column

    @property
    def n_matched(self) -> int:
        return self.n_by_id + self.n_by_symbol

    def summary(self) -> str:
        head = ", ".join(self.unmatched[:5]) + (", ..." if len(self.unmatched) > 5 else "")
        return (
            f"{self.n_matched}/{self.n_genes} genes matched ({self.n_by_id} by id, {self.n_by_symbol} by symbol); "
            f"{len(self.unmatched)} unmatched" + (f": {head}" if self.unmatched else "")
        )


class GeneVocab:
    """An ordered list of genes with a stable id and a symbol each."""

    def __init__(self, gene_ids: list[str], symbols: list[str] | None = None):
        symbols = list(gene_ids) if symbols is None else list(symbols)
        if len(symbols) != len(gene_ids):
            raise ValueError(f"vocabulary: {len(gene_ids)} gene ids but {len(symbols)} symbols")
        seen: set[str] = set()
        for g in gene_ids:
            if not g or any(c in g for c in "\t\n\r"):
                raise ValueError(f"vocabulary: invalid gene id {g!r} (empty or with a tab/newline)")
            if g in seen:
                raise ValueError(f"vocabulary: duplicate gene id {g!r}")
            seen.add(g)
        for g, sym in zip(gene_ids, symbols, strict=True):
            if any(c in sym for c in "\t\n\r"):  # would break the one-gene-per-line file
                raise ValueError(f"vocabulary: invalid symbol {sym!r} of gene {g!r} (with a tab or line break)")
        self.gene_ids = list(gene_ids)
        self.symbols = symbols
        self._by_id = {g: i for i, g in enumerate(self.gene_ids)}
        self._by_symbol: dict[str, int] = {}
        self._by_symbol_ci: dict[str, int] = {}
        for i, s in enumerate(self.symbols):  # the first gene with a symbol wins (symbols can repeat)
            self._by_symbol.setdefault(s, i)
            self._by_symbol_ci.setdefault(s.upper(), i)

    def __len__(self) -> int:
        return len(self.gene_ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self.hash == other.hash

    def to_tsv(self) -> str:
        return HEADER + "\n" + "".join(f"{g}\t{s}\n" for g, s in zip(self.gene_ids, self.symbols, strict=True))

    @property
    def hash(self) -> str:
        """sha256 of the canonical TSV text: two vocabularies are the same iff their hashes are."""
        return hashlib.sha256(self.to_tsv().encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_tsv())

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"{path}: vocabulary file missing")
        # split on "\n" only: str.splitlines also breaks at characters a symbol may hold (e.g. U+2028)
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines or lines[0] != HEADER:
            raise CorpusError(f"{path}: first line must be the header {HEADER!r}")
        ids, symbols = [], []
        for n, line in enumerate(lines[1:], start=2):
            parts = line.split("\t")
            if len(parts) != 2:
                raise CorpusError(f"{path}:{n}: expected 2 tab-separated fields (gene_id, symbol), got {len(parts)}")
            ids.append(parts[0])
            symbols.append(parts[1])
        try:
            return cls(ids, symbols)
        except ValueError as e:
            raise CorpusError(f"{path}: {e}") from e

    def map_genes(self, gene_ids: list[str] | None, symbols: list[str]) -> tuple[np.ndarray, GeneMapping]:
        """Map a dataset's genes onto this vocabulary.

        Args:
            gene_ids: the dataset's stable ids (None when it has only symbols).
            symbols: the dataset's gene symbols (or names).
        Returns:
            index [n_genes] int64, the vocabulary index of each gene or -1; and the mapping report.
        """
        n = len(symbols)
        index = np.full(n, -1, dtype=np.int64)
        n_id = n_sym = 0
        for i in range(n):
            j = self._by_id.get(gene_ids[i], -1) if gene_ids is not None else -1
            if j >= 0:
                n_id += 1
            else:
                j = self._by_id.get(symbols[i], -1)  # a dataset that put ids in its symbol column
                if j < 0:
                    j = self._by_symbol.get(symbols[i], self._by_symbol_ci.get(symbols[i].upper(), -1))
                n_sym += j >= 0
            index[i] = j
        unmatched = [symbols[i] for i in np.flatnonzero(index < 0)]
        return index, GeneMapping(n, n_id, n_sym, unmatched)
