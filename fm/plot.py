"""`fm plot`: RNA velocity on a 2-D embedding (stream lines or arrows), and loss curves from CSV training logs.

    fm plot velocity pred.h5ad --out velocity.png          # `fm predict` output; obsm['X_umap'] when present
    fm plot velocity pred.h5ad --out v.png --basis X_fm --color clusters --kind arrows
    fm plot loss runs/pretrain runs/finetune --out loss.png     # run folders (csv/metrics.csv) or CSV files
    python -c "from data_prep.simulate import simulate; a = simulate(300, 50); \
a.layers['velocity'] = a.layers['velocity_true']; a.obs['size_factor'] = a.obs['library_size']; \
from fm.plot import ExpressionSpace as E, save_figure, velocity_embedding as ve; \
save_figure(ve(a, basis='X_sim', space=E('size_factor')), 'v.png')"          # simulated truth; CPU, seconds

Velocity is projected onto the embedding as scVelo does it, in the velocity's own units, on the genes whose velocity
is finite in every cell (fm.metrics.projection, whose docstring says how; fm evaluate's CBDir uses the same
projection, so the arrows one sees and the score one reads agree). For the simulator's truth, which is in amounts,
pass ``ExpressionSpace('size_factor')`` as above: its total counts rise with time, and total-count normalisation
turns its arrows around. The embedding is ``obsm[basis]``: its two columns, or a PCA of it to 2-D when it has more
(``X_fm``); without ``basis``, ``X_umap`` when present, else a PCA of log1p normalised spliced counts (the title
says which). Stream lines follow the velocity averaged on a grid with a Gaussian kernel; grid points with little
cell density are masked. Figures are written atomically (temporary name, then rename).

Shapes: N cells, G genes, K neighbours, P principal components, M grid points.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from fm import keys
from fm.io import atomic_path
from fm.metrics.projection import (
    NORMALIZATIONS,
    ExpressionSpace,
    embedding_2d,
    expression_space,
    project_onto_embedding,
    velocity_genes,
)

log = logging.getLogger(__name__)

KINDS = ("stream", "arrows", "grid")
FIGSIZE = (7.5, 5.5)  # inches; at the default dpi 100 a 750 x 550 PNG
DPI = 100
_GRID = 40  # grid points per axis for stream lines and grid arrows
_MIN_DENSITY = 0.05  # grid points with less kernel mass than this share of the 99th percentile are masked


# --- drawing -----------------------------------------------------------------------------------------------------
def _new_figure(figsize=FIGSIZE):
    """A figure on an Agg canvas, without pyplot (no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _palette(adata, color: str, categories: Sequence) -> list:
    """scanpy's ``uns['{color}_colors']`` when it fits, else tab10 / tab20 / an evenly spaced colour map."""
    import matplotlib

    given = adata.uns.get(f"{color}_colors")
    if given is not None and len(given) == len(categories):
        return list(given)
    n = len(categories)
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](x) for x in np.linspace(0, 1, n)]


def _scatter(ax, adata, emb_N2: np.ndarray, color: str | None) -> None:
    """Cells as points: categorical colours with a legend, or a colour bar for a numeric column."""
    import pandas as pd

    size = max(4.0, min(30.0, 1.5e4 / max(adata.n_obs, 1)))
    if color is None:
        ax.scatter(*emb_N2.T, s=size, c="0.75", linewidths=0, rasterized=True)
        return
    if color not in adata.obs:
        raise ValueError(f"no obs['{color}'] for --color (obs columns: {list(adata.obs.columns)})")
    values = adata.obs[color]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        points = ax.scatter(*emb_N2.T, s=size, c=np.asarray(values, dtype=np.float64), cmap="viridis",
                            linewidths=0, rasterized=True)
        ax.figure.colorbar(points, ax=ax, label=color, shrink=0.8)
        return
    cat = values.astype("category")
    for category, rgba in zip(cat.cat.categories, _palette(adata, color, cat.cat.categories)):
        sel = np.asarray(cat == category)
        ax.scatter(*emb_N2[sel].T, s=size, color=rgba, linewidths=0, label=str(category), rasterized=True)
    ax.legend(title=color, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=2.5,
              fontsize="small")


def velocity_on_grid(emb_N2: np.ndarray, v_N2: np.ndarray, n_grid: int = _GRID, smooth: float = 1.0,
                     min_density: float = _MIN_DENSITY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xs [n_grid], ys [n_grid], V [n_grid, n_grid, 2]) Gaussian-kernel means of ``v_N2``; NaN where sparse.

    The kernel's width is ``smooth`` grid spacings; a grid point whose kernel weights sum to less than
    ``min_density`` times the 99th percentile over grid points (about: a cell density that much below the densest
    places) is masked, so no stream line or arrow crosses empty space.
    """
    from scipy.spatial import cKDTree

    lo, hi = emb_N2.min(0), emb_N2.max(0)
    pad = 0.02 * (hi - lo)
    xs, ys = (np.linspace(lo[i] - pad[i], hi[i] + pad[i], n_grid) for i in range(2))
    gx, gy = np.meshgrid(xs, ys)  # [n_grid (y), n_grid (x)]
    grid_M2 = np.stack([gx.ravel(), gy.ravel()], 1)
    sigma = smooth * float(np.mean([xs[1] - xs[0], ys[1] - ys[0]]))
    k = min(len(emb_N2), max(10, len(emb_N2) // 50))
    dist_MK, idx_MK = cKDTree(emb_N2).query(grid_M2, k=k)
    w_MK = np.exp(-0.5 * (dist_MK / sigma) ** 2)
    mass_M = w_MK.sum(1)
    v_M2 = (w_MK[:, :, None] * v_N2[idx_MK]).sum(1) / np.maximum(mass_M, 1e-12)[:, None]
    v_M2[mass_M < min_density * np.percentile(mass_M, 99)] = np.nan
    return xs, ys, v_M2.reshape(n_grid, n_grid, 2)


def _arrow_scale(emb_N2: np.ndarray, v_N2: np.ndarray, fraction: float) -> float:
    """Factor that makes the 95th-percentile arrow ``fraction`` of the embedding's larger side."""
    length = np.linalg.norm(v_N2, axis=1)
    length = length[np.isfinite(length) & (length > 0)]
    if length.size == 0:
        return 1.0
    return fraction * float(np.ptp(emb_N2, 0).max()) / float(np.percentile(length, 95))


def velocity_embedding(adata, *, basis: str | None = None, vkey: str = keys.LAYER_VELOCITY,
                       color: str | None = keys.OBS_CLUSTERS, kind: str = "stream", n_neighbors: int = 30,
                       space: ExpressionSpace | None = None, ax=None, title: str | None = None):
    """Velocity on a 2-D embedding: stream lines, arrows on cells or arrows on a grid, over the coloured cells.

    Args:
        adata: AnnData with ``layers[vkey]`` (ds/dt, cells x genes, NaN outside the model's genes) and spliced counts.
        basis: an ``obsm`` key (``X_umap``, ``X_tsne``, ``X_fm``, ...); None: ``X_umap`` if present, else a PCA.
        vkey: the velocity layer.
        color: an ``obs`` column (categorical: a legend; numeric: a colour bar); None: grey points.
        kind: ``stream``, ``arrows`` (one per cell) or ``grid`` (arrows on a grid).
        n_neighbors: kNN for the moments and the velocity graph.
        space: the units of the velocity, where displacements are taken (default: from ``uns['fm']`` when
            `fm predict` wrote it, else scVelo's total-count normalised spliced moments).
        ax: draw into these axes (their figure is returned); None: a new figure.
        title: replaces the default title (what velocity, how many genes, which embedding).

    Returns:
        The matplotlib Figure (write it with :func:`save_figure`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if color is not None and color not in adata.obs:  # fail before the projection's work
        raise ValueError(f"no obs['{color}'] for --color (obs columns: {list(adata.obs.columns)})")
    genes_G = velocity_genes(adata, vkey)
    space = space or ExpressionSpace.from_adata(adata)
    log.info("displacements in kNN means of %s", space.describe())
    neighbourhood = expression_space(adata, n_neighbors, space)
    emb_N2, described = embedding_2d(adata, basis, neighbourhood[1])
    v_N2 = project_onto_embedding(adata, emb_N2, vkey=vkey, neighbourhood=neighbourhood)

    fig = ax.figure if ax is not None else _new_figure()
    ax = ax if ax is not None else fig.add_subplot()
    _scatter(ax, adata, emb_N2, color)
    if kind == "stream":
        xs, ys, v_grid = velocity_on_grid(emb_N2, v_N2)
        u, v = (np.ma.masked_invalid(v_grid[..., i]) for i in range(2))
        ax.streamplot(xs, ys, u, v, color="0.15", linewidth=0.8, density=1.4, arrowsize=0.9)
    else:
        if kind == "grid":
            xs, ys, v_grid = velocity_on_grid(emb_N2, v_N2, n_grid=_GRID // 2, smooth=0.5, min_density=0.1)
            gx, gy = np.meshgrid(xs, ys)
            ok = np.isfinite(v_grid[..., 0])
            at_M2, v_M2 = np.stack([gx[ok], gy[ok]], 1), v_grid[ok]
        else:
            at_M2, v_M2 = emb_N2, v_N2
        scale = _arrow_scale(emb_N2, v_M2, 0.06 if kind == "grid" else 0.03)
        ax.quiver(*at_M2.T, *(scale * v_M2).T, angles="xy", scale_units="xy", scale=1.0, color="0.15",
                  width=0.003 if kind == "grid" else 0.0015, headwidth=4)
    ax.set_xlabel(f"{described} 1")
    ax.set_ylabel(f"{described} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"RNA velocity (layers['{vkey}'], {genes_G.sum()} genes) on {described}", fontsize="medium")
    return fig


# --- loss curves -------------------------------------------------------------------------------------------------
def find_metrics_csv(path: str | os.PathLike) -> list[Path]:
    """The Lightning CSV logs of a run: ``path`` itself if a file, else ``csv/metrics.csv``, ``csv/version_*/...``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or CSV file")
    found = sorted(path.glob("csv/metrics.csv")) + sorted(path.glob("csv/version_*/metrics.csv"))
    found = found or sorted(path.rglob("metrics.csv"))
    if not found:
        raise FileNotFoundError(_no_metrics_reason(path))
    return found


def _no_metrics_reason(run: Path) -> str:
    """Why a run folder has no metrics.csv, from what is in it (a run too short to log, or no CSV logger)."""
    there = sorted(p.name + "/" * p.is_dir() for p in run.iterdir() if not p.name.startswith("."))
    if not (run / "csv").is_dir():
        return (f"{run}: no metrics.csv (it holds {there or 'nothing'}); a run with logger=csv or logger=default "
                "writes RUN/csv/metrics.csv")
    import yaml

    every = "trainer.log_every_n_steps"
    config = run / ".hydra" / "config.yaml"
    if config.is_file():
        trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
        every += f"={trainer.get('log_every_n_steps', '?')}, max_steps={trainer.get('max_steps', '?')}"
    return (f"{run}: nothing to plot: csv/ holds {sorted(p.name for p in (run / 'csv').iterdir())} but no "
            f"metrics.csv, so no step was logged ({every}; a run shorter than log_every_n_steps logs none). The run "
            f"holds {there}; rerun with trainer.log_every_n_steps=1 to see a short run's loss")


def _run_name(csv: Path) -> str:
    """The run folder's name: the first parent that is not ``csv`` or ``version_*`` (the file's stem otherwise)."""
    if csv.name != "metrics.csv":
        return csv.stem
    for parent in csv.parents:
        if parent.name and parent.name != "csv" and not parent.name.startswith("version_"):
            return parent.name
    return csv.stem


def read_metrics(csv: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{family: {split: (steps, values)}} of the ``train/*`` and ``val/*`` columns of a Lightning metrics.csv."""
    import pandas as pd

    try:
        table = pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv}: empty CSV file") from None
    if "step" not in table:
        raise ValueError(f"{csv}: no 'step' column (columns: {list(table.columns)}); not a Lightning metrics.csv")
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for column in table.columns:
        split, _, family = str(column).partition("/")
        if split not in ("train", "val") or not family:
            continue
        rows = table[["step", column]].dropna()
        if len(rows):
            out.setdefault(family, {})[split] = (rows["step"].to_numpy(), rows[column].to_numpy(np.float64))
    if not out:
        raise ValueError(f"{csv}: no train/* or val/* values (columns: {list(table.columns)})")
    return out


def loss_curves(csv_paths_or_run_dirs: Sequence[str | os.PathLike], *, keys: Sequence[str] | None = None):
    """Train (solid) and validation (dashed) curves against step, one panel per metric family, runs overlaid.

    Args:
        csv_paths_or_run_dirs: Lightning ``metrics.csv`` files or run folders holding ``csv/metrics.csv``.
        keys: metric families to draw (``loss``, ``modality``, ...: the part after ``train/``/``val/``);
            None: all, ``loss`` first.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib

    if not csv_paths_or_run_dirs:
        raise ValueError("loss_curves: no run folder or CSV file given")
    runs: dict[str, dict] = {}
    for path in csv_paths_or_run_dirs:
        csvs = find_metrics_csv(path)
        for csv in csvs:
            name = _run_name(csv) + (f" ({csv.parent.name})" if len(csvs) > 1 else "")
            while name in runs:
                name += "'"
            runs[name] = read_metrics(csv)
    available = sorted({f for metrics in runs.values() for f in metrics}, key=lambda f: (f != "loss", f))
    if keys is None:
        families = available
    else:
        families = list(keys)
        unknown = [f for f in families if f not in available]
        if unknown:
            raise ValueError(f"--keys {unknown} not logged (available: {available})")

    ncols = min(3, len(families))
    nrows = -(-len(families) // ncols)
    fig = _new_figure((4.2 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = matplotlib.colormaps["tab10"]
    for ax, family in zip(axes, families):
        for r, (name, metrics) in enumerate(runs.items()):
            for split, style in (("train", "-"), ("val", "--")):
                if split in metrics.get(family, {}):
                    steps, values = metrics[family][split]
                    ax.plot(steps, values, style, color=colours(r % 10), marker="o" if len(steps) <= 20 else None,
                            markersize=3, label=f"{name} {split}")
        ax.set_title(family, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(families):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small", frameon=False)
    return fig


# --- writing and the command -------------------------------------------------------------------------------------
def save_figure(fig, out: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write ``fig`` to ``out`` (format from the suffix) atomically (fm.io)."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{out}: unknown figure format {fmt!r} (use one of {sorted(supported)})")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    return out


def _velocity_command(args: argparse.Namespace) -> int:
    import anndata as ad

    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    adata = ad.read_h5ad(path)
    try:
        space = ExpressionSpace.from_adata(adata)
        space = replace(space, normalization=args.normalization or space.normalization,
                        log1p=space.log1p if args.log1p is None else args.log1p)
        fig = velocity_embedding(adata, basis=args.basis, vkey=args.vkey, color=args.color or None, kind=args.kind,
                                 n_neighbors=args.n_neighbors, space=space, title=args.title)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    log.info("wrote %s", save_figure(fig, args.out, args.dpi))
    return 0


def _loss_command(args: argparse.Namespace) -> int:
    log.info("wrote %s", save_figure(loss_curves(args.runs, keys=args.keys), args.out, args.dpi))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="figures: velocity on an embedding, loss curves", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    figures = p.add_subparsers(dest="plot_command", required=True, metavar="FIGURE")

    v = figures.add_parser("velocity", help="velocity (layers['velocity'], from `fm predict`) on a 2-D embedding")
    v.add_argument("input", metavar="INPUT.h5ad")
    v.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg)")
    v.add_argument("--basis", help="obsm key (default: X_umap if present, else a PCA of the spliced counts)")
    v.add_argument("--color", default=keys.OBS_CLUSTERS, help="obs column to colour cells by ('' for none)")
    v.add_argument("--kind", default="stream", choices=KINDS)
    v.add_argument("--vkey", default=keys.LAYER_VELOCITY, help="velocity layer")
    v.add_argument("--n-neighbors", type=int, default=30)
    v.add_argument("--normalization", choices=NORMALIZATIONS,
                   help="units of the velocity, for the displacements (default: uns['fm']'s tokenizer, else total)")
    v.add_argument("--log1p", action=argparse.BooleanOptionalAction,
                   help="displacements in log1p units (default: yes after fm predict, else no)")
    v.add_argument("--title")
    v.add_argument("--dpi", type=int, default=DPI)
    v.set_defaults(func=_velocity_command)

    loss = figures.add_parser("loss", help="train/val curves from Lightning CSV logs")
    loss.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_CSV")
    loss.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg)")
    loss.add_argument("--keys", nargs="+", help="metric families (default: all; e.g. loss modality)")
    loss.add_argument("--dpi", type=int, default=DPI)
    loss.set_defaults(func=_loss_command)
    return p
