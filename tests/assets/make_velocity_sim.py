"""Make tests/assets/velocity_sim_300x40.h5ad, the tiny fixture of the velocity-teacher tests (fm velocity).

    .venv/bin/python tests/assets/make_velocity_sim.py

fm's kinetic simulator (one trajectory, 300 cells x 40 genes, seed 0, capture 1.0 for ~100 spliced counts a cell),
kept to what the tests read (no X): integer spliced/unspliced counts (CSR), the true velocities, the true time and the
clusters. Deterministic: rerunning it gives the same counts.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from data_prep.simulate import simulate
from fm import keys

OUT = Path(__file__).resolve().parent / "velocity_sim_300x40.h5ad"


def main() -> None:
    a = simulate(300, 40, regime="trajectory", seed=0, capture=1.0)
    small = ad.AnnData(
        obs=a.obs[[keys.OBS_TIME_TRUE, keys.OBS_CLUSTERS]].copy(),
        var=a.var[[keys.VAR_GENE_ID, keys.VAR_BETA_TRUE, keys.VAR_GAMMA_TRUE]].copy(),
        layers={name: a.layers[name] for name in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED)}
        | {name: np.asarray(a.layers[name], np.float32) for name in (keys.LAYER_VELOCITY_TRUE,
                                                                      keys.LAYER_VELOCITY_U_TRUE)},
    )
    small.write_h5ad(OUT, compression="gzip")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
