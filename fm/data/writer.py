"""Write corpus shards and the manifest, atomically: a temporary name, then a rename.

The converter (data_prep/convert.py) and tests that build small corpora by hand both write through here, so a
corpus on disk is always made one way:

    info = write_shard(corpus / "shards/part-00000.arrow", table, record_batch_size=1024, dataset_id="sim")
    write_manifest(corpus, vocab, [info], [dataset_info], record_batch_size=1024)
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import pyarrow as pa

from fm import __version__, keys
from fm.data.schema import (
    CORPUS_SCHEMA,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    VOCAB_NAME,
    DatasetInfo,
    Manifest,
    ShardInfo,
    sha256_file,
)
from fm.data.shards import hash_unit_interval, write_shard_index
from fm.data.vocab import GeneVocab
from fm.io import atomic_path, atomic_write_text


def shard_name(index: int) -> str:
    return f"part-{index:05d}.arrow"


def conform(table: pa.Table) -> pa.Table:
    """Return ``table`` with exactly the corpus schema's columns, in order; absent optional columns become null."""
    columns = []
    for f in CORPUS_SCHEMA:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"shard table lacks required column {f.name!r}")
    return pa.Table.from_arrays(columns, schema=CORPUS_SCHEMA)


def write_shard(
    path: str | os.PathLike,
    table: pa.Table,
    *,
    record_batch_size: int,
    dataset_id: str,
    metadata: dict[str, str] | None = None,
) -> ShardInfo:
    """Write ``table`` as an Arrow IPC file of fixed-size record batches at ``path`` (atomically).

    Args:
        path: the final shard path (``CORPUS/shards/part-NNNNN.arrow``).
        table: rows of cells; converted to the corpus schema by :func:`conform`.
        record_batch_size: rows per record batch (the last one may be shorter).
        dataset_id: recorded in the manifest entry.
        metadata: extra key/value pairs stored in the file's schema metadata (e.g. the conversion settings hash).
    Returns:
        The shard's manifest entry; its path is relative to the corpus folder.
    """
    path = Path(path)
    if record_batch_size < 1:
        raise ValueError(f"record_batch_size must be >= 1, got {record_batch_size}")
    table = conform(table)
    schema = CORPUS_SCHEMA
    if metadata:
        extra = {k.encode(): v.encode() for k, v in metadata.items()}
        schema = schema.with_metadata({**CORPUS_SCHEMA.metadata, **extra})
    batches = table.to_batches(max_chunksize=record_batch_size)
    # to_batches may split at chunk borders below the size; re-chunk so every batch but the last is full
    table = pa.Table.from_batches(batches, schema=CORPUS_SCHEMA).combine_chunks()
    batches = table.to_batches(max_chunksize=record_batch_size)
    rows = [b.num_rows for b in batches]
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b.replace_schema_metadata(schema.metadata))
    stat = path.stat()
    info = ShardInfo(
        path=f"{path.parent.name}/{path.name}",
        n_cells=table.num_rows,
        n_record_batches=len(rows),
        record_batch_rows=rows,
        bytes=stat.st_size,
        sha256=sha256_file(path),
        dataset_id=dataset_id,
    )
    # the start-up index (fm.data.shards): cell hashes for the split, and this verification's stamp
    cell_hash = hash_unit_interval(table.column(keys.DATASET_ID).combine_chunks(),
                                   table.column(keys.CELL_ID).combine_chunks())
    write_shard_index(path.parent.parent, info, cell_hash, verified=(stat.st_size, stat.st_mtime_ns))
    return info


def write_manifest(
    corpus: str | os.PathLike,
    vocab: GeneVocab,
    shards: list[ShardInfo],
    datasets: list[DatasetInfo],
    *,
    record_batch_size: int,
) -> Manifest:
    """Write ``vocab.tsv`` and then ``manifest.json`` (last, so a corpus with a manifest is a finished one)."""
    corpus = Path(corpus)
    vocab.save(corpus / VOCAB_NAME)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        vocab_hash=vocab.hash,
        n_genes=len(vocab),
        n_cells=sum(s.n_cells for s in shards),
        record_batch_size=record_batch_size,
        shards=sorted(shards, key=lambda s: s.path),
        datasets=datasets,
        fm_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    atomic_write_text(corpus / MANIFEST_NAME, manifest.to_json())
    return manifest
