"""The day-one path on real data, through the `fm` command only: pancreas -> corpus -> pretrain -> fine-tune velocity
(self-supervised dynamical model: there is no truth) -> export -> predict -> evaluate (CBDir/ICCoh) -> plot.

    OMP_NUM_THREADS=1 python bench/pancreas_release.py --workdir runs/pancreas   # CPU: ~15-30 min on 2 cores
    python bench/pancreas_release.py --workdir /tmp/p --pretrain-steps 4 --finetune-steps 4 --no-write --figure p.png

Every stage is one `fm` command, printed before it runs, so the log is also a recipe. The figure goes to
docs/img/pancreas_velocity.png (bench/figures.py's ``pancreas --input``: a t-SNE, since the file has no X_umap), the
metrics (CBDir over the endocrine transitions, ICCoh, cluster ARI of X_fm) beside the steady-state baseline's, scored
by the same `fm evaluate`, into docs/BENCHMARKS.md ("## Pancreas release"). The step counts are small (a CPU
budget), and the debug encoder is pretrained on this one dataset: a demonstration of the path, not a trained model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.figures import PANCREAS  # noqa: E402
from bench.report import record  # noqa: E402

INTRO = (
    "The pancreas file through `fm` commands only (`bench/pancreas_release.py`): convert, pretrain the debug "
    "encoder, fine-tune the velocity head self-supervised "
    "(its default dynamical mode), export, predict on all cells and genes, and "
    "score with `fm evaluate --transitions pancreas` (CBDir over Ductal -> Ngn3 low EP -> Ngn3 high EP -> "
    "Pre-endocrine -> Alpha/Beta/Delta/Epsilon, ICCoh, ARI of X_fm against the clusters), beside the steady-state "
    "baseline scored by the same command."
)
FM = [sys.executable, "-m", "fm.cli"]


def fm(*args: str) -> float:
    """Run one `fm` command (printed first); return its wall seconds."""
    print("$ fm " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([*FM, *args], check=True, cwd=REPO)
    return time.perf_counter() - t0


def steady_state_file(workdir: Path) -> Path:
    """The pancreas file with the steady-state baseline's velocity (bench/figures.py's recipe) as layers['velocity']."""
    import anndata as ad

    from bench.figures import baseline_velocity

    adata = ad.read_h5ad(PANCREAS)
    adata.layers["velocity"] = baseline_velocity(adata).astype("float32")
    out = workdir / "pancreas_steady_state.h5ad"
    adata.write_h5ad(out)
    return out


def run(workdir: Path, pretrain_steps: int, finetune_steps: int, max_genes: int, figure: Path) -> dict:
    common = ["logger=csv", "data.num_workers=1", "data.val_fraction=0.0",
              "trainer.limit_val_batches=0", "trainer.log_every_n_steps=10", f"data.max_genes={max_genes}",
              "data.batch_size=32", "seed=0", "trainer.enable_model_summary=false"]
    corpus, seconds = workdir / "corpus", {}
    seconds["convert"] = fm("prep", "convert", str(PANCREAS), "--out", str(corpus), "--no-progress")
    seconds["pretrain"] = fm("pretrain", f"data.corpus={corpus}", "model=debug", f"output_dir={workdir / 'pretrain'}",
                             f"trainer.max_steps={pretrain_steps}", *common)
    seconds["finetune"] = fm("finetune", "head=velocity", f"data.corpus={corpus}",
                             f"checkpoint={workdir / 'pretrain' / 'checkpoints' / 'last.ckpt'}",
                             f"output_dir={workdir / 'finetune'}",
                             f"trainer.max_steps={finetune_steps}", *common)
    seconds["export"] = fm("export", str(workdir / "finetune" / "checkpoints" / "last.ckpt"), "--out",
                           str(workdir / "release"))
    predicted = workdir / "pancreas_fm.h5ad"
    seconds["predict"] = fm("predict", "--checkpoint", str(workdir / "release"), "--input", str(PANCREAS),
                            "--output", str(predicted), "--overwrite")
    metrics = {}
    for name, path in (("fm (dynamical head)", predicted), ("steady state", steady_state_file(workdir))):
        out = workdir / f"{path.stem}.metrics.json"
        fm("evaluate", str(path), "--transitions", "pancreas", "--out", str(out))
        metrics[name] = json.loads(out.read_text())
    print(f"$ python bench/figures.py pancreas --input {predicted} --out {figure}", flush=True)
    subprocess.run([sys.executable, str(REPO / "bench" / "figures.py"), "pancreas", "--input", str(predicted),
                    "--out", str(figure)], check=True, cwd=REPO)
    return {"metrics": metrics, "seconds": seconds}


def markdown(r: dict, args: argparse.Namespace, command: str) -> str:
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.0f}"
    s = r["seconds"]
    lines = [f"### {datetime.date.today().isoformat()}, {machine}", "",
             f"`{command}`: debug encoder, max_genes {args.max_genes}, pretraining {args.pretrain_steps} steps "
             f"({s['pretrain']:.0f} s), dynamical fine-tuning (warm start, then "
             f"{args.finetune_steps} steps) ({s['finetune']:.0f} s), "
             f"`fm predict` on 3,696 cells x 2,000 genes {s['predict']:.0f} s (CPU).", "",
             "| velocity | CBDir (mean of 7 transitions) | ICCoh (mean) | ARI of X_fm |", "|---|---|---|---|"]
    for name, m in r["metrics"].items():
        t, e = m.get("transitions", {}), m.get("embedding", {})
        ari = f"{e['ari']:.3f}" if e else "-"
        lines.append(f"| {name} | {t.get('cbdir_mean', float('nan')):.3f} | {t.get('iccoh_mean', float('nan')):.3f} "
                     f"| {ari} |")
    lines += ["", "Per transition (CBDir): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in m["transitions"]["cbdir"].items())
        for name, m in r["metrics"].items() if "transitions" in m)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "pancreas")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--max-genes", type=int, default=512)
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "img" / "pancreas_velocity.png")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    if not PANCREAS.is_file():
        sys.exit(f"{PANCREAS}: not found (set FM_SHARED_DATA to the folder holding it)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(["bench/pancreas_release.py", *[a for a in sys.argv[1:] if a != "--no-write"]])
    result = run(args.workdir, args.pretrain_steps, args.finetune_steps, args.max_genes, args.figure)
    text = markdown(result, args, command)
    print(text)
    if not args.no_write:
        record("Pancreas release", text, intro=INTRO)


if __name__ == "__main__":
    main()
