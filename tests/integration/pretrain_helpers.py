"""Shared pieces of the pretraining tests: a simulated corpus, tiny configs, recording callbacks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from fm import keys

REPO = Path(__file__).resolve().parents[2]

# the smallest settings that still train: debug preset, small batches, no validation, no progress bar
TINY = [
    "model=debug",
    "logger=csv",
    "data.batch_size=16",
    "data.max_genes=32",
    "data.num_workers=0",
    "data.val_fraction=0.0",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "callbacks.throughput.log_every_n_steps=1",
    "task.optim.warmup_steps=5",
    "task.optim.lr=3e-3",
]


def build_corpus(root: Path, n_cells: int = 400, n_genes: int = 40, seed: int = 0, gene_seed: int = 0,
                 heldout_cells: int = 0) -> Path:
    """Simulate a bifurcation and convert it to a corpus under ``root`` (once; later calls reuse it).

    With ``heldout_cells``, a second dataset ``heldout`` (same kinetics, other cells) joins the corpus for
    ``data.split=dataset data.val_datasets=[heldout]``; the first is ``train``.
    """
    from data_prep.convert import convert
    from data_prep.simulate import simulate

    corpus = root / "corpus"
    if (corpus / "manifest.json").exists():
        return corpus
    root.mkdir(parents=True, exist_ok=True)
    simulate(n_cells, n_genes, regime="bifurcation", seed=seed, gene_seed=gene_seed).write_h5ad(root / "sim.h5ad")
    inputs, ids = [root / "sim.h5ad"], ["train"]
    if heldout_cells:
        adata = simulate(heldout_cells, n_genes, regime="bifurcation", seed=seed + 1000, gene_seed=gene_seed)
        adata.write_h5ad(root / "heldout.h5ad")
        inputs, ids = [*inputs, root / "heldout.h5ad"], [*ids, "heldout"]
    convert(inputs, corpus, dataset_ids=ids, progress=False)
    return corpus


def compose(corpus: Path, out: Path, *overrides: str):
    """The real pretrain config with the tiny settings, a corpus and an output folder, plus ``overrides``."""
    from fm import train

    return train.compose([f"data.corpus={corpus}", f"output_dir={out}", *TINY, *overrides])


class LossRecorder(L.Callback):
    """Records the training loss of every optimiser step and whether any step started."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.started = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs:  # None or {} when the step was skipped
            self.losses[trainer.global_step] = float(outputs["loss"])


def example_batch(vocab_size: int, n_cells: int = 6, n_genes: int = 12, seed: int = 0) -> dict:
    """A fixed random batch in the collator's layout (a cell without unspliced counts included)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_cells, n_genes, generator=g) < 0.8
    mask[:, 0] = True
    ids = torch.randint(1, vocab_size, (n_cells, n_genes), generator=g) * mask
    spliced = torch.rand(n_cells, n_genes, generator=g) * 3 * mask
    unspliced = torch.rand(n_cells, n_genes, generator=g) * 2 * mask
    unspliced[0] = 0
    return {keys.B_GENE_IDS: ids, keys.B_GENE_MASK: mask, keys.B_SPLICED: spliced, keys.B_UNSPLICED: unspliced}


class DumpOutputs(L.Callback):
    """At the end of training, every rank runs the encoder on :func:`example_batch`; rank 0 saves the output."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        batch = {k: v.to(pl_module.device) for k, v in example_batch(pl_module.model_config.vocab_size).items()}
        pl_module.eval()
        with torch.no_grad():  # under ZeRO-3 this is collective (parameters are gathered), so every rank runs it
            out = pl_module(batch)
        if trainer.is_global_zero:
            torch.save({"z_fusion": out.z_fusion.cpu(), "z_spliced": out.z_spliced.cpu()}, self.path)


def run_module(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python <args>`` (or torchrun) from the repository root; fail with its output if it fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu",
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return proc


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 1000)]


def csv_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from a run's CSV log."""
    path = run_dir / "csv" / "metrics.csv"
    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out
