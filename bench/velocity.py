"""Velocity without a truth layer, side by side: scVelo (the package) against fm's teachers, in one run, one table.

    .venv/bin/python -m bench.velocity --write                   # 3 seeds x 2 sizes + pancreas: ~15 min, 2 cores
    .venv/bin/python -m bench.velocity --sizes 1000x100 --seeds 0 --no-pancreas        # a look, ~1 min
    .venv/bin/python -m bench.velocity --sizes --no-pancreas --scale 100000x200    # fm_dynamical's cost, ~6 min

Methods, all on the same neighbourhood of each file (fm.velocity.neighbours: the given size factors on the
simulations, total counts on pancreas; 30 PCs, 30 neighbours, scVelo-equal moments Ms, Mu), so that the table
compares the velocity models and not the preprocessing (docs/VELOCITY.md measures that part):

- scVelo dynamical: the package's ``tl.recover_dynamics`` + ``tl.velocity(mode='dynamical')`` (fm.velocity.teachers
  .dynamical hands it fm's normalised layers, moments and graph; one job);
- scVelo stochastic: the package's ``tl.velocity(mode='stochastic')`` on the same AnnData;
- fm steady_state and fm stochastic (fm.velocity.teachers, equal to scVelo's by design), and fm_dynamical
  (fm.velocity.dynamical);
- fm head (dynamical): the velocity decoder's self-supervised dynamical objective through fm's own commands, as a user
  runs it on a file with no truth: convert (the same neighbourhood settings), pretrain the debug encoder one step,
  fine-tune ``head=velocity`` (its default mode) ``--head-steps`` steps, export, ``fm predict`` on the file; its
  seconds are the whole path (conversion and prediction included), its velocity genes the ones it fits.

Simulations: scVelo's own simulator (``scvelo.datasets.simulation``) as raw counts with given size factors
(bench.velocity_teachers.simulate_counts, the recipe of docs/VELOCITY.md; time spans 25 and 50); scored against
the true ds/dt with fm.metrics.velocity (median gene Spearman, mean scaled cosine, sign accuracy) on the genes
scVelo's dynamical model fits (its velocity genes) that the method also gives a velocity for. fm_dynamical was
tuned on seeds 100-101 (time span 25), never on the seeds reported (0, 1, 2 by default).

Pancreas (../shared/data): CBDir over the 7 known transitions and ICCoh, with the projection ``fm evaluate`` uses
(fm.metrics.projection: scVelo's velocity graph and embedding on the 2-D PCA of log1p normalised spliced, the file
having no UMAP), and the number of the 4 transitions on Ductal -> Ngn3 low EP -> Ngn3 high EP -> Pre-endocrine ->
Beta that point backwards (CBDir < 0). Seconds are each method's wall time on the shared neighbourhood.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.figures import PANCREAS  # noqa: E402
from bench.report import record, velocity_bench_logging  # noqa: E402

log = logging.getLogger("bench.velocity")

SECTION = "Velocity without truth"
INTRO = (
    "No truth layer: scVelo's dynamical and stochastic models (the package) against fm's teachers and fm's own "
    "dynamical model (`fm velocity --method fm_dynamical`), on the same neighbourhood and metric code in one run "
    "(`bench/velocity.py`). Simulations: scVelo's simulator as raw counts with given size factors, scored on the "
    "genes scVelo's dynamical model fits (median gene Spearman / mean scaled cosine / sign accuracy vs the true "
    "ds/dt); fm_dynamical was tuned on other seeds. Pancreas: CBDir over the 7 known transitions, ICCoh, and the "
    "backward transitions among Ductal > Ngn3 low EP > Ngn3 high EP > Pre-endocrine > Beta. Targets (issue 15): "
    "Spearman >= 0.98, cosine >= 0.93, sign >= 0.97, none below scVelo dynamical by more than 0.01; CBDir >= "
    "scVelo dynamical's, no backward transition."
)
PANCREAS_EDGES = [("Ductal", "Ngn3 low EP"), ("Ngn3 low EP", "Ngn3 high EP"), ("Ngn3 high EP", "Pre-endocrine"),
                  ("Pre-endocrine", "Alpha"), ("Pre-endocrine", "Beta"), ("Pre-endocrine", "Delta"),
                  ("Pre-endocrine", "Epsilon")]
CHAIN = PANCREAS_EDGES[:3] + [("Pre-endocrine", "Beta")]


# --- methods: (neighbourhood, normalised s, u, its config) -> (velocity [N, G] with NaN where none, velocity genes)
def _scvelo_dynamical(nb, s, u, ncfg):
    from fm.velocity.teachers import TeacherConfig, dynamical

    r = dynamical(s, u, nb, ncfg, TeacherConfig("dynamical"))
    return r.velocity, r.velocity_genes


def _scvelo_stochastic(nb, s, u, ncfg):
    import scvelo as scv

    from fm.velocity.teachers import velocity_anndata

    a = velocity_anndata(s, u, nb, ncfg)
    scv.tl.velocity(a, mode="stochastic")
    vg = a.var["velocity_genes"].to_numpy(bool) if "velocity_genes" in a.var else np.ones(a.n_vars, bool)
    return np.asarray(a.layers["velocity"], np.float32), vg


def _fm(method: str):
    def run(nb, s, u, ncfg):
        from fm.velocity.teachers import TeacherConfig, run_teacher

        r = run_teacher(TeacherConfig(method), nb, s, u, ncfg)
        return r.velocity, r.velocity_genes

    return run


METHODS: dict[str, Callable] = {
    "scVelo dynamical": _scvelo_dynamical, "scVelo stochastic": _scvelo_stochastic,
    "fm steady_state": _fm("steady_state"), "fm stochastic": _fm("stochastic"), "fm_dynamical": _fm("fm_dynamical"),
}


HEAD = "fm head (dynamical)"


def head_pipeline(adata, ncfg, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """fm's commands on a raw-count AnnData (module docstring): velocity [N, G] and its velocity genes."""
    import tempfile

    import anndata as ad

    from data_prep.convert import convert
    from data_prep.targets import TargetConfig
    from fm import finetune, keys, train
    from fm.checkpoint import export, load_pretrained
    from fm.predict import predict

    with tempfile.TemporaryDirectory(prefix="fm-velocity-head-") as tmp:
        tmp = Path(tmp)
        a = ad.AnnData(X=adata.layers["spliced"], obs=adata.obs[[c for c in adata.obs if c == keys.SIZE_FACTOR]],
                       var=adata.var[[]], layers={k: adata.layers[k] for k in ("spliced", "unspliced")})
        a.write_h5ad(tmp / "data.h5ad")
        sf = keys.SIZE_FACTOR if ncfg.normalization == "size_factor" else None
        convert([tmp / "data.h5ad"], tmp / "corpus", neighbours=ncfg, progress=False,
                targets=TargetConfig(velocity_layer=None, velocity_u_layer=None, size_factor_key=sf))
        data = [f"data.corpus={tmp / 'corpus'}", f"data.max_genes={a.n_vars}",
                f"data.normalization={ncfg.normalization}", "data.num_workers=0", "data.val_fraction=0.0",
                "trainer.limit_val_batches=0", "logger=csv", "trainer.enable_progress_bar=false"]
        pretrained = tmp / "pre" / "checkpoints" / "last.ckpt"
        train.run(train.compose([*data, "model=debug", f"output_dir={tmp / 'pre'}", "trainer.max_steps=1"]))
        finetune.run(train.compose([*data, f"output_dir={tmp / 'ft'}", f"checkpoint={pretrained}", "head=velocity",
                                    f"trainer.max_steps={steps}"], "finetune"))
        export(tmp / "ft" / "checkpoints" / "last.ckpt", tmp / "release")
        out = predict(load_pretrained(tmp / "release"), a, progress=False)
    return np.asarray(out.layers[keys.LAYER_VELOCITY], np.float32), out.var[keys.VAR_VELOCITY_GENES].to_numpy(bool)


def run_methods(nb, s, u, ncfg, names, adata=None,
                head_steps: int = 100) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    out = {}
    for name in names:
        if name == HEAD:
            t0 = time.perf_counter()
            v, vg = head_pipeline(adata, ncfg, head_steps)
            out[name] = (v, vg & np.isfinite(v).all(0), time.perf_counter() - t0)
            log.info("%s: %d velocity genes in %.1f s", name, out[name][1].sum(), out[name][2])
            continue
        t0 = time.perf_counter()
        v, vg = METHODS[name](nb, s, u, ncfg)
        out[name] = (v, vg & np.isfinite(v).all(0), time.perf_counter() - t0)
        log.info("%s: %d velocity genes in %.1f s", name, out[name][1].sum(), out[name][2])
    return out


# --- simulations -------------------------------------------------------------------------------------------------
def simulation_rows(size: str, seed: int, names, t_max: float = 25.0, head_steps: int = 100) -> list[dict]:
    from bench.velocity_teachers import score, simulate_counts
    from fm.velocity.neighbours import NeighbourConfig, neighbourhood

    n_cells, n_genes = (int(x) for x in size.split("x"))
    a = simulate_counts(n_cells, n_genes, seed, t_max)
    ncfg = NeighbourConfig(normalization="size_factor")
    nb, s, u = neighbourhood(a.layers["spliced"], a.layers["unspliced"], ncfg, a.obs["size_factor"].to_numpy(),
                             where=f"sim {size} seed {seed}")
    res = run_methods(nb, s, u, ncfg, names, a, head_steps)
    truth = np.asarray(a.layers["velocity_true"])
    ref = res["scVelo dynamical"][1] if "scVelo dynamical" in res else np.ones(n_genes, bool)
    rows = []
    for name, (v, _, sec) in res.items():
        genes = ref & np.isfinite(v).all(0)
        rows.append({"data": f"sim {size} t_max {t_max:g} seed {seed}", "method": name, "genes": int(genes.sum()),
                     "of": int(ref.sum()), "seconds": sec, **score(v, truth, genes)})
    return rows


# --- pancreas ------------------------------------------------------------------------------------------------------
def pancreas_rows(names, head_steps: int = 100) -> list[dict]:
    import anndata as ad

    from fm.metrics.projection import embedding_2d, expression_space, project_onto_embedding
    from fm.metrics.velocity import cross_boundary_correctness, in_cluster_coherence
    from fm.velocity.neighbours import NeighbourConfig, neighbourhood

    adata = ad.read_h5ad(PANCREAS)
    ncfg = NeighbourConfig()
    nb, s, u = neighbourhood(adata.layers["spliced"], adata.layers["unspliced"], ncfg, where=str(PANCREAS))
    res = run_methods(nb, s, u, ncfg, names, adata, head_steps)
    labels = np.asarray(adata.obs["clusters"].astype(str))
    neighbourhood_ = expression_space(adata, 30)
    emb, _ = embedding_2d(adata, None, neighbourhood_[1])
    rows = []
    for name, (v, vg, sec) in res.items():
        a = ad.AnnData(X=adata.layers["spliced"], layers={"spliced": adata.layers["spliced"], "velocity": v})
        a.var["velocity_genes"] = vg
        v_emb = project_onto_embedding(a, emb, neighbourhood=neighbourhood_)
        per_edge, cbdir = cross_boundary_correctness(emb, v_emb, labels, PANCREAS_EDGES, neighbourhood_[2])
        _, iccoh = in_cluster_coherence(v[:, vg], labels, neighbourhood_[2])
        rows.append({"data": "pancreas", "method": name, "genes": int(vg.sum()), "seconds": sec, "cbdir": cbdir,
                     "iccoh": iccoh, "backward": sum(per_edge[e] < 0 for e in CHAIN), "edges": per_edge})
    return rows


# --- the table ------------------------------------------------------------------------------------------------------
def scale_rows(size: str, seed: int = 7) -> list[dict]:
    """fm_dynamical alone on a large simulation (scVelo's fit would take hours): its cost per cell."""
    rows = simulation_rows(size, seed, ["fm_dynamical"])
    for r in rows:
        r["ms_per_cell"] = 1e3 * r["seconds"] / int(size.split("x")[0])
    return rows


def markdown(sim: list[dict], pancreas: list[dict], command: str, wall_s: float, scale: list[dict] = ()) -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"### {datetime.date.today().isoformat()}, {platform.machine()} {platform.system()}, "
             f"{os.cpu_count()} CPUs, load {load:.1f}, torch {torch.__version__}, scVelo "
             f"{__import__('scvelo').__version__}", "", f"`{command}` ({wall_s / 60:.1f} min)", ""]
    if sim:
        by = {(r["data"], r["method"]): r for r in sim}
        pair = [m for m in ("scVelo dynamical", "fm_dynamical", HEAD) if any(k[1] == m for k in by)]
        lines += ["| simulation | genes | " + " | ".join(f"{m}: Spearman / cosine / sign" for m in pair)
                  + " | s (" + " / ".join(pair) + ") |", "|---" * (3 + len(pair)) + "|"]
        for data in dict.fromkeys(r["data"] for r in sim):
            rs = [by[(data, m)] for m in pair]
            lines.append(f"| {data} | {rs[0]['genes']}/{rs[0]['of']} | " + " | ".join(
                f"{r['spearman']:.3f} / {r['cosine']:.3f} / {r['sign']:.3f}" for r in rs)
                + " | " + " / ".join(f"{r['seconds']:.1f}" for r in rs) + " |")
        lines += ["", "Median over those simulations, every method:", "", "| method | Spearman | cosine | sign | s |",
                  "|---|---|---|---|---|"]
        for m in dict.fromkeys(r["method"] for r in sim):
            rs = [r for r in sim if r["method"] == m]
            lines.append(f"| {m} | " + " | ".join(f"{np.median([r[k] for r in rs]):.3f}"
                                                   for k in ("spearman", "cosine", "sign")) +
                         f" | {np.median([r['seconds'] for r in rs]):.1f} |")
    if scale:
        lines += ["", "| large simulation | fm_dynamical genes | Spearman / cosine / sign | s | ms per cell |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['data']} | {r['genes']} | {r['spearman']:.3f} / {r['cosine']:.3f} / {r['sign']:.3f} "
                  f"| {r['seconds']:.1f} | {r['ms_per_cell']:.2f} |" for r in scale]
    if pancreas:
        lines += ["", "| pancreas (3,696 x 2,000) | velocity genes | CBDir | ICCoh | backward on the Beta chain | "
                  "s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['genes']} | {r['cbdir']:.3f} | {r['iccoh']:.3f} | {r['backward']}/4 "
                  f"| {r['seconds']:.1f} |" for r in pancreas]
        lines += ["", "CBDir per transition: " + "; ".join(
            f"{r['method']}: " + ", ".join(f"{a}>{b} {s:.2f}" for (a, b), s in r["edges"].items())
            for r in pancreas if r["method"] in ("scVelo dynamical", "fm_dynamical", HEAD)) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=["1000x100", "3000x200"], help="CELLSxGENES of the simulations")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="simulation seeds (tuned on 100-101)")
    p.add_argument("--t-max", nargs="+", type=float, default=[25.0, 50.0],
                   help="simulated time spans (parameter sets: 50 leaves more cells near the steady states)")
    p.add_argument("--methods", nargs="+", default=[*METHODS, HEAD], choices=[*METHODS, HEAD])
    p.add_argument("--head-steps", type=int, default=100, help=f"fine-tuning steps of '{HEAD}'")
    p.add_argument("--no-pancreas", action="store_true")
    p.add_argument("--scale", nargs="*", default=[], metavar="CELLSxGENES",
                   help="also time fm_dynamical alone on these simulation sizes (seed 7)")
    p.add_argument("--write", action="store_true", help=f"add the run to docs/BENCHMARKS.md ('## {SECTION}')")
    args = p.parse_args(argv)
    velocity_bench_logging()
    t0 = time.perf_counter()
    sim = [r for t_max in args.t_max for size in args.sizes for seed in args.seeds
           for r in simulation_rows(size, seed, args.methods, t_max, args.head_steps)]
    pancreas = [] if args.no_pancreas else pancreas_rows(args.methods, args.head_steps)
    scale = [r for size in args.scale for r in scale_rows(size)]
    text = markdown(sim, pancreas, "python -m bench.velocity " + " ".join(argv if argv is not None else sys.argv[1:]),
                    time.perf_counter() - t0, scale)
    print(text)
    if args.write:
        record(SECTION, text, intro=INTRO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
