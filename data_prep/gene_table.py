"""Gene tables of the simulator: per-gene rates, switching times and programmes, drawn, checked, read and located.

    python -c "from data_prep.gene_table import make_gene_table; print(make_gene_table(5, seed=0))"   # CPU

A gene table has its own seed, so datasets simulated from one table share their genes; `data_prep.simulate.write`
puts it beside the data as ``X.genes.tsv`` and ``fm prep simulate --gene-table`` reads it back.

Shapes: G genes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.kinetics import T_MAX

GENE_TABLE_COLUMNS = tuple(
    "gene_id symbol alpha_on alpha_off beta gamma t_on t_off multi_kinetic alpha_mult_a alpha_mult_b boosted "
    "boost_mult cycling cycle_on cycle_off".split()
)  # the columns of a gene table (see `make_gene_table`), in the order written to X.genes.tsv
VAR_FLAGS = ("multi_kinetic", "boosted", "cycling")  # gene-table flags copied into .var


def make_gene_table(
    n_genes: int,
    seed: int,
    *,
    multi_kinetic_fraction: float = 0.2,
    boost_fraction: float = 0.3,
    cycling_fraction: float = 0.5,
) -> pd.DataFrame:
    """Draw per-gene kinetics: rates, switching times, per-lineage α multipliers, boost and cycle programmes.

    Multi-kinetic genes are on across the default branch time, and after it one lineage raises their α
    (×1.5–3) while the other nearly shuts it (×0–0.3), as cellDancer's multi-kinetic genes. Non-cycling genes have
    the window [0, 1) (always on) in the cycle regime.
    """
    if not isinstance(n_genes, int) or n_genes < 1:
        raise ValueError(f"make_gene_table: n_genes={n_genes!r} must be a positive integer")
    rng = np.random.default_rng(seed)
    G = n_genes
    alpha_on = np.exp(rng.normal(np.log(2.0), 0.8, G))
    alpha_off = alpha_on * np.where(rng.random(G) < 0.5, 0.0, rng.uniform(0.0, 0.05, G))
    beta = np.exp(rng.normal(0.0, 0.5, G))
    gamma = np.exp(rng.normal(np.log(0.3), 0.5, G))
    t_on = rng.uniform(0.0, 0.5, G) * T_MAX
    t_off = t_on + rng.uniform(0.2, 0.9, G) * T_MAX  # past T_MAX: never switches off
    multi = rng.random(G) < multi_kinetic_fraction
    t_on = np.where(multi, rng.uniform(0.0, 0.3, G) * T_MAX, t_on)
    t_off = np.where(multi, rng.uniform(0.7, 1.2, G) * T_MAX, t_off)
    up_in_a = rng.random(G) < 0.5
    high, low = rng.uniform(1.5, 3.0, G), rng.uniform(0.0, 0.3, G)
    boosted = rng.random(G) < boost_fraction
    boost_mult = rng.uniform(2.0, 4.0, G)
    cycling = rng.random(G) < cycling_fraction
    cycle_on = rng.random(G)
    cycle_off = (cycle_on + rng.uniform(0.3, 0.7, G)) % 1.0
    width = max(5, len(str(G)))
    return pd.DataFrame(
        {
            "gene_id": [f"SIMG{i:0{width}d}" for i in range(1, G + 1)],
            "symbol": [f"SimG{i}" for i in range(1, G + 1)],
            "alpha_on": alpha_on,
            "alpha_off": alpha_off,
            "beta": beta,
            "gamma": gamma,
            "t_on": t_on,
            "t_off": t_off,
            "multi_kinetic": multi,
            "alpha_mult_a": np.where(multi, np.where(up_in_a, high, low), 1.0),
            "alpha_mult_b": np.where(multi, np.where(up_in_a, low, high), 1.0),
            "boosted": boosted,
            "boost_mult": np.where(boosted, boost_mult, 1.0),
            "cycling": cycling,
            "cycle_on": np.where(cycling, cycle_on, 0.0),
            "cycle_off": np.where(cycling, cycle_off, 1.0),
        }
    )


def check_gene_table(table: pd.DataFrame, n_genes: int) -> None:
    """Fail loudly on a gene table that lacks columns, has the wrong length or impossible values."""
    missing = [c for c in GENE_TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"gene_table: missing columns {missing}")
    if len(table) != n_genes:
        raise ValueError(f"gene_table: has {len(table)} rows but n_genes={n_genes}")
    for col in ("gene_id", "symbol"):
        if table[col].duplicated().any():
            dup = table[col][table[col].duplicated()].iloc[0]
            raise ValueError(f"gene_table.{col}: duplicate values, e.g. {dup!r}")
    for col in ("beta", "gamma"):
        if not (np.isfinite(table[col]).all() and (table[col] > 0).all()):
            raise ValueError(f"gene_table.{col}: must be finite and > 0")
    for col in ("alpha_on", "alpha_off", "alpha_mult_a", "alpha_mult_b", "boost_mult"):
        if not (np.isfinite(table[col]).all() and (table[col] >= 0).all()):
            raise ValueError(f"gene_table.{col}: must be finite and >= 0")


def read_gene_table(path: str | Path) -> pd.DataFrame:
    """Read a gene table written by `write` (``X.genes.tsv``)."""
    table = pd.read_csv(path, sep="\t", dtype={"gene_id": str, "symbol": str})
    for col in VAR_FLAGS:
        if col in table.columns:
            table[col] = table[col].astype(bool)
    return table


def gene_table_path(h5ad_path: str | Path) -> Path:
    """Where the gene table of ``X.h5ad`` lives: ``X.genes.tsv``."""
    path = Path(h5ad_path)
    return path.with_name(path.stem + ".genes.tsv")
