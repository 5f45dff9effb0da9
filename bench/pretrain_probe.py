"""Does contrastive pretraining learn? Held-out retrieval and a lineage probe, pretrained vs random encoder.

    python bench/pretrain_probe.py                          # debug preset, 2,000 steps, CPU: ~1.5 min on 2 cores
    python bench/pretrain_probe.py --preset small --steps 600 --cells 2000 --genes 200

Simulates a bifurcation (data_prep.simulate), converts it, pretrains through the real entry point (fm.train.run on
configs/), then measures on held-out cells (a second simulated dataset, same kinetics): spliced->unspliced top-1
retrieval among all held-out cells (vs chance 1/N), and a logistic-regression probe of the simulated lineage on
z_fusion (trained on the training cells), against the same probe on a randomly initialised encoder. Adds a run (a
dated block) to the "## Pretraining probe" section of docs/BENCHMARKS.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import record  # noqa: E402

log = logging.getLogger("bench.pretrain_probe")


def pretrain_and_probe(workdir: Path, preset: str = "debug", steps: int = 2000, cells: int = 600, genes: int = 60,
                       batch_size: int = 32, max_genes: int = 64, seed: int = 0, overrides: tuple = ()) -> dict:
    import anndata as ad
    import lightning as L

    from fm.tasks.evaluate import evaluate_pretraining
    from fm.tasks.pretrain import PretrainTask
    from fm.train import run
    from tests.integration.pretrain_helpers import build_corpus, compose

    corpus = build_corpus(workdir / "data", n_cells=cells, n_genes=genes, seed=seed, heldout_cells=cells // 4)
    lineage = {}
    for dataset in ("train", "heldout"):
        obs = ad.read_h5ad(workdir / "data" / ("sim.h5ad" if dataset == "train" else "heldout.h5ad")).obs
        lineage.update({f"{dataset}/{c}": str(v) for c, v in obs["lineage"].items()})
    cfg = compose(corpus, workdir / "run", f"model={preset}", f"trainer.max_steps={steps}",
                  f"data.batch_size={batch_size}", f"data.max_genes={max_genes}", "data.val_fraction=0.0",
                  "data.split=dataset", "data.val_datasets=[heldout]",
                  f"seed={seed}", "task.optim.warmup_steps=20", "task.optim.lr=2e-3", *overrides)
    t0 = time.perf_counter()
    result = run(cfg)
    train_s = time.perf_counter() - t0
    dm = result["datamodule"]
    pretrained = evaluate_pretraining(result["task"], dm, lineage)
    L.seed_everything(seed + 1)
    fresh = PretrainTask(result["task"].model_config, result["task"].head_config, vocab_hash=dm.vocab.hash)
    random_init = evaluate_pretraining(fresh, dm, lineage)
    return {"preset": preset, "steps": steps, "cells": cells, "genes": genes, "train_s": train_s,
            "overrides": overrides,
            "pretrained": pretrained, "random": random_init}


def markdown(r: dict) -> str:
    """One run: a ``### date, machine`` heading, the command and the table."""
    p, q = r["pretrained"], r["random"]
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    return "\n".join([
        f"### {datetime.date.today().isoformat()}, {machine}",
        "",
        f"`python bench/pretrain_probe.py --preset {r['preset']} --steps {r['steps']} --cells {r['cells']} "
        f"--genes {r['genes']}{''.join(' ' + o for o in r['overrides'])}` (simulated bifurcation, CPU, "
        f"{r['train_s']:.0f} s of training; held-out cells: {p['n_val_cells']}).",
        "",
        "| encoder | spliced→unspliced top-1 retrieval (held-out) | chance | lineage probe on z_fusion "
        "| majority class |",
        "|---|---|---|---|---|",
        f"| pretrained | {p['retrieval_s2u']:.3f} | {p['retrieval_chance']:.3f} | {p['probe_z_fusion']:.3f} | "
        f"{p['probe_majority']:.3f} |",
        f"| random init | {q['retrieval_s2u']:.3f} | {q['retrieval_chance']:.3f} | {q['probe_z_fusion']:.3f} | "
        f"{q['probe_majority']:.3f} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--cells", type=int, default=600)
    parser.add_argument("--genes", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. task.head.w_recon=1.0")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        r = pretrain_and_probe(Path(tmp), args.preset, args.steps, args.cells, args.genes,
                               overrides=tuple(args.overrides))
    text = markdown(r)
    sys.stdout.write(text + "\n")
    if not args.no_write:
        record("Pretraining probe", text)


if __name__ == "__main__":
    main()
