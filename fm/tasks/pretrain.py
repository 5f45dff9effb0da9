"""Contrastive pretraining as a LightningModule: the Zorro encoder, the contrastive head, AdamW + warmup-cosine.

    python -m fm.train data.corpus=corpus/ model=debug trainer.max_steps=50          # CPU, one process
    torchrun --nproc_per_node 2 -m fm.train data.corpus=corpus/ trainer=ddp trainer.devices=2

The task owns the optimiser, the NaN policy and logging; the head owns its loss terms and their weights. A
checkpoint carries ``checkpoint["fm"]``: the model config, the vocabulary hash and the RNG states, so resuming or
initialising from it against another vocabulary or architecture fails before any step.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Literal

import lightning as L
import numpy as np
import torch

from fm import keys
from fm.heads.base import LossOutput
from fm.heads.contrastive import ContrastiveConfig, ContrastiveHead
from fm.model.config import ZorroConfig, model_width
from fm.model.zorro import ZorroEncoder
from fm.tasks.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)

CKPT_KEY = "fm"  # checkpoint entry with what describes the model (config, vocab hash) and the RNG states
NAN_POLICIES = ("stop", "skip")


class CheckpointMismatchError(ValueError):
    """A checkpoint was made for another vocabulary or another architecture."""


def model_config(name: str, vocab_size: int, **overrides) -> ZorroConfig:
    """A preset with overrides; ``None`` means "the preset's value" (so YAML can list every overridable key)."""
    return ZorroConfig.from_name(name, vocab_size=vocab_size, **{k: v for k, v in overrides.items() if v is not None})


def check_checkpoint_meta(meta: dict | None, vocab_hash: str | None, config: ZorroConfig, source: str) -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint's vocabulary or model config differs from ours."""
    if meta is None:
        raise CheckpointMismatchError(f"{source}: not an fm checkpoint (no '{CKPT_KEY}' entry)")
    theirs = meta.get("vocab_hash")
    if vocab_hash is not None and theirs != vocab_hash:
        raise CheckpointMismatchError(
            f"{source}: vocabulary hash {str(theirs)[:12]}... differs from the corpus's {vocab_hash[:12]}...; "
            "the checkpoint was trained on another gene vocabulary"
        )
    ours, saved = config.to_dict(), meta.get("model_config", {})
    diff = sorted(k for k in set(ours) | set(saved) if ours.get(k) != saved.get(k) and k != "attention")
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {ours.get(k)!r}" for k in diff)
        raise CheckpointMismatchError(f"{source}: model config differs ({detail})")


class PretrainTask(L.LightningModule):
    """Zorro encoder + contrastive head, trained with AdamW and a warmup-cosine schedule.

    Args:
        model: the encoder config (or its dict).
        head: contrastive head settings.
        optim: optimiser and schedule settings.
        nan_policy: on a non-finite loss, ``stop`` (raise with the step number) or ``skip`` (no update).
        vocab_hash: hash of the vocabulary the model embeds; stored in checkpoints and checked on load.
        seed: seeds the per-step masking generator (so a resumed run masks as an uninterrupted one).
    """

    def __init__(
        self,
        model: ZorroConfig | dict,
        head: ContrastiveConfig | dict | None = None,
        optim: OptimConfig | dict | None = None,
        nan_policy: Literal["stop", "skip"] = "stop",
        vocab_hash: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        model = ZorroConfig.from_dict(model) if isinstance(model, dict) else model
        head = ContrastiveConfig(**head) if isinstance(head, dict) else (head or ContrastiveConfig())
        optim = OptimConfig(**optim) if isinstance(optim, dict) else (optim or OptimConfig())
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"PretrainTask.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.model_config, self.head_config, self.optim_config = model, head, optim
        self.nan_policy, self.vocab_hash, self.seed = nan_policy, vocab_hash, seed
        self.save_hyperparameters(
            {"model": model.to_dict(), "head": asdict(head), "optim": asdict(optim), "nan_policy": nan_policy,
             "vocab_hash": vocab_hash, "seed": seed}
        )
        self.encoder = ZorroEncoder(model)
        self.head = ContrastiveHead(model_width(model), head)
        self.skipped_steps = 0

    # --- steps ---------------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        """Encoder output of a batch (no corruption)."""
        return self.encoder(batch)

    def _mask_generator(self) -> torch.Generator:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return torch.Generator().manual_seed(hash((self.seed, self.global_step, rank)) % (2**63))

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        batch = self.head.prepare(batch, generator)
        if not self.head_config.split_views:
            return self.head.loss(batch, self.head(batch, self.encoder(batch)))
        view_a, view_b = self.head.split(batch, generator)
        outputs = self.head.forward_views(view_a, self.encoder(view_a), view_b, self.encoder(view_b))
        return self.head.loss({**view_a, **{k: v for k, v in view_b.items() if "unspliced" in k}}, outputs)

    def training_step(self, batch: dict, batch_idx: int):
        out = self.compute_loss(batch, self._mask_generator())
        finite = self.trainer.strategy.reduce_boolean_decision(out.is_finite(), all=True)
        if not finite:
            if self.nan_policy == "stop":
                raise FloatingPointError(
                    f"non-finite training loss at step {self.global_step} (loss={out.loss.item()}, "
                    f"parts={ {k: v.item() for k, v in out.parts.items()} }); stopping (task.nan_policy=stop)"
                )
            self.skipped_steps += 1
            log.warning("non-finite loss at step %d: step skipped (%d so far)", self.global_step, self.skipped_steps)
            return None  # every rank agrees (reduce_boolean_decision), so no rank waits in backward
        n = batch[keys.B_GENE_MASK].shape[0]
        self.log_dict(out.to_log("train"), batch_size=n)
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False, batch_size=n)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int):
        out = self.compute_loss(batch, torch.Generator().manual_seed(self.seed + batch_idx))
        self.log_dict(out.to_log("val"), batch_size=batch[keys.B_GENE_MASK].shape[0], sync_dist=True)
        return out.loss

    def configure_optimizers(self):
        total = self.optim_config.total_steps or self.trainer.max_steps
        if total is None or total <= 0:
            total = int(self.trainer.estimated_stepping_batches)
        opt, sched = build_optimizer(self, self.optim_config, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        n_enc, n_all = self.encoder.num_parameters(), sum(p.numel() for p in self.parameters())
        if self.trainer.is_global_zero:
            log.info("parameters: encoder %s, total %s", f"{n_enc:,}", f"{n_all:,}")
        for logger in self.loggers:
            logger.log_hyperparams({"n_parameters": n_all, "n_parameters_encoder": n_enc})

    # --- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {
            "model_config": self.model_config.to_dict(),
            "vocab_hash": self.vocab_hash,
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CKPT_KEY)
        check_checkpoint_meta(meta, self.vocab_hash, self.model_config, "checkpoint")
        if meta.get("rng") is not None:
            set_rng_state(meta["rng"])


def rng_state() -> dict:
    """torch, CUDA, numpy and Python RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    name, keys_, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [name, torch.from_numpy(keys_.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), py_gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys_, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys_.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
