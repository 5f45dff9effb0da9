"""Benchmark the converter: cells/s and peak memory (RSS of the process tree) on simulated files of two sizes, with
and without neighbourhoods (moments over 30 neighbours on 30 PCs), in one run.

    python bench/convert.py                                      # docs/BENCHMARKS.md: 100k and 400k cells; ~25 min
    python bench/convert.py --cells 20000 5000 --genes 500       # a quick one

Simulated inputs are cached in --work (default /tmp/fm-bench). Each conversion runs in its own process, sampled
with psutil every 50 ms; peak memory is the largest sum of RSS over it and its workers. Peak memory not growing
with the file size is the point of the chunked design, so both sizes are reported. Appends a row to
docs/BENCHMARKS.md (section "convert").
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import record  # noqa: E402

INTRO = """`python bench/convert.py`: simulated .h5ad (bifurcation) -> corpus.

| date | machine | genes | workers | cells | neighbours | seconds | cells/s | peak RSS (MiB) | corpus (MiB) |
|---|---|---|---|---|---|---|---|---|---|"""


def simulate_file(path: Path, n_cells: int, n_genes: int) -> Path:
    """A simulated .h5ad (bifurcation, seed 0) with spliced, unspliced, velocity_true and the obs targets."""
    if path.is_file():
        return path
    from data_prep.simulate import simulate, write

    adata = simulate(n_cells=n_cells, n_genes=n_genes, regime="bifurcation", seed=0)
    for layer in ("alpha_true", "velocity_u_true"):  # dense and not converted by default: keep the file smaller
        del adata.layers[layer]
    write(adata, path)
    return path


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (seconds, peak RSS of its process tree in MiB)."""
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return seconds, peak / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 400_000])
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--neighbours", type=int, nargs="+", default=[0, 30],
                   help="neighbours per cell for the moments, one conversion each (0: none)")
    p.add_argument("--work", type=Path, default=Path("/tmp/fm-bench"))
    p.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs"
    for n in args.cells:
        src = simulate_file(args.work / f"sim_{n}x{args.genes}.h5ad", n, args.genes)
        base = None
        for k in args.neighbours:
            out = args.work / f"corpus_{n}_{k}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "data_prep.convert", str(src), "--out", str(out), "--workers",
                   str(args.workers), "--neighbours", str(k), "--no-progress"]
            seconds, peak = measure(cmd)
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            base = seconds if k == 0 else base
            ratio = f", {seconds / base:.2f}x the time without" if base and k else ""
            print(f"{n:>9,} cells, {k:>2} neighbours: {seconds:7.1f} s, {n / seconds:9,.0f} cells/s, peak RSS "
                  f"{peak:7.0f} MiB, input {src.stat().st_size / 2**20:,.0f} MiB, corpus {size / 2**20:,.0f} MiB"
                  f"{ratio}")  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)  # (size was taken above)
            if not args.no_record:
                today = dt.date.today().isoformat()
                record(
                    "convert",
                    f"| {today} | {machine} | {args.genes} | {args.workers} | {n:,} | {k} | {seconds:.1f} "
                    f"| {n / seconds:,.0f} | {peak:.0f} | {size / 2**20:.0f} |",
                    intro=INTRO,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
