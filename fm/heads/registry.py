"""The decoder heads by name: each one's config class and module class, in one place.

Fine-tuning (fm.tasks.finetune) picks a head by its config's type from here, and a release (fm.checkpoint) is rebuilt
from the name it records, without importing training code.

    .venv/bin/python -c "from fm.heads.registry import HEADS; print(sorted(HEADS))"
"""

from __future__ import annotations

from fm.heads.base import Head
from fm.heads.expression import ExpressionConfig, ExpressionHead
from fm.heads.generative import GenerativeConfig, GenerativeHead
from fm.heads.velocity import VelocityConfig, VelocityHead

# head name -> (config class, head class); a config's type picks its head
HEADS: dict[str, tuple[type, type[Head]]] = {
    "expression": (ExpressionConfig, ExpressionHead),
    "velocity": (VelocityConfig, VelocityHead),
    "generative": (GenerativeConfig, GenerativeHead),
}
