"""Speed of `fm predict`: cells/s of fm.predict.predict per preset, on a simulated file (CPU, and CUDA when asked).

    nice python bench/predict.py                                   # CPU: debug and small, 2000 cells x 2000 genes
    python bench/predict.py --presets small base --device cuda     # on a GPU

Timed: one ``predict(model, adata)`` call after a warm-up on a few cells, i.e. gene mapping, streaming the CSR,
tokenisation, the encoder, the velocity decoder queried with every in-vocabulary gene of every cell, writing the
five cells x genes layers and the copy of the AnnData; not the model load. The release is a randomly initialised
encoder with a velocity head (speed does not depend on training), exported through the real ``fm export``.
``--cells`` times a subset of the file's cells (the CPU ``small`` row, whose full file would take minutes on a
shared 2-core machine). Adds a run (a dated block) to the "## Predict" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import record  # noqa: E402
from fm.data.vocab import GeneVocab  # noqa: E402

INTRO = ("Written by `python bench/predict.py` (see its docstring): cells/s of `fm.predict.predict` on a simulated "
         "file, a random-init encoder + velocity head release; every in-vocabulary gene of every cell is predicted.")


def random_release(out: Path, preset: str, vocab: GeneVocab, max_genes: int) -> Path:
    """Export a randomly initialised encoder + velocity head as a release, through the real export path."""
    from fm.checkpoint import export
    from fm.heads.velocity import VelocityConfig
    from fm.tasks.finetune import FinetuneTask
    from fm.tasks.pretrain import CKPT_KEY, model_config

    torch.manual_seed(0)
    cfg = model_config(preset, len(vocab))
    head = VelocityConfig(mode="supervised")  # the decoder's cost (the dynamical head has no decoder)
    task = FinetuneTask(cfg, head, vocab_hash=vocab.hash)
    ckpt = {
        CKPT_KEY: {"model_config": cfg.to_dict(), "head": "velocity", "vocab_hash": vocab.hash},
        "state_dict": task.state_dict(),
        "hyper_parameters": {"head": {"name": "velocity", **asdict(head)}},
        "datamodule_hyper_parameters": {"max_genes": max_genes, "gene_set": "cell", "normalization": "total",
                                        "target_sum": 1e4},
        "global_step": 0,
        "epoch": 0,
    }
    torch.save(ckpt, out.parent / f"{out.name}.ckpt")
    vocab.save(out.parent / f"{out.name}.vocab.tsv")
    return export(out.parent / f"{out.name}.ckpt", out, vocab=out.parent / f"{out.name}.vocab.tsv")


def measure(adata, release: Path, device: str, batch_size: int, n_cells: int) -> dict:
    from fm.checkpoint import load_pretrained
    from fm.predict import predict

    model = load_pretrained(release, device=device)
    predict(model, adata[:16].copy(), batch_size=batch_size, progress=False)  # warm-up
    subset = adata[:n_cells].copy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = predict(model, subset, batch_size=batch_size, progress=False)
    dt = time.perf_counter() - t0
    return {"params": sum(p.numel() for p in model.encoder.parameters()) + sum(p.numel() for p in
                                                                               model.head.parameters()),
            "cells": subset.n_obs, "seconds": dt, "cells_s": subset.n_obs / dt,
            "entries_s": subset.n_obs * int(out.var["fm_in_vocab"].sum()) / dt,
            "mean_genes": float(np.mean((subset.layers["spliced"] + subset.layers["unspliced"]).getnnz(1)))}


def main() -> None:
    from data_prep.simulate import simulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["debug", "small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", type=int, nargs="+", default=None,
                        help="cells timed per preset (default: all 2000; one value, or one per preset)")
    parser.add_argument("--n-cells", type=int, default=2000, help="cells of the simulated file")
    parser.add_argument("--n-genes", type=int, default=2000, help="genes of the simulated file (all in the vocab)")
    parser.add_argument("--max-genes", type=int, default=512, help="the release's tokenizer max_genes")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cells = args.cells or [args.n_cells]
    cells = cells * len(args.presets) if len(cells) == 1 else cells
    if len(cells) != len(args.presets):
        parser.error("--cells: one value, or one per preset")

    adata = simulate(args.n_cells, args.n_genes, regime="bifurcation", seed=0)
    vocab = GeneVocab(list(adata.var["gene_id"]), list(adata.var_names))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, n in zip(args.presets, cells, strict=True):
            release = random_release(Path(tmp) / preset, preset, vocab, args.max_genes)
            rows.append({"preset": preset, **measure(adata, release, args.device, args.batch_size, n)})
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    machine += f", {torch.cuda.get_device_name()}" if cuda else ""
    cmd = " ".join(["python bench/predict.py", *sys.argv[1:]])
    lines = [f"### {datetime.date.today().isoformat()}, {machine}", "",
             f"`{cmd}` on {where}, fp32: a simulated {args.n_cells} x {args.n_genes} file (bifurcation, seed 0), "
             f"max_genes={args.max_genes}, batch {args.batch_size}; outputs for every cell x gene.", "",
             "| preset | params (encoder + head) | cells timed | mean genes with counts | s | cells/s | "
             "cell-gene outputs/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['cells']} | {r['mean_genes']:.0f} | "
                     f"{r['seconds']:.1f} | {r['cells_s']:.1f} | {r['entries_s']:,.0f} |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if not args.no_write:
        record("Predict", text, intro=INTRO)


if __name__ == "__main__":
    main()
