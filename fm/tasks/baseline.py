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
(seed, step), so a resumed run repeats an uninterrupted one. The step, the NaN policy, RNG and the checkpoint's
``fm`` entry are the shared training plan's (fm.tasks.base): checkpoints carry ``checkpoint["fm"]`` with the head's
name and config, the vocabulary hash and the RNG states.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Literal

import torch

from fm.baselines.celldancer import CellDancerConfig
from fm.baselines.registry import BASELINES
from fm.baselines.scscope import ScScopeConfig
from fm.baselines.scvi import SCVIConfig
from fm.ckpt_io import load_training_checkpoint
from fm.ckpt_meta import CKPT_KEY, CheckpointMismatchError, check_head
from fm.heads.base import LossOutput
from fm.tasks.base import TaskBase

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


class BaselineTask(TaskBase):
    """One baseline head trained alone (it ignores the encoder output it is given: None).

    Args:
        head: the baseline's config (SCVIConfig, ScScopeConfig or CellDancerConfig), or a dict of its fields with
            ``name``: scvi | scscope | celldancer.
        vocab_hash: hash of the vocabulary the head's genes index; stored in checkpoints and checked on load.
        seed: seeds each training step's draws, with the step.
        nan_policy: on a non-finite loss on any rank, ``stop`` (every rank raises) or ``skip`` (every rank skips).
    """

    def __init__(self, head: SCVIConfig | ScScopeConfig | CellDancerConfig | Mapping, vocab_hash: str | None = None,
                 seed: int = 0, nan_policy: Literal["stop", "skip"] = "stop"):
        super().__init__(nan_policy=nan_policy, vocab_hash=vocab_hash, seed=seed)
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
        self.head_name, self.head_config, self.loss_label = name, head, name
        self.save_hyperparameters({"head": {"name": name, **asdict(head)}, "vocab_hash": vocab_hash, "seed": seed,
                                   "nan_policy": nan_policy})
        self.head = BASELINES[name][1](head)

    def forward(self, batch: dict) -> dict:
        return self.head(batch, None)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        return self.head.loss(batch, self.head(batch, None))  # the head draws from the global RNG (see training_loss)

    def on_train_epoch_start(self) -> None:
        if hasattr(self.head, "set_epoch"):  # scVI's KL warm-up follows the stream's epochs
            self.head.set_epoch(self.current_epoch)

    def training_loss(self, batch: dict) -> LossOutput:
        # the step's randomness (scVI's posterior sample, dropout, cellDancer's point sampling) comes from a seed of
        # (seed, step), not from the global RNG stream, so a resumed run draws what an uninterrupted one would
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(hash((self.seed, self.global_step)) % (2**63))
            return self.compute_loss(batch)

    def training_step(self, batch: dict, batch_idx: int):
        loss = super().training_step(batch, batch_idx)
        if getattr(self.head, "finished", False):  # cellDancer: every gene has stopped early, as its package's
            self.trainer.should_stop = True
        return loss

    def configure_optimizers(self):
        return self.head.optimizer()  # the baseline's own recipe, constant learning rate

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """No clipping, whatever ``trainer.gradient_clip_val`` says: the baselines' recipes have none."""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.is_global_zero:
            n = sum(p.numel() for p in self.head.parameters())
            log.info("training the %s baseline (%s parameters, no encoder)", self.head_name, f"{n:,}")

    # --- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        return {"head": self.head_name, "head_config": asdict(self.head_config)}

    def check_checkpoint(self, meta: dict | None) -> None:
        if not isinstance(meta, dict) or "head" not in meta:
            raise CheckpointMismatchError(f"checkpoint: not an fm baseline checkpoint (no '{CKPT_KEY}.head' entry)")
        check_head(meta, self.head_name)
        if meta.get("vocab_hash") != self.vocab_hash:
            raise CheckpointMismatchError(
                f"checkpoint: vocabulary hash {meta.get('vocab_hash')} differs from the corpus's {self.vocab_hash}"
            )
        if meta.get("head_config") != asdict(self.head_config):
            raise CheckpointMismatchError(
                f"checkpoint: {self.head_name} config {meta.get('head_config')} differs from {asdict(self.head_config)}"
            )


def load_baseline(path, vocab_hash: str | None = None) -> BaselineTask:
    """A trained BaselineTask from one of its checkpoint files (head and vocabulary checked; eval mode)."""
    ckpt = load_training_checkpoint(path)  # a file or a DeepSpeed ZeRO folder
    meta = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("head") not in BASELINES:
        raise CheckpointMismatchError(f"{path}: not an fm baseline checkpoint (no '{CKPT_KEY}.head' naming a baseline)")
    if vocab_hash is not None and meta.get("vocab_hash") != vocab_hash:
        raise CheckpointMismatchError(f"{path}: vocabulary hash {meta.get('vocab_hash')} differs from {vocab_hash}")
    task = BaselineTask({"name": meta["head"], **meta["head_config"]}, vocab_hash=meta.get("vocab_hash"))
    task.load_state_dict(ckpt["state_dict"])
    return task.eval()
