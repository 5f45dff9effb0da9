"""Every config group composes and instantiates on CPU (the real configs/ with tiny overrides).

    python -m pytest tests/unit/test_configs.py -q
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fm.train import CONFIG_DIR
from tests.integration.pretrain_helpers import build_corpus

GROUPS = ("model", "data", "task", "trainer", "logger", "callbacks", "experiment", "hparams_search")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.getbasetemp() / "configs_data", n_cells=120, n_genes=20)


def _compose(corpus, tmp_path, *overrides, hydra: bool = False):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("pretrain", overrides=[f"data.corpus={corpus}", f"output_dir={tmp_path}", *overrides],
                       return_hydra_config=hydra)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_instantiates(group, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for option in options(group):
        cfg = _compose(corpus, tmp_path, f"{group}={option}", "data.num_workers=0", hydra=group == "hparams_search")
        dm = instantiate(cfg.data)
        model_cfg = instantiate(cfg.model, vocab_size=len(dm.vocab))
        assert model_cfg.vocab_size == len(dm.vocab)
        if model_cfg.d_model <= 256:  # building base (~100M parameters) is not what this test is about
            task = instantiate(cfg.task, model=model_cfg, vocab_hash=dm.vocab.hash, _convert_="all")
            assert task.head_config.proj_dim > 0
        cbs = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
        trainer = instantiate(cfg.trainer, callbacks=cbs, logger=loggers or False, accelerator="cpu", devices=1)
        assert isinstance(trainer, L.Trainer)
        if group == "hparams_search":
            assert cfg.hydra.sweeper.params, option


def test_fast_dev_run_on_the_default_config(corpus, tmp_path):
    from fm.train import run

    cfg = _compose(corpus, tmp_path, "logger=csv", "data.num_workers=0", "data.batch_size=8", "data.max_genes=16",
                   "+trainer.fast_dev_run=2", "callbacks.progress_bar=null")
    result = run(cfg)
    assert result["trainer"].global_step == 2
