"""Building a vocabulary from datasets and mapping genes onto one (data_prep/vocab.py, fm/data/vocab.py).

.venv/bin/python -m pytest -q tests/unit/test_vocab.py
"""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.vocab import build_vocab
from fm.data.genes import map_onto
from fm.data.schema import CorpusError
from fm.data.vocab import GeneVocab


def test_union_merges_by_id_then_symbol_and_is_sorted():
    a = (["ENSG3", "ENSG1"], ["C", "A"])
    b = (["ENSG1", "ENSG2"], ["A", "B"])  # ENSG1 again by id
    c = (None, ["B", "c", "D"])  # symbols only: B and C (other case) are known, D is new
    v = build_vocab([a, b, c])
    assert v.gene_ids == ["D", "ENSG1", "ENSG2", "ENSG3"]
    assert v.symbols == ["D", "A", "B", "C"]
    assert build_vocab([c, b, a]).gene_ids == v.gene_ids  # input order does not matter here


def test_map_onto_reports_unmatched_and_skips_filtered_genes():
    v = GeneVocab(["ENSG1", "ENSG2", "ENSG3"], ["A", "B", "C"])
    index, mapping = map_onto(v, ["ENSG2", "X", "Y", "ENSG1"], ["B", "C", "Z", "A"], np.array([1, 1, 1, 0], bool))
    assert index.tolist() == [1, 2, -1, -1]  # X matched by symbol C; Z unmatched; ENSG1 filtered out
    assert (mapping.n_by_id, mapping.n_by_symbol, mapping.unmatched) == (1, 1, ["Z"])


def test_two_genes_never_share_a_vocabulary_index():
    v = GeneVocab(["ENSG1", "ENSG2"], ["A", "B"])
    # the first gene reaches ENSG1 by symbol A, the second by id: the id match wins, the other is unmatched
    index, mapping = map_onto(v, ["X", "ENSG1"], ["A", "Q"])
    assert index.tolist() == [-1, 0]
    assert mapping.unmatched == ["A"] and mapping.n_by_id == 1 and mapping.n_by_symbol == 0


def test_vocab_round_trip_and_hash(tmp_path):
    v = GeneVocab(["ENSG1", "ENSG2"], ["A", "B\u2028x"])  # a symbol with a unicode line separator
    v.save(tmp_path / "vocab.tsv")
    assert GeneVocab.load(tmp_path / "vocab.tsv") == v


def test_vocab_rejects_symbols_that_break_the_file():
    with pytest.raises(ValueError, match="symbol"):
        GeneVocab(["ENSG1"], ["A\tB"])


def test_vocab_load_errors_name_the_line(tmp_path):
    (tmp_path / "v.tsv").write_text("gene_id\tsymbol\nENSG1\tA\nENSG2\n")
    with pytest.raises(CorpusError, match=r"v.tsv:3: expected 2 tab-separated fields"):
        GeneVocab.load(tmp_path / "v.tsv")
