"""Optimiser and learning-rate schedule: AdamW (no weight decay on biases, norms, embeddings) + warmup-cosine.

    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=100), total_steps=10_000)
    opt, sched = build_optimizer([{"params": head.parameters(), "lr": 1e-3}, ...], config, total_steps=10_000)

The schedule is a ``LambdaLR`` stepped every optimiser step: linear warmup from 0 to ``lr`` over ``warmup_steps``,
then cosine decay to ``min_lr_ratio * lr`` at ``total_steps`` (held there after).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fm.heads.base import check_fields, param_groups  # param_groups: heads declare their own groups with it


@dataclass
class OptimConfig:
    """AdamW and warmup-cosine settings."""

    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05  # decoupled weight decay, on matrices only
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warmup from 0
    min_lr_ratio: float = 0.1  # final lr / peak lr
    total_steps: int | None = None  # cosine length; None: the trainer's max_steps

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lr <= 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimiser step ``step``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module | list[dict], config: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its warmup-cosine schedule, over ``model``'s trainable parameters (:func:`param_groups`) or over
    the param groups given (a group without its own ``lr`` gets ``config.lr``)."""
    total = config.total_steps or total_steps
    if total is None or total <= 0:
        raise ValueError(
            f"warmup-cosine needs a positive total step count (OptimConfig.total_steps or max_steps), got {total}"
        )
    groups = param_groups(model, config.weight_decay) if isinstance(model, nn.Module) else model
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, config.warmup_steps, total, config.min_lr_ratio)
    )
    return opt, sched
