"""Reading a training checkpoint, a Lightning file or a DeepSpeed ZeRO folder alike, as one dict.

    python -c "from fm.ckpt_io import load_training_checkpoint as f; print(sorted(f('runs/x/checkpoints/last.ckpt')))"

A ZeRO checkpoint (any stage, any world size) is a folder of per-rank shards; it is consolidated to one fp32
Lightning checkpoint in a temporary folder first (:func:`fm.distributed.consolidate_zero_checkpoint`, on CPU, no
process group), which keeps the client state fm writes (the ``fm`` entry: model config, vocabulary hash) beside
``state_dict``. Training checkpoints hold optimizer and loop state (pickled): they are the user's own files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fm.distributed import consolidate_zero_checkpoint


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` (a file, or a DeepSpeed ZeRO folder, consolidated), loaded on CPU.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder that is not a DeepSpeed checkpoint (names the path).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or DeepSpeed folder")
    if path.is_dir():
        if not any(path.glob("**/*model_states.pt")):
            raise FileNotFoundError(f"{path}: a folder, but no DeepSpeed model-states file in it")
        with tempfile.TemporaryDirectory(prefix="fm-zero-") as tmp:
            merged = consolidate_zero_checkpoint(path, Path(tmp) / "consolidated.ckpt")
            return torch.load(merged, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False)
