"""The training plan every fm task shares: the step, the optimiser and its schedule, the NaN policy, RNG and the
checkpoint's ``fm`` entry. Pretraining, fine-tuning and the baselines differ only in what they declare:

    class MyTask(TaskBase):
        def forward(self, batch): ...                                    # what the task computes
        def compute_loss(self, batch, generator=None) -> LossOutput: ... # the modules and the loss
        def optim_groups(self) -> list[dict]: ...                        # param groups (optional: one lr per group)
        def checkpoint_meta(self) -> dict: ...                           # checkpoint["fm"] beside vocab_hash and rng
        def check_checkpoint(self, meta) -> None: ...                    # refuse another model's checkpoint

NaN policy (``task.nan_policy``): every rank computes its loss, then the ranks agree whether all of them are finite
(``strategy.reduce_boolean_decision``) before anything else, so one rank's NaN never leaves another waiting in a
collective. ``stop`` raises FloatingPointError on every rank, with the step; ``skip`` skips the step on every rank.
In one process ``training_step`` then returns None (no backward, no update). Lightning refuses a None in distributed
training (DDP, DeepSpeed: every rank must run backward), so there the step backpropagates a zero that reaches every
trainable parameter, at learning rate 0: the weights stay as they are (Adam's moments decay by one step). ZeRO-3's
partitioned parameters take no such zero: ``skip`` is refused there before the first step.
"""

from __future__ import annotations

import logging
import random
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from fm import keys
from fm.ckpt_meta import CKPT_KEY
from fm.heads.base import LossOutput
from fm.tasks.optim import OptimConfig, build_optimizer, param_groups

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")


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


class TaskBase(L.LightningModule):
    """The shared training plan (see the module docstring). Subclasses set their modules, then declare the rest.

    Args:
        nan_policy: on a non-finite loss on any rank, ``stop`` (every rank raises) or ``skip`` (every rank skips).
        vocab_hash: hash of the vocabulary the model embeds; stored in checkpoints and checked on load.
        seed: seeds the per-step generator of the task's own draws (so a resumed run draws as an uninterrupted one).
        optim: AdamW and warmup-cosine settings (a task with its own recipe overrides ``configure_optimizers``).
    """

    loss_label = "training"  # how the NaN error names the loss

    def __init__(self, nan_policy: Literal["stop", "skip"] = "stop", vocab_hash: str | None = None, seed: int = 0,
                 optim: OptimConfig | None = None):
        super().__init__()
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"{type(self).__name__}.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.nan_policy, self.vocab_hash, self.seed, self.optim_config = nan_policy, vocab_hash, seed, optim
        self.skipped_steps = 0
        self._lrs_before_skip: list[list[float]] | None = None

    # --- what a task declares ------------------------------------------------------------------------------
    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError  # pragma: no cover - interface

    def optim_groups(self) -> list[dict]:
        """AdamW param groups (a group may set its own ``lr``); default: every trainable parameter, decay by shape."""
        return param_groups(self, self.optim_config.weight_decay)

    def checkpoint_meta(self) -> dict:
        """What describes the model in ``checkpoint["fm"]`` (the vocabulary hash and RNG states are added)."""
        raise NotImplementedError  # pragma: no cover - interface

    def check_checkpoint(self, meta: dict | None) -> None:
        """Raise fm.ckpt_meta.CheckpointMismatchError when ``meta`` (a checkpoint's ``fm`` entry) is not ours."""
        raise NotImplementedError  # pragma: no cover - interface

    def step_generator(self) -> torch.Generator:
        """The generator of a training step's own draws: seeded by (seed, step), the same on every rank."""
        return torch.Generator().manual_seed(hash((self.seed, self.global_step)) % (2**63))

    def training_loss(self, batch: dict) -> LossOutput:
        return self.compute_loss(batch, self.step_generator())

    # --- steps ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        out = self.training_loss(batch)
        if not self.trainer.strategy.reduce_boolean_decision(out.is_finite(), all=True):
            return self._non_finite(out)
        self.log_loss(out, "train", batch)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int):
        out = self.compute_loss(batch, torch.Generator().manual_seed(self.seed + batch_idx))
        self.log_loss(out, "val", batch)
        return out.loss

    def log_loss(self, out: LossOutput, stage: str, batch: dict) -> None:
        """The total, the loss parts and metrics as ``{stage}/...``; the training total on the progress bar."""
        n = batch[keys.B_GENE_MASK].shape[0]
        self.log_dict(out.to_log(stage), batch_size=n, sync_dist=stage != "train")
        if stage == "train":
            self.log("loss", out.loss.detach(), prog_bar=True, logger=False, batch_size=n)

    def _non_finite(self, out: LossOutput) -> torch.Tensor | None:
        """Every rank gets here together (the decision was reduced over ranks): stop or skip, all alike."""
        if self.nan_policy == "stop":
            raise FloatingPointError(
                f"non-finite {self.loss_label} loss at step {self.global_step} on at least one rank (this rank's "
                f"loss={out.loss.item()}, parts={ {k: v.item() for k, v in out.parts.items()} }); "
                "stopping on every rank (task.nan_policy=stop)"
            )
        self.skipped_steps += 1
        log.warning("non-finite loss at step %d: step skipped (%d so far)", self.global_step, self.skipped_steps)
        if self.trainer.world_size == 1 and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return None
        # distributed or DeepSpeed: backward must run; a zero reaches every trainable parameter, the step runs at lr 0
        self._lrs_before_skip = [[g["lr"] for g in opt.param_groups] for opt in self.trainer.optimizers]
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = 0.0
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._lrs_before_skip is not None:  # after a skip at lr 0: the learning rates it zeroed
            for opt, lrs in zip(self.trainer.optimizers, self._lrs_before_skip, strict=True):
                for group, lr in zip(opt.param_groups, lrs, strict=True):
                    group["lr"] = lr
            self._lrs_before_skip = None

    def on_fit_start(self) -> None:
        strategy = self.trainer.strategy
        if self.nan_policy == "skip" and isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            raise ValueError("task.nan_policy=skip: DeepSpeed ZeRO-3 cannot skip a step (its partitioned parameters "
                             "take no zero gradient); use task.nan_policy=stop or trainer=deepspeed_stage_2")

    # --- optimiser -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW over :meth:`optim_groups` on one warmup-cosine schedule of ``optim.total_steps`` (default: the
        trainer's max_steps, else its estimate of the run's steps)."""
        total = self.optim_config.total_steps or self.trainer.max_steps
        if total is None or total <= 0:
            total = int(self.trainer.estimated_stepping_batches)
        opt, sched = build_optimizer(self.optim_groups(), self.optim_config, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {**self.checkpoint_meta(), "vocab_hash": self.vocab_hash, "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CKPT_KEY)
        self.check_checkpoint(meta)
        if meta.get("rng") is not None:
            set_rng_state(meta["rng"])
