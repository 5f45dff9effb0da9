"""Baselines against their own packages: scVI vs scvi-tools, cellDancer vs the celldancer package.

    python -m bench.baselines scvi --epochs 50              # ELBO on held-out pancreas cells + epoch time
    python -m bench.baselines celldancer-sim                # agreement with simulated truth (fm and package)
    python -m bench.baselines celldancer-speed              # all 2,000 pancreas genes vs the package's own run
    python -m bench.baselines all --no-write                # everything, print only

The reference packages live in their own virtual environments, created on first use: /tmp/scvi-env (``pip install
scvi-tools`` with torch pinned to this project's version) and /tmp/celldancer-env (``pip install --no-deps
celldancer==1.1.7`` plus the old pins it needs). Both sides get the same inputs: the same train / held-out split of
``pancreas_supercell_3696x2000.h5ad`` (spliced counts) for scVI, the same kNN moments (Mu, Ms; 30 PCs, 30
neighbours) for cellDancer. Each part appends a block to the ``## Baselines`` section of docs/BENCHMARKS.md.
Parts whose data file is absent are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from bench.report import record
from fm import keys
from fm.baselines.celldancer import CellDancerHead
from fm.baselines.common import batch_from_dense
from fm.baselines.scvi import SCVIConfig, SCVIHead

log = logging.getLogger("bench.baselines")
PANCREAS = Path(os.environ.get("FM_SHARED_DATA", "/work/shared/data")) / "pancreas_supercell_3696x2000.h5ad"
SCVI_ENV, CELLDANCER_ENV = Path("/tmp/scvi-env"), Path("/tmp/celldancer-env")
CELLDANCER_PINS = [
    "pytorch-lightning==1.6.5.post0", "pandas<2", "numpy<2", "scipy<1.14", "anndata<0.11", "scikit-learn",
    "matplotlib", "seaborn", "joblib", "tqdm", "setuptools<81", "statsmodels", "bezier<2024", "datashader<0.16",
    "xarray<2023.9", "dask<2024.1", "umap-learn",
]  # fmt: skip


# --- environments ----------------------------------------------------------------------------------------------------
def ensure_env(path: Path, packages: list[str], no_deps: list[str] = ()) -> Path:
    """Create a venv at ``path`` with ``packages`` (and ``no_deps`` installed without dependencies) unless present."""
    python = path / "bin" / "python"
    marker = path / ".fm-bench-ready"
    if marker.exists():
        return python
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    log.info("creating %s (%s)", path, ", ".join([torch_pin, *packages, *no_deps]))
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin, *packages], check=True)
    if no_deps:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *no_deps], check=True)
    marker.write_text("ok\n")
    return python


def run_external(python: Path, code: str, args: list[str], env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script, result = Path(tmp) / "run.py", Path(tmp) / "result.json"
        script.write_text(textwrap.dedent(code))
        subprocess.run([str(python), str(script), *args, str(result)], check=True, env={**os.environ, **(env or {})},
                       cwd=tmp)  # fmt: skip
        return json.loads(result.read_text())


# --- data ------------------------------------------------------------------------------------------------------------
def pancreas_split(seed: int = 0, held_out: float = 0.1):
    import anndata as ad

    adata = ad.read_h5ad(PANCREAS)
    rng = np.random.default_rng(seed)
    test = rng.random(adata.n_obs) < held_out
    return adata, ~test, test


def moments(s_CG: np.ndarray, u_CG: np.ndarray, n_pcs: int = 30, k: int = 30):
    """scVelo-style first moments: each layer normalised by its own total to the median total, then averaged over
    each cell's k nearest neighbours (itself included) in the PCA space of log1p normalised spliced counts.

    Returns Ms [C, G], Mu [C, G] and a 2-d cell embedding [C, 2] (the first two PCs) for the package's downsampling.
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    def norm(x):
        tot = x.sum(1, keepdims=True)
        return x / np.where(tot > 0, tot, 1) * np.median(tot)

    sn, un = norm(s_CG.astype(np.float64)), norm(u_CG.astype(np.float64))
    pcs = PCA(n_components=n_pcs, random_state=0).fit_transform(np.log1p(sn))
    idx = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs, return_distance=False)
    C = len(s_CG)
    conn = sp.csr_matrix((np.full(C * k, 1.0 / k), idx.ravel(), np.arange(0, C * k + 1, k)), shape=(C, C))
    return (conn @ sn).astype(np.float32), (conn @ un).astype(np.float32), pcs[:, :2].astype(np.float32)


def _subset(batch: dict, idx: torch.Tensor) -> dict:
    return {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]) for k, v in batch.items()}


# --- scVI ------------------------------------------------------------------------------------------------------------
SCVI_TOOLS_SCRIPT = """
import json, sys, time
import anndata as ad, numpy as np, scipy.sparse as sp, torch, scvi
path, epochs, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
scvi.settings.seed = 0
d = np.load(path)
train = ad.AnnData(sp.csr_matrix(d["train"]))
test = ad.AnnData(sp.csr_matrix(d["test"]))
scvi.model.SCVI.setup_anndata(train)
model = scvi.model.SCVI(train)
t0 = time.perf_counter()
model.train(max_epochs=epochs, train_size=1.0, batch_size=128, accelerator="cpu", enable_progress_bar=False)
seconds = time.perf_counter() - t0
elbo = float(model.get_elbo(test))
json.dump({"seconds": seconds, "elbo": elbo, "version": scvi.__version__}, open(out, "w"))
"""


def train_fm_scvi(train_CG: np.ndarray, epochs: int, seed: int = 0, batch_size: int = 128):
    torch.manual_seed(seed)
    V = train_CG.shape[1]
    batch = batch_from_dense(train_CG, np.zeros_like(train_CG))
    head = SCVIHead(SCVIConfig(n_genes=V, modality="spliced"))
    opt = head.optimizer()  # scvi-tools' TrainingPlan defaults: Adam, lr 1e-3, eps 0.01, weight decay 1e-6
    gen = torch.Generator().manual_seed(seed)
    n = train_CG.shape[0]
    t0 = time.perf_counter()
    for epoch in range(epochs):
        head.set_epoch(epoch)
        head.train()
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) < 3:  # scvi-tools drops a last batch this small (batch norm)
                continue
            mb = _subset(batch, idx)
            loss = head.loss(mb, head(mb, None)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head, time.perf_counter() - t0


@torch.no_grad()
def fm_neg_elbo(head: SCVIHead, test_CG: np.ndarray, batch_size: int = 128) -> float:
    """-ELBO per cell (reconstruction + full KL), z sampled from the posterior as scvi-tools' get_elbo."""
    head.eval()
    batch = batch_from_dense(test_CG, np.zeros_like(test_CG))
    total = 0.0
    for idx in torch.arange(test_CG.shape[0]).split(batch_size):
        mb = _subset(batch, idx)
        rec, kl = head.elbo_terms(head(mb, None))
        total += float((rec + kl).sum())
    return total / test_CG.shape[0]


def bench_scvi(epochs: int, threads: int) -> list[str]:
    adata, train, test = pancreas_split()
    X = adata.layers[keys.LAYER_SPLICED]
    train_CG, test_CG = X[train].toarray().astype(np.float32), X[test].toarray().astype(np.float32)
    python = ensure_env(SCVI_ENV, ["scvi-tools"])
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "data.npz", train=train_CG, test=test_CG)
        ref = run_external(python, SCVI_TOOLS_SCRIPT, [str(Path(tmp) / "data.npz"), str(epochs), str(threads)])
    torch.set_num_threads(threads)
    head, seconds = train_fm_scvi(train_CG, epochs)
    ours = fm_neg_elbo(head, test_CG)
    theirs = abs(ref["elbo"])  # scvi-tools reports the ELBO (higher is better) or -ELBO depending on version
    gap = (ours - theirs) / theirs
    log.info("scVI: fm -ELBO %.2f (%.2f s/epoch), scvi-tools %s %.2f (%.2f s/epoch)", ours, seconds / epochs,
             ref["version"], theirs, ref["seconds"] / epochs)  # fmt: skip
    return [
        f"scVI on pancreas spliced counts ({int(train.sum())} train / {int(test.sum())} held-out cells, 2000 genes), "
        f"{epochs} epochs, batch 128, scvi-tools defaults on both sides, torch threads {threads}.",
        "",
        "| model | held-out -ELBO per cell | gap vs scvi-tools | s/epoch |",
        "|---|---|---|---|",
        f"| fm `SCVIHead` | {ours:.2f} | {gap:+.2%} | {seconds / epochs:.2f} |",
        f"| scvi-tools {ref['version']} `SCVI` | {theirs:.2f} | | {ref['seconds'] / epochs:.2f} |",
    ]


# --- cellDancer ------------------------------------------------------------------------------------------------------
CELLDANCER_SCRIPT = """
import json, os, sys, time
import numpy as np, pandas as pd
import celldancer as cd
path, genes, jobs, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
df = pd.read_csv(path)
t0 = time.perf_counter()
loss_df, cdf = cd.velocity(df, gene_list=genes, n_jobs=jobs, save_path=os.getcwd())
seconds = time.perf_counter() - t0
cdf = cdf.sort_values(["gene_name", "cellIndex"])
vel = {g: (sub.splice_predict - sub.splice).tolist() for g, sub in cdf.groupby("gene_name")}
json.dump({"seconds": seconds, "velocity": vel, "epochs": loss_df.groupby("gene_name").epoch.max().tolist()},
          open(out, "w"))
"""


# The package's own full run (velocity() over the whole table of every gene), stopped after its first batches of
# genes: velocity() trains one burn-in gene, then batches of n_jobs genes, and each batch first scans the whole
# table for its genes, so a batch's cost depends on the table's size and the run is timed on the full table.
CELLDANCER_SPEED_SCRIPT = """
import glob, json, os, sys, time
import numpy as np, pandas as pd
import celldancer as cd
import celldancer.velocity_estimation as ve
path, n_batches, jobs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
z = np.load(path)
mu, ms, emb, order = z["mu"], z["ms"], z["emb"], z["order"]
C = mu.shape[0]
df = pd.DataFrame({"gene_name": np.repeat(np.array([f"g{g}" for g in order], dtype=object), C),
                   "unsplice": mu[:, order].T.ravel(), "splice": ms[:, order].T.ravel(),
                   "cellID": np.tile(np.arange(C), len(order)), "clusters": "c",
                   "embedding1": np.tile(emb[:, 0], len(order)), "embedding2": np.tile(emb[:, 1], len(order))})
marks = []  # (start, end) of each joblib Parallel run: the burn-in gene, then one per batch of genes


class Enough(Exception):
    pass


class Timed(ve.Parallel):
    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = super().__call__(*args, **kwargs)
        marks.append((start, time.perf_counter()))
        if len(marks) > n_batches:
            raise Enough
        return result


ve.Parallel = Timed
t0 = time.perf_counter()
try:
    cd.velocity(df, n_jobs=jobs, save_path=os.getcwd())
except Enough:
    pass
# velocity() writes each fitted gene's losses to <save_path>/cellDancer_velocity_<date>/TEMP/loss_<gene>.csv
losses = [pd.read_csv(f) for f in glob.glob(os.path.join(os.getcwd(), "cellDancer_velocity_*", "TEMP", "loss_*.csv"))]
json.dump({"fixed_seconds": marks[0][1] - t0, "batch_seconds": marks[-1][1] - marks[0][1],
           "batches": len(marks) - 1, "fitted": len(losses), "epochs": [int(x.epoch.max()) for x in losses]},
          open(out, "w"))
"""


def time_package_run(mu_CG, ms_CG, emb_C2, genes: int, jobs: int, seed: int = 0) -> dict:
    """The package's full run on every gene (in a random order), timed over its burn-in gene and first batches of
    about ``genes`` genes, then stopped; the rest of the run is estimated from the batches' time (see the script)."""
    python = ensure_env(CELLDANCER_ENV, CELLDANCER_PINS, ["celldancer==1.1.7"])
    V = mu_CG.shape[1]
    order = np.random.default_rng(seed).permutation(V)
    n_batches = max(1, genes // jobs)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "data.npz", mu=mu_CG, ms=ms_CG, emb=emb_C2, order=order)
        res = run_external(python, CELLDANCER_SPEED_SCRIPT, [str(Path(tmp) / "data.npz"), str(n_batches), str(jobs)],
                           env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})  # fmt: skip
    res["genes"] = res["batches"] * jobs
    res["total_batches"] = -(-V // jobs)
    res["seconds"] = res["fixed_seconds"] + res["batch_seconds"] * res["total_batches"] / res["batches"]
    return res


def celldancer_frame(mu_CG, ms_CG, emb_C2, gene_idx: list[int], path: Path) -> list[str]:
    """The package's input table (one row per gene and cell) for the chosen genes; returns their names."""
    import pandas as pd

    C = mu_CG.shape[0]
    names = [f"g{g}" for g in gene_idx]
    frames = [
        pd.DataFrame({"gene_name": n, "unsplice": mu_CG[:, g], "splice": ms_CG[:, g], "cellID": np.arange(C),
                      "clusters": "c", "embedding1": emb_C2[:, 0], "embedding2": emb_C2[:, 1]})
        for n, g in zip(names, gene_idx, strict=True)
    ]  # fmt: skip
    pd.concat(frames).to_csv(path, index=False)
    return names


def run_package(mu_CG, ms_CG, emb_C2, gene_idx: list[int], jobs: int) -> dict:
    python = ensure_env(CELLDANCER_ENV, CELLDANCER_PINS, ["celldancer==1.1.7"])
    with tempfile.TemporaryDirectory() as tmp:
        names = celldancer_frame(mu_CG, ms_CG, emb_C2, gene_idx, Path(tmp) / "df.csv")
        res = run_external(python, CELLDANCER_SCRIPT, [str(Path(tmp) / "df.csv"), ",".join(names), str(jobs)],
                           env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})  # fmt: skip
    C = mu_CG.shape[0]  # genes the package reports as "not predicted" get NaN
    res["velocity_CG"] = np.stack([np.asarray(res["velocity"].get(n, np.full(C, np.nan))) for n in names], 1)
    res["missing"] = sum(n not in res["velocity"] for n in names)
    return res


def downsample_embedding(emb_C2: np.ndarray, step: tuple[int, int] = (200, 200), seed: int = 10) -> np.ndarray:
    """The package's ``speed_up`` cell choice (sampling_neighbors): the nearest cell to each point of a jittered
    step[0] x step[1] grid over the embedding, then the densest 75% of those (Gaussian kernel over 20 neighbours)."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    grids = []
    for d in range(2):
        m, M = emb_C2[:, d].min(), emb_C2[:, d].max()
        m, M = m - 0.025 * abs(M - m), M + 0.025 * abs(M - m)
        grids.append(np.linspace(m, M, step[d]))
    grid = np.stack([g.ravel() for g in np.meshgrid(*grids)], 1) + rng.normal(0, 0.15, (step[0] * step[1], 2))
    nn = NearestNeighbors(n_neighbors=min(len(emb_C2) - 1, 20)).fit(emb_C2)
    chosen = np.unique(nn.kneighbors(grid, 1, return_distance=False)[:, 0])
    dist = nn.kneighbors(emb_C2[chosen])[0]
    density = (np.exp(-(dist**2) / (2 * 0.5**2)) / np.sqrt(2 * np.pi * 0.5**2)).sum(1)
    return chosen[density > np.percentile(density, 25)]


def train_fm_celldancer(mu_CG, ms_CG, fit_cells: np.ndarray, steps: int = 200, fraction: float = 0.125, seed: int = 0):
    """All genes at once: each step is one package epoch of every running gene, a random ``fraction`` of its distinct
    points among ``fit_cells``; genes stop early as the package's do, and the run ends when every gene has stopped or
    after ``steps`` (the package's max_epoches). Returns the velocity [C, G] of every cell, the seconds of training
    and predicting every cell (the package's ``velocity()`` does both) and the step at which each gene stopped
    (``steps`` for a gene still running at the end)."""
    torch.manual_seed(seed)
    C, V = ms_CG.shape
    batch = batch_from_dense(ms_CG, mu_CG)
    head = CellDancerHead(n_genes=V, input="counts", fit_fraction=fraction)
    opt = head.optimizer()
    fit = _subset(batch, torch.from_numpy(fit_cells))
    t0 = time.perf_counter()
    head.observe(batch)  # each gene normalised by its maxima over every cell, as the package's, not the fitted ones'
    for _ in range(steps):
        loss = head.loss(fit, head(fit, None)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not head.running.any():
            break
    head.eval()
    with torch.no_grad():
        velocity = head(batch, None)["velocity"].numpy()
    seconds = time.perf_counter() - t0  # training and the prediction of every cell, as the package's velocity()
    stopped = head.stopped_at.numpy().copy()
    stopped[stopped < 0] = steps
    return velocity, seconds, stopped


def stop_summary(stopped: np.ndarray) -> str:
    q = np.percentile(stopped, [0, 25, 50, 75, 100]).astype(int).tolist()
    return f"min/quartiles/max {q}, mean {stopped.mean():.0f}"


def agreement(pred_CG: np.ndarray, true_CG: np.ndarray) -> tuple[float, float]:
    """Sign accuracy over cell-gene entries with nonzero truth, and the median over genes of Spearman's rho."""
    from scipy.stats import spearmanr

    nz = true_CG != 0
    nz &= np.isfinite(pred_CG)
    sign = float((np.sign(pred_CG[nz]) == np.sign(true_CG[nz])).mean())
    rhos = [spearmanr(pred_CG[:, g], true_CG[:, g]).statistic for g in range(true_CG.shape[1])
            if np.isfinite(pred_CG[:, g]).all()]  # fmt: skip
    return sign, float(np.nanmedian(rhos))


def bench_celldancer_sim(n_cells: int, n_genes: int, jobs: int, package: bool) -> list[str]:
    from data_prep.simulate import simulate

    adata = simulate(n_cells, n_genes, regime="bifurcation", seed=0)
    s = adata.layers[keys.LAYER_SPLICED].toarray()
    u = adata.layers[keys.LAYER_UNSPLICED].toarray()
    ms, mu, emb = moments(s, u)
    multi = np.flatnonzero(adata.var["multi_kinetic"].to_numpy())
    true = adata.layers[keys.LAYER_VELOCITY_TRUE][:, multi]
    true = true.toarray() if sp.issparse(true) else np.asarray(true)
    vel, seconds, stopped = train_fm_celldancer(mu, ms, downsample_embedding(emb))
    rows = [("fm `CellDancerHead`", *agreement(vel[:, multi], true), seconds, f"all {n_genes}",
             stop_summary(stopped))]  # fmt: skip
    if package:
        res = run_package(mu, ms, emb, multi.tolist(), jobs)
        genes = f"{len(multi)} ({res['missing']} not predicted)"
        rows.append(("celldancer 1.1.7", *agreement(res["velocity_CG"], true), res["seconds"], genes,
                     stop_summary(np.asarray(res["epochs"]) + 1)))  # fmt: skip
    lines = [
        f"cellDancer on the simulator (bifurcation, {n_cells} cells, {n_genes} genes, seed 0), scored on its "
        f"{len(multi)} multi-kinetic genes against `velocity_true`; inputs: kNN moments (Mu, Ms), the package's "
        "embedding downsampling. fm: at most 200 steps, each 12.5% of every running gene's distinct points, genes "
        "stopped early as the package's (the package's maximum epochs, permutation ratio and early stopping); "
        "package: its defaults. Seconds: training and predicting every cell, on both sides. Sign accuracy over "
        "cell-gene entries, Spearman per gene.",
        "",
        "| model | sign accuracy | median Spearman | seconds | genes trained | steps (epochs) per gene |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {a:.3f} | {r:.3f} | {t:.1f} | {g} | {e} |" for m, a, r, t, g, e in rows]
    for line in lines[-len(rows) :]:
        log.info(line)
    return lines


def bench_celldancer_speed(package_genes: int, jobs: int, threads: int, steps: int) -> list[str]:
    adata, _, _ = pancreas_split()
    s = adata.layers[keys.LAYER_SPLICED].toarray()
    u = adata.layers[keys.LAYER_UNSPLICED].toarray()
    ms, mu, emb = moments(s, u)
    C, V = ms.shape
    torch.set_num_threads(threads)
    _, seconds, stopped = train_fm_celldancer(mu, ms, downsample_embedding(emb), steps=steps)
    res = time_package_run(mu, ms, emb, package_genes, jobs)
    ratio = res["seconds"] / seconds
    per_batch = res["batch_seconds"] / res["batches"]
    log.info("cellDancer speed: fm %.1f s for %d genes; package %.1f s burn-in + %.1f s for %d batches of %d genes "
             "-> %.0f s for %d batches (%.1fx)", seconds, V, res["fixed_seconds"], res["batch_seconds"],
             res["batches"], jobs, res["seconds"], res["total_batches"], ratio)  # fmt: skip
    epochs = sorted((np.asarray(res["epochs"]) + 1).tolist())
    return [
        f"cellDancer speed on pancreas ({C} cells, kNN moments, the package's embedding downsampling on the first two "
        f"PCs). fm: all {V} genes in one run of at most {steps} steps, each 12.5% of every running gene's distinct "
        f"points, genes stopped early as the package's (check every 10 steps, patience 3); steps per gene: "
        f"{stop_summary(stopped)}; then the velocity of every cell (both sides' seconds include predicting); torch "
        f"threads {threads}. Package: its own run of `velocity()` on the table of all {V} genes (random order), "
        f"n_jobs={jobs}, its defaults, timed in the same run over its burn-in gene ({res['fixed_seconds']:.1f} s, "
        f"once per run) and its first {res['batches']} batches of {jobs} genes ({res['genes']} genes, "
        f"{per_batch:.2f} s per batch; each batch first scans the whole table for its genes), then stopped; the "
        f"whole run is estimated as burn-in + {res['total_batches']} batches at that rate, without the final "
        f"merge of every gene's output files (so a lower bound). Epochs of its {res['fitted']} fitted genes: "
        f"{epochs}; {res['genes'] - res['fitted']} of the {res['genes']} failed.",
        "",
        f"| model | genes run | seconds | seconds for {V} genes | speed-up |",
        "|---|---|---|---|---|",
        f"| fm `CellDancerHead` | {V} | {seconds:.1f} | {seconds:.1f} | {ratio:.1f}x |",
        f"| celldancer 1.1.7 | {res['genes']} (+1 burn-in) | {res['fixed_seconds'] + res['batch_seconds']:.1f} | "
        f"{res['seconds']:.0f} (estimated) | 1x |",
    ]


# --- report ----------------------------------------------------------------------------------------------------------
def write_section(blocks: list[list[str]], command: str) -> None:
    """Add one dated run, of one block per part, to the ``## Baselines`` section."""
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.0f}"
    body = [f"### {datetime.date.today().isoformat()}, {machine}: `{command}`", ""]
    for block in blocks:
        body += [*block, ""]
    record("Baselines", "\n".join(body), intro="Written by `python -m bench.baselines` (see its docstring).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["scvi", "celldancer-sim", "celldancer-speed", "all"])
    p.add_argument("--epochs", type=int, default=50, help="scVI epochs (both sides)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    p.add_argument("--jobs", type=int, default=2, help="celldancer n_jobs")
    p.add_argument(
        "--package-genes",
        type=int,
        default=64,
        help="genes of its full run the celldancer package is timed on before it is stopped (speed part)",
    )
    p.add_argument("--steps", type=int, default=200, help="fm cellDancer's most steps (the package's max_epoches)")
    p.add_argument("--sim-cells", type=int, default=1000)
    p.add_argument("--sim-genes", type=int, default=200)
    p.add_argument("--no-package", action="store_true", help="celldancer-sim: fm only")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parts = ["scvi", "celldancer-sim", "celldancer-speed"] if args.part == "all" else [args.part]
    blocks = []
    for part in parts:
        if part in ("scvi", "celldancer-speed") and not PANCREAS.exists():
            log.warning("%s: %s is absent, skipped", part, PANCREAS)
            continue
        if part == "scvi":
            blocks.append(bench_scvi(args.epochs, args.threads))
        elif part == "celldancer-sim":
            blocks.append(bench_celldancer_sim(args.sim_cells, args.sim_genes, args.jobs, not args.no_package))
        else:
            blocks.append(bench_celldancer_speed(args.package_genes, args.jobs, args.threads, args.steps))
    for block in blocks:
        sys.stdout.write("\n".join(block) + "\n\n")
    if blocks and not args.no_write:
        write_section(blocks, "python -m bench.baselines " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
