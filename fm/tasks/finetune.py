"""Fine-tuning as a LightningModule: a pretrained Zorro encoder (frozen, partly or fully trainable) and one head.

    python -m fm.finetune head=velocity checkpoint=runs/pretrain/x/checkpoints/last.ckpt data.corpus=corpus/
    fm finetune head=expression checkpoint=... task.finetune.encoder=last_k

The head is chosen by its config's type (configs/head/{expression,velocity,generative}.yaml instantiate
ExpressionConfig, VelocityConfig or GenerativeConfig). The head gets ``optim.lr``, the trainable part of the encoder
``task.finetune.encoder_lr``, both on the same warmup-cosine schedule (a head with ``optim_groups`` gives its own
groups). A frozen encoder runs without gradients and in eval mode (no dropout). The step, the NaN policy, RNG and the
checkpoint's ``fm`` entry are the shared training plan's (fm.tasks.base): checkpoints carry ``checkpoint["fm"]`` as
pretraining's do (model config, vocabulary hash, RNG states) plus the head's name, so a fine-tuned checkpoint
describes itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from fm.ckpt_io import load_training_checkpoint
from fm.ckpt_meta import CKPT_KEY, CheckpointMismatchError, check_checkpoint_meta, check_head
from fm.heads.base import LossOutput, check_fields
from fm.heads.expression import ExpressionConfig
from fm.heads.generative import GenerativeConfig
from fm.heads.registry import HEADS
from fm.heads.velocity import VelocityConfig
from fm.model.config import ZorroConfig, model_width
from fm.model.zorro import ZorroEncoder
from fm.tasks.base import TaskBase
from fm.tasks.optim import OptimConfig, param_groups

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """How much of the encoder trains, and how fast."""

    encoder: Literal["frozen", "last_k", "full"] = "frozen"  # frozen | last_k (the last unfreeze_last blocks) | full
    unfreeze_last: int = 1  # last_k: trainable blocks, counted from the top (the final norm and pooling train too)
    encoder_lr: float = 1e-4  # peak learning rate of the trainable encoder parameters (the head uses optim.lr)
    init_queries: bool = True  # copy the encoder's gene embedding into the head's own gene table before training

    def __post_init__(self) -> None:
        check_fields(self)
        bad = [name for name in ("encoder_lr", "unfreeze_last") if getattr(self, name) <= 0]
        if bad:
            raise ValueError(f"FinetuneConfig.{bad[0]} must be positive, got {getattr(self, bad[0])}")


def head_name(config) -> str:
    """The name of the head a config instance belongs to (``FinetuneTask.head`` names the field on error)."""
    for name, (config_cls, _) in HEADS.items():
        if isinstance(config, config_cls):
            return name
    valid = ", ".join(c.__name__ for c, _ in HEADS.values())
    raise TypeError(f"FinetuneTask.head: expected one of {valid} (configs/head/), got {type(config).__name__}")


def load_encoder_state(path: str | os.PathLike, vocab_hash: str | None) -> tuple[ZorroConfig, dict]:
    """The encoder config and weights of a pretraining (or fine-tuning) checkpoint, a file or a ZeRO folder;
    vocabulary checked.

    Raises:
        CheckpointMismatchError: not an fm checkpoint, another vocabulary, or no encoder weights (names file, field).
    """
    ckpt = load_training_checkpoint(path)  # a file or a DeepSpeed ZeRO folder
    meta = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if meta is None or "model_config" not in meta:
        raise CheckpointMismatchError(f"{path}: not an fm training checkpoint (no '{CKPT_KEY}.model_config' entry)")
    config = ZorroConfig.from_dict(meta["model_config"])
    check_checkpoint_meta(meta, vocab_hash, config, str(path))
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointMismatchError(f"{path}: state_dict has no '{prefix}*' weights")
    return config, state


class FinetuneTask(TaskBase):
    """A Zorro encoder and one decoder head; the encoder frozen, partly or fully trainable.

    Args:
        model: the encoder config (or its dict): the pretraining checkpoint's.
        head: the head's config, an ExpressionConfig, VelocityConfig or GenerativeConfig (or a dict of its fields
            with ``name``: expression | velocity | generative).
        finetune: which encoder parameters train, and their learning rate.
        optim: optimiser and schedule settings; ``optim.lr`` is the head's peak learning rate.
        vocab_hash: hash of the vocabulary the model embeds; stored in checkpoints and checked on load.
        seed: seeds the per-step input-corruption generator of heads that hide tokens.
        nan_policy: on a non-finite loss on any rank, ``stop`` (every rank raises) or ``skip`` (every rank skips).
    """

    loss_label = "fine-tuning"

    def __init__(
        self,
        model: ZorroConfig | dict,
        head: ExpressionConfig | VelocityConfig | GenerativeConfig | Mapping,
        finetune: FinetuneConfig | Mapping | None = None,
        optim: OptimConfig | Mapping | None = None,
        vocab_hash: str | None = None,
        seed: int = 0,
        nan_policy: Literal["stop", "skip"] = "stop",
    ):
        model = ZorroConfig.from_dict(dict(model)) if isinstance(model, Mapping) else model
        if isinstance(head, Mapping):
            fields = dict(head)
            name = fields.pop("name", None)
            if name not in HEADS:
                raise ValueError(f"FinetuneTask.head.name: must be one of {tuple(HEADS)}, got {name!r}")
            head = HEADS[name][0](**fields)
        name = head_name(head)
        finetune = FinetuneConfig(**finetune) if isinstance(finetune, Mapping) else (finetune or FinetuneConfig())
        optim = OptimConfig(**optim) if isinstance(optim, Mapping) else (optim or OptimConfig())
        if finetune.encoder == "last_k" and finetune.unfreeze_last > model.depth:
            raise ValueError(
                f"FinetuneConfig.unfreeze_last: {finetune.unfreeze_last} > the encoder's depth {model.depth}"
            )
        super().__init__(nan_policy=nan_policy, vocab_hash=vocab_hash, seed=seed, optim=optim)
        self.model_config, self.head_name, self.head_config, self.finetune_config = model, name, head, finetune
        self.save_hyperparameters(
            {"model": model.to_dict(), "head": {"name": name, **asdict(head)}, "finetune": asdict(finetune),
             "optim": asdict(optim), "vocab_hash": vocab_hash, "seed": seed, "nan_policy": nan_policy}
        )
        self.encoder = ZorroEncoder(model)
        self.head = HEADS[name][1](model_width(model), model.vocab_size, head)
        self._set_trainable()

    # --- which encoder parameters train --------------------------------------------------------------------
    def _set_trainable(self) -> None:
        mode = self.finetune_config.encoder
        self.encoder.requires_grad_(mode == "full")
        if mode == "last_k":
            # the top blocks and everything above them (final norm, pooling, global projection)
            top = [*self.encoder.blocks[-self.finetune_config.unfreeze_last:], self.encoder.norm,
                   self.encoder.global_proj]
            top += [getattr(self.encoder, n) for n in ("pool_spliced", "pool_unspliced") if hasattr(self.encoder, n)]
            for module in top:
                module.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.finetune_config.encoder == "frozen":
            self.encoder.eval()  # no dropout in a frozen encoder
        return self

    @torch.no_grad()
    def init_encoder(self, state: dict, source: str = "checkpoint") -> None:
        """Load encoder weights (from :func:`load_encoder_state`); seed the head's gene table from them."""
        self.encoder.load_state_dict(state)
        table = self.head.gene_table()
        if self.finetune_config.init_queries and table is not None:  # a head without a gene table has none to seed
            table.weight.copy_(self.encoder.gene_embedding.weight)
        log.info("encoder loaded from %s (%s; %s head)", source, self.finetune_config.encoder, self.head_name)

    # --- steps ---------------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        """Encoder output of a batch (no corruption)."""
        return self.encoder(batch)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        batch = self.head.prepare(batch, generator)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune_config.encoder != "frozen"):
            encoded = self.encoder(batch)
        return self.head.loss(batch, self.head(batch, encoded))

    def optim_groups(self) -> list[dict]:
        """The head at optim.lr (or the head's own groups), the trainable encoder at finetune.encoder_lr."""
        c = self.optim_config
        head_groups = (self.head.optim_groups(c.lr, c.weight_decay) if hasattr(self.head, "optim_groups")
                       else [{**g, "lr": c.lr} for g in param_groups(self.head, c.weight_decay) if g["params"]])
        return head_groups + [{**g, "lr": self.finetune_config.encoder_lr}
                              for g in param_groups(self.encoder, c.weight_decay) if g["params"]]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._warm_start_head()
        n_train = sum(p.numel() for p in self.encoder.parameters() if p.requires_grad)
        if self.trainer.is_global_zero:
            log.info("fine-tuning the %s head; encoder %s: %s of %s parameters train", self.head_name,
                     self.finetune_config.encoder, f"{n_train:,}", f"{self.encoder.num_parameters():,}")

    def _warm_start_head(self) -> None:
        """A head that fits per-gene parameters (the velocity head's dynamical mode) is warm-started on a sample of
        training cells before the first step, on rank 0, and the result broadcast to every rank; skipped when they are
        already fitted (a resumed run, or an init checkpoint that had them)."""
        if not (hasattr(self.head, "needs_warm_start") and self.head.needs_warm_start()):
            return
        state = None
        if self.trainer.is_global_zero:
            dm = self.trainer.datamodule
            if dm is None or not hasattr(dm, "sample_batches"):
                raise ValueError(f"the {self.head_name} head needs a warm start from the training corpus: fit with a "
                                 "CorpusDataModule (fm finetune data.corpus=...)")
            state = self.head.warm_start(dm.sample_batches(self.head.config.warm_start_cells))
        state = self.trainer.strategy.broadcast(state, src=0)
        result = self.head.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"{self.head_name} head warm start: unexpected entries {result.unexpected_keys}")

    # --- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        return {"model_config": self.model_config.to_dict(), "head": self.head_name}

    def check_checkpoint(self, meta: dict | None) -> None:
        check_checkpoint_meta(meta, self.vocab_hash, self.model_config, "checkpoint")
        check_head(meta, self.head_name)
