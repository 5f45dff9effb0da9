"""What pretraining learned: held-out spliced->unspliced retrieval and a linear probe on z_fusion.

    python bench/pretrain_probe.py --steps 300          # pretrain on a simulated bifurcation, print and record both

Retrieval: for each held-out cell, its spliced projection is compared with the unspliced projections of every
held-out cell (one batch); top-1 accuracy, chance = 1 / cells. Probe: multinomial logistic regression
(scikit-learn) on standardised embeddings of training cells, accuracy on held-out cells.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fm import keys


@torch.no_grad()
def embed(task, dataloader, max_batches: int | None = None) -> dict:
    """Run the encoder and the head's projections over a loader (cells deduplicated, first occurrence kept).

    Returns ``cell`` (list of "dataset_id/cell_id") and float arrays ``z_fusion``, ``z_spliced``, ``z_unspliced``
    [N, D] and ``p_spliced``, ``p_unspliced`` [N, P] (projections computed on all N cells as one batch).
    """
    task.eval()
    n = len(dataloader) if max_batches is None and hasattr(dataloader, "__len__") else max_batches
    seen: dict[str, int] = {}
    parts: dict[str, list] = {"z_fusion": [], "z_spliced": [], "z_unspliced": []}
    for batch in islice(dataloader, n):
        out = task.encoder({k: v for k, v in batch.items() if torch.is_tensor(v)})
        names = [f"{d}/{c}" for d, c in zip(batch[keys.B_DATASET_ID], batch[keys.B_CELL_ID])]
        keep = [i for i, c in enumerate(names) if c not in seen]
        for i in keep:
            seen[names[i]] = len(seen)
        for name in parts:
            parts[name].append(getattr(out, name)[keep])
    result = {name: torch.cat(v) for name, v in parts.items()}
    head = task.head
    result["p_spliced"] = F.normalize(head.proj_spliced(result["z_spliced"]), dim=-1)
    result["p_unspliced"] = F.normalize(head.proj_unspliced(result["z_unspliced"]), dim=-1)
    out = {k: v.float().numpy() for k, v in result.items()}
    out["cell"] = list(seen)
    return out


def retrieval_accuracy(p_spliced: np.ndarray, p_unspliced: np.ndarray) -> float:
    """Top-1 spliced->unspliced retrieval accuracy among the given cells (chance: 1 / len)."""
    sim = p_spliced @ p_unspliced.T
    return float((sim.argmax(axis=1) == np.arange(len(sim))).mean())


def linear_probe(x_train: np.ndarray, y_train: list, x_test: np.ndarray, y_test: list,
                 weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features.

    The objective is the mean cross-entropy + ``weight_decay`` * |W|^2 (bias not penalised): scikit-learn's
    C * sum(cross-entropy) + |W|^2 / 2 with C = 1 / (2 * weight_decay * n_train).
    """
    c = 1.0 / (2.0 * weight_decay * len(x_train))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    return float(probe.fit(x_train, y_train).score(x_test, y_test))


def evaluate_pretraining(task, datamodule, labels: dict[str, str]) -> dict[str, float]:
    """Held-out retrieval and a lineage probe (train-split cells -> held-out cells) for one task.

    Args:
        task: a PretrainTask (pretrained, or freshly initialised for the baseline).
        datamodule: a CorpusDataModule with a validation split (``val_fraction > 0``).
        labels: "dataset_id/cell_id" -> label (e.g. the simulated lineage).
    """
    datamodule.setup("fit")
    train = embed(task, datamodule.train_dataloader())
    val = embed(task, datamodule.val_dataloader())
    y_train = [labels[c] for c in train["cell"]]
    y_val = [labels[c] for c in val["cell"]]
    return {
        "n_val_cells": len(val["cell"]),
        "retrieval_s2u": retrieval_accuracy(val["p_spliced"], val["p_unspliced"]),
        "retrieval_chance": 1.0 / len(val["cell"]),
        "probe_z_fusion": linear_probe(train["z_fusion"], y_train, val["z_fusion"], y_val),
        "probe_majority": max(y_val.count(y) for y in set(y_val)) / len(y_val),
    }
