"""The one interface every head and baseline implements (DESIGN.md §6).

A head turns the encoder's output into predictions and a loss:

    outputs = head(batch, encoder_output)        # dict of tensors
    loss_out = head.loss(batch, outputs)          # LossOutput: total + named parts
    loss_out.loss.backward()

A head that needs its input corrupted before the encoder sees it (masked-value reconstruction) does that in
``prepare(batch, generator)``, which the task calls before the encoder; the default returns the batch untouched.
A head declares what ``fm predict`` writes from its outputs (``predict_layers``: output -> AnnData layer and what it
holds; ``predict_gathered`` / ``predict_reduce`` for outputs that need all of a cell's genes at once) and which gene
table fine-tuning seeds from the encoder (``gene_table``), so that prediction, export, evaluation and fine-tuning hold
no head names; ``uses_encoder`` is False for the baselines,
which are released and run without an encoder, their outputs dense over the vocabulary [B, V].
Heads are single-device modules: they never call torch.distributed themselves (global negatives go through
:mod:`fm.distributed`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn


def check_fields(config) -> None:
    """Raise a TypeError naming the field when a dataclass config holds a value of the wrong type.

    Handles the annotations configs use: bool, int, float (an int is accepted), str, Literal, and ``X | None``.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if not _matches(value, hint):
            name = f"{type(config).__name__}.{f.name}"
            raise TypeError(f"{name}: expected {hint}, got {value!r} ({type(value).__name__})")


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    return True  # containers and classes: not checked here


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: matrices (decayed) and everything 0/1-dimensional (biases, norms, scalars; not decayed).
    Here, below the tasks, so that a head can declare its own groups (``optim_groups``) without training code."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class LossOutput:
    """A head's loss: the weighted total that is optimised, plus named parts and metrics for logging.

    Args:
        loss: scalar, the weighted sum the optimiser minimises.
        parts: scalar losses by name, before weighting (what the total is made of).
        metrics: scalar diagnostics by name (no gradient needed), e.g. retrieval accuracy.
    """

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss.dim() != 0:
            raise ValueError(f"LossOutput.loss must be a scalar, got shape {tuple(self.loss.shape)}")

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.loss.detach()).item())

    def to_log(self, prefix: str) -> dict[str, Tensor]:
        """Everything as detached scalars keyed ``{prefix}/{name}`` (``{prefix}/loss`` for the total)."""
        out = {f"{prefix}/loss": self.loss.detach()}
        out.update({f"{prefix}/{k}": v.detach() for k, v in self.parts.items()})
        out.update({f"{prefix}/{k}": v.detach() for k, v in self.metrics.items()})
        return out


@dataclass(frozen=True)
class PredictLayer:
    """A layer ``fm predict`` writes from one of a head's outputs."""

    layer: str  # the AnnData layer (fm.keys), cells x genes
    doc: str  # what it holds and in which units (written to uns['fm']['layers'])


class Head(nn.Module):
    """Base class of heads: ``prepare`` (optional input corruption), ``forward`` and ``loss``."""

    # False: the head reads the batch alone (a baseline) and its outputs are [B, V] over the vocabulary; a release of
    # it holds no encoder
    uses_encoder: ClassVar[bool] = True

    def predict_layers(self) -> dict[str, PredictLayer]:
        """Output name -> the layer ``fm predict`` writes it to (default: none; the head is not predicted with)."""
        return {}

    def predict_obs(self) -> dict[str, PredictLayer]:
        """Per-cell output name ([B]) -> the ``obs`` column ``fm predict`` writes it to (default: none)."""
        return {}

    def predict_gathered(self) -> tuple[str, ...]:
        """Per-gene outputs ``fm predict`` gathers over all of a cell's gene chunks and hands to
        :meth:`predict_reduce`, which then makes the ``predict_layers`` outputs (default: none; each chunk's outputs
        are written as they come)."""
        return ()

    def predict_reduce(self, gathered: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """The ``predict_layers`` outputs [B, M] from the gathered outputs [B, M] over a cell's M queried genes."""
        raise NotImplementedError(f"{type(self).__name__} gathers {self.predict_gathered()} but has no predict_reduce")

    def gene_table(self) -> nn.Embedding | None:
        """The head's own gene embedding [V, D] that fine-tuning seeds from the encoder's (default: none)."""
        return None

    def prepare(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Return the batch the encoder should see (default: unchanged)."""
        return batch

    def forward(self, batch: dict, encoder_output) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def loss(self, batch: dict, outputs: dict[str, Tensor]) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError
