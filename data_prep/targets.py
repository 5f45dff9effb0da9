"""Which fields of an input become target columns, and what a worker needs to read one input.

    fm prep convert sim.h5ad --out corpus/ --time-key latent_time --size-factor-key none   # CPU; resolved here
    python -c "from data_prep import targets as t; print(t.inspect_input('sim.h5ad', 'sim', t.TargetConfig()))"

`inspect_input` opens an input once, checks its count layers and resolves each `TargetConfig` option to a field of
that file (``"auto"``: the first of the usual names present); nothing is read in bulk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_prep.sources import ConversionError, Source, open_source
from fm import keys

AUTO = "auto"
VELOCITY_LAYERS = (keys.LAYER_VELOCITY_TRUE, keys.LAYER_VELOCITY)
VELOCITY_U_LAYERS = (keys.LAYER_VELOCITY_U_TRUE, "velocity_u")
TIME_KEYS = (keys.OBS_TIME_TRUE, "latent_time", "velocity_pseudotime", "dpt_pseudotime")


@dataclass(frozen=True)
class TargetConfig:
    """Which optional fields become target columns: a name, ``"auto"`` (first found of the usual names) or None."""

    velocity_layer: str | None = AUTO  # -> velocity; auto: velocity_true, velocity
    velocity_u_layer: str | None = AUTO  # -> velocity_u; auto: velocity_u_true, velocity_u
    cell_type_key: str | None = AUTO  # obs column -> cell_type; auto: clusters
    time_key: str | None = AUTO  # obs column -> time; auto: time_true, latent_time, velocity_pseudotime, ...
    size_factor_key: str | None = None  # obs column -> size_factor


@dataclass
class DatasetSpec:
    """What a worker needs to read one input (picklable)."""

    path: str
    dataset_id: str
    n_cells: int
    n_genes: int
    velocity: str | None = None
    velocity_u: str | None = None
    cell_type: str | None = None
    time: str | None = None
    size_factor: str | None = None

    @property
    def targets(self) -> list[str]:
        names = {"velocity": keys.VELOCITY, "velocity_u": keys.VELOCITY_U, "cell_type": keys.CELL_TYPE}
        names |= {"time": keys.TIME, "size_factor": keys.SIZE_FACTOR}
        return [col for attr, col in names.items() if getattr(self, attr) is not None]


def _resolve(src: Source, option: str | None, auto: tuple[str, ...], kind: str, path: str) -> str | None:
    """The field an option names: None stays None, ``auto`` is the first present, a name must exist."""
    has = src.has_layer if kind == "layer" else src.has_obs
    if option is None:
        return None
    if option == AUTO:
        return next((n for n in auto if has(n)), None)
    if not has(option):
        what = src.layer_field(option) if kind == "layer" else src.obs_field(option)
        raise ConversionError(f"{path}: {what} is missing (asked for as a target)")
    return option


def inspect_input(
    path: Path, dataset_id: str, targets: TargetConfig
) -> tuple[DatasetSpec, list[str] | None, list[str]]:
    """Open an input, check its layers and genes, and resolve its target fields; nothing is read in bulk."""
    with open_source(path) as src:
        src.check_layers([keys.LAYER_SPLICED, keys.LAYER_UNSPLICED])
        ds = DatasetSpec(
            path=str(path),
            dataset_id=dataset_id,
            n_cells=src.n_cells,
            n_genes=src.n_genes,
            velocity=_resolve(src, targets.velocity_layer, VELOCITY_LAYERS, "layer", str(path)),
            velocity_u=_resolve(src, targets.velocity_u_layer, VELOCITY_U_LAYERS, "layer", str(path)),
            cell_type=_resolve(src, targets.cell_type_key, (keys.OBS_CLUSTERS,), "obs", str(path)),
            time=_resolve(src, targets.time_key, TIME_KEYS, "obs", str(path)),
            size_factor=_resolve(src, targets.size_factor_key, (), "obs", str(path)),
        )
        src.check_layers([n for n in (ds.velocity, ds.velocity_u) if n is not None])
        return ds, src.gene_ids, src.symbols
