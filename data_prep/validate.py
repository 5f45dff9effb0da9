"""Check a corpus folder against docs/FORMAT.md and summarise it.

    fm prep validate corpus/                      # exit code 1 and a message naming shard and field on failure
    python -m data_prep.validate corpus/

Checks: manifest format and schema version, vocabulary hash, every shard's size and sha256, its Arrow schema and
record batches against the manifest, and per cell: required fields present, gene indices sorted, unique and below
the vocabulary size, list lengths aligned, counts finite and non-negative, no stored gene with s + u = 0, library
sizes equal to the sums of the stored counts, cell ids unique within a dataset.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fm import keys
from fm.command import run_step
from fm.data.schema import CORPUS_SCHEMA, SCHEMA_VERSION, SHARD_DIR, CorpusError, Manifest, load_manifest, sha256_file
from fm.data.vocab import GeneVocab

log = logging.getLogger(__name__)

LIBRARY_RTOL = 1e-4  # float32 sums of up to ~1e5 counts


@dataclass
class ValidationReport:
    """What :func:`validate` found: ``ok`` when ``errors`` is empty."""

    corpus: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_cells: int = 0
    n_genes: int = 0
    n_shards: int = 0
    n_datasets: int = 0
    genes_per_cell: tuple[float, float, float] | None = None  # min, median, max
    spliced_per_cell: tuple[float, float, float] | None = None
    unspliced_per_cell: tuple[float, float, float] | None = None
    targets: list[str] = field(default_factory=list)  # optional columns with at least one value

    @property
    def ok(self) -> bool:
        return not self.errors


class _ShardError(Exception):
    pass


def _first(bad: np.ndarray) -> int:
    return int(np.argmax(bad))


def _check_list(batch: pa.RecordBatch, name: str, where: str, ref_lengths: np.ndarray | None) -> pa.ListArray:
    arr = batch.column(name)
    if ref_lengths is not None:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        bad = valid & (lengths != ref_lengths)
        if bad.any():
            r = _first(bad)
            raise _ShardError(
                f"{where}: field {name!r} row {r} has {lengths[r]} values but gene_index {ref_lengths[r]}"
            )
    return arr


def _check_batch(batch: pa.RecordBatch, where: str, n_genes: int) -> dict[str, np.ndarray]:
    for f in CORPUS_SCHEMA:
        if not f.nullable and batch.column(f.name).null_count:
            r = _first(~batch.column(f.name).is_valid().to_numpy(zero_copy_only=False))
            raise _ShardError(f"{where}: required field {f.name!r} is null at row {r}")
    gi = batch.column(keys.GENE_INDEX)
    offsets = gi.offsets.to_numpy()
    lengths = np.diff(offsets)
    idx = gi.flatten().to_numpy()
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    if len(idx):
        bad = (idx < 0) | (idx >= n_genes)
        if bad.any():
            k = _first(bad)
            raise _ShardError(f"{where}: field 'gene_index' row {row_of[k]} holds {idx[k]}, outside [0, {n_genes})")
        step = np.diff(idx) <= 0
        step &= row_of[1:] == row_of[:-1]  # only within a row
        if step.any():
            k = _first(step)
            raise _ShardError(f"{where}: field 'gene_index' row {row_of[k]} is not sorted and unique")
    values = {}
    for name in (keys.SPLICED, keys.UNSPLICED):
        arr = _check_list(batch, name, where, lengths)
        v = arr.flatten().to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(v) | (v < 0)
        if bad.any():
            k = _first(bad)
            raise _ShardError(f"{where}: field {name!r} row {row_of[k]} holds {v[k]} (counts are finite and >= 0)")
        values[name] = v
    for name in (keys.VELOCITY, keys.VELOCITY_U):
        _check_list(batch, name, where, lengths)
    zero = (values[keys.SPLICED] + values[keys.UNSPLICED]) == 0
    if zero.any():
        k = _first(zero)
        raise _ShardError(f"{where}: row {row_of[k]} stores gene {idx[k]} with spliced + unspliced = 0")
    for name in (keys.MS, keys.MU):  # where present, a cell's moments are finite, >= 0 and aligned with its genes
        arr = _check_list(batch, name, where, lengths)
        if arr.null_count == len(arr):
            continue
        v = arr.flatten().to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(v) | (v < 0)
        if bad.any():
            k = _first(bad)
            raise _ShardError(f"{where}: field {name!r} holds {v[k]} (moments are finite and >= 0)")
    for name, lib in ((keys.SPLICED, keys.LIBRARY_SIZE_SPLICED), (keys.UNSPLICED, keys.LIBRARY_SIZE_UNSPLICED)):
        sums = np.bincount(row_of, values[name].astype(np.float64), len(lengths))
        got = batch.column(lib).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isclose(got, sums, rtol=LIBRARY_RTOL, atol=1e-3)
        if bad.any():
            r = _first(bad)
            raise _ShardError(f"{where}: field {lib!r} row {r} is {got[r]}, the stored {name} counts sum to {sums[r]}")
    return {
        "genes": lengths,
        "s": batch.column(keys.LIBRARY_SIZE_SPLICED).to_numpy(zero_copy_only=False),
        "u": batch.column(keys.LIBRARY_SIZE_UNSPLICED).to_numpy(zero_copy_only=False),
    }


def _check_shard(corpus: Path, manifest: Manifest, i: int, checksums: bool, acc: dict) -> None:
    info = manifest.shards[i]
    path = corpus / info.path
    where = info.path
    if not path.is_file():
        raise _ShardError(f"{where}: missing")
    if path.stat().st_size != info.bytes:
        raise _ShardError(f"{where}: {path.stat().st_size} bytes, manifest field 'bytes' says {info.bytes}")
    if checksums and sha256_file(path) != info.sha256:
        raise _ShardError(f"{where}: sha256 differs from manifest field 'sha256' (the file changed after writing)")
    try:
        with pa.memory_map(str(path)) as f:
            reader = pa.ipc.open_file(f)
            schema = reader.schema
            if not schema.equals(CORPUS_SCHEMA, check_metadata=False):
                raise _ShardError(f"{where}: Arrow schema differs from the corpus schema:\n{schema}")
            version = (schema.metadata or {}).get(b"fm.schema_version", b"").decode()
            if version != str(SCHEMA_VERSION):
                raise _ShardError(
                    f"{where}: schema metadata 'fm.schema_version' is {version!r}, expected {SCHEMA_VERSION}"
                )
            rows = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
            if rows != info.record_batch_rows:
                raise _ShardError(
                    f"{where}: record batches of {rows} rows, manifest field 'record_batch_rows' says "
                    f"{info.record_batch_rows}"
                )
            if any(r != manifest.record_batch_size for r in rows[:-1]):
                raise _ShardError(f"{where}: record batches other than the last must hold {manifest.record_batch_size}")
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                stats = _check_batch(batch, f"{where} (record batch {b})", manifest.n_genes)
                ds = batch.column(keys.DATASET_ID).to_numpy(zero_copy_only=False)
                if (ds != info.dataset_id).any():
                    raise _ShardError(
                        f"{where}: field 'dataset_id' holds {ds[ds != info.dataset_id][0]!r}, manifest "
                        f"says the shard is {info.dataset_id!r}"
                    )
                for k, v in stats.items():
                    acc[k].append(v)
                ids = batch.column(keys.CELL_ID).to_numpy(zero_copy_only=False).astype(object)
                acc["id_hash"].setdefault(info.dataset_id, []).append(pd.util.hash_array(ids))
                for name in (*keys.GENE_VALUE_COLUMNS, keys.CELL_TYPE, keys.TIME, keys.SIZE_FACTOR):
                    if batch.column(name).null_count < batch.num_rows:
                        acc["targets"].add(name)
    except pa.ArrowInvalid as e:
        raise _ShardError(f"{where}: not a readable Arrow IPC file ({e})") from e
    if sum(rows) != info.n_cells:
        raise _ShardError(f"{where}: {sum(rows)} cells, manifest field 'n_cells' says {info.n_cells}")


def validate(corpus: str | os.PathLike, *, checksums: bool = True) -> ValidationReport:
    """Check every file of ``corpus``; errors name the shard and the field. Never raises on a bad corpus."""
    corpus = Path(corpus)
    report = ValidationReport(corpus=str(corpus))
    try:
        manifest = load_manifest(corpus)
    except CorpusError as e:
        report.errors.append(str(e))
        return report
    report.n_genes, report.n_shards, report.n_datasets = manifest.n_genes, len(manifest.shards), len(manifest.datasets)
    if len(GeneVocab.load(corpus / "vocab.tsv")) != manifest.n_genes:
        report.errors.append(
            f"{corpus}/manifest.json: field 'n_genes' is {manifest.n_genes}, vocab.tsv has a different number of genes"
        )
    listed = {s.path for s in manifest.shards}
    for p in sorted((corpus / SHARD_DIR).glob("*")):
        rel = f"{SHARD_DIR}/{p.name}"
        if p.name.startswith("."):
            report.warnings.append(f"{rel}: temporary file of an interrupted conversion")
        elif rel not in listed:
            report.errors.append(f"{rel}: not listed in manifest.json")
    acc: dict = {"genes": [], "s": [], "u": [], "id_hash": {}, "targets": set()}
    for i in range(len(manifest.shards)):
        try:
            _check_shard(corpus, manifest, i, checksums, acc)
        except _ShardError as e:
            report.errors.append(str(e))
    known = {d.dataset_id for d in manifest.datasets}
    for ds, hashes in acc["id_hash"].items():
        h = np.concatenate(hashes)
        if len(np.unique(h)) != len(h):
            report.errors.append(f"dataset {ds!r}: field 'cell_id' is not unique")
        if ds not in known:
            report.errors.append(f"dataset {ds!r}: in the shards but not in manifest field 'datasets'")
    n = sum(len(g) for g in acc["genes"])
    report.n_cells = n
    if n != manifest.n_cells:
        report.errors.append(f"manifest.json: field 'n_cells' is {manifest.n_cells}, the shards hold {n}")
    if n:
        for name, k in (("genes_per_cell", "genes"), ("spliced_per_cell", "s"), ("unspliced_per_cell", "u")):
            v = np.concatenate(acc[k])
            setattr(report, name, (float(v.min()), float(np.median(v)), float(v.max())))
    report.targets = sorted(acc["targets"])
    return report


def print_report(report: ValidationReport) -> None:
    """The summary as a rich table, then warnings and errors (user-facing output of the CLI)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    if report.n_cells == 0 and report.errors:  # nothing could be read: a summary of zeros would only mislead
        for e in report.errors:
            console.print(f"[red]error[/]: {e}")
        return
    table = Table(title=f"corpus {report.corpus}: " + ("[green]valid[/]" if report.ok else "[red]INVALID[/]"))
    table.add_column("")
    table.add_column("min", justify="right")
    table.add_column("median", justify="right")
    table.add_column("max", justify="right")
    for label, v in (
        ("genes / cell", report.genes_per_cell),
        ("spliced counts / cell", report.spliced_per_cell),
        ("unspliced counts / cell", report.unspliced_per_cell),
    ):
        if v is not None:
            table.add_row(label, *(f"{x:,.0f}" for x in v))
    console.print(
        f"{report.n_cells:,} cells, {report.n_genes:,} genes in the vocabulary, {report.n_shards} shards, "
        f"{report.n_datasets} datasets; targets: {', '.join(report.targets) or 'none'}"
    )
    console.print(table)
    for w in report.warnings:
        console.print(f"[yellow]warning[/]: {w}")
    for e in report.errors:
        console.print(f"[red]error[/]: {e}")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate",
        help="check a corpus and summarise it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("corpus", help="corpus folder")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of every shard")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    report = validate(args.corpus, checksums=not args.no_checksums)
    print_report(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(run_step(add_parser, "python -m data_prep.validate"))
