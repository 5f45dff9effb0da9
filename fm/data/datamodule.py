"""CorpusDataModule: a corpus folder as Lightning train/validation dataloaders (DESIGN §2-4).

Construction reads and checks the manifest (format, schema version, vocabulary hash) and loads the vocabulary, so
``dm.vocab`` and ``dm.manifest`` exist before ``setup``. ``setup`` checks every shard (size, Arrow footer, schema;
sha256 once per file version unless ``verify_checksums`` is off; every record batch and a fresh sha256 with
``deep_check``: fm.data.shards) and splits the cells:

* ``split="hash"``: a cell is in validation iff a stable 64-bit hash of (dataset_id, cell_id) falls below
  ``val_fraction`` (fm.data.shards.hash_unit_interval), the same on every machine and run;
* ``split="dataset"``: validation is the datasets listed in ``val_datasets``.

The training loader is a fm.data.stream.ShardedDataLoader: Lightning stores its ``state_dict`` in the checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and restores it on resume; the datamodule's own ``state_dict``
records the data settings and the vocabulary hash (checked on load) and carries the stream state too. Validation
reads its cells in corpus order, the same every epoch (``wrap`` so no cell is left out).

    python -c "from fm.data.datamodule import CorpusDataModule as D; d = D(corpus='CORPUS'); d.setup('fit'); \\
        print(next(iter(d.train_dataloader())).keys())"
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np

from fm import keys
from fm.data.schema import VOCAB_NAME, CorpusError, Manifest, load_manifest
from fm.data.shards import REMAINDERS, ShardReader, UnitIndex, check_shards, unit_cell_hashes
from fm.data.stream import ShardedArrowDataset, ShardedDataLoader
from fm.data.tokenize import TokenizerConfig
from fm.data.vocab import GeneVocab
from fm.distributed import get_rank, get_world_size

log = logging.getLogger(__name__)

SPLITS = ("hash", "dataset")


@dataclass
class DataConfig:
    """Everything the data side of training needs; checked on construction."""

    corpus: str  # corpus folder (manifest.json, vocab.tsv, shards/)
    batch_size: int = 32  # cells per batch per rank
    num_workers: int = 0  # DataLoader workers per rank (readers per rank)
    max_genes: int = 1024  # gene tokens per cell and modality
    gene_set: str = "cell"  # cell: each cell's stored genes | batch: the batch's genes in every cell (fm.data.tokenize)
    gene_sampling: str = "random"  # random | top_expressed, when a cell has more than max_genes genes
    normalization: str = "total"  # total | size_factor | none, then log1p
    target_sum: float = 1e4  # library size after `total` normalisation
    seed: int = 0  # seed of the deal, shuffle and gene sampling
    val_fraction: float = 0.05  # split="hash": share of cells in validation
    split: str = "hash"  # hash (of dataset_id + cell_id) | dataset (val_datasets)
    val_datasets: list[str] = field(default_factory=list)  # split="dataset": the validation datasets
    remainder: str = "wrap"  # drop | wrap: how ranks get equal batch counts (fm.data.shards)
    shuffle_buffer: int = 8192  # cells per shuffle window
    length_bucketing: bool = False  # batch cells of similar length (less padding; see docs/BENCHMARKS.md)
    tolerant: bool = False  # skip (and log) shards that fail their checks instead of failing
    verify_checksums: bool = True  # sha256 of every shard against the manifest, once per file version (stamped in
    # CORPUS/index/; sizes, footers and schemas are checked at every start)
    deep_check: bool = False  # at every start: sha256 every shard, read every record batch, hash every cell id
    val_batch_size: int | None = None  # default: batch_size
    pin_memory: bool = False
    pad_to_multiple: int = 1  # gene tokens per modality padded to a multiple of this (few shapes for flex; 1: off)

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"DataConfig.{name} {what}, got {getattr(self, name)!r}")

        self.corpus = str(self.corpus)
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an int >= 1")
        need(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "must be an int >= 0")
        need(isinstance(self.seed, int), "seed", "must be an int")
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        need(self.split in SPLITS, "split", f"must be one of {SPLITS}")
        self.val_datasets = list(self.val_datasets)
        need(self.split == "dataset" or not self.val_datasets, "val_datasets", "needs split='dataset'")
        need(self.split != "dataset" or bool(self.val_datasets), "val_datasets", "must list datasets (split='dataset')")
        need(self.remainder in REMAINDERS, "remainder", f"must be one of {REMAINDERS}")
        need(isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 0, "shuffle_buffer", "must be an int >= 0")
        need(self.val_batch_size is None or (isinstance(self.val_batch_size, int) and self.val_batch_size >= 1),
             "val_batch_size", "must be None or an int >= 1")
        self.tokenizer  # noqa: B018 (validates the tokenizer fields, naming them)

    @property
    def tokenizer(self) -> TokenizerConfig:
        return TokenizerConfig(max_genes=self.max_genes, gene_set=self.gene_set, gene_sampling=self.gene_sampling,
                               normalization=self.normalization, target_sum=self.target_sum,
                               pad_to_multiple=self.pad_to_multiple)


_RECORDED = ("max_genes", "gene_set", "gene_sampling", "normalization", "target_sum", "split", "val_fraction",
             "val_datasets")


class CorpusDataModule(L.LightningDataModule):
    """Train/validation batches of a corpus; keyword arguments are DataConfig's fields."""

    def __init__(self, corpus: str, batch_size: int = 32, num_workers: int = 0, max_genes: int = 1024,
                 gene_set: str = "cell", gene_sampling: str = "random", normalization: str = "total",
                 target_sum: float = 1e4, seed: int = 0,
                 val_fraction: float = 0.05, split: str = "hash", val_datasets: list[str] | None = None,
                 remainder: str = "wrap", shuffle_buffer: int = 8192, length_bucketing: bool = False,
                 tolerant: bool = False, verify_checksums: bool = True, val_batch_size: int | None = None,
                 pin_memory: bool = False, pad_to_multiple: int = 1, deep_check: bool = False):
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        args["val_datasets"] = list(val_datasets or [])
        self.config = DataConfig(**args)
        self.save_hyperparameters(asdict(self.config))
        self.manifest = load_manifest(self.config.corpus)
        self.vocab = GeneVocab.load(Path(self.config.corpus) / VOCAB_NAME)
        known = {d.dataset_id for d in self.manifest.datasets} | {s.dataset_id for s in self.manifest.shards}
        unknown = sorted(set(self.config.val_datasets) - known)
        if unknown:
            raise ValueError(f"DataConfig.val_datasets: {unknown} not in the corpus (it has {sorted(known)})")
        # recorded in checkpoints and releases, so fm predict computes the moments the model was trained on
        self.hparams["neighbourhood"] = corpus_neighbourhood(self.manifest, self.config.tokenizer, self.config.corpus)
        self.train_index: UnitIndex | None = None
        self.val_index: UnitIndex | None = None
        self._train_loader: ShardedDataLoader | None = None
        self._stream_state: dict | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage: str | None = None) -> None:
        if self.train_index is not None:
            return
        cfg = self.config
        ok = check_shards(cfg.corpus, self.manifest, checksum=cfg.verify_checksums, tolerant=cfg.tolerant,
                          deep=cfg.deep_check)
        index = UnitIndex.from_manifest(cfg.corpus, self.manifest, ok)
        self.train_index, self.val_index = split_index(index, cfg)
        log.info("corpus %s: %d train cells in %d units, %d validation cells in %d units", cfg.corpus,
                 self.train_index.n_cells, self.train_index.n_units, self.val_index.n_cells, self.val_index.n_units)

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return get_rank(), get_world_size()

    def train_dataloader(self) -> ShardedDataLoader:
        self.setup()
        cfg = self.config
        rank, world = self._rank_and_world_size()
        ds = ShardedArrowDataset(self.train_index, batch_size=cfg.batch_size, tokenizer=cfg.tokenizer, seed=cfg.seed,
                                 shuffle=True, shuffle_buffer=cfg.shuffle_buffer, remainder=cfg.remainder,
                                 length_bucketing=cfg.length_bucketing, rank=rank, world_size=world)
        self._train_loader = ShardedDataLoader(ds, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory)
        if self._stream_state is not None:
            self._train_loader.load_state_dict(self._stream_state)
            self._stream_state = None
        return self._train_loader

    def sample_batches(self, n_cells: int):
        """Batches of about ``n_cells`` training cells, shuffled (``seed``), read in this process by a stream of its own
        (the training loader and its resumable state are untouched): what a head warm-starts on. Every stored gene of
        a cell is a token (no ``max_genes`` sampling), so a fit on them sees each cell whole."""
        self.setup()
        cfg = self.config
        whole = replace(cfg.tokenizer, max_genes=max(len(self.vocab), 1), gene_set="cell")
        ds = ShardedArrowDataset(self.train_index, batch_size=cfg.batch_size, tokenizer=whole, seed=cfg.seed,
                                 shuffle=True, shuffle_buffer=cfg.shuffle_buffer, remainder="wrap", rank=0,
                                 world_size=1)
        n = 0
        for batch in ShardedDataLoader(ds, num_workers=0, fixed_epoch=0):
            yield batch
            n += batch[keys.B_GENE_MASK].shape[0]
            if n >= n_cells:
                return

    def val_dataloader(self):
        self.setup()
        cfg = self.config
        if self.val_index.n_cells == 0:
            return []
        rank, world = self._rank_and_world_size()
        ds = ShardedArrowDataset(self.val_index, batch_size=cfg.val_batch_size or cfg.batch_size,
                                 tokenizer=cfg.tokenizer, seed=cfg.seed, shuffle=False, remainder="wrap",
                                 rank=rank, world_size=world)
        return ShardedDataLoader(ds, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, fixed_epoch=0)

    def state_dict(self) -> dict:
        stream = self._train_loader.state_dict() if self._train_loader is not None else self._stream_state
        return {"data_config": asdict(self.config), "vocab_hash": self.vocab.hash, "stream": stream}

    def load_state_dict(self, state: dict) -> None:
        if state.get("vocab_hash") != self.vocab.hash:
            raise CorpusError(
                f"checkpoint field 'vocab_hash' {str(state.get('vocab_hash'))[:12]} differs from the corpus "
                f"vocabulary {self.vocab.hash[:12]} ({self.config.corpus}); the model's gene ids would not match"
            )
        saved = state.get("data_config", {})
        for name in _RECORDED:
            if name in saved and saved[name] != getattr(self.config, name):
                raise ValueError(
                    f"checkpoint field 'data_config.{name}' is {saved[name]!r} but DataConfig.{name} is "
                    f"{getattr(self.config, name)!r}; resuming would change the data the model sees"
                )
        self._stream_state = state.get("stream")
        if self._train_loader is not None and self._stream_state is not None:
            self._train_loader.load_state_dict(self._stream_state)
            self._stream_state = None


def corpus_neighbourhood(manifest: Manifest, tokenizer: TokenizerConfig, corpus: str) -> dict | None:
    """The corpus's neighbourhood settings (fm.velocity.neighbours.NeighbourConfig fields; None: no moments).

    Raises when the moments were normalised by another rule than the tokenizer's (Ms and a cell's normalised
    spliced value would be in different units); a corpus whose datasets differ gets the first one's, with a warning.
    """
    found = [d for d in manifest.datasets if d.neighbourhood]
    for d in found:
        norm = d.neighbourhood.get("normalization")
        if norm != tokenizer.normalization:
            raise CorpusError(
                f"{corpus}: dataset {d.dataset_id!r} stores moments normalised by {norm!r} but data.normalization is "
                f"{tokenizer.normalization!r}; set data.normalization={norm} or convert again with "
                f"--normalization {tokenizer.normalization}"
            )
    if any(d.neighbourhood != found[0].neighbourhood for d in found):
        log.warning("%s: datasets were converted with different neighbourhood settings; releases record %s's",
                    corpus, found[0].dataset_id)
    return dict(found[0].neighbourhood) if found else None


def split_index(index: UnitIndex, cfg: DataConfig) -> tuple[UnitIndex, UnitIndex]:
    """(train, validation) row selections of ``index``; disjoint by construction."""
    if cfg.split == "dataset":
        val_ds = set(cfg.val_datasets)
        keep_val = []
        for u in index.units:
            reader = ShardReader(index.shard_paths[u.shard])
            ids = reader.get_batch(u.batch).column(keys.DATASET_ID).to_numpy(zero_copy_only=False)
            reader.close()
            keep_val.append(np.isin(ids if u.rows is None else ids[u.rows], list(val_ds)))
    elif cfg.val_fraction == 0:
        return index, UnitIndex(index.shard_paths, [])
    else:
        t0 = time.perf_counter()
        keep_val = [h < cfg.val_fraction for h in unit_cell_hashes(cfg.corpus, index, deep=cfg.deep_check)]
        log.info("hash split of %d cells took %.1f s", index.n_cells, time.perf_counter() - t0)
    return index.select([~k for k in keep_val]), index.select(keep_val)
