"""The README's main job on a built-in default: the whole pipeline on simulated data, on one CPU, in minutes.

    fm demo --out runs/demo                          # 4 min on 2 busy CPU cores
    fm demo --out runs/demo --steps 0                # data pipeline only (simulate, convert, validate, stream)

Stages: simulate a training dataset and a held-out one (same genes, kinetics jittered by 5 %, other cells and seed)
→ convert the training one into a corpus → validate it → stream a few batches → pretrain the debug encoder
(contrastive) → fine-tune the velocity decoder (self-supervised: the dynamical model of the moments, no truth read)
→ export a release → predict on the held-out file (velocity, confidence, latent time, embedding) → evaluate against
its true velocity → plot velocity on the simulator's 2-D
embedding and the loss curves. Every stage calls the same function its own subcommand does (`fm prep simulate`,
`fm prep convert`, `fm pretrain`, `fm finetune`, `fm export`, `fm predict`, `fm evaluate`, `fm plot`), so the
demo is also the smoke test of the whole pipeline. Outputs land under ``--out``; the last lines say where. The step
counts are a demonstration's, not a trained model's: see docs/BENCHMARKS.md for what longer runs reach.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# shared by pretraining and fine-tuning (whose encoder comes from the checkpoint): CSV logs, no workers (one CPU),
# every cell of the corpus used for training
COMMON = ["logger=csv", "data.num_workers=0", "data.val_fraction=0.0", "trainer.limit_val_batches=0",
          "trainer.log_every_n_steps=10"]


def run_demo(out: str | Path, *, cells: int = 2000, genes: int = 200, seed: int = 0, steps: int = 100,
             finetune_steps: int | None = None) -> dict:
    """Run the pipeline end to end and return the paths it wrote (``steps=0``: the data stages only)."""
    from data_prep.convert import convert
    from data_prep.simulate import simulate, write
    from data_prep.validate import validate
    from fm import keys
    from fm.data.datamodule import CorpusDataModule

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    n_stages = 10 if steps > 0 else 4

    h5ad, heldout = out / "sim_bifurcation.h5ad", out / "sim_heldout.h5ad"
    log.info("[1/%d] simulate %d cells x %d genes (bifurcation, seed %d) -> %s, and %d held-out cells (seed %d, "
             "rates jittered 5%%) -> %s", n_stages, cells, genes, seed, h5ad, cells // 2, seed + 1, heldout)
    write(simulate(n_cells=cells, n_genes=genes, regime="bifurcation", seed=seed), h5ad)
    write(simulate(n_cells=cells // 2, n_genes=genes, regime="bifurcation", seed=seed + 1, jitter=0.05), heldout)
    paths["simulated"], paths["held out"] = h5ad, heldout

    corpus = out / "corpus"
    log.info("[2/%d] convert -> %s", n_stages, corpus)
    convert([h5ad], corpus, progress=False, overwrite=True)  # a re-run replaces the demo's own corpus
    paths["corpus"] = corpus

    log.info("[3/%d] validate %s", n_stages, corpus)
    report = validate(corpus)
    if not report.ok:
        raise RuntimeError(f"{corpus}: validation failed: {report.errors}")

    log.info("[4/%d] stream a few batches", n_stages)
    dm = CorpusDataModule(corpus=str(corpus), batch_size=64, num_workers=0, max_genes=genes, seed=seed)
    dm.setup("fit")
    for i, batch in zip(range(3), dm.train_dataloader()):
        n_cells, n_tokens = batch[keys.B_GENE_IDS].shape
        log.info("  batch %d: %d cells x %d gene tokens per modality", i, n_cells, n_tokens)
    if steps > 0:
        paths.update(_model_stages(out, corpus, heldout, genes=genes, seed=seed, steps=steps,
                                   finetune_steps=steps if finetune_steps is None else finetune_steps))
    log.info("done; outputs:")
    for name, p in paths.items():
        log.info("  %-18s %s", name, p)
    return paths


def _model_stages(out: Path, corpus: Path, heldout: Path, *, genes: int, seed: int, steps: int,
                  finetune_steps: int) -> dict[str, Path]:
    """Pretrain, fine-tune, export, predict, evaluate, plot (stages 5-10)."""
    import anndata as ad

    from fm import finetune, train
    from fm.checkpoint import export, load_pretrained
    from fm.evaluate import evaluate, print_table, write_json
    from fm.io import write_h5ad_atomic
    from fm.plot import loss_curves, save_figure, velocity_embedding
    from fm.predict import predict

    paths: dict[str, Path] = {}
    data = [f"data.corpus={corpus}", f"data.max_genes={genes}", f"seed={seed}", *COMMON]
    pretrain_dir, finetune_dir = out / "pretrain", out / "finetune"
    log.info("[5/10] pretrain the debug encoder for %d steps -> %s", steps, pretrain_dir)
    result = train.run(train.compose([*data, "model=debug", f"output_dir={pretrain_dir}",
                                      f"trainer.max_steps={steps}"]))
    log.info("  final metrics: %s", {k: round(v, 4) for k, v in sorted(result["metrics"].items())})
    paths["pretrain run"] = pretrain_dir

    log.info("[6/10] fine-tune the velocity decoder (self-supervised dynamical model) for %d steps -> %s",
             finetune_steps, finetune_dir)
    result = finetune.run(train.compose(
        [*data, f"output_dir={finetune_dir}", f"checkpoint={pretrain_dir / 'checkpoints' / 'last.ckpt'}",
         "head=velocity", f"trainer.max_steps={finetune_steps}"], "finetune"))
    log.info("  final metrics: %s", {k: round(v, 4) for k, v in sorted(result["metrics"].items())})
    paths["finetune run"] = finetune_dir

    release = out / "release"
    log.info("[7/10] export -> %s", release)
    export(finetune_dir / "checkpoints" / "last.ckpt", release)
    paths["release"] = release

    predicted = out / "heldout_predicted.h5ad"
    log.info("[8/10] predict %s -> %s", heldout.name, predicted)
    adata = predict(load_pretrained(release), ad.read_h5ad(heldout), source=str(heldout), progress=False)
    write_h5ad_atomic(adata, predicted)
    paths["predictions"] = predicted

    metrics = out / "heldout_metrics.json"
    log.info("[9/10] evaluate against the held-out file's true velocity -> %s", metrics)
    scores = evaluate(adata, cluster_key="clusters")
    scores["input"] = str(predicted)
    print_table(scores, predicted.name)
    paths["metrics"] = write_json(scores, metrics)

    log.info("[10/10] plot")
    paths["velocity plot"] = save_figure(
        velocity_embedding(adata, basis="X_sim", color="clusters"), out / "heldout_velocity.png")
    paths["loss plot"] = save_figure(loss_curves([pretrain_dir, finetune_dir]), out / "loss_curves.png")
    return paths


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on a built-in simulated default (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100, help="pretraining steps (0: data pipeline only)")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning steps (default: --steps)")
    p.set_defaults(func=lambda a: run_demo(a.out, cells=a.cells, genes=a.genes, seed=a.seed, steps=a.steps,
                                           finetune_steps=a.finetune_steps) and 0)
