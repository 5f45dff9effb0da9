"""Pretraining entry point (Hydra): instantiate data, model, task, loggers, callbacks and trainer; fit.

    python -m fm.train data.corpus=corpus/ trainer.max_steps=50                  # CPU, debug preset
    fm pretrain data.corpus=corpus/ model=small trainer=gpu                        # same, through the fm CLI
    fm pretrain -m data.corpus=corpus/ model.depth=1,2 trainer.max_steps=20        # a sweep (multirun)
    torchrun --nproc_per_node 2 -m fm.train data.corpus=corpus/ trainer=ddp trainer.devices=2
    python -m fm.train ckpt_path=runs/x/checkpoints/last.ckpt ...                  # resume exactly

Configs live in configs/ (pretrain.yaml and its groups). Everything that can be checked before training is: an
unknown preset, backend or strategy, a config field of the wrong type, a resume path that does not exist, a
checkpoint made for another vocabulary or architecture.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _register_resolvers() -> None:
    # bf16-mixed where CUDA is, fp32 elsewhere; wandb offline without an API key
    resolvers = {
        "fm.auto_precision": lambda: "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "fm.wandb_offline": lambda: not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline",
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_resolvers()


def read_checkpoint_meta(path: str | os.PathLike) -> dict | None:
    """The ``fm`` entry of a Lightning checkpoint file or a DeepSpeed checkpoint folder (no weights loaded twice)."""
    from fm.ckpt_meta import CKPT_KEY

    path = Path(path)
    if path.is_dir():  # DeepSpeed: client state is in the rank-0 model-states file
        files = sorted(path.glob("**/mp_rank_00_model_states.pt")) or sorted(path.glob("**/*model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path}: a folder, but no DeepSpeed model-states file in it")
        path = files[0]
    return torch.load(path, map_location="cpu", weights_only=False).get(CKPT_KEY)


def check_paths(cfg: DictConfig, names: tuple[str, ...] = ("ckpt_path", "init_ckpt")) -> None:
    """Raise FileNotFoundError naming the key when a checkpoint path in ``cfg`` does not exist."""
    for key in names:
        value = cfg.get(key)
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"{key}={value}: no such checkpoint file or folder")


def compose(overrides: list[str], config_name: str = "pretrain") -> DictConfig:
    """A config of configs/ (pretrain, finetune) with ``overrides``, composed outside a Hydra run (set
    ``output_dir``: there is no Hydra run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


# what a user can get wrong before training: a key, a value, a file (each message names it)
BAD_INPUT = (ValueError, FileNotFoundError, KeyError, MissingMandatoryValue)
HYDRA_FILES = {".hydra"}  # and the job's <name>.log: all a run folder holds before training writes anything


def check_config(cfg: DictConfig, optional: tuple[str, ...] = ()) -> None:
    """Raise MissingMandatoryValue naming every required key (``???`` in configs/) left unset, but ``optional``."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra.") and k not in optional)
    if missing:
        raise MissingMandatoryValue(f"{', '.join(missing)} must be set: add {missing[0]}=... to the command")


@contextmanager
def user_errors(cfg: DictConfig) -> Iterator[None]:
    """Bad input (BAD_INPUT) becomes one line on stderr and exit code 2, and the run folder Hydra made before the
    config could be checked is removed when nothing but Hydra's own files are in it. Hydra would print a traceback
    and exit 1 (it catches every Exception; SystemExit passes through); HYDRA_FULL_ERROR=1 still shows it."""
    try:
        yield
    except (*BAD_INPUT, InstantiationException) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) else e
        if not isinstance(cause, BAD_INPUT) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        out = Path(cfg.output_dir)
        if out.is_dir() and all(p.name in HYDRA_FILES or p.suffix == ".log" for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
            for parent in out.parents:  # runs/pretrain/, runs/ when this run made them
                if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()
        message = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause  # KeyError's repr quotes
        sys.stderr.write(f"fm: error: {message}\n")
        raise SystemExit(2) from None


def _one_handler_for_lightning() -> None:
    """``import lightning`` gives the ``lightning`` logger its own console handler and lets records propagate too;
    under a configured root logger (Hydra's, the CLI's) every Lightning line then printed twice. The root's stays."""
    if logging.getLogger().handlers:
        lightning_log = logging.getLogger("lightning")
        for handler in [h for h in lightning_log.handlers if type(h) is logging.StreamHandler]:
            lightning_log.removeHandler(handler)


def setup_run(cfg: DictConfig, checkpoint_keys: tuple[str, ...] = ("ckpt_path", "init_ckpt"),
              optional: tuple[str, ...] = ()) -> None:
    """What every run does first: check the config (every ``???`` key set but ``optional``) and checkpoint paths,
    seed everything, pick the matmul precision."""
    import lightning as L

    _one_handler_for_lightning()
    check_config(cfg, optional)
    check_paths(cfg, checkpoint_keys)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")


def fit(cfg: DictConfig, task, datamodule, callbacks: list | None = None) -> dict:
    """Instantiate ``cfg``'s callbacks, loggers and trainer; fit ``task`` (resuming from ``cfg.ckpt_path`` if set).

    Returns the trainer, task, datamodule and the last logged scalar metrics.
    """
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar

    cbs = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None] + list(callbacks or [])
    if not cfg.trainer.get("enable_progress_bar", True):  # the trainer's switch wins (Lightning refuses both)
        cbs = [c for c in cbs if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=cbs, logger=loggers or False)
    failed = True
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        failed = False
    finally:
        finish_wandb(loggers, exit_code=int(failed))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return {"trainer": trainer, "task": task, "datamodule": datamodule, "metrics": metrics}


def finish_wandb(loggers: list, exit_code: int = 0) -> None:
    """End the wandb run of ``loggers``' WandbLogger. Lightning leaves it open after ``fit``, and a sweep's jobs
    (``-m``) run one after another in one process: the next job's WandbLogger would log into this job's run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def run(cfg: DictConfig, callbacks: list | None = None) -> dict:
    """Train as ``cfg`` says. Returns the trainer, task, datamodule and the last logged metrics.

    Args:
        cfg: the composed pretrain config.
        callbacks: extra callbacks (tests use this), added after those in ``cfg.callbacks``.
    """
    from hydra.utils import instantiate

    from fm.ckpt_meta import check_checkpoint_meta

    setup_run(cfg)
    datamodule = instantiate(cfg.data)
    model_cfg = instantiate(cfg.model, vocab_size=len(datamodule.vocab))
    task = instantiate(cfg.task, model=model_cfg, vocab_hash=datamodule.vocab.hash, _convert_="all")
    if cfg.get("ckpt_path"):
        check_checkpoint_meta(read_checkpoint_meta(cfg.ckpt_path), datamodule.vocab.hash, model_cfg, cfg.ckpt_path)
    if cfg.get("init_ckpt"):
        init_from_checkpoint(task, cfg.init_ckpt)
    return fit(cfg, task, datamodule, callbacks)


def init_from_checkpoint(task, path: str | os.PathLike) -> None:
    """Initialise ``task``'s weights from a checkpoint file or ZeRO folder (vocabulary and architecture checked);
    not a resume."""
    from fm.ckpt_io import load_training_checkpoint
    from fm.ckpt_meta import CKPT_KEY, check_checkpoint_meta

    ckpt = load_training_checkpoint(path)  # a file or a DeepSpeed ZeRO folder
    check_checkpoint_meta(ckpt.get(CKPT_KEY), task.vocab_hash, task.model_config, str(path))
    task.load_state_dict(ckpt["state_dict"])
    log.info("initialised weights from %s", path)


@hydra.main(config_path=CONFIG_DIR, config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):
        result = run(cfg)
    return result["metrics"].get(cfg.get("optimized_metric") or "train/loss")


def cli(overrides: list[str]) -> None:
    """``fm pretrain key=value ... [-m]``: hand the overrides (and Hydra flags) to :func:`main`.

    ``sys.argv[0]`` becomes this file, so a Lightning-spawned multi-process run relaunches this entry point.
    """
    sys.argv = [__file__, *overrides]
    main()


if __name__ == "__main__":
    main()
