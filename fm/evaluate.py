"""`fm evaluate`: score predictions on a `.h5ad` (a table on screen, JSON on disk).

    fm evaluate pred.h5ad --out metrics.json                        # output of `fm predict`, against what it holds
    fm evaluate sim.h5ad --checkpoint releases/fm-velocity --checkpoint releases/fm-expression --hold-out 0.1
    fm evaluate pancreas_pred.h5ad --transitions "Ductal>Ngn3 low EP; Ngn3 low EP>Ngn3 high EP" --basis X_umap
    fm evaluate pancreas_pred.h5ad --transitions pancreas        # the preset: Ductal -> ... -> Alpha/Beta/Delta/Epsilon
    fm evaluate sim_fm.h5ad sim_stochastic.h5ad --name fm --name teacher   # side by side: one column per file

Several inputs (outputs of `fm predict` and `fm velocity` on the same cells, say) are scored by the same code and
shown side by side, one column each; each file's ``layers['velocity']`` is scored against its truth layer, so a
simulated file's truth is in every column's row.

What is scored depends on what the file holds (DESIGN.md §8); a section whose inputs are absent is skipped, and
the reason is recorded under ``skipped``:

- ``velocity``: ``layers['velocity']`` against a truth layer (``velocity_true``, the simulator's ds/dt): median
  per-gene Spearman, sign accuracy, mean per-cell cosine after scaling genes by their true-velocity sd; and rate
  recovery of ``fm_beta``/``fm_gamma`` (median over cells, per gene) against ``var['beta_true']``/``var['gamma_true']``
  and of ``fm_alpha`` against ``layers['alpha_true']``. Only genes with a prediction (in the model's vocabulary)
  are scored.
- ``transitions``: CBDir over the given transitions A>B and ICCoh per cluster (fm.metrics.velocity), on the 2-D
  embedding ``--basis`` (default ``X_umap`` when present, else two principal components computed here), with the
  kNN (30) in a PCA (30 components) of log1p normalised spliced counts and velocity projected onto the embedding as
  scVelo does, in the velocity's units (fm.metrics.projection: the same projection ``fm plot`` draws).
- ``embedding``: ARI, NMI (k-means, k = number of clusters) and silhouette of ``obsm['X_fm']`` against the clusters.
- ``imputation`` (only with ``--checkpoint`` and an expression head): a fraction of the nonzero spliced and
  unspliced counts is hidden (set to zero) in the model's input and predicted; median absolute error on the held-out
  counts, against the gene-mean baseline (the scVI/scScope protocol, fm.metrics.expression).

With ``--checkpoint`` the input is first run through ``fm predict`` in memory (nothing is written but the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fm import keys
from fm.io import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_BASIS = "X_umap"  # else the first two principal components of the expression, computed here
PRESETS = {  # known transitions by name (--transitions pancreas)
    # endocrine pancreas (Bastidas-Ponce et al. 2019), as in scVelo's and the VeloAE/UniTVelo benchmarks
    "pancreas": "Ductal>Ngn3 low EP; Ngn3 low EP>Ngn3 high EP; Ngn3 high EP>Pre-endocrine; "
                "Pre-endocrine>Alpha,Beta,Delta,Epsilon",
}
N_NEIGHBOURS = 30


# --- sections ----------------------------------------------------------------------------------------------------
def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def velocity_section(adata, truth_layer: str) -> dict[str, Any]:
    """Velocity against a truth layer on the genes the model predicted (finite in every cell)."""
    from fm.metrics.velocity import gene_spearman, rate_recovery, scaled_cosine, sign_accuracy

    pred_NG, true_NG = _dense(adata.layers[keys.LAYER_VELOCITY]), _dense(adata.layers[truth_layer])
    genes = np.isfinite(pred_NG).all(0)
    if not genes.any():
        raise ValueError(f"layers['{keys.LAYER_VELOCITY}'] has no gene predicted in every cell")
    pred_NG, true_NG = pred_NG[:, genes], true_NG[:, genes]
    rho = gene_spearman(pred_NG, true_NG)
    out: dict[str, Any] = {
        "truth_layer": truth_layer,
        "n_genes": int(genes.sum()),
        "median_gene_spearman": rho["median"],
        "sign_accuracy": sign_accuracy(pred_NG, true_NG),
        "scaled_cosine_mean": scaled_cosine(pred_NG, true_NG)["mean"],
    }
    for rate, layer, column in (("beta", keys.LAYER_BETA, keys.VAR_BETA_TRUE),
                                ("gamma", keys.LAYER_GAMMA, keys.VAR_GAMMA_TRUE)):
        if layer in adata.layers and column in adata.var:
            pred_G = np.nanmedian(_dense(adata.layers[layer])[:, genes], axis=0)
            out[f"{rate}_recovery"] = rate_recovery(pred_G, np.asarray(adata.var[column])[genes])
    if keys.LAYER_ALPHA in adata.layers and keys.LAYER_ALPHA_TRUE in adata.layers:
        out["alpha_recovery"] = rate_recovery(_dense(adata.layers[keys.LAYER_ALPHA])[:, genes],
                                              _dense(adata.layers[keys.LAYER_ALPHA_TRUE])[:, genes])
    return out


def parse_transitions(text: str) -> list[tuple[str, str]]:
    """``"A>B; B>C"`` -> [(A, B), (B, C)]; a target list ``"A>B,C"`` gives one edge per target; or a preset name."""
    text = PRESETS.get(text.strip(), text)
    edges = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if part.count(">") != 1:
            raise ValueError(f"--transitions: {part!r} is not of the form 'SOURCE>TARGET[,TARGET...]'")
        source, targets = (p.strip() for p in part.split(">"))
        edges += [(source, t.strip()) for t in targets.split(",") if t.strip()]
    if not edges:
        raise ValueError(f"--transitions: no transition in {text!r}")
    return edges


def transitions_section(adata, edges: Sequence[tuple[str, str]], cluster_key: str,
                        basis: str | None) -> dict[str, Any]:
    """CBDir over the transitions and ICCoh per cluster, on the embedding ``basis`` (None: X_umap, else two PCs).

    The velocity is projected onto the embedding exactly as ``fm plot`` draws it (fm.metrics.projection), in the
    velocity's own units (the release's tokenizer settings that `fm predict` records in ``uns['fm']``).
    """
    from fm.metrics.projection import (
        ExpressionSpace,
        embedding_2d,
        expression_space,
        project_onto_embedding,
        velocity_genes,
    )
    from fm.metrics.velocity import cross_boundary_correctness, in_cluster_coherence

    labels = np.asarray(adata.obs[cluster_key].astype(str))
    unknown = sorted({c for edge in edges for c in edge} - set(labels))
    if unknown:
        raise ValueError(f"--transitions: cluster(s) {unknown} not in obs['{cluster_key}'] "
                         f"(has {sorted(set(labels))})")
    space = ExpressionSpace.from_adata(adata)
    neighbourhood = expression_space(adata, N_NEIGHBOURS, space)
    _, pcs_NP, neighbours_NK = neighbourhood
    emb_NE, described = embedding_2d(adata, basis, pcs_NP)
    v_emb_NE = project_onto_embedding(adata, emb_NE, space=space, neighbourhood=neighbourhood)
    v_NG = _dense(adata.layers[keys.LAYER_VELOCITY])[:, velocity_genes(adata)]
    cbdir, cbdir_mean = cross_boundary_correctness(emb_NE, v_emb_NE, labels, edges, neighbours_NK)
    iccoh, iccoh_mean = in_cluster_coherence(v_NG, labels, neighbours_NK)
    return {"basis": described, "space": space.describe(), "cluster_key": cluster_key, "cbdir_mean": cbdir_mean,
            "iccoh_mean": iccoh_mean, "cbdir": {f"{a}>{b}": s for (a, b), s in cbdir.items()}, "iccoh": iccoh}


def embedding_section(adata, cluster_key: str, seed: int = 0) -> dict[str, Any]:
    from fm.metrics.embedding import embedding_scores

    labels = np.asarray(adata.obs[cluster_key].astype(str))
    return {"cluster_key": cluster_key, **embedding_scores(np.asarray(adata.obsm[keys.OBSM_EMBEDDING]), labels, seed)}


def imputation_section(models, adata, fraction: float, seed: int, batch_size: int) -> dict[str, Any]:
    """Hide ``fraction`` of the nonzero counts of each modality, predict them, score against the gene means."""
    import scipy.sparse as sp

    from fm.metrics.expression import gene_mean_imputation, hold_out_entries, imputation_error
    from fm.predict import predict

    layers = (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED)
    masked, held, truth = adata.copy(), {}, {}
    for i, layer in enumerate(layers):
        truth[layer] = _dense(adata.layers[layer])
        x_masked, held[layer] = hold_out_entries(truth[layer], fraction, seed + i)
        masked.layers[layer] = sp.csr_matrix(x_masked)
    predicted = predict(models, masked, batch_size=batch_size, progress=False)
    in_vocab = np.asarray(predicted.var[keys.VAR_FM_IN_VOCAB], dtype=bool)
    out: dict[str, Any] = {"fraction": fraction, "seed": seed, "scale": "raw counts"}
    for layer in layers:
        pred_layer = keys.LAYER_IMPUTED[layer]
        if pred_layer not in predicted.layers:
            raise ValueError(f"imputation: the model wrote no layers['{pred_layer}'] (needs an expression head)")
        sel = held[layer] & in_vocab[None, :]
        x_masked = _dense(masked.layers[layer])
        out[layer] = {
            "n_held_out": int(sel.sum()),
            "fm": imputation_error(_dense(predicted.layers[pred_layer]), truth[layer], sel),
            "gene_mean": imputation_error(gene_mean_imputation(x_masked, held[layer]), truth[layer], sel),
        }
    return out


def evaluate(adata, *, models=None, truth_layer: str | None = None, cluster_key: str = keys.OBS_CLUSTERS,
             transitions: Sequence[tuple[str, str]] | None = None, basis: str | None = None,
             hold_out: float = 0.0, seed: int = 0, batch_size: int = 256) -> dict[str, Any]:
    """Every metric the AnnData (and the models, when given) allows; see the module docstring.

    Args:
        adata: a predicted AnnData (output of ``fm predict``), or the raw input when ``models`` are given.
        models: ``Pretrained`` release(s); the input is run through :func:`fm.predict.predict` first.
        truth_layer: the true velocity layer (default ``velocity_true`` when present).
        transitions: known transitions (A, B) for CBDir.
        basis: the obsm key of the 2-D embedding for CBDir (default ``X_umap`` when present, else two principal
            components of log1p normalised spliced counts, computed).
        hold_out: with models, the fraction of nonzero counts hidden for the imputation score (0: none).
    Returns:
        ``{"n_cells", "n_genes", section: {...}, "skipped": {section: reason}}``.
    """
    raw = adata
    if models is not None:
        from fm.predict import predict

        adata = predict(models, raw, batch_size=batch_size, progress=True)
    result: dict[str, Any] = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "skipped": {}}
    skipped = result["skipped"]
    has_velocity = keys.LAYER_VELOCITY in adata.layers
    has_clusters = cluster_key in adata.obs
    truth_layer = truth_layer or (keys.LAYER_VELOCITY_TRUE if keys.LAYER_VELOCITY_TRUE in adata.layers else None)
    if truth_layer is not None and truth_layer not in adata.layers:
        raise KeyError(f"--truth-layer: layers['{truth_layer}'] not in the input (has {sorted(adata.layers)})")

    if not has_velocity:
        skipped["velocity"] = skipped["transitions"] = f"no layers['{keys.LAYER_VELOCITY}'] (run fm predict)"
    elif truth_layer is None:
        skipped["velocity"] = f"no truth layer (layers['{keys.LAYER_VELOCITY_TRUE}'] or --truth-layer)"
    else:
        result["velocity"] = velocity_section(adata, truth_layer)

    if has_velocity:
        if basis is None and DEFAULT_BASIS in adata.obsm:
            basis = DEFAULT_BASIS
        if not transitions:
            skipped["transitions"] = "no --transitions given"
        elif not has_clusters:
            skipped["transitions"] = f"no obs['{cluster_key}']"
        elif basis is not None and basis not in adata.obsm:
            raise KeyError(f"--basis: obsm['{basis}'] not in the input (has {sorted(adata.obsm)})")
        else:
            result["transitions"] = transitions_section(adata, transitions, cluster_key, basis)

    if keys.OBSM_EMBEDDING not in adata.obsm:
        skipped["embedding"] = f"no obsm['{keys.OBSM_EMBEDDING}'] (run fm predict)"
    elif not has_clusters:
        skipped["embedding"] = f"no obs['{cluster_key}']"
    else:
        result["embedding"] = embedding_section(adata, cluster_key, seed)

    if hold_out > 0 and models is not None:
        result["imputation"] = imputation_section(models, raw, hold_out, seed, batch_size)
    else:
        skipped["imputation"] = "needs --checkpoint with an expression head and --hold-out > 0"
    if len(skipped) == 4:
        raise ValueError("nothing to evaluate: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return result


# --- output ------------------------------------------------------------------------------------------------------
def _rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(section, metric, value) rows of the scalar results, for the table."""
    rows = []

    def walk(section: str, prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(section, f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, float):
            rows.append((section, prefix, "nan" if math.isnan(value) else f"{value:.4g}"))
        elif isinstance(value, (int, str)):
            rows.append((section, prefix, str(value)))

    for section, value in result.items():
        if section not in ("skipped", "n_cells", "n_genes", "input", "checkpoints"):
            walk(section, "", value)
    return rows


def print_table(result: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: {result['n_cells']} cells x {result['n_genes']} genes")
    for name in ("section", "metric", "value"):
        table.add_column(name, justify="right" if name == "value" else "left", overflow="fold")
    for row in _rows(result):
        table.add_row(*row)
    console = Console()
    console.print(table)
    for section, why in result["skipped"].items():
        console.print(f"[dim]skipped {section}: {why}[/]")


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``result`` as JSON atomically (fm.io)."""
    return atomic_write_text(path, json.dumps(result, indent=2, default=float, allow_nan=True) + "\n")


def print_comparison(results: dict[str, dict[str, Any]]) -> None:
    """One table, a column per input: the rows any of them has (blank where one lacks it)."""
    from rich.console import Console
    from rich.table import Table

    rows: dict[tuple[str, str], dict[str, str]] = {}
    for name, result in results.items():
        for section, metric, value in _rows(result):
            rows.setdefault((section, metric), {})[name] = value
    n_cells = {r["n_cells"] for r in results.values()}
    table = Table(title=f"{len(results)} inputs, {'/'.join(map(str, sorted(n_cells)))} cells")
    table.add_column("section")
    table.add_column("metric", overflow="fold")
    for name in results:
        table.add_column(name, justify="right")
    for (section, metric), values in rows.items():
        table.add_row(section, metric, *(values.get(name, "") for name in results))
    console = Console()
    console.print(table)
    for name, result in results.items():
        for section, why in result["skipped"].items():
            console.print(f"[dim]{name}: skipped {section}: {why}[/]")


def input_names(paths: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """Column names: ``--name`` per input, else the file stems (made unique)."""
    if names:
        if len(names) != len(paths):
            raise ValueError(f"--name: {len(names)} names for {len(paths)} inputs (one per input)")
        if len(set(names)) != len(names):
            raise ValueError(f"--name: the names must differ, got {list(names)}")
        return list(names)
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}[{i}]" for i, s in enumerate(stems)]


def run_cli(args: argparse.Namespace) -> int:
    import anndata as ad

    from fm.checkpoint import load_pretrained

    paths = [Path(p) for p in args.input]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such .h5ad file")
    if args.hold_out and not args.checkpoint:
        raise ValueError("--hold-out needs --checkpoint (the model must predict the hidden counts)")
    if args.checkpoint and len(paths) > 1:
        raise ValueError("--checkpoint takes one input; to compare files, run fm predict on each first")
    names = input_names(paths, args.name)
    models = [load_pretrained(c, device=args.device) for c in args.checkpoint] if args.checkpoint else None
    transitions = parse_transitions(args.transitions) if args.transitions else None
    results = {}
    for name, path in zip(names, paths, strict=True):
        result = evaluate(ad.read_h5ad(path), models=models, truth_layer=args.truth_layer, cluster_key=args.clusters,
                          transitions=transitions, basis=args.basis, hold_out=args.hold_out, seed=args.seed,
                          batch_size=args.batch_size)
        result["input"], result["checkpoints"] = str(path), list(args.checkpoint or [])
        results[name] = result
    if len(paths) == 1:
        print_table(results[names[0]], paths[0].name)
        out = write_json(results[names[0]], args.out or paths[0].with_suffix(".metrics.json"))
    else:
        print_comparison(results)
        out = write_json({"compare": results}, args.out or paths[0].with_suffix(".compare.json"))
    print(f"metrics written to {out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="score predictions (velocity vs truth, CBDir/ICCoh, embedding, "
                              "imputation): a table and a JSON file", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="H5AD", nargs="+",
                   help="output of fm predict or fm velocity (several: side by side), or with --checkpoint the raw "
                   "input")
    p.add_argument("--name", action="append", help="column name of each input, in order (default: the file stems)")
    p.add_argument("--checkpoint", action="append", help="release folder(s) to run first (repeatable)")
    p.add_argument("--out", help="JSON file (default: INPUT with suffix .metrics.json; several inputs: the first's "
                   "with .compare.json)")
    p.add_argument("--truth-layer", help=f"true velocity layer (default: {keys.LAYER_VELOCITY_TRUE} when present)")
    p.add_argument("--clusters", default=keys.OBS_CLUSTERS, help="obs column of cell types (default: clusters)")
    p.add_argument("--transitions", help=f"known transitions for CBDir, 'A>B; B>C,D', or a preset "
                   f"({', '.join(PRESETS)})")
    p.add_argument("--basis", help=f"obsm key of the 2-D embedding for CBDir (default: {DEFAULT_BASIS} when present, "
                   "else two principal components, computed)")
    p.add_argument("--hold-out", type=float, default=0.0, help="fraction of counts hidden for imputation (0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_cli)
    return p
