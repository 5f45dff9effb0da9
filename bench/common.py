"""Pieces the bench scripts share: a fine-tuned task's per-token predictions on a corpus, in an AnnData's layout.

    from bench.common import predict
    pred_NG, target_NG = predict(task, corpus, "heldout", adata, max_genes=64)       # velocity head, ds/dt

Used by bench/velocity_quality.py and bench/compare.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def predict(task, corpus: Path, dataset: str, adata, max_genes: int, batch_size: int = 64) -> tuple:
    """Predicted and stored-target ds/dt scattered into the AnnData's cells x genes: (pred_NG, target_NG), NaN unasked.

    Every cell is predicted once on its stored genes (gene_set=cell, as in fine-tuning); a cell with more stored
    genes than ``max_genes`` would be sampled, which this bench refuses.
    """
    import torch

    from fm import keys
    from fm.data.datamodule import CorpusDataModule

    dm = CorpusDataModule(corpus=str(corpus), batch_size=batch_size, num_workers=0, max_genes=max_genes,
                          gene_set="cell", split="dataset", val_datasets=[dataset])
    gene_ids = np.asarray(adata.var[keys.VAR_GENE_ID].astype(str))
    col_of_vocab = np.full(len(dm.vocab), -1)
    where = {g: j for j, g in enumerate(gene_ids)}
    for i, g in enumerate(dm.vocab.gene_ids):
        col_of_vocab[i] = where.get(g, -1)
    row_of_cell = {c: i for i, c in enumerate(adata.obs_names)}
    stored_NG = (adata.layers[keys.LAYER_SPLICED] + adata.layers[keys.LAYER_UNSPLICED]).toarray() > 0
    pred_NG = np.full(adata.shape, np.nan)
    target_NG = np.full(adata.shape, np.nan)
    seen = set()
    task.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
            v_BQ = task.head(tensors, task.encoder(tensors))["velocity"].double().numpy()
            mask_BQ = batch[keys.B_GENE_MASK].numpy().astype(bool)
            ids_BQ = batch[keys.B_GENE_IDS].numpy()
            y = batch.get(keys.B_VELOCITY)  # a corpus without the target column: NaN
            y_BQ = np.full(v_BQ.shape, np.nan) if y is None else y.double().numpy()
            for b, cell in enumerate(batch[keys.B_CELL_ID]):
                if cell in seen:  # the loader wraps its last batch
                    continue
                seen.add(cell)
                cols = col_of_vocab[ids_BQ[b][mask_BQ[b]]]
                if (cols < 0).any():
                    raise KeyError(f"{corpus}: cell {cell} has a vocabulary gene absent from the AnnData")
                row = row_of_cell[cell]
                pred_NG[row, cols] = v_BQ[b][mask_BQ[b]]
                target_NG[row, cols] = y_BQ[b][mask_BQ[b]]
                if set(cols) != set(np.flatnonzero(stored_NG[row])):
                    raise ValueError(f"cell {cell}: its tokens are not its stored genes (max_genes={max_genes}?)")
    if len(seen) != stored_NG.any(1).sum():  # a cell with no stored gene is not in the corpus (docs/FORMAT.md)
        raise ValueError(f"{corpus}: predicted {len(seen)} of {stored_NG.any(1).sum()} cells with a stored gene")
    return pred_NG, target_NG
