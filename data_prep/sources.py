"""Read spliced/unspliced counts from ``.h5ad`` and ``.loom`` files in row chunks, never a whole file at once.

The converter (data_prep/convert.py) opens every input through :func:`open_source`; a source knows its genes,
cells, layers and obs columns and reads any layer as a CSR block of cells:

    with open_source("pancreas.h5ad") as src:
        s_RG = src.read_layer("spliced", 0, 1024)   # scipy CSR [rows, genes], the file's dtype

``.h5ad`` is read with h5py plus anndata's backed sparse datasets (``anndata.read_h5ad(backed='r')`` keeps layers in
memory, so it is not used); ``.loom`` with h5py (genes are rows there, cells columns).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fm.data.genes import GENE_ID_COLUMNS, GENE_SYMBOL_COLUMNS

try:  # anndata >= 0.11
    from anndata.io import read_elem, sparse_dataset
except ImportError:  # pragma: no cover - anndata 0.10
    from anndata.experimental import read_elem, sparse_dataset

log = logging.getLogger(__name__)

CELL_ID_COLUMNS = ("CellID", "obs_names", "cell_id")  # loom column attributes
SUFFIXES = (".h5ad", ".loom")


class ConversionError(ValueError):
    """An input file cannot be converted; the message names the file and the field."""


def _decode(values: np.ndarray) -> np.ndarray:
    """Strings from h5py as an object array of ``str`` (fixed-length bytes are decoded as UTF-8)."""
    if values.dtype.kind == "S":
        return np.array([v.decode("utf-8") for v in values], dtype=object)
    if values.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in values], dtype=object)
    return values


def _check_unique(path: Path, field: str, names: list[str]) -> None:
    s = pd.Series(names)
    dup = s[s.duplicated(keep=False)]
    if len(dup):
        head = ", ".join(f"{k} ({v}x)" for k, v in dup.value_counts().head(5).items())
        raise ConversionError(f"{path}: {field} has {dup.nunique()} duplicate gene names: {head}")


class Source:
    """A file of cells x genes with spliced/unspliced layers, read in row (cell) chunks."""

    path: Path
    n_cells: int
    n_genes: int
    gene_ids: list[str] | None  # stable ids when the file has them
    symbols: list[str]
    gene_field: str  # where the names came from, for messages (e.g. "var['gene_id']")

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    # --- implemented per format ---
    def has_layer(self, name: str) -> bool:
        raise NotImplementedError

    def layer_field(self, name: str) -> str:
        return f"layers[{name!r}]"

    def obs_field(self, name: str) -> str:
        return f"obs[{name!r}]"

    def has_obs(self, name: str) -> bool:
        raise NotImplementedError

    def layer_shape(self, name: str) -> tuple[int, int]:
        """Shape as cells x genes."""
        raise NotImplementedError

    def read_layer(self, name: str, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    def read_dense(self, name: str, start: int, stop: int) -> np.ndarray | None:
        """Rows of a layer stored dense, as an array [rows, genes]; None when the layer is stored sparse."""
        return None

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    # --- shared checks ---
    def check_layers(self, names: list[str]) -> None:
        """Every named layer exists and has shape cells x genes."""
        for name in names:
            if not self.has_layer(name):
                raise ConversionError(f"{self.path}: {self.layer_field(name)} is missing (layers: {self.layer_names})")
            shape = self.layer_shape(name)
            if shape != (self.n_cells, self.n_genes):
                raise ConversionError(
                    f"{self.path}: {self.layer_field(name)} has shape {shape} (cells x genes), expected "
                    f"{(self.n_cells, self.n_genes)} from the cell and gene annotations"
                )

    def _set_genes(self, gene_ids: list[str] | None, id_field: str | None, symbols: list[str], sym_field: str):
        if self.n_cells == 0 or self.n_genes == 0:
            raise ConversionError(f"{self.path}: empty ({self.n_cells} cells x {self.n_genes} genes)")
        for field, names in ((id_field, gene_ids), (sym_field, symbols)):
            if names is not None and any(not n or n == "nan" for n in names):
                raise ConversionError(f"{self.path}: {field} has empty or missing gene names")
        self.gene_ids, self.symbols = gene_ids, symbols
        # the key a gene is known by must be unique: ids when present, else symbols
        if gene_ids is not None:
            _check_unique(self.path, id_field, gene_ids)
            self.gene_field = id_field
        else:
            _check_unique(self.path, sym_field, symbols)
            self.gene_field = sym_field


class H5adSource(Source):
    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = h5py.File(path, "r")
        except OSError as e:
            raise ConversionError(f"{path}: not a readable .h5ad (HDF5) file ({e})") from e
        f = self._f
        try:
            for group in ("obs", "var"):
                if group not in f:
                    raise ConversionError(f"{path}: field '{group}' is missing; not an AnnData .h5ad file")
            obs = f["obs"]
            self._obs_index = obs.attrs.get("_index", "_index")
            if self._obs_index not in obs:
                raise ConversionError(f"{path}: field 'obs/{self._obs_index}' (the cell names) is missing")
            self.n_cells = obs[self._obs_index].shape[0]
            var = read_elem(f["var"])
            self.n_genes = len(var)
            self.layer_names = sorted(f["layers"].keys()) if "layers" in f else []
            id_col = next((c for c in GENE_ID_COLUMNS if c in var.columns), None)
            sym_col = next((c for c in GENE_SYMBOL_COLUMNS if c in var.columns), None)
            ids = [str(g) for g in var[id_col]] if id_col else None
            symbols = [str(g) for g in (var[sym_col] if sym_col else var.index)]
            self._set_genes(ids, f"var[{id_col!r}]", symbols, f"var[{sym_col!r}]" if sym_col else "var_names")
        except ConversionError:
            f.close()
            raise
        except (KeyError, OSError, ValueError, TypeError) as e:
            f.close()
            raise ConversionError(f"{path}: unreadable AnnData annotations ({type(e).__name__}: {e})") from e
        self._sparse: dict[str, object] = {}

    def has_layer(self, name: str) -> bool:
        return name in self.layer_names

    def has_obs(self, name: str) -> bool:
        return name in self._f["obs"] and name != self._obs_index

    def layer_shape(self, name: str) -> tuple[int, int]:
        elem = self._f["layers"][name]
        shape = elem.attrs["shape"] if isinstance(elem, h5py.Group) else elem.shape
        return int(shape[0]), int(shape[1])

    def read_layer(self, name: str, start: int, stop: int) -> sp.csr_matrix:
        elem = self._f["layers"][name]
        if isinstance(elem, h5py.Dataset):
            return sp.csr_matrix(elem[start:stop])
        if name not in self._sparse:
            if elem.attrs.get("encoding-type") == "csc_matrix":
                log.warning(
                    "%s: %s is CSC; reading cells from it is slow (store CSR)", self.path, self.layer_field(name)
                )
            self._sparse[name] = sparse_dataset(elem)
        return sp.csr_matrix(self._sparse[name][start:stop])

    def read_dense(self, name: str, start: int, stop: int) -> np.ndarray | None:
        elem = self._f["layers"][name]
        return elem[start:stop] if isinstance(elem, h5py.Dataset) else None

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        elem = self._f["obs"][name]
        if isinstance(elem, h5py.Dataset):
            return _decode(elem[start:stop])
        enc = elem.attrs.get("encoding-type")
        if enc == "categorical":
            categories = np.asarray(read_elem(elem["categories"]), dtype=object)
            codes = elem["codes"][start:stop]
            out = np.empty(len(codes), dtype=object)
            out[codes >= 0] = categories[codes[codes >= 0]]
            return out
        if enc is not None and enc.startswith("nullable"):
            values = _decode(elem["values"][start:stop]).astype(object)
            values[elem["mask"][start:stop]] = None
            return values
        raise ConversionError(f"{self.path}: {self.obs_field(name)} has an unsupported encoding {enc!r}")

    def read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return _decode(self._f["obs"][self._obs_index][start:stop])


class LoomSource(Source):
    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = h5py.File(path, "r")
        except OSError as e:
            raise ConversionError(f"{path}: not a readable .loom (HDF5) file ({e})") from e
        f = self._f
        try:
            for group in ("matrix", "row_attrs", "col_attrs"):
                if group not in f:
                    raise ConversionError(f"{path}: field '{group}' is missing; not a .loom file")
            self.n_genes, self.n_cells = (int(n) for n in f["matrix"].shape)
            self.layer_names = sorted(f["layers"].keys()) if "layers" in f else []
            rows, cols = f["row_attrs"], f["col_attrs"]
            id_col = next((c for c in GENE_ID_COLUMNS if c in rows), None)
            sym_col = next((c for c in (*GENE_SYMBOL_COLUMNS, "var_names") if c in rows), None)
            if sym_col is None and id_col is None:
                raise ConversionError(f"{path}: no gene names in row_attrs (looked for {GENE_SYMBOL_COLUMNS})")
            ids = [str(g) for g in _decode(rows[id_col][:])] if id_col else None
            symbols = [str(g) for g in _decode(rows[sym_col][:])] if sym_col else list(ids)
            self._cell_col = next((c for c in CELL_ID_COLUMNS if c in cols), None)
            self._set_genes(ids, f"row_attrs[{id_col!r}]", symbols, f"row_attrs[{sym_col!r}]")
        except ConversionError:
            f.close()
            raise
        except (KeyError, OSError, ValueError, TypeError) as e:
            f.close()
            raise ConversionError(f"{path}: unreadable loom attributes ({type(e).__name__}: {e})") from e

    def obs_field(self, name: str) -> str:
        return f"col_attrs[{name!r}]"

    def has_layer(self, name: str) -> bool:
        return name in self.layer_names

    def has_obs(self, name: str) -> bool:
        return name in self._f["col_attrs"]

    def layer_shape(self, name: str) -> tuple[int, int]:
        genes, cells = self._f["layers"][name].shape
        return int(cells), int(genes)

    def read_layer(self, name: str, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self._f["layers"][name][:, start:stop].T)

    def read_dense(self, name: str, start: int, stop: int) -> np.ndarray | None:
        return self._f["layers"][name][:, start:stop].T

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        return _decode(self._f["col_attrs"][name][start:stop])

    def read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        if self._cell_col is None:
            return np.array([str(i) for i in range(start, stop)], dtype=object)
        return _decode(self._f["col_attrs"][self._cell_col][start:stop]).astype(str).astype(object)


def open_source(path: str | os.PathLike) -> Source:
    """Open an ``.h5ad`` or ``.loom`` file for chunked reading; a :class:`ConversionError` names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: empty file (0 bytes)")
    if path.suffix == ".h5ad":
        return H5adSource(path)
    if path.suffix == ".loom":
        return LoomSource(path)
    raise ConversionError(f"{path}: unsupported file type {path.suffix!r} (expected one of {SUFFIXES})")
