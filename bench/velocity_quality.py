"""Velocity quality on a held-out simulated dataset (issue 5): pretrained vs random encoder vs steady state.

    python bench/velocity_quality.py                      # debug preset, CPU: a few minutes on 2 cores
    python bench/velocity_quality.py --no-write --pretrain-steps 200 --finetune-steps 200    # a quick look

One gene table (data_prep.gene_table.make_gene_table); from it a training dataset (bifurcation, seed 0) and a
held-out one (another regime, seed, library sizes, and the table's rates jittered per gene), converted into two
corpora that share the training corpus's vocabulary. The debug encoder is pretrained on the training corpus
(fm.train.run, configs/pretrain.yaml: gene_set=batch), then the velocity head is fine-tuned supervised on its
``velocity`` target (fm.finetune.run, configs/finetune.yaml: gene_set=cell), once from the pretrained checkpoint and
once, for the same steps, from a randomly initialised encoder. Predictions on the held-out corpus are scattered
into a cells x genes matrix (batch gene ids -> vocabulary gene id -> AnnData column; cell ids -> AnnData row) and
scored against the simulated ds/dt (fm.metrics.velocity) on the entries the model is asked about (the genes stored
for each cell: spliced + unspliced > 0); everything else is NaN in the truth and left out. The steady-state baseline
(v = u - gamma_hat s, gamma_hat per gene on the held-out data) is scored on the same entries, on per-cell normalised
counts and on their kNN moments (scVelo's default preprocessing). Nothing is tuned on the held-out data. Adds a run
(a dated block) to the "## Velocity quality" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import record  # noqa: E402

log = logging.getLogger("bench.velocity_quality")

INTRO = (
    "Supervised velocity decoder on a simulated dataset held out of pretraining and fine-tuning (same genes, rates "
    "jittered; other seed, lineage structure and library sizes), against the simulated ds/dt: median per-gene "
    "Spearman, sign accuracy, mean per-cell cosine after scaling genes by their true-velocity sd "
    "(`bench/velocity_quality.py`). Issue-5 target: Spearman >= 0.8, sign accuracy >= 0.85."
)

# shared by pretraining and fine-tuning: small batches, no validation, no progress bar, CSV logs
COMMON = [
    "logger=csv",
    "data.num_workers=0",
    "data.val_fraction=0.0",
    "trainer.log_every_n_steps=50",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
]


def make_corpora(workdir: Path, cells: int, heldout_cells: int, genes: int, gene_seed: int, jitter: float,
                 heldout_regime: str) -> dict:
    """Simulate the training and held-out datasets from one gene table and convert each into a corpus."""
    from data_prep.convert import convert
    from data_prep.gene_table import make_gene_table
    from data_prep.simulate import simulate, write

    table = make_gene_table(genes, seed=gene_seed)
    train = simulate(cells, genes, regime="bifurcation", seed=0, gene_table=table)
    # other cells, lineages and library sizes (capture 0.5 vs 0.25, wider spread); each gene's rates jittered
    heldout = simulate(heldout_cells, genes, regime=heldout_regime, seed=1, gene_table=table, jitter=jitter,
                       capture=0.5, library_sigma=0.5)
    paths = {"train": write(train, workdir / "train.h5ad"), "heldout": write(heldout, workdir / "heldout.h5ad")}
    corpora = {"train": workdir / "corpus_train", "heldout": workdir / "corpus_heldout"}
    convert([paths["train"]], corpora["train"], dataset_ids=["train"], progress=False)
    convert([paths["heldout"]], corpora["heldout"], vocab=corpora["train"] / "vocab.tsv", dataset_ids=["heldout"],
            progress=False)
    return {"adata": {"train": train, "heldout": heldout}, "corpus": corpora}


def random_checkpoint(pretrained: Path, out: Path, seed: int) -> Path:
    """The pretraining checkpoint with its encoder weights replaced by a fresh initialisation (same architecture)."""
    import torch

    from fm.model.config import ZorroConfig
    from fm.model.zorro import ZorroEncoder
    from fm.tasks.pretrain import CKPT_KEY

    ckpt = torch.load(pretrained, map_location="cpu", weights_only=False)
    torch.manual_seed(seed)
    fresh = ZorroEncoder(ZorroConfig.from_dict(ckpt[CKPT_KEY]["model_config"])).state_dict()
    state = ckpt["state_dict"]
    encoder_keys = [k for k in state if k.startswith("encoder.")]
    if {k[len("encoder."):] for k in encoder_keys} != set(fresh):
        raise KeyError(f"{pretrained}: encoder keys differ from a fresh ZorroEncoder's")
    for k in encoder_keys:
        state[k] = fresh[k[len("encoder."):]]
    torch.save(ckpt, out)
    return out


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
            y_BQ = batch[keys.B_VELOCITY].double().numpy()
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


def score(pred_NG: np.ndarray, true_NG: np.ndarray) -> dict:
    """Median per-gene Spearman, sign accuracy and mean scaled cosine on the entries where both are known."""
    from fm.metrics.velocity import gene_spearman, scaled_cosine, sign_accuracy

    known = np.isfinite(pred_NG) & np.isfinite(true_NG)
    truth = np.where(known, true_NG, np.nan)
    pred = np.where(known, pred_NG, 0.0)
    rho = gene_spearman(pred, truth)
    return {"spearman": rho["median"], "per_gene": rho["per_gene"], "sign": sign_accuracy(pred, truth),
            "cosine": scaled_cosine(pred, truth)["mean"], "coverage": float(known.mean())}


def steady_state(adata, smooth: bool, n_neighbours: int = 30, n_pcs: int = 30) -> np.ndarray:
    """Steady-state velocity on per-cell normalised counts (each layer by its own total), optionally kNN moments."""
    from fm import keys
    from fm.metrics.velocity import knn_indices, steady_state_velocity

    def normalise(layer):
        x = np.asarray(layer.toarray(), dtype=np.float64)
        total = x.sum(1, keepdims=True)
        return x / np.maximum(total, 1) * np.median(total)

    s_NG, u_NG = normalise(adata.layers[keys.LAYER_SPLICED]), normalise(adata.layers[keys.LAYER_UNSPLICED])
    if smooth:  # scVelo pp.moments: means over the kNN (self included) in PCA of log1p spliced
        x = np.log1p(s_NG)
        x -= x.mean(0)
        k = min(n_pcs, min(x.shape) - 1)
        u, sv, _ = np.linalg.svd(x, full_matrices=False)
        nb = knn_indices(u[:, :k] * sv[:k], n_neighbours)
        s_NG, u_NG = s_NG[nb].mean(1), u_NG[nb].mean(1)
    return steady_state_velocity(u_NG, s_NG)


def run_bench(workdir: Path, cells: int, heldout_cells: int, genes: int, pretrain_steps: int, finetune_steps: int,
              encoder: str, gene_seed: int, jitter: float, heldout_regime: str, seed: int = 0) -> dict:
    from fm import finetune, keys, train

    max_genes = 64 * ((genes + 63) // 64)  # every stored gene of a cell is a token
    data = make_corpora(workdir, cells, heldout_cells, genes, gene_seed, jitter, heldout_regime)
    corpus, adata = data["corpus"], data["adata"]

    t0 = time.perf_counter()
    train.run(train.compose([f"data.corpus={corpus['train']}", f"output_dir={workdir / 'pretrain'}", "model=debug",
                             *COMMON, "data.batch_size=32", f"data.max_genes={max_genes}",
                             f"trainer.max_steps={pretrain_steps}", f"seed={seed}", "task.optim.warmup_steps=20",
                             "task.optim.lr=2e-3"]))
    pretrain_s = time.perf_counter() - t0
    checkpoints = {"pretrained": workdir / "pretrain" / "checkpoints" / "last.ckpt"}
    checkpoints["random init"] = random_checkpoint(checkpoints["pretrained"], workdir / "random.ckpt", seed + 1)

    truth = {name: np.asarray(a.layers[keys.LAYER_VELOCITY_TRUE], dtype=np.float64) for name, a in adata.items()}
    rows, finetune_s, asked = {}, {}, {}
    for name, ckpt in checkpoints.items():
        t0 = time.perf_counter()
        out = workdir / f"finetune_{name.replace(' ', '_')}"
        cfg = train.compose([f"data.corpus={corpus['train']}", f"output_dir={out}", f"checkpoint={ckpt}",
                             "head=velocity", "head.mode=supervised", f"task.finetune.encoder={encoder}",
                             *COMMON, "data.batch_size=32", f"data.max_genes={max_genes}",
                             f"trainer.max_steps={finetune_steps}", f"seed={seed}", "task.optim.warmup_steps=50",
                             "task.optim.lr=1e-3", "task.finetune.encoder_lr=3e-4"], "finetune")
        task = finetune.run(cfg)["task"]
        finetune_s[name] = time.perf_counter() - t0
        for split in ("heldout", "train"):
            pred, target = predict(task, corpus[split], split, adata[split], max_genes)
            asked[split] = np.isfinite(pred)  # the stored genes of each cell, the same for every model
            if not np.allclose(target[asked[split]], truth[split][asked[split]], rtol=1e-5, atol=1e-6):
                raise ValueError(f"{split}: the corpus's velocity target does not match the AnnData's truth "
                                 "after alignment")
            rows[(name, split)] = score(pred, truth[split])
            log.info("%s on %s: %s", name, split, {k: v for k, v in rows[(name, split)].items() if k != "per_gene"})
    for name, smooth in (("steady state (kNN moments)", True), ("steady state (no smoothing)", False)):
        rows[(name, "heldout")] = score(np.where(asked["heldout"], steady_state(adata["heldout"], smooth), np.nan),
                                        truth["heldout"])
    return {"rows": rows, "cells": cells, "heldout_cells": heldout_cells, "genes": genes,
            "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, "encoder": encoder,
            "gene_seed": gene_seed, "jitter": jitter, "heldout_regime": heldout_regime, "pretrain_s": pretrain_s,
            "finetune_s": finetune_s}


def markdown(r: dict, command: str) -> str:
    """One run: a ``### date, machine`` heading, the command, the setting and the table."""
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    lines = [
        f"### {datetime.date.today().isoformat()}, {machine}",
        "",
        f"`{command}` (CPU; pretraining {r['pretrain_s']:.0f} s, fine-tuning "
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["finetune_s"].items()) + ").",
        "",
        f"Training data: bifurcation, seed 0, {r['cells']} cells x {r['genes']} genes (gene table seed "
        f"{r['gene_seed']}). Held out: {r['heldout_regime']}, seed 1, {r['heldout_cells']} cells, same genes with "
        f"rates jittered (log-normal sd {r['jitter']}), capture 0.5 vs 0.25, library sd 0.5 vs 0.3. Debug encoder "
        f"pretrained {r['pretrain_steps']} steps; velocity head fine-tuned supervised {r['finetune_steps']} steps "
        f"(encoder {r['encoder']}). Scored on the entries with a stored gene (coverage = share of all cells x genes).",
        "",
        "| model | data | median gene Spearman | sign accuracy | scaled cosine (mean) | coverage |",
        "|---|---|---|---|---|---|",
    ]
    for (name, split), s in r["rows"].items():
        data = "held-out" if split == "heldout" else "training (seen)"
        lines.append(f"| {name} | {data} | {s['spearman']:.3f} | {s['sign']:.3f} | {s['cosine']:.3f} | "
                     f"{s['coverage']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--heldout-cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=60)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--encoder", default="full", choices=("frozen", "last_k", "full"))
    parser.add_argument("--gene-seed", type=int, default=0)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--heldout-regime", default="mixed")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    command = "python " + " ".join(["bench/velocity_quality.py", *[a for a in sys.argv[1:] if a != "--no-write"]])
    with tempfile.TemporaryDirectory() as tmp:
        r = run_bench(Path(tmp), args.cells, args.heldout_cells, args.genes, args.pretrain_steps,
                      args.finetune_steps, args.encoder, args.gene_seed, args.jitter, args.heldout_regime)
    text = markdown(r, command)
    sys.stdout.write(text + "\n")
    if not args.no_write:
        record("Velocity quality", text, intro=INTRO)


if __name__ == "__main__":
    main()
