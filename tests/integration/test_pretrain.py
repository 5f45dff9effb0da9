"""One-process pretraining through the real configs: bad input, NaN policy, preemption, exact resume, CLI sweep.

    python -m pytest tests/integration/test_pretrain.py -q
"""

from __future__ import annotations

import math
import os
import signal
import sys

import lightning as L
import pytest
import torch
from hydra.errors import MissingConfigException

from fm import keys
from fm.ckpt_meta import CheckpointMismatchError
from fm.train import run
from tests.integration.pretrain_helpers import LossRecorder, build_corpus, compose, run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.getbasetemp() / "pretrain_data")


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory):  # another gene vocabulary
    return build_corpus(tmp_path_factory.getbasetemp() / "pretrain_other", n_cells=120, n_genes=30, gene_seed=7)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A short run with a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("trained")
    run(compose(corpus, out, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=3"))
    return out / "checkpoints" / "last.ckpt"


class SignalAt(L.Callback):
    """Sends this process a signal at the end of a given step (a scheduler's preemption notice)."""

    def __init__(self, step: int, sig=signal.SIGUSR1):
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


class NanAt(L.Callback):
    """Turns the input of one batch into NaN (once: a skipped step does not advance the step counter)."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.done:
            batch[keys.B_SPLICED].fill_(float("nan"))
            self.done = True


def _fails_before_training(cfg, error, match):
    rec = LossRecorder()
    with pytest.raises(error, match=match):
        run(cfg, callbacks=[rec])
    assert not rec.started, "the error came after training had started"


# --- bad input: each a clear error before any training step ------------------------------------------------------
@pytest.mark.parametrize(
    "override, error, match",
    [
        ("model.name=huge", Exception, "unknown ZorroConfig preset 'huge'"),
        ("model.attention=fast", Exception, "attention"),
        ("trainer.strategy=ddp_turbo", Exception, "ddp_turbo"),
        ("task.optim.lr=fast", Exception, "OptimConfig.lr"),
        ("task.head.proj_dim=1.5", Exception, "ContrastiveConfig.proj_dim"),
        ("task.nan_policy=ignore", Exception, "nan_policy"),
        ("ckpt_path=/nonexistent/last.ckpt", FileNotFoundError, "ckpt_path=/nonexistent/last.ckpt"),
    ],
)
def test_bad_input_fails_before_training(corpus, tmp_path, override, error, match):
    _fails_before_training(compose(corpus, tmp_path, "trainer.max_steps=2", override), error, match)


def test_unknown_trainer_group_fails_at_composition(corpus, tmp_path):
    with pytest.raises(MissingConfigException, match="deepspeed_stage_9"):
        compose(corpus, tmp_path, "trainer=deepspeed_stage_9")


@pytest.mark.parametrize("key", ["ckpt_path", "init_ckpt"])
def test_checkpoint_of_another_vocabulary_is_refused(trained, other_corpus, tmp_path, key):
    cfg = compose(other_corpus, tmp_path, "trainer.max_steps=8", f"{key}={trained}")
    _fails_before_training(cfg, CheckpointMismatchError, "vocabulary hash")


def test_checkpoint_of_another_architecture_is_refused(trained, corpus, tmp_path):
    cfg = compose(corpus, tmp_path, "trainer.max_steps=8", "model.depth=3", f"ckpt_path={trained}")
    _fails_before_training(cfg, CheckpointMismatchError, "depth")


# --- NaN / inf ---------------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_step_and_writes_no_nan_checkpoint(corpus, tmp_path):
    cfg = compose(corpus, tmp_path, "trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=1")
    with pytest.raises(FloatingPointError, match="step 3"):
        run(cfg, callbacks=[NanAt(3)])
    ckpts = sorted((tmp_path / "checkpoints").glob("step*.ckpt"))
    assert [c.name for c in ckpts] == [f"step{s:07d}.ckpt" for s in (1, 2, 3)]
    for c in ckpts:
        state = torch.load(c, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_loss_skipped_by_policy(corpus, tmp_path):
    rec = LossRecorder()
    result = run(compose(corpus, tmp_path, "trainer.max_steps=5", "task.nan_policy=skip"), callbacks=[NanAt(2), rec])
    assert result["task"].skipped_steps == 1
    assert all(math.isfinite(v) for v in rec.losses.values())
    assert all(torch.isfinite(p).all() for p in result["task"].parameters())


# --- preemption and exact resume ---------------------------------------------------------------------------------
def test_preempted_run_resumes_like_an_uninterrupted_one(corpus, tmp_path):
    steps, stop = 10, 4
    base = ["trainer.max_steps=10", "task.head.w_recon=0.5"]  # reconstruction on: the masking RNG must resume too
    full = LossRecorder()
    run(compose(corpus, tmp_path / "full", *base), callbacks=[full])

    first = LossRecorder()
    result = run(compose(corpus, tmp_path / "cut", *base), callbacks=[first, SignalAt(stop)])
    preempt = tmp_path / "cut" / "checkpoints" / "preempt.ckpt"
    stop = result["trainer"].global_step  # the signal is noticed at the end of the step it arrives in, or the next
    assert preempt.exists() and stop in (4, 5) and sorted(first.losses) == list(range(1, stop + 1))
    assert torch.load(preempt, map_location="cpu", weights_only=False)["global_step"] == stop

    second = LossRecorder()
    run(compose(corpus, tmp_path / "cut", *base, f"ckpt_path={preempt}"), callbacks=[second])
    assert sorted(second.losses) == list(range(stop + 1, steps + 1))
    for step in range(1, steps + 1):
        resumed = first.losses.get(step, second.losses.get(step))
        assert resumed == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), f"step {step}"


# --- the CLI: fm pretrain key=value ... -m -------------------------------------------------------------------------
def test_cli_multirun_sweeps_depth(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    run_module([sys.executable, "-m", "fm.cli", "pretrain", "-m", f"data.corpus={corpus}", "model.depth=1,2",
                "trainer.max_steps=2", "logger=csv", "data.batch_size=8", "data.max_genes=16", "data.num_workers=0",
                "data.val_fraction=0.0", "trainer.limit_val_batches=0", "callbacks.progress_bar=null",
                "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", f"hydra.sweep.dir={sweep}"])
    for job in ("0", "1"):
        assert (sweep / job / "csv" / "metrics.csv").exists(), sorted(p.name for p in sweep.iterdir())
    import yaml

    depths = [yaml.safe_load((sweep / j / ".hydra" / "config.yaml").read_text())["model"]["depth"] for j in "01"]
    assert depths == [1, 2]
