"""Fine-tuning entry point (Hydra): a pretrained encoder from a checkpoint, one decoder head, the corpus; fit.

    python -m fm.finetune head=velocity checkpoint=runs/pretrain/x/checkpoints/last.ckpt data.corpus=corpus/
    fm finetune head=expression checkpoint=... data.corpus=corpus/ task.finetune.encoder=last_k
    fm finetune head=generative checkpoint=... data.corpus=corpus/ trainer.max_steps=200 logger=csv
    fm finetune head=scvi data.corpus=corpus/ data.max_genes=2000       # a baseline: no encoder, no checkpoint

Configs: configs/finetune.yaml and its groups (head/ picks the decoder). The encoder's architecture comes from the
checkpoint, so there is no model group. Checked before any step: the checkpoint exists, is an fm checkpoint, and was
made for the corpus's vocabulary. Trainer, loggers and callbacks are built as in :mod:`fm.train`.

The baselines (head=scvi | scscope | celldancer) train through the same data module, trainer, loggers, callbacks and
checkpoints as a fm.tasks.baseline.BaselineTask: the head alone with its own optimiser (``task.*`` is not used).
They have no encoder, so ``checkpoint=`` is refused for them; they need ``data.max_genes`` >= the vocabulary size.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fm.train import CONFIG_DIR, fit, setup_run, user_errors

CHECKPOINT_KEYS = ("checkpoint", "ckpt_path")


def run(cfg: DictConfig, callbacks: list | None = None) -> dict:
    """Fine-tune as ``cfg`` (the composed finetune config) says. Returns trainer, task, datamodule and metrics."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    from fm.tasks.baseline import baseline_name
    from fm.tasks.finetune import load_encoder_state

    baseline = baseline_name(get_class(cfg.head._target_))
    if baseline is not None:
        return run_baseline(cfg, baseline, callbacks)
    if OmegaConf.is_missing(cfg, "checkpoint") or cfg.checkpoint is None:
        raise ValueError(f"checkpoint: head={cfg.head._target_.rsplit('.', 1)[-1]} fine-tunes a pretrained encoder; "
                         "give checkpoint=PATH (a pretraining checkpoint file)")
    setup_run(cfg, CHECKPOINT_KEYS)
    datamodule = instantiate(cfg.data)
    vocab_hash = datamodule.vocab.hash
    model_cfg, encoder_state = load_encoder_state(cfg.checkpoint, vocab_hash)  # fails here on another vocabulary
    # the head's config goes in after instantiate, which would turn a dataclass argument into a plain dict
    make_task = instantiate(cfg.task, model=model_cfg, vocab_hash=vocab_hash, _partial_=True, _convert_="all")
    task = make_task(head=instantiate(cfg.head))
    task.init_encoder(encoder_state, source=str(cfg.checkpoint))
    return fit(cfg, task, datamodule, callbacks)


def run_baseline(cfg: DictConfig, name: str, callbacks: list | None = None) -> dict:
    """Train the baseline ``name`` (fm.tasks.baseline.BaselineTask) on ``cfg``'s data with ``cfg``'s trainer."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fm.tasks.baseline import BaselineTask, check_data

    if not OmegaConf.is_missing(cfg, "checkpoint") and cfg.checkpoint is not None:
        raise ValueError(
            f"checkpoint: head={name} is a baseline, trained alone by BaselineTask without an encoder; "
            f"leave out checkpoint={cfg.checkpoint}"
        )
    setup_run(cfg, ("ckpt_path",), optional=("checkpoint",))
    datamodule = instantiate(cfg.data)
    check_data(datamodule.config, len(datamodule.vocab), name)
    head = instantiate(cfg.head, _convert_="all")(n_genes=len(datamodule.vocab))
    task = BaselineTask(head, vocab_hash=datamodule.vocab.hash, seed=cfg.seed)
    return fit(cfg, task, datamodule, callbacks)


@hydra.main(config_path=CONFIG_DIR, config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        result = run(cfg)
    return result["metrics"].get(cfg.get("optimized_metric") or "train/loss")


def cli(overrides: list[str]) -> None:
    """``fm finetune head=... checkpoint=... key=value ... [-m]``: hand the overrides to :func:`main`."""
    sys.argv = [__file__, *overrides]
    main()


if __name__ == "__main__":
    main()
