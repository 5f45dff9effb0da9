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
                   "trainer.fast_dev_run=2", "callbacks.progress_bar=null")
    result = run(cfg)
    assert result["trainer"].global_step == 2


# --- every option a user may set is in the YAML, with a comment ------------------------------------------------------
# Trainer arguments fm sets itself or that do not apply to a streamed corpus: not options of configs/trainer/
TRAINER_NOT_OPTIONS = {
    "logger", "callbacks",  # built from the logger/ and callbacks/ groups by fm.train
    "plugins", "model_registry", "barebones", "enable_autolog_hparams", "inference_mode",
    "use_distributed_sampler",  # the stream deals cells to ranks itself (fm.data.stream)
    "reload_dataloaders_every_n_epochs",  # the stream starts fresh workers every epoch anyway
    "limit_test_batches", "limit_predict_batches", "overfit_batches",  # no test/predict loop; an IterableDataset
}


def _yaml_keys(group: str, option: str) -> tuple[dict, str]:
    import yaml

    text = (Path(CONFIG_DIR) / group / f"{option}.yaml").read_text()
    return yaml.safe_load(text), text


def _commented(text: str, key: str) -> bool:
    return any(line.startswith(f"{key}:") and "#" in line for line in text.splitlines())


def _user_fields(what: str) -> set[str]:
    import dataclasses
    import inspect

    from fm.data.datamodule import DataConfig
    from fm.data.tokenize import TokenizerConfig
    from fm.heads.contrastive import ContrastiveConfig
    from fm.model.config import ZorroConfig
    from fm.tasks.optim import OptimConfig

    if what == "Trainer":
        return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"} - TRAINER_NOT_OPTIONS
    classes = {"DataConfig+TokenizerConfig": (DataConfig, TokenizerConfig), "ZorroConfig": (ZorroConfig,),
               "ContrastiveConfig": (ContrastiveConfig,), "OptimConfig": (OptimConfig,)}[what]
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return names - {"vocab_size"}  # the corpus's, set by fm.train


@pytest.mark.parametrize("group, option, section, fields", [
    ("data", "corpus", None, "DataConfig+TokenizerConfig"),
    ("trainer", "default", None, "Trainer"),
    *(("model", m, None, "ZorroConfig") for m in ("debug", "small", "base")),
    ("task", "contrastive", "head", "ContrastiveConfig"),
    ("task", "contrastive", "optim", "OptimConfig"),
])
def test_every_config_field_is_in_the_yaml_with_a_comment(group, option, section, fields):
    """No hidden key that only `+key=` reaches, and a one-line comment on each (before: data.normalization,
    data.verify_checksums, ... were missing from configs/data/corpus.yaml)."""
    values, text = _yaml_keys(group, option)
    values = values[section] if section else values
    where = f"configs/{group}/{option}.yaml" + (f" ({section})" if section else "")
    missing = sorted(_user_fields(fields) - set(values))
    assert not missing, f"{where} lacks {missing}"
    indent = "  " if section else ""
    uncommented = [k for k in values if k not in ("_target_", "name") and not _commented(text, indent + k)]
    assert not uncommented, f"{where}: no comment on {uncommented}"


def test_progress_bar_off_by_the_trainer_switch(corpus, tmp_path):
    """trainer.enable_progress_bar=false with the callbacks group's bar in place trains (Lightning refused it)."""
    from fm.train import run

    cfg = _compose(corpus, tmp_path, "logger=csv", "data.num_workers=0", "data.batch_size=8", "data.max_genes=16",
                   "trainer.fast_dev_run=1", "trainer.enable_progress_bar=false")
    assert cfg.callbacks.progress_bar is not None
    assert run(cfg)["trainer"].global_step == 1
