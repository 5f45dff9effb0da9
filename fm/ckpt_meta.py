"""What a training checkpoint says about itself: the ``checkpoint["fm"]`` entry and its checks.

Every task writes ``checkpoint[CKPT_KEY]``: the vocabulary hash, the RNG states and what describes its model (the
encoder config; a fine-tuned or baseline head's name). Training (fm.tasks), resuming (fm.train) and releasing
(fm.checkpoint) all read it from here, so a release is made and loaded without importing training code.

    .venv/bin/python -c "from fm.ckpt_meta import CKPT_KEY; print(CKPT_KEY)"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fm.model.config import ZorroConfig

CKPT_KEY = "fm"  # checkpoint entry with what describes the model (config, vocab hash, head) and the RNG states


class CheckpointMismatchError(ValueError):
    """A checkpoint was made for another vocabulary or another architecture."""


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


def check_head(meta: dict, head_name: str, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint was made with another head."""
    if meta.get("head") != head_name:
        raise CheckpointMismatchError(f"{source}: head {meta.get('head')!r} differs from {head_name!r}")
