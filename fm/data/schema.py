"""The corpus format: Arrow schema, schema version, manifest, and the checks a reader makes before it reads.

A corpus is a folder (docs/FORMAT.md):

    CORPUS/manifest.json       schema version, vocab hash, per shard: cells, record batches, bytes, sha256
    CORPUS/vocab.tsv           the gene vocabulary (fm.data.vocab)
    CORPUS/shards/part-NNNNN.arrow   Arrow IPC file (feather v2), one row per cell

Readers call :func:`load_manifest`, which checks the schema version and that ``vocab.tsv`` hashes to what the
manifest says, before any shard is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from fm import keys
from fm.data.errors import CorpusError
from fm.data.vocab import GeneVocab

SCHEMA_VERSION = 2  # 2: moments (Ms, Mu) and each dataset's neighbourhood settings
FORMAT_NAME = "fm-corpus"
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.tsv"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".arrow"

CORPUS_SCHEMA = pa.schema(
    [
        pa.field(keys.CELL_ID, pa.string(), nullable=False),
        pa.field(keys.DATASET_ID, pa.string(), nullable=False),
        pa.field(keys.GENE_INDEX, pa.list_(pa.int32()), nullable=False),
        pa.field(keys.SPLICED, pa.list_(pa.float32()), nullable=False),
        pa.field(keys.UNSPLICED, pa.list_(pa.float32()), nullable=False),
        pa.field(keys.LIBRARY_SIZE_SPLICED, pa.float32(), nullable=False),
        pa.field(keys.LIBRARY_SIZE_UNSPLICED, pa.float32(), nullable=False),
        pa.field(keys.VELOCITY, pa.list_(pa.float32()), nullable=True),
        pa.field(keys.VELOCITY_U, pa.list_(pa.float32()), nullable=True),
        pa.field(keys.CELL_TYPE, pa.string(), nullable=True),
        pa.field(keys.TIME, pa.float32(), nullable=True),
        pa.field(keys.SIZE_FACTOR, pa.float32(), nullable=True),
        pa.field(keys.MS, pa.list_(pa.float32()), nullable=True),
        pa.field(keys.MU, pa.list_(pa.float32()), nullable=True),
    ],
    metadata={b"fm.schema_version": str(SCHEMA_VERSION).encode()},
)


@dataclass
class ShardInfo:
    """One shard as the manifest records it."""

    path: str  # relative to the corpus folder, e.g. "shards/part-00000.arrow"
    n_cells: int
    n_record_batches: int
    record_batch_rows: list[int]  # rows of each record batch, in order
    bytes: int
    sha256: str
    dataset_id: str


@dataclass
class DatasetInfo:
    """One source dataset as the manifest records it."""

    dataset_id: str
    source: str  # the source file as given to the converter
    n_cells_in: int
    n_cells_out: int
    n_genes_in: int
    n_genes_matched: int  # genes of the source found in the vocabulary (after gene filters)
    n_genes_unmatched: int
    filters: dict[str, Any] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)  # optional columns the dataset fills
    neighbourhood: dict[str, Any] = field(default_factory=dict)  # fm.velocity.NeighbourConfig fields; {}: none


@dataclass
class Manifest:
    """The corpus manifest (``manifest.json``)."""

    schema_version: int
    vocab_hash: str
    n_genes: int
    n_cells: int
    record_batch_size: int
    shards: list[ShardInfo]
    datasets: list[DatasetInfo]
    format: str = FORMAT_NAME
    fm_version: str = ""
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = MANIFEST_NAME) -> Manifest:
        try:
            shards = [ShardInfo(**s) for s in d["shards"]]
            datasets = [DatasetInfo(**s) for s in d["datasets"]]
            rest = {k: v for k, v in d.items() if k not in ("shards", "datasets")}
            return cls(shards=shards, datasets=datasets, **rest)
        except (KeyError, TypeError) as e:
            raise CorpusError(f"{where}: malformed manifest ({e})") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(corpus: str | os.PathLike, *, check_vocab: bool = True) -> Manifest:
    """Read and check ``CORPUS/manifest.json``: format, schema version and (by default) the vocabulary hash."""
    corpus = Path(corpus)
    path = corpus / MANIFEST_NAME
    if not corpus.is_dir():
        raise CorpusError(f"{corpus}: not a corpus folder (it does not exist or is not a directory)")
    if not path.is_file():
        raise CorpusError(f"{path}: missing; is {corpus} a finished corpus? (fm prep convert writes it last)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from e
    if d.get("format") != FORMAT_NAME:
        raise CorpusError(f"{path}: field 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
    if d.get("schema_version") != SCHEMA_VERSION:
        sources = " ".join(str(x.get("source", "?")) for x in d.get("datasets", [])[:3]) or "INPUTS"
        raise CorpusError(
            f"{path}: field 'schema_version' is {d.get('schema_version')!r}, this fm reads {SCHEMA_VERSION} "
            f"(version 2 adds each cell's moments over its dataset's neighbourhood); rebuild the corpus from its "
            f"inputs: fm prep convert {sources} --out {corpus} --overwrite"
        )
    manifest = Manifest.from_dict(d, where=str(path))
    if check_vocab:
        vocab = GeneVocab.load(corpus / VOCAB_NAME)
        if vocab.hash != manifest.vocab_hash:
            raise CorpusError(
                f"{corpus / VOCAB_NAME}: hash {vocab.hash[:12]} does not match manifest field 'vocab_hash' "
                f"{manifest.vocab_hash[:12]}; the vocabulary was changed after conversion"
            )
    return manifest
