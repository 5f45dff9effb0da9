"""Convert ``.h5ad`` / ``.loom`` files of spliced and unspliced counts into a corpus (docs/FORMAT.md).

    fm prep convert sim.h5ad --out corpus/                                   # builds the vocabulary
    fm prep convert a.h5ad b.loom --out corpus/ --vocab vocab.tsv --workers 2 --min-shared-counts 20
    python -m data_prep.convert sim.h5ad --out corpus/                       # the same, without the fm command

Two chunked passes per dataset, so peak memory depends on the chunk and shard sizes, never on the file size:
1. statistics: per-gene totals (spliced, unspliced, shared; cells) and per-cell totals, checking every count
   (finite, non-negative, integer unless ``allow_non_integer``); the filters and the vocabulary follow from them.
2. writing: one task per shard ``shards/part-NNNNN.arrow`` (deterministic names), run in ``workers`` processes.

Idempotent: each shard records the hash of the conversion settings; a re-run keeps the shards whose hash matches
(a killed run is finished, a finished one is left untouched), and refuses shards from other settings unless
``overwrite``. Atomic: shards are written under a temporary name then renamed; the manifest, written last, is
removed before anything is rewritten, so a corpus with a manifest is always a finished one.

Pass 1 lives in `data_prep.stats`, pass 2 in `data_prep.shard_tasks`, the target fields in `data_prep.targets`; this
module plans the shards, keeps a re-run idempotent and runs the tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from data_prep.neighbourhoods import NEIGHBOURHOOD_DIR, write_dataset_moments
from data_prep.shard_tasks import ShardTask, read_shard_info, shard_settings_hash, write_shard_task
from data_prep.sources import ConversionError
from data_prep.stats import BlockStats, FilterConfig, cell_mask, collect_stats, gene_mask, merge_stats
from data_prep.targets import DatasetSpec, TargetConfig, inspect_input
from data_prep.vocab import build_vocab
from fm import keys
from fm.command import run_step
from fm.data.genes import map_onto
from fm.data.schema import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_DIR,
    CorpusError,
    DatasetInfo,
    Manifest,
    load_manifest,
)
from fm.data.vocab import GeneVocab
from fm.data.writer import shard_name, write_manifest
from fm.progress import progress_bar
from fm.velocity.neighbours import NORMALIZATIONS, NeighbourConfig
from fm.velocity.teachers import METHODS, TeacherConfig

__all__ = ["ConversionError", "FilterConfig", "TargetConfig", "convert", "add_parser"]

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the same settings would write different shards
LOCK_NAME = ".convert.lock"


def _settings_hash(datasets: list[DatasetSpec], settings: dict) -> str:
    files = []
    for ds in datasets:
        st = os.stat(ds.path)
        files.append(
            {**asdict(ds), "path": str(Path(ds.path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        )
    blob = json.dumps(
        {"files": files, **settings, "schema": SCHEMA_VERSION, "converter": CONVERTER_VERSION},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class _Lock:
    """``CORPUS/.convert.lock``: one conversion per corpus folder at a time; a stale lock (dead pid) is taken over."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = int(self.path.read_text().strip() or 0)
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, ValueError):
                log.warning("%s: taking over the lock of a conversion that no longer runs (pid %d)", self.path, pid)
                self.path.unlink(missing_ok=True)
                return self.__enter__()
            raise ConversionError(f"{self.path}: another conversion (pid {pid}) is writing this corpus") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes from a fork server that has imported this module once (fast and fork-safe), or None."""
    if workers <= 1:
        return None
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.convert"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _run(fn, tasks: list[tuple], pool: ProcessPoolExecutor | None, progress, task_id, weights: list[int]) -> Iterator:
    """Run ``fn(*args)`` for each task, inline (advancing per chunk) or in ``pool``; results in task order."""
    if pool is None:
        for args in tasks:
            yield fn(*args, on_chunk=lambda n: progress.advance(task_id, n))
        return
    futures = [pool.submit(fn, *args) for args in tasks]
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                progress.advance(task_id, weights[futures.index(fut)])
                fut.result()  # raises the worker's error here
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    for fut in futures:
        yield fut.result()


@dataclass
class _Job:
    """One conversion, its inputs inspected and its settings checked by :func:`convert`."""

    paths: list[Path]
    out: Path
    datasets: list[DatasetSpec]
    inspected: list[tuple]  # (DatasetSpec, gene ids or None, symbols) per input
    given_vocab: GeneVocab | None
    filters: FilterConfig
    settings_hash: str
    workers: int
    shard_size: int
    record_batch_size: int
    allow_non_integer: bool
    overwrite: bool
    progress: bool
    neighbours: NeighbourConfig
    velocity_teacher: TeacherConfig | None


def convert(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    vocab: str | os.PathLike | None = None,
    *,
    workers: int = 1,
    filters: FilterConfig = FilterConfig(),  # noqa: B008 (frozen, so one shared default is safe)
    targets: TargetConfig = TargetConfig(),  # noqa: B008
    shard_size: int = 8192,
    record_batch_size: int = 1024,
    allow_non_integer: bool = False,
    dataset_ids: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    neighbours: NeighbourConfig = NeighbourConfig(),  # noqa: B008 (frozen)
    velocity_teacher: str | TeacherConfig | None = None,
) -> Manifest:
    """Convert ``inputs`` into the corpus folder ``out`` and return its manifest.

    Args:
        inputs: ``.h5ad`` / ``.loom`` files with layers ``spliced`` and ``unspliced`` (cells x genes).
        out: the corpus folder (created).
        vocab: a ``vocab.tsv`` to map onto; None builds the union of the inputs' genes that pass the filters.
        workers: processes for both passes.
        filters: scVelo-style cell and gene filters.
        targets: which optional fields become target columns.
        shard_size: cells per shard (a shard holds cells of one dataset; the last of a dataset may be shorter).
        record_batch_size: cells per record batch, also the rows read per chunk.
        allow_non_integer: accept non-integer counts (normalised or imputed data).
        dataset_ids: one per input; default the file stems.
        overwrite: replace shards written with other settings instead of stopping.
        progress: show rich progress bars.
        neighbours: each dataset's neighbourhood, whose moments are stored as ``Ms``/``Mu``
            (``NeighbourConfig(n_neighbours=0)``: none).
        velocity_teacher: a teacher (fm.velocity.teachers: ``steady_state``, ``stochastic``, ``dynamical``) whose
            velocity on each dataset's moments becomes the ``velocity`` target, in place of any velocity layer of
            the inputs (NaN at genes it could not fit or flags as no velocity gene).
    Raises:
        ConversionError: bad input, naming the file and the field; nothing is left half-written.
    """
    if workers < 1 or shard_size < 1 or record_batch_size < 1:
        raise ValueError(
            f"workers, shard_size and record_batch_size must be >= 1 (got {workers}, {shard_size}, {record_batch_size})"
        )
    if not inputs:
        raise ValueError("convert: no input files")
    paths = [Path(p) for p in inputs]
    dataset_ids = list(dataset_ids) if dataset_ids is not None else [p.stem for p in paths]
    if len(dataset_ids) != len(paths):
        raise ValueError(f"convert: {len(paths)} inputs but {len(dataset_ids)} dataset ids")
    if len(set(dataset_ids)) != len(dataset_ids):
        raise ConversionError(f"duplicate dataset ids {dataset_ids}; give distinct ones (--dataset-id)")
    if isinstance(velocity_teacher, str):
        velocity_teacher = TeacherConfig(method=velocity_teacher)
    if velocity_teacher is not None and not neighbours.enabled:
        raise ConversionError("a velocity teacher works on moments; it needs neighbours (--neighbours >= 1)")
    given_vocab = GeneVocab.load(vocab) if vocab is not None else None
    inspected = [inspect_input(p, d, targets) for p, d in zip(paths, dataset_ids, strict=True)]
    if velocity_teacher is not None:  # the teacher's velocity replaces the inputs' own velocity layers
        for k, (ds, ids, syms) in enumerate(inspected):
            if ds.velocity is not None or ds.velocity_u is not None:
                log.warning("%s: its velocity layers are not stored; the %s teacher writes the velocity target",
                            ds.path, velocity_teacher.method)
            inspected[k] = (replace(ds, velocity=None, velocity_u=None), ids, syms)
    datasets = [ds for ds, _, _ in inspected]
    settings = {
        "filters": asdict(filters),
        "vocab": given_vocab.hash if given_vocab else None,
        "shard_size": shard_size,
        "record_batch_size": record_batch_size,
        "allow_non_integer": allow_non_integer,
        "neighbours": neighbours.to_dict(),
        "velocity_teacher": velocity_teacher.to_dict() if velocity_teacher is not None else None,
    }
    settings_hash = _settings_hash(datasets, settings)
    out = Path(out)
    created = not out.exists()
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    try:
        with _Lock(out):
            done = _up_to_date(out, settings_hash)
            if done is not None:
                log.info("%s: up to date (settings %s); nothing to do", out, settings_hash[:12])
                return done
            return _convert_locked(
                _Job(paths, out, datasets, inspected, given_vocab, filters, settings_hash, workers, shard_size,
                     record_batch_size, allow_non_integer, overwrite, progress, neighbours, velocity_teacher)
            )
    except ConversionError:
        if created:  # bad input into a new folder: leave nothing behind (an interrupted run keeps its shards)
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:  # the neighbourhoods' working files (each run computes them anew)
        shutil.rmtree(out / NEIGHBOURHOOD_DIR, ignore_errors=True)


def _up_to_date(out: Path, settings_hash: str) -> Manifest | None:
    """The manifest of a finished corpus written with these settings, or None."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = load_manifest(out)
    except CorpusError:
        return None
    if any(d.filters.get("settings_hash") != settings_hash for d in manifest.datasets):
        return None
    for s in manifest.shards:
        p = out / s.path
        if not p.is_file() or p.stat().st_size != s.bytes or shard_settings_hash(p) != settings_hash:
            return None
    return manifest


def _convert_locked(job: _Job) -> Manifest:
    shard_dir = job.out / SHARD_DIR
    # shards from other settings: refuse before any work, unless asked to replace them
    foreign = [p for p in sorted(shard_dir.glob("part-*.arrow")) if shard_settings_hash(p) != job.settings_hash]
    if foreign and not job.overwrite:
        raise ConversionError(
            f"{job.out}: {len(foreign)} shards (e.g. {foreign[0].name}) were written with other settings or inputs; "
            f"use --overwrite to replace them, or another --out"
        )
    chunk = job.record_batch_size
    pool = _pool(job.workers)
    with progress_bar(job.progress) as bar, pool or contextlib.nullcontext():
        # pass 1: statistics, in blocks of shard_size rows
        tasks, weights, owners = [], [], []
        for k, ds in enumerate(job.datasets):
            for a in range(0, ds.n_cells, job.shard_size):
                b = min(a + job.shard_size, ds.n_cells)
                tasks.append((ds, a, b, chunk, job.allow_non_integer))
                weights.append(b - a)
                owners.append(k)
        tid = bar.add_task("statistics", total=sum(weights))
        parts: list[list[BlockStats]] = [[] for _ in job.datasets]
        for k, st in zip(owners, _run(collect_stats, tasks, pool, bar, tid, weights), strict=True):
            parts[k].append(st)
        stats = [merge_stats(p) for p in parts]

        # filters, vocabulary, mapping
        gene_keep = [gene_mask(st, job.filters) for st in stats]
        for ds, st in zip(job.datasets, stats, strict=True):
            h = st.cell_id_hash
            if len(np.unique(h)) != len(h):
                raise ConversionError(f"{ds.path}: the cell names (obs_names) are not unique")
        if job.given_vocab is None:
            vocab = build_vocab(
                (
                    [ids[i] for i in np.flatnonzero(keep)] if ids is not None else None,
                    [syms[i] for i in np.flatnonzero(keep)],
                )
                for (_, ids, syms), keep in zip(job.inspected, gene_keep, strict=True)
            )
        else:
            vocab = job.given_vocab
        plan: list[ShardTask] = []
        infos: list[DatasetInfo] = []
        mapped = [map_onto(vocab, ids, syms, keep)
                  for (_, ids, syms), keep in zip(job.inspected, gene_keep, strict=True)]
        kept_cells = [np.flatnonzero(cell_mask(st, job.filters)) for st in stats]
        stored_genes = []
        for index, _ in mapped:
            genes = np.flatnonzero(index >= 0)
            stored_genes.append(genes[np.argsort(index[genes], kind="stable")])
        moment_files: list[list[str]] = [[] for _ in job.datasets]
        if job.neighbours.enabled:  # between the passes: each dataset's graph and moments, one file per shard
            nb_dir = job.out / NEIGHBOURHOOD_DIR
            nb_tasks = [(ds, cells, genes, job.neighbours, chunk, job.shard_size, str(nb_dir / str(k)),
                         job.velocity_teacher)
                        for k, (ds, cells, genes) in enumerate(zip(job.datasets, kept_cells, stored_genes,
                                                                   strict=True))]
            tid = bar.add_task("neighbourhoods", total=sum(len(c) for c in kept_cells))
            weights = [len(c) for c in kept_cells]
            for k, (cells, files) in enumerate(_run(write_dataset_moments, nb_tasks, pool, bar, tid, weights)):
                kept_cells[k], moment_files[k] = cells, files
        per_input = zip(job.paths, job.datasets, mapped, kept_cells, stored_genes, moment_files, gene_keep,
                        strict=True)
        for path, ds, (index, mapping), cells, genes, files, keep in per_input:
            log.info(
                "%s: %d/%d cells pass the cell filters, %d/%d genes the gene filters; %s",
                ds.dataset_id,
                len(cells),
                ds.n_cells,
                int(keep.sum()),
                ds.n_genes,
                mapping.summary(),
            )
            if mapping.unmatched:
                log.warning("%s: %d genes not in the vocabulary are not stored", ds.dataset_id, len(mapping.unmatched))
            for k, a in enumerate(range(0, len(cells), job.shard_size)):
                plan.append(
                    ShardTask(
                        index=len(plan),
                        dataset=ds,
                        rows=cells[a : a + job.shard_size],
                        genes=genes,
                        vocab_index=index[genes],
                        path=str(shard_dir / shard_name(len(plan))),
                        settings_hash=job.settings_hash,
                        record_batch_size=job.record_batch_size,
                        moments=files[k] if files else None,
                    )
                )
            infos.append(
                DatasetInfo(
                    dataset_id=ds.dataset_id,
                    source=str(path),
                    n_cells_in=ds.n_cells,
                    n_cells_out=0,
                    n_genes_in=ds.n_genes,
                    n_genes_matched=mapping.n_matched,
                    n_genes_unmatched=len(mapping.unmatched),
                    filters={
                        **asdict(job.filters),
                        "n_cells_failing_filters": int(ds.n_cells - len(cells)),
                        "n_genes_failing_filters": int((~keep).sum()),
                        "unmatched_genes": mapping.unmatched[:100],
                        "settings_hash": job.settings_hash,
                        "allow_non_integer": job.allow_non_integer,
                        "velocity_teacher": job.velocity_teacher.method if job.velocity_teacher else "none",
                    },
                    targets=ds.targets + ([keys.VELOCITY] if job.velocity_teacher is not None else [])
                    + ([keys.MS, keys.MU] if job.neighbours.enabled else []),
                    neighbourhood=job.neighbours.to_dict() if job.neighbours.enabled else {},
                )
            )

        # pass 2: one task per shard; finished shards (same settings) are kept. The input is known to be good now.
        (job.out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the corpus is not a finished one
        for p in shard_dir.glob(".*.tmp-*"):  # temporary files of a killed run
            log.info("removing %s, left by an interrupted run", p)
            p.unlink()
        for p in foreign:
            p.unlink()
        planned = {Path(t.path).name for t in plan}
        for p in shard_dir.glob("part-*.arrow"):
            if p.name not in planned:
                p.unlink()
        todo = [t for t in plan if shard_settings_hash(Path(t.path)) != job.settings_hash]
        todo_index = {t.index for t in todo}
        kept = [t for t in plan if t.index not in todo_index]
        if kept:
            log.info("%d of %d shards already written with these settings; keeping them", len(kept), len(plan))
        tid = bar.add_task("shards", total=sum(len(t.rows) for t in todo))
        written = list(_run(write_shard_task, [(t,) for t in todo], pool, bar, tid, [len(t.rows) for t in todo]))
    shard_infos = {t.index: info for t, (info, _) in zip(todo, written, strict=True)}
    for t in kept:
        shard_infos[t.index] = read_shard_info(Path(t.path), t.dataset.dataset_id)
    dropped = sum(n for _, n in written)
    if dropped:
        log.info("%d cells had no stored gene (after gene filters and vocabulary) and are not stored", dropped)
    shards = [shard_infos[t.index] for t in plan]
    for info in infos:
        info.n_cells_out = sum(s.n_cells for s in shards if s.dataset_id == info.dataset_id)
    manifest = write_manifest(job.out, vocab, shards, infos, record_batch_size=job.record_batch_size)
    log.info("%s: %d cells, %d shards, %d genes", job.out, manifest.n_cells, len(shards), len(vocab))
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# command line


def _optional_name(value: str) -> str | None:
    return None if value.lower() == "none" else value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert .h5ad/.loom files into a corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help=".h5ad or .loom files")
    p.add_argument("--out", required=True, help="corpus folder")
    p.add_argument("--vocab", help="map onto this vocab.tsv (default: build the union of the inputs' genes)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=8192, help="cells per shard")
    p.add_argument("--record-batch-size", type=int, default=1024, help="cells per record batch")
    p.add_argument("--allow-non-integer", action="store_true", help="accept non-integer counts")
    p.add_argument("--overwrite", action="store_true", help="replace shards written with other settings")
    p.add_argument("--dataset-id", action="append", dest="dataset_ids", help="one per input (default: file stem)")
    p.add_argument("--no-progress", action="store_true")
    nb = NeighbourConfig()
    p.add_argument("--neighbours", type=int, default=nb.n_neighbours,
                   help=f"neighbours per cell for the moments Ms/Mu (default {nb.n_neighbours}; 0: none)")
    p.add_argument("--pcs", type=int, default=nb.n_pcs, help=f"principal components of the kNN graph ({nb.n_pcs})")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default=nb.normalization,
                   help="normalisation of the moments, as the tokenizer's data.normalization (default total)")
    p.add_argument("--velocity-teacher", choices=METHODS, default=None,
                   help="write this teacher's velocity (fm velocity --method) as the velocity target (default: none; "
                        "a velocity layer of the input is stored as it is)")
    for f in fields(FilterConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=f.default, help="filter (default 0)")
    t = TargetConfig()
    for name, help_ in (
        ("velocity_layer", "layer -> velocity ('auto': velocity_true, velocity; 'none')"),
        ("velocity_u_layer", "layer -> velocity_u ('auto': velocity_u_true, velocity_u; 'none')"),
        ("cell_type_key", "obs column -> cell_type ('auto': clusters; 'none')"),
        ("time_key", "obs column -> time ('auto': time_true, latent_time, velocity_pseudotime, dpt_pseudotime)"),
        ("size_factor_key", "obs column -> size_factor (default none)"),
    ):
        default = getattr(t, name)
        p.add_argument("--" + name.replace("_", "-"), type=_optional_name, default=default, help=help_)
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    filters = FilterConfig(
        **{
            f.name: (int(getattr(args, f.name)) if f.type in (int, "int") else getattr(args, f.name))
            for f in fields(FilterConfig)
        }
    )
    targets = TargetConfig(**{f.name: getattr(args, f.name) for f in fields(TargetConfig)})
    try:
        convert(
            args.inputs,
            args.out,
            args.vocab,
            workers=args.workers,
            filters=filters,
            targets=targets,
            shard_size=args.shard_size,
            record_batch_size=args.record_batch_size,
            allow_non_integer=args.allow_non_integer,
            dataset_ids=args.dataset_ids,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            neighbours=NeighbourConfig(n_neighbours=args.neighbours, n_pcs=args.pcs, normalization=args.normalization),
            velocity_teacher=args.velocity_teacher,
        )
    except (ConversionError, CorpusError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_step(add_parser, "python -m data_prep.convert"))
