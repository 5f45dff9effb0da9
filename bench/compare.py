"""The comparison table of issue 6: fm's decoders against scVI, scScope, cellDancer and simple baselines.

    nice .venv/bin/python bench/compare.py                    # defaults: ~10 min on 2 busy CPU cores (small steps)
    .venv/bin/python bench/compare.py --steps 200 --no-write  # a quick look, print only

Simulated (bench/velocity_quality.py's ``make_corpora``): one gene table, a training dataset (bifurcation, seed 0)
and a held-out one (another regime, seed, library sizes; rates jittered), two corpora on the training vocabulary.
fm: the debug encoder pretrained on the training corpus (fm.train.run), then the expression head and the velocity
head (supervised, and dynamical: no target) fine-tuned through fm.finetune.run; the baselines (scVI, scScope,
cellDancer) are trained through the same entry point (``fm finetune head=scvi|scscope|celldancer``, BaselineTask)
on the same training corpus. Every model is then scored on the held-out dataset, which none of them saw, in the
vocabulary's gene order:

* imputation (the scVI / scScope protocol, fm.metrics.expression): 10 % of the nonzero spliced entries are held
  out and zeroed in every model's input; median |prediction - truth| over them on one scale, log1p of counts per
  10^4 of the cell's true spliced total. How each model is asked: fm expression head: the queries are the cell's
  stored genes, the held-out ones hidden from the encoder (token mask off, values 0, as ExpressionHead.prepare
  does in training), the library sizes those of the visible counts; its NB mean over the library is the predicted
  share of the cell's counts (x 10^4, log1p). Its queries tell it which genes the cell stores (s + u > 0), which
  the other models are not told; the row "gene mean of nonzero entries" is given the same knowledge (each gene's
  mean over the visible nonzero entries, at the stored genes, 0 elsewhere). scVI: posterior mean (1 - pi) x rate
  at the latent mean, divided by the visible library (share, x 10^4, log1p). scScope: its imputer-completed
  output (mean of its T decoder outputs), already normalised log1p of its input (per 10^4 of the visible
  library). Gene mean: each gene's mean normalised log1p value over the entries not held out
  (fm.metrics.expression.gene_mean_imputation).
* embeddings: k-means ARI / NMI against the simulated lineage (fm.metrics.embedding), for fm's global
  representation, scVI's latent mean and scScope's latent, on the uncorrupted held-out cells.
* velocity against the simulated ds/dt on each cell's stored genes (as bench/velocity_quality.py): fm velocity head
  supervised and dynamical, the cellDancer head (all held-out cells in one batch: its networks normalise by the
  batch's maxima), and the steady-state baseline (kNN moments).

Pancreas (``pancreas_supercell_3696x2000.h5ad``; skipped when absent): a random quarter of the cells held out; the
200 genes (``--pancreas-genes``) with the most counts in both modalities; the same models trained on the other
cells (no supervised velocity: there is no truth); on the held-out cells imputation as above, ARI / NMI against
``obs['clusters']``, and CBDir / ICCoh of fm's dynamical velocity head, cellDancer and steady state over the known
endocrine transitions.

Adds a run to the "## Comparison" section of docs/BENCHMARKS.md through bench/report.py.
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

from bench import velocity_quality as vq  # noqa: E402
from bench.common import predict  # noqa: E402
from bench.report import record  # noqa: E402
from bench.velocity_quality import COMMON, make_corpora, score, steady_state  # noqa: E402

log = logging.getLogger("bench.compare")

INTRO = (
    "fm's decoders against the baselines (scVI, scScope, cellDancer, gene mean, steady state) on the same held-out "
    "data (`bench/compare.py`; its docstring gives the protocol). Each table says the command that made it."
)
TARGET_SUM = 1e4
BASELINE_DATA = {"scvi": 128, "scscope": 64, "celldancer": 64}  # each baseline's own batch size


def vocab_order(corpus: Path, adata) -> np.ndarray:
    """The AnnData column of every vocabulary gene (KeyError naming the gene when one is missing)."""
    from fm import keys
    from fm.data.vocab import GeneVocab

    vocab = GeneVocab.load(corpus / "vocab.tsv")
    where = {g: j for j, g in enumerate(np.asarray(adata.var[keys.VAR_GENE_ID].astype(str)))}
    missing = [g for g in vocab.gene_ids if g not in where]
    if missing:
        raise KeyError(f"{corpus}/vocab.tsv: gene {missing[0]} is not in the held-out AnnData")
    return np.array([where[g] for g in vocab.gene_ids])


def normalised(x_NV: np.ndarray, library_N: np.ndarray) -> np.ndarray:
    """log1p of counts per 10^4 of the given library (0 where the library is 0)."""
    return np.log1p(x_NV / np.maximum(library_N, 1e-12)[:, None] * TARGET_SUM)


def chunks(n: int, size: int = 256):
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def fm_imputation(task, s_NV, u_NV, held_NV) -> np.ndarray:
    """The expression head's predicted share of each cell's spliced counts [N, V] (NaN off the cell's tokens)."""
    import torch

    from fm import keys
    from fm.baselines.common import batch_from_dense
    from fm.heads.expression import LIBRARY, QUERY_MASK

    out = np.full(s_NV.shape, np.nan)
    task.eval()
    for rows in chunks(len(s_NV)):
        batch = batch_from_dense(s_NV[rows], u_NV[rows])
        ids, real = batch[keys.B_GENE_IDS], batch[keys.B_GENE_MASK]
        hidden = real & torch.from_numpy(held_NV[rows]).gather(1, ids)
        visible = real & ~hidden
        batch[QUERY_MASK] = real
        batch[keys.B_GENE_MASK] = visible
        for count_key, value_key, lib_key in ((keys.B_SPLICED_COUNTS, keys.B_SPLICED, keys.B_LIBRARY_SIZE_SPLICED),
                                              (keys.B_UNSPLICED_COUNTS, keys.B_UNSPLICED,
                                               keys.B_LIBRARY_SIZE_UNSPLICED)):
            counts = batch[count_key].masked_fill(~visible, 0.0)
            lib = counts.sum(1)  # the visible library: the model never learns the held-out counts
            batch[count_key] = counts
            batch[value_key] = torch.log1p(counts / lib.clamp(min=1e-12)[:, None] * TARGET_SUM).masked_fill(~visible, 0)
            batch[lib_key] = lib
        batch[LIBRARY["spliced"]] = torch.ones(len(rows))  # NB mean x 1: the predicted share of the library
        with torch.no_grad():
            share = task.head(batch, task.encoder(batch))["spliced_mu"].double().numpy()
        for b, r in enumerate(rows):
            m = real[b].numpy()
            out[r, ids[b].numpy()[m]] = share[b][m]
    return out


def baseline_outputs(task, s_NV, u_NV, one_batch: bool = False) -> dict:
    """A BaselineTask's eval outputs on dense counts, concatenated over cell chunks (or one batch of all cells)."""
    import torch

    from fm.baselines.common import batch_from_dense

    task.eval()
    parts = []
    for rows in [np.arange(len(s_NV))] if one_batch else chunks(len(s_NV)):
        with torch.no_grad():
            out = task.head(batch_from_dense(s_NV[rows], u_NV[rows]), None)
        parts.append({k: v.double().numpy() for k, v in out.items() if torch.is_tensor(v) and v.shape[0] == len(rows)})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fm_embedding(task, s_NV, u_NV) -> np.ndarray:
    import torch

    from fm.baselines.common import batch_from_dense

    task.eval()
    parts = []
    for rows in chunks(len(s_NV)):
        with torch.no_grad():
            parts.append(task.encoder(batch_from_dense(s_NV[rows], u_NV[rows])).z_global.double().numpy())
    return np.concatenate(parts)


def train_models(workdir: Path, corpus: Path, n_cells: int, max_genes: int, heads: dict, args, pretrain_steps: int,
                 steps: int) -> tuple[dict, dict]:
    """Pretrain the debug encoder on ``corpus``, fine-tune the fm ``heads`` from it and train the three baselines,
    all through the real entry points. Returns ({name: task}, {name: seconds})."""
    from fm import finetune, train

    seconds, tasks = {}, {}
    t0 = time.perf_counter()
    train.run(train.compose([f"data.corpus={corpus}", f"output_dir={workdir / 'pretrain'}", "model=debug",
                             f"task={vq.PRETRAIN_TASK}", *COMMON, "data.batch_size=32", f"data.max_genes={max_genes}",
                             f"trainer.max_steps={pretrain_steps}", f"seed={args.seed}", "task.optim.warmup_steps=20",
                             "task.optim.lr=2e-3"]))  # bench/velocity_quality.py's pretraining settings
    seconds["pretraining"] = time.perf_counter() - t0
    ckpt = workdir / "pretrain" / "checkpoints" / "last.ckpt"
    for name, (head, *extra) in heads.items():
        t0 = time.perf_counter()
        tasks[name], _ = vq.finetune_head(workdir / f"finetune{len(tasks)}", corpus, ckpt, head, args.encoder, steps,
                                          max_genes, args.seed, tuple(extra))
        seconds[name] = time.perf_counter() - t0
    # scVI's KL warm-up over half the epochs the run has (scvi-tools' 400 epochs would leave it near 0 here)
    epochs = max(1, steps * BASELINE_DATA["scvi"] // n_cells)
    recipes = {"scvi": [f"head.n_epochs_kl_warmup={max(1, epochs // 2)}"], "scscope": [],
               "celldancer": ["head.input=counts"]}
    for name, extra in recipes.items():
        t0 = time.perf_counter()
        cfg = train.compose([f"data.corpus={corpus}", *COMMON, f"data.max_genes={max_genes}",
                             f"trainer.max_steps={steps}", f"seed={args.seed}", f"head={name}",
                             f"output_dir={workdir / name}", f"data.batch_size={BASELINE_DATA[name]}", *extra],
                            "finetune")
        tasks[name] = finetune.run(cfg)["task"]
        seconds[name] = time.perf_counter() - t0
    return tasks, seconds


def dense(adata, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spliced and unspliced counts [N, V] of ``adata`` in vocabulary order."""
    from fm import keys

    return tuple(np.asarray(adata.layers[k][:, cols].toarray(), dtype=np.float64)
                 for k in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED))


def score_imputation(tasks: dict, s_NV: np.ndarray, u_NV: np.ndarray, fraction: float, seed: int) -> tuple[dict, int]:
    """Median absolute error on held-out spliced entries per model (protocol: module docstring)."""
    from fm.metrics.expression import gene_mean_imputation, hold_out_entries, imputation_error

    s_masked_NV, held_NV = hold_out_entries(s_NV, fraction, seed=seed)
    u_masked_NV = np.where(held_NV, 0.0, u_NV)  # fm hides the whole token; scVI / scScope read spliced only
    truth_NV = normalised(s_NV, s_NV.sum(1))
    visible_lib = s_masked_NV.sum(1)
    visible_norm_NV = normalised(s_masked_NV, visible_lib)
    expressed_NV = (s_NV + u_NV) > 0  # the cell's stored genes: what fm's queries are
    nonzero_mean_V = np.nanmean(np.where(s_masked_NV > 0, visible_norm_NV, np.nan), axis=0)
    impute = {"gene mean": gene_mean_imputation(visible_norm_NV, held_NV),
              "gene mean of nonzero entries (told which genes are stored, as fm's queries)":
                  np.where(expressed_NV, np.nan_to_num(nonzero_mean_V)[None, :], 0.0),
              "fm expression": np.log1p(fm_imputation(tasks["fm expression"], s_NV, u_NV, held_NV) * TARGET_SUM)}
    scvi_out = baseline_outputs(tasks["scvi"], s_masked_NV, u_masked_NV)
    impute["scVI"] = np.log1p(scvi_out["imputed"] / np.maximum(visible_lib, 1e-12)[:, None] * TARGET_SUM)
    impute["scScope"] = baseline_outputs(tasks["scscope"], s_masked_NV, u_masked_NV)["imputed"]
    return {k: imputation_error(v, truth_NV, held_NV) for k, v in impute.items()}, int(held_NV.sum())


def score_embeddings(tasks: dict, s_NV: np.ndarray, u_NV: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """k-means ARI / NMI and silhouette of each representation of the uncorrupted cells against ``labels``."""
    from fm.metrics.embedding import embedding_scores

    embeddings = {
        "fm global representation": fm_embedding(tasks["fm expression"], s_NV, u_NV),
        "scVI latent (mean)": baseline_outputs(tasks["scvi"], s_NV, u_NV)["z_mean"],
        "scScope latent": baseline_outputs(tasks["scscope"], s_NV, u_NV)["latent"],
    }
    return {k: embedding_scores(v, labels, seed=seed) for k, v in embeddings.items()}


def run_simulated(workdir: Path, args) -> dict:
    """Simulated part: bench/velocity_quality.py's corpora; velocity scored against the simulated truth."""
    from fm import keys

    data = make_corpora(workdir)
    corpus, adata = data["corpus"], data["adata"]
    max_genes = 64 * ((vq.GENES + 63) // 64)  # every stored gene of a cell is a token (>= the vocabulary)
    heads = {"fm expression": ["expression"],
             "fm velocity (supervised)": ["velocity", "head.mode=supervised"],
             "fm velocity (dynamical)": ["velocity", "head.mode=dynamical"]}
    n_train = sum(a.n_obs for n, a in adata.items() if n.startswith("train"))
    tasks, seconds = train_models(workdir, corpus["train"], n_train, max_genes, heads, args, args.pretrain_steps,
                                  args.steps)
    held = adata["heldout"]
    cols = vocab_order(corpus["train"], held)
    s_NV, u_NV = dense(held, cols)
    truth_v_NV = np.asarray(held.layers[keys.LAYER_VELOCITY_TRUE][:, cols], dtype=np.float64)
    imputation, n_held = score_imputation(tasks, s_NV, u_NV, args.hold_out, args.seed)
    embedding = score_embeddings(tasks, s_NV, u_NV, np.asarray(held.obs[keys.OBS_LINEAGE].astype(str)), args.seed)
    velocity, asked = {}, None
    for name in ("fm velocity (supervised)", "fm velocity (dynamical)"):
        pred = predict(tasks[name], corpus["heldout"], "heldout", held, max_genes)[0][:, cols]
        asked = np.isfinite(pred)  # each cell's stored genes, the same for every model
        velocity[name] = score(pred, truth_v_NV)
    dancer = baseline_outputs(tasks["celldancer"], s_NV, u_NV, one_batch=True)["velocity"]
    velocity["cellDancer"] = score(np.where(asked, dancer, np.nan), truth_v_NV)
    steady = steady_state(held, smooth=True)[:, cols]
    velocity["steady state (kNN moments)"] = score(np.where(asked, steady, np.nan), truth_v_NV)
    return {"imputation": imputation, "n_held": n_held, "embedding": embedding, "velocity": velocity,
            "seconds": seconds, "n_vocab": len(cols)}


PANCREAS = Path(os.environ.get("FM_SHARED_DATA", "/work/shared/data")) / "pancreas_supercell_3696x2000.h5ad"
# the known transitions of the endocrine pancreas (Bastidas-Ponce et al. 2019), in the file's cluster names
PANCREAS_EDGES = [("Ductal", "Ngn3 low EP"), ("Ngn3 low EP", "Ngn3 high EP"), ("Ngn3 high EP", "Pre-endocrine"),
                  *[("Pre-endocrine", fate) for fate in ("Alpha", "Beta", "Delta", "Epsilon")]]


def pancreas_corpora(workdir: Path, n_genes: int, held_out: float, seed: int) -> dict:
    """Training and held-out cells of the pancreas file on its ``n_genes`` genes with the most unspliced and
    spliced counts (ranked by min(total s, total u) over the training cells), as two corpora on one vocabulary."""
    import anndata as ad

    from data_prep.convert import convert
    from fm import keys

    adata = ad.read_h5ad(PANCREAS)
    missing = sorted({a for e in PANCREAS_EDGES for a in e} - set(adata.obs[keys.OBS_CLUSTERS].astype(str)))
    if missing:
        raise KeyError(f"{PANCREAS}: obs['{keys.OBS_CLUSTERS}'] has no cluster {missing[0]!r}")
    test = np.random.default_rng(seed).random(adata.n_obs) < held_out
    totals = [np.asarray(adata.layers[k][~test].sum(0)).ravel() for k in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED)]
    genes = np.sort(np.argsort(-np.minimum(*totals), kind="stable")[:n_genes])
    adata = adata[:, genes].copy()
    adata.var[keys.VAR_GENE_ID] = adata.var_names.astype(str)
    parts = {"train": adata[~test].copy(), "heldout": adata[test].copy()}
    corpora = {}
    for name, part in parts.items():
        part.write_h5ad(workdir / f"pancreas_{name}.h5ad")
        corpora[name] = workdir / f"pancreas_corpus_{name}"
        convert([workdir / f"pancreas_{name}.h5ad"], corpora[name], dataset_ids=[name], progress=False,
                vocab=None if name == "train" else corpora["train"] / "vocab.tsv")
    return {"adata": parts, "corpus": corpora}


def run_pancreas(workdir: Path, args) -> dict:
    """Pancreas part: imputation and cluster ARI on held-out cells; CBDir / ICCoh of the velocities there."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from fm import keys
    from fm.metrics.velocity import (
        cross_boundary_correctness,
        embed_velocity,
        in_cluster_coherence,
        knn_indices,
        transition_matrix,
        velocity_graph,
    )

    data = pancreas_corpora(workdir, args.pancreas_genes, args.pancreas_held_out, args.seed)
    corpus, adata = data["corpus"], data["adata"]
    max_genes = 64 * ((args.pancreas_genes + 63) // 64)
    heads = {"fm expression": ["expression"], "fm velocity (dynamical)": ["velocity", "head.mode=dynamical"]}
    tasks, seconds = train_models(workdir, corpus["train"], adata["train"].n_obs, max_genes, heads, args,
                                  args.pancreas_pretrain_steps, args.pancreas_steps)
    held = adata["heldout"]
    cols = vocab_order(corpus["train"], held)
    s_NV, u_NV = dense(held, cols)
    clusters = np.asarray(held.obs[keys.OBS_CLUSTERS].astype(str))
    imputation, n_held = score_imputation(tasks, s_NV, u_NV, args.hold_out, args.seed)
    embedding = score_embeddings(tasks, s_NV, u_NV, clusters, args.seed)

    # the file has no obsm['X_umap']: a t-SNE of 30 PCs of log1p normalised spliced counts; kNN in those PCs
    x_NV = s_NV / np.maximum(s_NV.sum(1, keepdims=True), 1) * np.median(s_NV.sum(1))
    pcs = PCA(n_components=30, random_state=args.seed).fit_transform(np.log1p(x_NV))
    emb = TSNE(n_components=2, random_state=args.seed, init="pca", max_iter=300).fit_transform(pcs)
    neighbours = knn_indices(pcs, 30)
    pred = predict(tasks["fm velocity (dynamical)"], corpus["heldout"], "heldout", held, max_genes)[0][:, cols]
    asked = np.isfinite(pred)
    velocities = {"fm velocity (dynamical)": np.nan_to_num(pred),
                  "cellDancer": np.where(asked, baseline_outputs(tasks["celldancer"], s_NV, u_NV,
                                                                 one_batch=True)["velocity"], 0.0),
                  "steady state (kNN moments)": np.where(asked, steady_state(held, smooth=True)[:, cols], 0.0)}
    velocity = {}
    for name, v_NV in velocities.items():
        v_emb = embed_velocity(emb, transition_matrix(velocity_graph(x_NV, v_NV, neighbours)))
        per_edge, cbdir = cross_boundary_correctness(emb, v_emb, clusters, PANCREAS_EDGES, neighbours)
        velocity[name] = {"cbdir": cbdir, "iccoh": in_cluster_coherence(v_NV, clusters, neighbours)[1],
                          "per_edge": per_edge}
    return {"imputation": imputation, "n_held": n_held, "embedding": embedding, "velocity": velocity,
            "seconds": seconds, "n_vocab": len(cols), "n_cells": {k: a.n_obs for k, a in adata.items()}}


def _tables(r: dict, labels: str, fraction: float) -> list[str]:
    return [
        f"Imputation: {r['n_held']} held-out entries ({fraction:.0%} of the nonzero spliced entries of the held-out "
        "cells), "
        "median absolute error on log1p(counts per 10^4 of the cell's spliced total); lower is better.",
        "",
        "| model | median abs. error |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in r["imputation"].items()],
        "",
        f"Embeddings of the held-out cells: k-means (k = {labels}) ARI / NMI, and silhouette, against the {labels}.",
        "",
        "| representation | ARI | NMI | silhouette |",
        "|---|---|---|---|",
        *[f"| {k} | {v['ari']:.3f} | {v['nmi']:.3f} | {v['silhouette']:.3f} |" for k, v in r["embedding"].items()],
        "",
    ]


def markdown(sim: dict, pancreas: dict | None, args, command: str, wall_s: float) -> str:
    """One run: a ``### date, machine`` heading, the command, the settings and the tables."""
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    a = args
    lines = [
        f"### {datetime.date.today().isoformat()}, {machine}",
        "",
        f"`{command}` (CPU, {wall_s / 60:.0f} min wall on a machine shared with other jobs). Small step counts, "
        "meant to finish in about 10 minutes on 2 busy cores: these figures rank the models at this budget, not at "
        "convergence.",
        "",
        "#### Simulated",
        "",
        vq.setting(a.pretrain_steps, a.steps, vq.PRETRAIN_TASK) + f" {sim['n_vocab']} vocabulary genes. Every head "
        f"and baseline trained {a.steps} steps through `fm.finetune.run` on the training corpus (fm heads: encoder "
        f"{a.encoder}, batch 32; the dynamical head reads no target; scVI batch 128 with its KL warm-up over half its "
        "epochs; scScope batch 64, its Adam lr 1e-4; cellDancer batch 64 on raw counts); all scored on the held-out "
        "dataset. Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sim["seconds"].items()) + ".",
        "",
        *_tables(sim, "lineages", a.hold_out),
        "Velocity against the simulated ds/dt on each held-out cell's stored genes.",
        "",
        "| model | median gene Spearman | sign accuracy | scaled cosine (mean) |",
        "|---|---|---|---|",
        *[f"| {k} | {v['spearman']:.3f} | {v['sign']:.3f} | {v['cosine']:.3f} |" for k, v in sim["velocity"].items()],
        "",
        "#### Pancreas",
        "",
    ]
    if pancreas is None:
        lines.append(f"Skipped: {PANCREAS} is absent.")
        return "\n".join(lines)
    p = pancreas
    lines += [
        f"`{PANCREAS.name}`: {p['n_cells']['train']} training / {p['n_cells']['heldout']} held-out cells (random, "
        f"seed {a.seed}), the {p['n_vocab']} genes with the most counts in both modalities (rank of min(total s, "
        f"total u) over the training cells). Debug encoder pretrained {a.pancreas_pretrain_steps} steps, every head "
        f"and baseline trained {a.pancreas_steps} steps on the training cells, as above. Seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in p["seconds"].items()) + ".",
        "",
        *_tables(p, "clusters", a.hold_out),
        "Velocity on the held-out cells (no model saw them): CBDir over Ductal -> Ngn3 low EP -> Ngn3 high EP -> "
        "Pre-endocrine -> {Alpha, Beta, Delta, Epsilon} and ICCoh (fm.metrics.velocity), on each cell's stored "
        "genes (0 elsewhere). The file has no `obsm['X_umap']`: the embedding is a t-SNE (300 iterations) of 30 "
        "PCs of log1p normalised spliced counts, the kNN (30) in those PCs; velocities projected onto it as scVelo "
        "does (fm.metrics.velocity: velocity_graph, transition_matrix, embed_velocity).",
        "",
        "| model | CBDir | ICCoh |",
        "|---|---|---|",
        *[f"| {k} | {v['cbdir']:.3f} | {v['iccoh']:.3f} |" for k, v in p["velocity"].items()],
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning / baseline training steps, each")
    parser.add_argument("--encoder", default="full", choices=("frozen", "last_k", "full"))
    parser.add_argument("--hold-out", type=float, default=0.1, help="share of nonzero spliced entries held out")
    parser.add_argument("--pancreas-genes", type=int, default=200)
    parser.add_argument("--pancreas-held-out", type=float, default=0.25, help="share of pancreas cells held out")
    parser.add_argument("--pancreas-pretrain-steps", type=int, default=100)
    parser.add_argument("--pancreas-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    command = "python " + " ".join(["bench/compare.py", *[a for a in sys.argv[1:] if a != "--no-write"]])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sim").mkdir()
        sim = run_simulated(Path(tmp) / "sim", args)
        pancreas = None
        if PANCREAS.exists():
            (Path(tmp) / "pancreas").mkdir()
            pancreas = run_pancreas(Path(tmp) / "pancreas", args)
    text = markdown(sim, pancreas, args, command, time.perf_counter() - t0)
    sys.stdout.write(text + "\n")
    if not args.no_write:
        record("Comparison", text, intro=INTRO)


if __name__ == "__main__":
    main()
