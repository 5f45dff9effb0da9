"""`fm velocity`: a velocity teacher's velocity, moments and neighbours graph written into a copy of a `.h5ad`.

    fm velocity pancreas.h5ad --out pancreas_velocity.h5ad --method stochastic
    fm velocity sim.h5ad --out sim_v.h5ad --method dynamical --neighbours 30 --pcs 30 \
        --normalization size_factor --size-factor-key size_factor          # dynamical: pip install "fm[velocity]"
    .venv/bin/fm velocity tests/assets/velocity_sim_300x40.h5ad --out /tmp/sim_v.h5ad --method steady_state  # CPU, s

The input needs raw counts in ``layers['spliced']`` and ``layers['unspliced']`` (non-integer layers are refused
unless ``--allow-non-integer``). The neighbourhood is fm's (fm.velocity.neighbours: normalisation, log1p, PCA, kNN
graph, first-order moments), the teacher fm.velocity.teachers' (``steady_state`` and ``stochastic`` equal scVelo's
``tl.velocity`` modes; ``dynamical`` is scVelo's own fit; ``fm_dynamical`` fm's, fm.velocity.dynamical). The
output is the input with, in scVelo's and scanpy's names (so ``scv.tl.velocity_graph`` and the rest of scVelo run on
it directly; ``fm_dynamical`` also writes ``obs['latent_time']``, ``var['fit_*']``, ``layers['velocity_confidence']``):

- ``layers['velocity']`` (ds/dt, in the units of ``Ms``), ``layers['velocity_u']`` (du/dt; dynamical only),
  ``layers['Ms']``, ``layers['Mu']`` (first-order moments of the normalised counts); NaN at genes the teacher
  could not fit;
- ``var['velocity_genes']``, ``var['velocity_gamma']``, ``var['velocity_r2']``;
- ``obsp['distances']``, ``obsp['connectivities']``, ``uns['neighbors']``, ``obsm['X_pca']``;
- ``uns['fm']``: the fm version, the method and the teacher's and neighbourhood's settings, the unfit genes.

The input file is never written: the copy goes to a temporary name beside ``--out`` and is renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from fm import keys
from fm.velocity.neighbours import NORMALIZATIONS, NeighbourConfig, neighbourhood
from fm.velocity.teachers import METHODS, TeacherConfig, run_teacher, scanpy_neighbors_uns

log = logging.getLogger(__name__)

LAYER_MS, LAYER_MU = "Ms", "Mu"  # scVelo's moments layers
VAR_GAMMA, VAR_R2 = "velocity_gamma", "velocity_r2"  # scVelo's names
OBSM_PCA = "X_pca"
OBSP_GRAPH = ("distances", "connectivities")
UNS_NEIGHBORS = "neighbors"


def read_velocity_counts(adata, source: str, allow_non_integer: bool = False):
    """(spliced, unspliced) raw counts as CSR, checked by the converter's rule (fm.data.counts)."""
    import scipy.sparse as sp

    from fm.data.counts import check_counts

    out = []
    for name in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED):
        if name not in adata.layers:
            raise ValueError(f"{source}: layers['{name}'] is missing (layers: {sorted(adata.layers)}); fm velocity "
                             "needs raw spliced and unspliced counts")
        x = sp.csr_matrix(adata.layers[name])
        check_counts(x, f"{source}: layers['{name}']", allow_non_integer, cell_name=lambda r: adata.obs_names[r],
                     gene_name=lambda c: adata.var_names[c])
        out.append(x)
    return out[0], out[1]


def size_factors(adata, cfg: NeighbourConfig, key: str, source: str) -> np.ndarray | None:
    """``obs[key]`` when the normalisation needs size factors, else None."""
    if cfg.normalization != "size_factor":
        return None
    if key not in adata.obs.columns:
        raise ValueError(f"{source}: --normalization size_factor reads obs['{key}'], which is missing (obs columns: "
                         f"{list(adata.obs.columns)}); name the column with --size-factor-key")
    return adata.obs[key].to_numpy(np.float64)


FM_DYNAMICAL_FIELDS = {"obs": ["latent_time"], "layers": ["velocity_confidence"],
                       "var": ["fit_alpha", "fit_alpha_off", "fit_beta", "fit_gamma", "fit_scaling", "fit_t0", "fit_t_",
                               "fit_r2"]}


def output_fields(has_velocity_u: bool, method: str = "") -> dict[str, list[str]]:
    """The fields ``fm velocity`` writes, by AnnData attribute."""
    layers = [keys.LAYER_VELOCITY] + ([keys.LAYER_VELOCITY_U] if has_velocity_u else []) + [LAYER_MS, LAYER_MU]
    out = {"layers": layers, "var": [keys.VAR_VELOCITY_GENES, VAR_GAMMA, VAR_R2], "obsm": [OBSM_PCA],
           "obsp": list(OBSP_GRAPH), "uns": [UNS_NEIGHBORS, keys.UNS_FM], "obs": []}
    if method == "fm_dynamical":
        for attr, names in FM_DYNAMICAL_FIELDS.items():
            out[attr] = out[attr] + names
    return out


def _present(adata, fields: dict[str, list[str]]) -> list[str]:
    have = {"layers": adata.layers, "var": adata.var.columns, "obsm": adata.obsm, "obsp": adata.obsp,
            "uns": adata.uns, "obs": adata.obs.columns}
    return [f"{attr}['{k}']" for attr, names in fields.items() for k in names if k in have[attr]]


def velocity(adata, tcfg: TeacherConfig, ncfg: NeighbourConfig, *, size_factor_key: str = keys.SIZE_FACTOR,
             allow_non_integer: bool = False, overwrite: bool = False, source: str = ""):
    """Add the teacher's velocity, the moments and the graph to ``adata`` (in place) and return it."""
    from fm import __version__

    if not ncfg.enabled:
        raise ValueError(f"{source}: --neighbours must be >= 1 (velocity teachers work on neighbourhood moments)")
    clash = _present(adata, output_fields(tcfg.method in ("dynamical", "fm_dynamical"), tcfg.method))
    if clash and not overwrite:
        raise ValueError(f"{source}: already holds {', '.join(clash)}; pass --overwrite to replace them in the copy")
    s, u = read_velocity_counts(adata, source, allow_non_integer)
    nb, s_n, u_n = neighbourhood(s, u, ncfg, size_factors(adata, ncfg, size_factor_key, source), where=source)
    r = run_teacher(tcfg, nb, s_n, u_n, ncfg, genes=list(adata.var_names), where=source)
    adata.layers[keys.LAYER_VELOCITY] = r.velocity
    if r.velocity_u is not None:
        adata.layers[keys.LAYER_VELOCITY_U] = r.velocity_u
    adata.layers[LAYER_MS], adata.layers[LAYER_MU] = nb.Ms, nb.Mu
    adata.var[keys.VAR_VELOCITY_GENES] = r.velocity_genes
    adata.var[VAR_GAMMA], adata.var[VAR_R2] = r.gamma, r.r2
    for name, x in r.obs.items():  # fm_dynamical: latent time, fitted rates, confidence (scVelo's names)
        adata.obs[name] = x
    for name, x in r.var.items():
        adata.var[name] = x
    for name, x in r.layers.items():
        adata.layers[name] = x
    adata.obsm[OBSM_PCA] = nb.X_pca
    adata.obsp["distances"], adata.obsp["connectivities"] = nb.distances, nb.connectivities
    adata.uns[UNS_NEIGHBORS] = scanpy_neighbors_uns(ncfg)
    units = "in the units of Ms (counts normalised as uns['fm']['neighbours']['normalization'] says)"
    adata.uns[keys.UNS_FM] = {
        "fm_version": __version__,
        "command": "fm velocity",
        "method": tcfg.method,
        "teacher": tcfg.to_dict(),
        "neighbours": ncfg.to_dict(),
        "size_factor_key": size_factor_key if ncfg.normalization == "size_factor" else "none",
        "n_velocity_genes": int(r.velocity_genes.sum()),
        "unfit_genes": [str(adata.var_names[g]) for g in r.unfit],
        "unfit_reasons": list(r.unfit.values()),
        "layers": {keys.LAYER_VELOCITY: f"ds/dt {units}; NaN at unfit genes",
                   **({keys.LAYER_VELOCITY_U: f"du/dt {units}; NaN at unfit genes"} if r.velocity_u is not None
                      else {}),
                   LAYER_MS: "first-order moments of the normalised spliced counts (kNN mean, self included)",
                   LAYER_MU: "first-order moments of the normalised unspliced counts"},
    }
    return adata


def run(args: argparse.Namespace) -> int:
    from fm.predict import check_paths, read_input, write_h5ad_atomic

    inp, out = Path(args.input), Path(args.out)
    check_paths(inp, out, "--out", args.overwrite)
    ncfg = NeighbourConfig(n_neighbours=args.neighbours, n_pcs=args.pcs, normalization=args.normalization)
    tcfg = TeacherConfig(method=args.method)
    adata = read_input(inp)
    velocity(adata, tcfg, ncfg, size_factor_key=args.size_factor_key, allow_non_integer=args.allow_non_integer,
             overwrite=args.overwrite, source=str(inp))
    write_h5ad_atomic(adata, out)
    fm_uns = adata.uns[keys.UNS_FM]
    log.info("fm velocity: wrote %s (%d cells x %d genes, method %s): %d velocity genes, %d genes without velocity; "
             "layers %s; var %s; the neighbours graph", out, adata.n_obs, adata.n_vars, tcfg.method,
             fm_uns["n_velocity_genes"], len(fm_uns["unfit_genes"]), ", ".join(fm_uns["layers"]),
             ", ".join(output_fields(False)["var"]))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = NeighbourConfig()
    p = subparsers.add_parser(
        "velocity", help="a velocity teacher (steady_state, stochastic, dynamical, fm_dynamical) written into a "
        "copy of a .h5ad",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT.h5ad", help="raw counts in layers spliced and unspliced")
    p.add_argument("--out", required=True, metavar="OUT.h5ad", help="where to write the copy (never the input)")
    p.add_argument("--method", choices=METHODS, default="stochastic", help="the teacher (default stochastic)")
    p.add_argument("--neighbours", type=int, default=d.n_neighbours, help=f"kNN neighbours (default {d.n_neighbours})")
    p.add_argument("--pcs", type=int, default=d.n_pcs, help=f"principal components (default {d.n_pcs})")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default=d.normalization,
                   help="total: each modality by its library size x 1e4; size_factor: divided by obs[KEY]; none "
                        f"(default {d.normalization})")
    p.add_argument("--size-factor-key", default=keys.SIZE_FACTOR, metavar="KEY",
                   help=f"obs column of size factors for --normalization size_factor (default {keys.SIZE_FACTOR})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, and velocity fields the input already holds (in the copy)")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept non-integer counts (refused by default, as by fm prep convert)")
    p.set_defaults(func=run)
    return p
