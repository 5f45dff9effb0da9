"""Expression and generative decoders on a held-out simulated dataset (issue 5): pretrained vs random encoder.

    python bench/decoder_quality.py                       # debug preset, CPU: ~8 minutes on 2 busy cores
    python bench/decoder_quality.py --no-write --pretrain-steps 200 --finetune-steps 200    # a quick look

The corpora and the pretraining are bench/velocity_quality.py's (`make_corpora`, `pretrain`): one gene table,
a training corpus of several simulated datasets, a held-out dataset (other seed, cells, branching and library
sizes; each gene's rates jittered). Two checks:

- Expression: the expression head is fine-tuned on the training corpus, from the pretrained encoder and from a
  randomly initialised one, for the same steps, with the encoder frozen and fully trained. Scored twice on the
  held-out dataset, median absolute error on hidden counts beside the gene-mean baseline
  (fm.metrics.expression.gene_mean_imputation): *hidden tokens* (`token_imputation`: 15 % of each cell's stored
  genes hidden from the encoder by ``ExpressionHead.prepare``, as in training; NB mean vs count) and *fm evaluate*
  (the scVI/scScope protocol, fm.evaluate.imputation_section: 10 % of the nonzero counts zeroed in the input, the
  exported release run through `fm predict`, which predicts every vocabulary gene of the cell).
- Generative: the generative head, fine-tuned on the training corpus (pairs of cells by simulated time), generates
  each held-out cell's state after a step dt (`GenerativeHead.generate`). The true future state of cell i is the
  mean normalised log1p (s, u) of the k held-out cells of its lineage nearest in simulated time to t_i + dt (what
  the head is trained to predict: a later cell's observed values; the mean removes that cell's count noise). Scored:
  RMSE over the cell's genes between generated and true future, against the same RMSE for the present state as
  observed and for the present state denoised the same way (the k cells nearest to t_i: the stricter bar, since a
  denoised present beats a noisy present without moving forward). Cells whose t_i + dt leaves their lineage's time
  span (a root cell past the branching) are left out.

Adds a run to the "## Decoder quality" section of docs/BENCHMARKS.md.
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
from bench.velocity_quality import PRETRAIN_TASK, finetune_head, make_corpora, pretrain, setting  # noqa: E402

log = logging.getLogger("bench.decoder_quality")

INTRO = (
    "Expression and generative decoders on a simulated dataset held out of pretraining and fine-tuning "
    "(`bench/decoder_quality.py`). Expression: median absolute error on hidden counts (hidden tokens as in training, "
    "and the scVI protocol through `fm predict`) vs the gene-mean baseline, pretrained vs randomly initialised "
    "encoder at equal fine-tuning steps. Generative: RMSE of the generated state after dt to the true future state "
    "(time-neighbour mean) vs the present state, observed and denoised."
)


def columns_of_vocab(vocab, adata) -> np.ndarray:
    """AnnData column of every vocabulary gene (-1: absent)."""
    from fm import keys

    where = {g: j for j, g in enumerate(np.asarray(adata.var[keys.VAR_GENE_ID].astype(str)))}
    return np.array([where.get(g, -1) for g in vocab.gene_ids])


def normalised_log1p(adata, target_sum: float = 1e4) -> dict[str, np.ndarray]:
    """The tokeniser's values (fm.data.tokenize, normalization=total) of every cell and gene: {layer: [N, G]}."""
    from fm import keys

    out = {}
    for layer in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
        x_NG = np.asarray(adata.layers[layer].toarray(), dtype=np.float64)
        total_N1 = x_NG.sum(1, keepdims=True)
        out[layer] = np.log1p(np.where(total_N1 > 0, x_NG / np.maximum(total_N1, 1e-12) * target_sum, 0.0))
    return out


def time_neighbour_means(adata, values: dict[str, np.ndarray], shift: float, k: int) -> tuple[np.ndarray, ...]:
    """Per cell, the mean values of the k other cells of its lineage nearest in time to t + shift.

    Returns:
        (s_NG, u_NG, valid_N): valid where t + shift stays inside the lineage's time span.
    """
    from data_prep.simulate import model_from_adata
    from fm import keys

    lineages = model_from_adata(adata).lineages
    t_N = adata.obs[keys.OBS_TIME_TRUE].to_numpy(np.float64)
    code_N = adata.obs[keys.OBS_LINEAGE].cat.codes.to_numpy()
    s_NG, u_NG = (np.full(v.shape, np.nan) for v in values.values())
    valid_N = np.zeros(len(t_N), bool)
    for i, lin in enumerate(lineages):
        rows = np.flatnonzero(code_N == i)
        if rows.size <= k:
            continue
        target = t_N[rows] + shift
        ok = (target >= lin.t_lo) & (target <= lin.t_hi)
        d_RR = np.abs(t_N[rows][None, :] - target[:, None])
        np.fill_diagonal(d_RR, np.inf)  # never a cell's own counts
        nb_RK = np.argsort(d_RR, axis=1)[:, :k]
        for out, v in zip((s_NG, u_NG), values.values()):
            out[rows] = v[rows][nb_RK].mean(1)
        valid_N[rows] = ok
    return s_NG, u_NG, valid_N


def generative_distances(task, corpus: Path, dataset: str, adata, max_genes: int, dt: float, k: int = 15,
                         batch_size: int = 64) -> dict:
    """RMSE per cell (over its genes, both modalities) of generated, present and denoised present to the future."""
    import torch

    from fm import keys
    from fm.data.datamodule import CorpusDataModule

    dm = CorpusDataModule(corpus=str(corpus), batch_size=batch_size, num_workers=0, max_genes=max_genes,
                          gene_set="cell", split="dataset", val_datasets=[dataset])
    col_of_vocab = columns_of_vocab(dm.vocab, adata)
    row_of_cell = {c: i for i, c in enumerate(adata.obs_names)}
    values = normalised_log1p(adata)
    fut_s, fut_u, valid_N = time_neighbour_means(adata, values, dt, k)
    now_s, now_u, _ = time_neighbour_means(adata, values, 0.0, k)
    err = {"generated": [], "present (observed)": [], "present (denoised)": []}
    seen = set()
    task.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            tensors = {key: v for key, v in batch.items() if torch.is_tensor(v)}
            gen = task.head.generate(tensors, task.encoder(tensors), dt)
            mask_BG = tensors[keys.B_GENE_MASK].numpy().astype(bool)
            ids_BG = tensors[keys.B_GENE_IDS].numpy()
            for b, cell in enumerate(batch[keys.B_CELL_ID]):
                row = row_of_cell[cell]
                if cell in seen or not valid_N[row]:  # the loader wraps its last batch
                    continue
                seen.add(cell)
                cols = col_of_vocab[ids_BG[b][mask_BG[b]]]
                if (cols < 0).any():
                    raise KeyError(f"{corpus}: cell {cell} has a vocabulary gene absent from the AnnData")
                future = np.concatenate([fut_s[row, cols], fut_u[row, cols]])
                states = {
                    "generated": (gen["spliced"][b], gen["unspliced"][b]),
                    "present (observed)": (tensors[keys.B_SPLICED][b], tensors[keys.B_UNSPLICED][b]),
                }
                for name, (s_G, u_G) in states.items():
                    x = np.concatenate([s_G.numpy()[mask_BG[b]], u_G.numpy()[mask_BG[b]]])
                    err[name].append(np.sqrt(np.mean((x - future) ** 2)))
                x = np.concatenate([now_s[row, cols], now_u[row, cols]])
                err["present (denoised)"].append(np.sqrt(np.mean((x - future) ** 2)))
    if not seen:
        raise ValueError(f"{corpus}: no cell with a future inside its lineage at dt={dt}")
    e = {name: np.asarray(v) for name, v in err.items()}
    return {"n_cells": len(seen), "rmse": {name: float(v.mean()) for name, v in e.items()},
            "win_vs_present": float((e["generated"] < e["present (observed)"]).mean()),
            "win_vs_denoised": float((e["generated"] < e["present (denoised)"]).mean())}


def token_imputation(task, corpus: Path, dataset: str, adata, max_genes: int, seed: int,
                     batch_size: int = 64) -> dict:
    """Imputation as the head is trained: ``head.prepare`` hides a share of each cell's tokens from the encoder.

    Median |NB mean - count| over the hidden tokens, beside the gene-mean baseline on the same entries
    (fm.metrics.expression; the gene's mean over all entries not hidden). Returns {layer: {"fm", "gene_mean"}}.
    """
    import torch

    from fm import keys
    from fm.data.datamodule import CorpusDataModule
    from fm.heads.expression import HIDDEN_MASK
    from fm.metrics.expression import gene_mean_imputation, imputation_error

    dm = CorpusDataModule(corpus=str(corpus), batch_size=batch_size, num_workers=0, max_genes=max_genes,
                          gene_set="cell", split="dataset", val_datasets=[dataset])
    col_of_vocab = columns_of_vocab(dm.vocab, adata)
    row_of_cell = {c: i for i, c in enumerate(adata.obs_names)}
    layers = {"spliced": keys.LAYER_SPLICED, "unspliced": keys.LAYER_UNSPLICED}
    truth = {name: np.asarray(adata.layers[layer].toarray(), dtype=np.float64) for name, layer in layers.items()}
    pred = {name: np.zeros(adata.shape) for name in layers}
    held_NG = np.zeros(adata.shape, bool)
    generator = torch.Generator().manual_seed(seed)
    seen = set()
    task.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            tensors = task.head.prepare({k: v for k, v in batch.items() if torch.is_tensor(v)}, generator)
            out = task.head(tensors, task.encoder(tensors))
            hidden_BG = tensors[HIDDEN_MASK].numpy()
            ids_BG = tensors[keys.B_GENE_IDS].numpy()
            for b, cell in enumerate(batch[keys.B_CELL_ID]):
                if cell in seen:  # the loader wraps its last batch
                    continue
                seen.add(cell)
                row, cols = row_of_cell[cell], col_of_vocab[ids_BG[b][hidden_BG[b]]]
                held_NG[row, cols] = True
                for name in layers:
                    pred[name][row, cols] = out[f"{name}_mu"][b].numpy()[hidden_BG[b]]
    return {layer: {"fm": imputation_error(pred[name], truth[name], held_NG),
                    "gene_mean": imputation_error(gene_mean_imputation(np.where(held_NG, 0.0, truth[name]), held_NG),
                                                  truth[name], held_NG)}
            for name, layer in layers.items()}


def imputation(ckpt: Path, release: Path, adata, seed: int) -> dict:
    """Export a fine-tuned expression checkpoint as a release and score it on ``adata`` (fm.evaluate's protocol)."""
    from fm.checkpoint import export, load_pretrained
    from fm.evaluate import imputation_section

    model = load_pretrained(export(ckpt, release))
    return imputation_section([model], adata, fraction=0.1, seed=seed, batch_size=256)


def run_bench(workdir: Path, pretrain_steps: int, finetune_steps: int, encoders: list[str], dts: list[float],
              pretrain_task: str, seed: int = 0) -> dict:
    from fm import keys

    data = make_corpora(workdir)
    corpus, adata = data["corpus"], data["adata"]
    t0 = time.perf_counter()
    checkpoints, max_genes = pretrain(workdir, corpus["train"], pretrain_steps, seed, pretrain_task)
    timings = {"pretraining": time.perf_counter() - t0}

    expression = {}
    for encoder in encoders:
        for name, ckpt in checkpoints.items():
            t0 = time.perf_counter()
            tag = f"expression_{encoder}_{name.replace(' ', '_')}"
            task, out = finetune_head(workdir / tag, corpus["train"], ckpt, "expression", encoder, finetune_steps,
                                      max_genes, seed)
            expression[(name, encoder)] = {
                "hidden tokens": token_imputation(task, corpus["heldout"], "heldout", adata["heldout"], max_genes,
                                                  seed),
                "fm evaluate": imputation(out / "checkpoints" / "last.ckpt", workdir / f"{tag}_release",
                                          adata["heldout"], seed),
            }
            timings[f"expression {encoder} {name}"] = time.perf_counter() - t0
            log.info("expression %s %s: %s", encoder, name, expression[(name, encoder)])

    t0 = time.perf_counter()
    task, _ = finetune_head(workdir / "generative", corpus["train"], checkpoints["pretrained"], "generative", "full",
                            finetune_steps, max_genes, seed)
    generative = {dt: generative_distances(task, corpus["heldout"], "heldout", adata["heldout"], max_genes, dt)
                  for dt in dts}
    timings["generative"] = time.perf_counter() - t0
    log.info("generative: %s", generative)
    spliced = keys.LAYER_SPLICED
    return {"expression": expression, "generative": generative, "timings": timings, "spliced": spliced,
            "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, "pretrain_task": pretrain_task}


def markdown(r: dict, command: str) -> str:
    """One run: a ``### date, machine`` heading, the command, the setting and two tables."""
    from fm import keys

    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    lines = [
        f"### {datetime.date.today().isoformat()}, {machine}",
        "",
        f"`{command}` (CPU; " + ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items()) + ").",
        "",
        setting(r["pretrain_steps"], r["finetune_steps"], r["pretrain_task"]),
        "",
        "Expression: median absolute error on the hidden counts (lower is better). *hidden tokens*: 15 % of each "
        "held-out cell's stored genes hidden from the encoder as in training (`ExpressionHead.prepare`), NB mean vs "
        "count; *fm evaluate*: 10 % of the nonzero counts zeroed in the input, the exported release run through "
        "`fm predict` (fm.evaluate.imputation_section). Gene mean: the gene's mean over the entries not hidden.",
        "",
        "| encoder init | fine-tuning | protocol | spliced: fm | spliced: gene mean | unspliced: fm | "
        "unspliced: gene mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, encoder), by_protocol in r["expression"].items():
        for protocol, e in by_protocol.items():
            s, u = e[keys.LAYER_SPLICED], e[keys.LAYER_UNSPLICED]
            lines.append(f"| {name} | encoder {encoder} | {protocol} | {s['fm']:.3f} | {s['gene_mean']:.3f} | "
                         f"{u['fm']:.3f} | {u['gene_mean']:.3f} |")
    lines += [
        "",
        "Generative (pretrained encoder, fine-tuned full): mean RMSE per cell to the true future state (normalised "
        "log1p, the cell's genes, both modalities); win = share of cells where the generated state is closer.",
        "",
        "| dt | cells | generated | present (observed) | present (denoised) | win vs observed | win vs denoised |",
        "|---|---|---|---|---|---|---|",
    ]
    for dt, g in r["generative"].items():
        m = g["rmse"]
        lines.append(f"| {dt:g} | {g['n_cells']} | {m['generated']:.3f} | {m['present (observed)']:.3f} | "
                     f"{m['present (denoised)']:.3f} | {g['win_vs_present']:.2f} | {g['win_vs_denoised']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--encoders", default="frozen,full", help="comma-separated: frozen, last_k, full")
    parser.add_argument("--dt", default="0.5,1.0", help="comma-separated generation steps (simulated time)")
    parser.add_argument("--pretrain-task", default=PRETRAIN_TASK, help="configs/task/ group of the pretraining")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    command = "python " + " ".join(["bench/decoder_quality.py", *[a for a in sys.argv[1:] if a != "--no-write"]])
    with tempfile.TemporaryDirectory() as tmp:
        r = run_bench(Path(tmp), args.pretrain_steps, args.finetune_steps, args.encoders.split(","),
                      [float(x) for x in args.dt.split(",")], args.pretrain_task)
    text = markdown(r, command)
    sys.stdout.write(text + "\n")
    if not args.no_write:
        record("Decoder quality", text, intro=INTRO)


if __name__ == "__main__":
    main()
