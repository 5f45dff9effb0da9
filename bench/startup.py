"""Datamodule start-up at corpus scale: seconds per rank for ``CorpusDataModule.setup()`` (shard checks and the hash
split), by default (the per-shard index: size, footer, stamped sha256, cached cell hashes) and with
``data.deep_check`` (every record batch read, every shard hashed, every cell id hashed: O(cells)).

    python bench/startup.py                               # 2M cells in 2,000 shards (built once under --out)
    python bench/startup.py --cells 20000 --shards 20 --no-write

The corpus is synthetic (8 genes per cell: start-up cost follows cells and shards, not genes). Every rank of a run
does this once, before its first step. Adds a run to the "## Start-up" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import record  # noqa: E402
from fm import keys  # noqa: E402
from fm.data.datamodule import CorpusDataModule  # noqa: E402
from fm.data.schema import DatasetInfo  # noqa: E402
from fm.data.vocab import GeneVocab  # noqa: E402
from fm.data.writer import shard_name, write_manifest, write_shard  # noqa: E402

GENES_PER_CELL, N_GENES, RECORD_BATCH = 8, 1000, 256


def build_corpus(out: Path, n_cells: int, n_shards: int) -> Path:
    """A synthetic corpus of ``n_cells`` in ``n_shards`` shards (kept under ``out`` and reused)."""
    corpus = out / f"startup-c{n_cells}-s{n_shards}"
    if (corpus / "manifest.json").exists():
        return corpus
    rng = np.random.default_rng(0)
    per_shard = -(-n_cells // n_shards)
    infos = []
    for k, lo in enumerate(range(0, n_cells, per_shard)):
        n = min(per_shard, n_cells - lo)
        off = pa.array(np.arange(n + 1, dtype=np.int32) * GENES_PER_CELL)
        genes = np.sort(rng.integers(0, N_GENES, (n, GENES_PER_CELL)), axis=1).astype(np.int32).ravel()
        counts = rng.integers(1, 5, n * GENES_PER_CELL).astype(np.float32)
        table = pa.table({
            keys.CELL_ID: [f"cell{i}" for i in range(lo, lo + n)], keys.DATASET_ID: ["bench"] * n,
            keys.GENE_INDEX: pa.ListArray.from_arrays(off, pa.array(genes)),
            keys.SPLICED: pa.ListArray.from_arrays(off, pa.array(counts)),
            keys.UNSPLICED: pa.ListArray.from_arrays(off, pa.array(counts)),
            keys.LIBRARY_SIZE_SPLICED: counts.reshape(n, -1).sum(1),
            keys.LIBRARY_SIZE_UNSPLICED: counts.reshape(n, -1).sum(1),
        })
        infos.append(write_shard(corpus / "shards" / shard_name(k), table, record_batch_size=RECORD_BATCH,
                                 dataset_id="bench"))
    vocab = GeneVocab([f"ENSG{i:06d}" for i in range(N_GENES)])
    write_manifest(corpus, vocab, infos, [DatasetInfo("bench", "synthetic", n_cells, n_cells, N_GENES, N_GENES, 0)],
                   record_batch_size=RECORD_BATCH)
    return corpus


def setup_seconds(corpus: Path, deep: bool) -> float:
    dm = CorpusDataModule(corpus=str(corpus), val_fraction=0.05, deep_check=deep)
    t0 = time.perf_counter()
    dm.setup()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=2_000_000)
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/BENCHMARKS.md")
    a = p.parse_args()
    corpus = build_corpus(a.out, a.cells, a.shards)
    default = min(setup_seconds(corpus, False) for _ in range(2))  # page cache warm, as on a rank's second start
    deep = setup_seconds(corpus, True)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs"
    text = (f"### {datetime.date.today().isoformat()}, {machine}\n\n"
            f"`python bench/startup.py --cells {a.cells} --shards {a.shards}`: `CorpusDataModule.setup()` per rank, "
            f"{a.cells:,} cells in {a.shards:,} shards: **{default:.2f} s** by default (per-shard index: size, "
            f"footer, stamped sha256, cached cell hashes; {1e3 * default / a.shards:.2f} ms per shard), "
            f"{deep:.1f} s with `data.deep_check=true` (every record batch, sha256 and cell id; "
            f"{1e6 * deep / a.cells:.1f} µs per cell).\n")
    sys.stdout.write(text)
    if not a.no_write:
        record("Start-up", text)


if __name__ == "__main__":
    main()
