"""The README's main job on a built-in default: simulate → convert → validate → stream → pretrain, on one CPU.

    fm demo --out runs/demo                  # about a few minutes on 2 CPU cores
    fm demo --out runs/demo --steps 0        # data pipeline only

Every stage calls the same function its own subcommand does (`fm prep simulate`, `fm prep convert`, ...), so the
demo is also the smoke test of the whole pipeline. Outputs land under ``--out``; the last lines say where.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(out: str | Path, *, cells: int = 2000, genes: int = 200, seed: int = 0, steps: int = 100) -> dict:
    """Run the pipeline end to end and return the paths it wrote."""
    from data_prep.convert import convert
    from data_prep.simulate import simulate, write
    from data_prep.validate import validate
    from fm import keys
    from fm.data.datamodule import CorpusDataModule

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    h5ad = out / "sim_bifurcation.h5ad"
    log.info("[1/5] simulate %d cells x %d genes (bifurcation, seed %d) -> %s", cells, genes, seed, h5ad)
    write(simulate(n_cells=cells, n_genes=genes, regime="bifurcation", seed=seed), h5ad)
    paths["simulated"] = h5ad

    corpus = out / "corpus"
    log.info("[2/5] convert -> %s", corpus)
    convert([h5ad], corpus)
    paths["corpus"] = corpus

    log.info("[3/5] validate %s", corpus)
    report = validate(corpus)
    if not report.ok:
        raise RuntimeError(f"{corpus}: validation failed: {report.errors}")

    log.info("[4/5] stream a few batches")
    dm = CorpusDataModule(corpus=str(corpus), batch_size=64, num_workers=0, max_genes=genes, seed=seed)
    dm.setup("fit")
    for i, batch in zip(range(3), dm.train_dataloader()):
        n_cells, n_tokens = batch[keys.B_GENE_IDS].shape
        log.info("  batch %d: %d cells x %d gene tokens per modality", i, n_cells, n_tokens)

    if steps > 0:
        from fm import train

        run_dir = (out / "pretrain").resolve()
        log.info("[5/5] pretrain the debug encoder for %d steps -> %s", steps, run_dir)
        result = train.run(
            train.compose(
                [
                    f"data.corpus={corpus.resolve()}",
                    f"output_dir={run_dir}",
                    f"trainer.max_steps={steps}",
                    "model=debug",
                    "logger=csv",
                    "data.num_workers=0",
                    f"data.max_genes={genes}",
                    f"seed={seed}",
                ]
            )
        )
        paths["pretrain run"] = run_dir
        log.info("  final metrics: %s", {k: round(v, 4) for k, v in sorted(result["metrics"].items())})

    log.info("done; outputs:")
    for name, p in paths.items():
        log.info("  %-12s %s", name, p)
    return paths


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on a built-in simulated default (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100, help="pretraining steps (0: data pipeline only)")
    p.set_defaults(func=lambda a: run_demo(a.out, cells=a.cells, genes=a.genes, seed=a.seed, steps=a.steps) and 0)
