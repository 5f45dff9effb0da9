"""Contrastive pretraining as a LightningModule: the Zorro encoder, the contrastive head, AdamW + warmup-cosine.

    python -m fm.train data.corpus=corpus/ model=debug trainer.max_steps=50          # CPU, one process
    torchrun --nproc_per_node 2 -m fm.train data.corpus=corpus/ trainer=ddp trainer.devices=2

The step, the optimiser, the NaN policy, logging and RNG are the shared training plan's (fm.tasks.base); this task
declares the encoder, the contrastive head and its loss. The head owns its loss terms and their weights. A
checkpoint carries ``checkpoint["fm"]``: the model config, the vocabulary hash and the RNG states, so resuming or
initialising from it against another vocabulary or architecture fails before any step.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Literal

import torch

from fm.ckpt_meta import CKPT_KEY, check_checkpoint_meta
from fm.heads.base import LossOutput
from fm.heads.contrastive import ContrastiveConfig, ContrastiveHead
from fm.model.config import ZorroConfig, model_width
from fm.model.zorro import ZorroEncoder
from fm.tasks.base import TaskBase
from fm.tasks.optim import OptimConfig

log = logging.getLogger(__name__)

__all__ = ["CKPT_KEY", "PretrainTask", "model_config"]  # CKPT_KEY (from fm.ckpt_meta): bench/ reads it here


def model_config(name: str, vocab_size: int, **overrides) -> ZorroConfig:
    """A preset with overrides; ``None`` means "the preset's value" (so YAML can list every overridable key)."""
    return ZorroConfig.from_name(name, vocab_size=vocab_size, **{k: v for k, v in overrides.items() if v is not None})


class PretrainTask(TaskBase):
    """Zorro encoder + contrastive head, trained with AdamW and a warmup-cosine schedule.

    Args:
        model: the encoder config (or its dict).
        head: contrastive head settings.
        optim: optimiser and schedule settings.
        nan_policy: on a non-finite loss on any rank, ``stop`` (raise with the step number) or ``skip`` (no update).
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
        model = ZorroConfig.from_dict(model) if isinstance(model, dict) else model
        head = ContrastiveConfig(**head) if isinstance(head, dict) else (head or ContrastiveConfig())
        optim = OptimConfig(**optim) if isinstance(optim, dict) else (optim or OptimConfig())
        super().__init__(nan_policy=nan_policy, vocab_hash=vocab_hash, seed=seed, optim=optim)
        self.model_config, self.head_config = model, head
        self.save_hyperparameters(
            {"model": model.to_dict(), "head": asdict(head), "optim": asdict(optim), "nan_policy": nan_policy,
             "vocab_hash": vocab_hash, "seed": seed}
        )
        self.encoder = ZorroEncoder(model)
        self.head = ContrastiveHead(model_width(model), head)

    def forward(self, batch: dict):
        """Encoder output of a batch (no corruption)."""
        return self.encoder(batch)

    def step_generator(self) -> torch.Generator:
        """Masking differs between ranks: seeded by (seed, step, rank)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return torch.Generator().manual_seed(hash((self.seed, self.global_step, rank)) % (2**63))

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        batch = self.head.prepare(batch, generator)
        if not self.head_config.split_views:
            return self.head.loss(batch, self.head(batch, self.encoder(batch)))
        view_a, view_b = self.head.split(batch, generator)
        outputs = self.head.forward_views(view_a, self.encoder(view_a), view_b, self.encoder(view_b))
        return self.head.loss({**view_a, **{k: v for k, v in view_b.items() if "unspliced" in k}}, outputs)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        n_enc, n_all = self.encoder.num_parameters(), sum(p.numel() for p in self.parameters())
        if self.trainer.is_global_zero:
            log.info("parameters: encoder %s, total %s", f"{n_enc:,}", f"{n_all:,}")
        for logger in self.loggers:
            logger.log_hyperparams({"n_parameters": n_all, "n_parameters_encoder": n_enc})

    # --- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        return {"model_config": self.model_config.to_dict()}

    def check_checkpoint(self, meta: dict | None) -> None:
        check_checkpoint_meta(meta, self.vocab_hash, self.model_config, "checkpoint")
