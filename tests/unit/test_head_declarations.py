"""Heads declare what consumers need (DESIGN.md section 6, STYLE.md rule 11): the gene table fine-tuning seeds, the
outputs fm predict gathers over a cell's gene chunks and how it reduces them; so fm predict, the release and
fine-tuning hold no head names.

    .venv/bin/python -m pytest -q tests/unit/test_head_declarations.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fm import keys
from fm.baselines.registry import BASELINES
from fm.heads.expression import ExpressionConfig, ExpressionHead, expected_counts
from fm.heads.generative import GenerativeConfig, GenerativeHead
from fm.heads.registry import HEADS
from fm.heads.velocity import VelocityConfig, VelocityHead

ROOT = Path(__file__).resolve().parents[2]
D, V = 16, 12


def test_gene_tables():
    expression = ExpressionHead(D, V, ExpressionConfig(n_heads=2))
    assert expression.gene_table() is expression.decoder.gene_queries
    generative = GenerativeHead(D, V, GenerativeConfig(n_heads=2))
    assert generative.gene_table() is generative.gene_embedding
    supervised = VelocityHead(D, V, VelocityConfig(mode="supervised", n_heads=2))
    assert supervised.gene_table() is supervised.decoder.gene_queries
    assert VelocityHead(D, V, VelocityConfig(mode="dynamical")).gene_table() is None  # per-gene kinetics, no table


def test_expression_gathers_logits_and_reduces_them_to_expected_counts():
    assert ExpressionHead(D, V, ExpressionConfig(loss="mse", n_heads=2)).predict_gathered() == ()
    head = ExpressionHead(D, V, ExpressionConfig(loss="nb", n_heads=2))
    assert head.predict_gathered() == ("spliced_logits", "unspliced_logits")
    g = torch.Generator().manual_seed(0)
    gathered = {name: torch.randn(3, 7, generator=g) for name in head.predict_gathered()}
    batch = {keys.B_LIBRARY_SIZE_SPLICED: torch.tensor([10.0, 20.0, 30.0]),
             keys.B_LIBRARY_SIZE_UNSPLICED: torch.tensor([1.0, 2.0, 3.0])}
    reduced = head.predict_reduce(gathered, batch)
    assert set(reduced) == set(head.predict_layers())
    ones = torch.ones(3, 7, dtype=torch.bool)
    torch.testing.assert_close(reduced["spliced"], expected_counts(gathered["spliced_logits"], ones,
                                                                   batch[keys.B_LIBRARY_SIZE_SPLICED]))
    torch.testing.assert_close(reduced["unspliced"].sum(1), batch[keys.B_LIBRARY_SIZE_UNSPLICED])


def _code_strings(path: Path) -> set[str]:
    """String constants of a module's code (docstrings and log/error messages excluded: f-strings and calls' text)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


@pytest.mark.parametrize("module", ["fm/predict.py", "fm/checkpoint.py", "fm/tasks/finetune.py"])
def test_consumers_hold_no_head_names(module):
    names = set(HEADS) | set(BASELINES)
    found = _code_strings(ROOT / module) & names
    assert not found, f"{module} names heads {sorted(found)}: ask the head (a declaration on fm.heads.base.Head)"
