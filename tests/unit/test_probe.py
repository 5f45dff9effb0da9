"""The linear probe of pretraining's evaluation (fm/tasks/evaluate.py): scikit-learn's logistic regression fits the
objective it documents, checked against a direct minimisation of it in torch.

    .venv/bin/python -m pytest -q tests/unit/test_probe.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fm.tasks.evaluate import linear_probe


def reference_probe(x_train, y_train, x_test, y_test, weight_decay: float) -> float:
    """Mean cross-entropy + weight_decay * |W|^2 on standardised features, minimised by LBFGS (float64)."""
    mean, std = x_train.mean(0), x_train.std(0)
    xtr = torch.tensor((x_train - mean) / std)
    xte = torch.tensor((x_test - mean) / std)
    classes = sorted(set(y_train))
    ytr = torch.tensor([classes.index(y) for y in y_train])
    linear = torch.nn.Linear(xtr.shape[1], len(classes)).double()
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(xtr), ytr) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        predicted = [classes[i] for i in linear(xte).argmax(1)]
    return float(np.mean([p == y for p, y in zip(predicted, y_test, strict=True)]))


def blobs(seed: int, n: int = 300, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    means = 0.4 * rng.normal(size=(3, 16))
    y = rng.integers(0, 3, n)
    x = means[y] + spread * rng.normal(size=(n, 16))
    return x, list(np.array(["a", "b", "c"])[y])


@pytest.mark.parametrize("weight_decay", [1e-3, 0.3])
def test_probe_matches_a_direct_minimisation_of_its_objective(weight_decay):
    for seed in range(3):
        x, y = blobs(seed, spread=1.5)
        args = (x[:200], y[:200], x[200:], y[200:])
        assert linear_probe(*args, weight_decay=weight_decay) == pytest.approx(
            reference_probe(*args, weight_decay=weight_decay), abs=0.011)  # at most one of 100 cells differs


def test_probe_separates_separable_classes_and_not_random_labels():
    x, y = blobs(0, spread=0.05)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:]) == 1.0
    shuffled = list(np.random.default_rng(1).permutation(y))
    assert linear_probe(x[:200], shuffled[:200], x[200:], shuffled[200:]) < 0.6
