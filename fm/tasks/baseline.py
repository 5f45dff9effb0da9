"""Baselines as a LightningModule: one baseline head (scVI, scScope, cellDancer), no encoder, its own recipe.

    python -m fm.finetune head=scvi data.corpus=corpus/ data.max_genes=2000 data.batch_size=128
    fm finetune head=celldancer data.corpus=corpus/ data.max_genes=2000 trainer.max_steps=500 logger=csv

``fm finetune head=scvi|scscope|celldancer`` builds this task instead of FinetuneTask (fm.finetune dispatches on the
head config's type), on the same data module, trainer, loggers, callbacks and checkpoints as the decoders. A
baseline models every gene of the vocabulary densely (fm.baselines.common.densify), so every stored gene of a cell
must be a token: ``data.max_genes`` must be at least the vocabulary size (checked by :func:`check_data`). Each
baseline trains with its own paper's or package's optimiser (the head's ``optimizer()``: scVI Adam lr 1e-3, eps
0.01, weight decay 1e-6; scScope Adam lr 1e-4, beta1 0.05; cellDancer Adam lr 1e-3, weight decay 4e-3), without a
schedule and without the trainer's gradient clipping (none of the three packages clips; and a norm taken over all of
cellDancer's genes at once would couple genes that train independently); a head with ``set_epoch`` (scVI's KL
warm-up) is told the stream's epoch at the start of each. A training step draws its random numbers from a seed of
(seed, step), so a resumed run repeats an uninterrupted one. Checkpoints carry ``checkpoint["fm"]`` with the head's
name and config, the vocabulary hash and the RNG states.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict

import lightning as L
import torch

from fm.baselines.celldancer import CellDancerConfig
from fm.baselines.registry import BASELINES
from fm.baselines.scscope import ScScopeConfig
from fm.baselines.scvi import SCVIConfig
from fm.heads.base import LossOutput
from fm.tasks.finetune import log_loss
from fm.tasks.pretrain import CKPT_KEY, CheckpointMismatchError, rng_state, set_rng_state

log = logging.getLogger(__name__)


def baseline_name(config) -> str | None:
    """The baseline a config (instance or class) belongs to, or None when it is not a baseline's."""
    cls = config if isinstance(config, type) else type(config)
    return next((name for name, (config_cls, _) in BASELINES.items() if issubclass(cls, config_cls)), None)


def check_data(data_config, vocab_size: int, name: str) -> None:
    """Raise a ValueError naming ``data.max_genes`` when a cell's stored genes could be sampled away."""
    if data_config.max_genes < vocab_size:
        raise ValueError(
            f"data.max_genes={data_config.max_genes}: the {name} baseline models all {vocab_size} genes of the "
            f"vocabulary densely, so every stored gene of a cell must be a token; set data.max_genes={vocab_size} "
            "(batches are padded to their longest cell, not to max_genes)"
        )


class BaselineTask(L.LightningModule):
    """One baseline head trained alone (it ignores the encoder output it is given: None).

    Args:
        head: the baseline's config (SCVIConfig, ScScopeConfig or CellDancerConfig), or a dict of its fields with
            ``name``: scvi | scscope | celldancer.
        vocab_hash: hash of the vocabulary the head's genes index; stored in checkpoints and checked on load.
        seed: recorded with the hyperparameters (the run is seeded by fm.train.setup_run).
    """

    def __init__(self, head: SCVIConfig | ScScopeConfig | CellDancerConfig | Mapping, vocab_hash: str | None = None,
                 seed: int = 0):
        super().__init__()
        if isinstance(head, Mapping):
            fields = dict(head)
            name = fields.pop("name", None)
            if name not in BASELINES:
                raise ValueError(f"BaselineTask.head.name: must be one of {tuple(BASELINES)}, got {name!r}")
            head = BASELINES[name][0](**fields)
        name = baseline_name(head)
        if name is None:
            valid = ", ".join(c.__name__ for c, _ in BASELINES.values())
            raise TypeError(f"BaselineTask.head: expected one of {valid} (configs/head/), got {type(head).__name__}")
        self.head_name, self.head_config, self.vocab_hash, self.seed = name, head, vocab_hash, seed
        self.save_hyperparameters({"head": {"name": name, **asdict(head)}, "vocab_hash": vocab_hash, "seed": seed})
        self.head = BASELINES[name][1](head)

    def forward(self, batch: dict) -> dict:
        return self.head(batch, None)

    def compute_loss(self, batch: dict) -> LossOutput:
        return self.head.loss(batch, self.head(batch, None))

    def on_train_epoch_start(self) -> None:
        if hasattr(self.head, "set_epoch"):  # scVI's KL warm-up follows the stream's epochs
            self.head.set_epoch(self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int):
        # the step's randomness (scVI's posterior sample, dropout, cellDancer's point sampling) comes from a seed of
        # (seed, step), not from the global RNG stream, so a resumed run draws what an uninterrupted one would
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(hash((self.seed, self.global_step)) % (2**63))
            out = self.compute_loss(batch)
        if not out.is_finite():
            raise FloatingPointError(
                f"non-finite {self.head_name} loss at step {self.global_step} "
                f"(parts={ {k: v.item() for k, v in out.parts.items()} })"
            )
        self._log_loss(out, "train", batch)
        if getattr(self.head, "finished", False):  # cellDancer: every gene has stopped early, as its package's
            self.trainer.should_stop = True
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int):
        out = self.compute_loss(batch)
        self._log_loss(out, "val", batch)
        return out.loss

    def _log_loss(self, out: LossOutput, stage: str, batch: dict) -> None:
        log_loss(self, out, stage, batch)

    def configure_optimizers(self):
        return self.head.optimizer()  # the baseline's own recipe, constant learning rate

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """No clipping, whatever ``trainer.gradient_clip_val`` says: the baselines' recipes have none."""

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            n = sum(p.numel() for p in self.head.parameters())
            log.info("training the %s baseline (%s parameters, no encoder)", self.head_name, f"{n:,}")

    # --- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {"head": self.head_name, "head_config": asdict(self.head_config),
                                "vocab_hash": self.vocab_hash, "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CKPT_KEY)
        if not isinstance(meta, dict) or "head" not in meta:
            raise CheckpointMismatchError(f"checkpoint: not an fm baseline checkpoint (no '{CKPT_KEY}.head' entry)")
        if meta["head"] != self.head_name:
            raise CheckpointMismatchError(f"checkpoint: head {meta['head']!r} differs from {self.head_name!r}")
        if meta.get("vocab_hash") != self.vocab_hash:
            raise CheckpointMismatchError(
                f"checkpoint: vocabulary hash {meta.get('vocab_hash')} differs from the corpus's {self.vocab_hash}"
            )
        if meta.get("head_config") != asdict(self.head_config):
            raise CheckpointMismatchError(
                f"checkpoint: {self.head_name} config {meta.get('head_config')} differs from {asdict(self.head_config)}"
            )
        if meta.get("rng") is not None:
            set_rng_state(meta["rng"])


def load_baseline(path, vocab_hash: str | None = None) -> BaselineTask:
    """A trained BaselineTask from one of its checkpoint files (head and vocabulary checked; eval mode)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    meta = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("head") not in BASELINES:
        raise CheckpointMismatchError(f"{path}: not an fm baseline checkpoint (no '{CKPT_KEY}.head' naming a baseline)")
    if vocab_hash is not None and meta.get("vocab_hash") != vocab_hash:
        raise CheckpointMismatchError(f"{path}: vocabulary hash {meta.get('vocab_hash')} differs from {vocab_hash}")
    task = BaselineTask({"name": meta["head"], **meta["head_config"]}, vocab_hash=meta.get("vocab_hash"))
    task.load_state_dict(ckpt["state_dict"])
    return task.eval()
