"""The baselines by name: each one's config class and head class, in one place.

Baseline training (fm.tasks.baseline, ``fm finetune head=scvi|scscope|celldancer``) picks one by its config's type from
here, and a baseline's release (fm.checkpoint) is rebuilt from the name it records, without importing training code.

    .venv/bin/python -c "from fm.baselines.registry import BASELINES; print(sorted(BASELINES))"
"""

from __future__ import annotations

from fm.baselines.celldancer import CellDancerConfig, CellDancerHead
from fm.baselines.scscope import ScScopeConfig, ScScopeHead
from fm.baselines.scvi import SCVIConfig, SCVIHead
from fm.heads.base import Head

# baseline name -> (config class, head class); a config's type picks its head
BASELINES: dict[str, tuple[type, type[Head]]] = {
    "scvi": (SCVIConfig, SCVIHead),
    "scscope": (ScScopeConfig, ScScopeHead),
    "celldancer": (CellDancerConfig, CellDancerHead),
}
