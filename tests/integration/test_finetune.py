"""Fine-tuning each decoder head from a pretraining checkpoint through the real entry point and configs, on CPU.

    python -m pytest tests/integration/test_finetune.py -q
"""

from __future__ import annotations

import sys

import pytest
import torch

from fm import finetune, train
from fm.ckpt_meta import CKPT_KEY, CheckpointMismatchError
from fm.tasks.finetune import load_encoder_state
from tests.integration.pretrain_helpers import TINY, LossRecorder, build_corpus, compose, run_module

pytestmark = pytest.mark.slow

# the pretraining tiny settings without the pretraining-only ones (model group, task.*)
FT_TINY = [o for o in TINY if not o.startswith(("model=", "task."))] + [
    "task.optim.warmup_steps=5",
    "task.optim.lr=3e-3",
    "task.finetune.encoder_lr=1e-3",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A simulated corpus and a few pretraining steps on it through the real entry point: (corpus, last checkpoint)."""
    root = tmp_path_factory.mktemp("finetune")
    corpus = build_corpus(root / "data")
    train.run(compose(corpus, root / "pretrain", "trainer.max_steps=4"))
    return corpus, root / "pretrain" / "checkpoints" / "last.ckpt"


def compose_finetune(corpus, out, checkpoint, *overrides):
    return train.compose(
        [f"data.corpus={corpus}", f"output_dir={out}", f"checkpoint={checkpoint}", *FT_TINY, *overrides], "finetune"
    )


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize(
    "head, encoder, part",
    [
        ("expression", "frozen", "train/spliced_nll"),
        ("velocity head.mode=supervised", "last_k", "train/velocity_mse"),
        ("generative", "full", "train/nll"),
    ],
)
def test_head_trains_from_checkpoint(pretrained, tmp_path, head, encoder, part):
    corpus, pretrained = pretrained
    rec = LossRecorder()
    head, *extra = head.split()
    cfg = compose_finetune(corpus, tmp_path, pretrained, f"head={head}", *extra, f"task.finetune.encoder={encoder}",
                           "trainer.max_steps=50")
    result = finetune.run(cfg, callbacks=[rec])

    losses = [rec.losses[s] for s in sorted(rec.losses)]
    assert len(losses) == 50
    assert _mean(losses[-5:]) < 0.9 * _mean(losses[:5]), losses
    assert part in result["metrics"], sorted(result["metrics"])  # the head's loss parts are logged

    _, before = load_encoder_state(pretrained, None)
    after = result["task"].encoder.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    if encoder == "frozen":
        assert not changed
    elif encoder == "last_k":  # the top block (and what sits above it) trains, nothing below it
        depth = result["task"].model_config.depth
        assert any(k.startswith(f"blocks.{depth - 1}.") for k in changed)
        assert not any(k.startswith(("embed.", *(f"blocks.{i}." for i in range(depth - 1)))) for k in changed)
    else:
        assert any(k.startswith("embed.") for k in changed) and any(k.startswith("blocks.0.") for k in changed)

    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved[CKPT_KEY]["head"] == head
    assert saved[CKPT_KEY]["vocab_hash"] == result["datamodule"].vocab.hash


def _fails_before_training(cfg, error, match):
    rec = LossRecorder()
    with pytest.raises(error, match=match):
        finetune.run(cfg, callbacks=[rec])
    assert not rec.started, "the error came after training had started"


def test_checkpoint_of_another_vocabulary_is_refused(pretrained, tmp_path):
    checkpoint = pretrained[1]
    other_corpus = build_corpus(tmp_path / "other", n_cells=120, n_genes=30, gene_seed=7)  # other genes
    cfg = compose_finetune(other_corpus, tmp_path, checkpoint, "trainer.max_steps=2")
    _fails_before_training(cfg, CheckpointMismatchError, f"{checkpoint}: vocabulary hash")


@pytest.mark.parametrize(
    "override, error, match",
    [
        pytest.param("checkpoint=/nonexistent/last.ckpt", FileNotFoundError, "checkpoint=/nonexistent/last.ckpt",
                     id="missing-checkpoint"),
        pytest.param("task.finetune.encoder=half", Exception, "FinetuneConfig.encoder", id="encoder-mode"),
        pytest.param("task.finetune.unfreeze_last=9", Exception, "FinetuneConfig.unfreeze_last", id="too-deep"),
        pytest.param("head=scvi", ValueError, "checkpoint: head=scvi is a baseline", id="baseline-given-a-checkpoint"),
    ],
)
def test_bad_input_fails_before_training(pretrained, tmp_path, override, error, match):
    corpus, checkpoint = pretrained
    cfg = compose_finetune(corpus, tmp_path, checkpoint, "trainer.max_steps=2", "task.finetune.encoder=last_k",
                           override)
    _fails_before_training(cfg, error, match)


def test_dynamical_velocity_head_warm_starts_and_trains(pretrained, tmp_path):
    """The default velocity head (self-supervised dynamical model): warm-started on training cells before the first
    step, its likelihood and clock losses logged, the clock's gradient reaching the encoder's top block."""
    corpus, pretrained = pretrained
    cfg = compose_finetune(corpus, tmp_path, pretrained, "head=velocity", "task.finetune.encoder=last_k",
                           "head.warm_start_rounds=2", "trainer.max_steps=5")
    result = finetune.run(cfg)
    head = result["task"].head
    assert head.config.mode == "dynamical" and int(head.kinetics.fitted.sum()) >= 5
    assert {"train/nll", "train/clock"} <= set(result["metrics"]), sorted(result["metrics"])
    _, before = load_encoder_state(pretrained, None)
    depth = result["task"].model_config.depth
    after = result["task"].encoder.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(f"blocks.{depth - 1}."))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["state_dict"]["head.kinetics.fitted"].sum() == head.kinetics.fitted.sum()  # resumes without refit


def test_cli_finetunes_velocity(pretrained, tmp_path):
    corpus, pretrained = pretrained
    run_module([sys.executable, "-m", "fm.cli", "finetune", "head=velocity", f"checkpoint={pretrained}",
                f"hydra.run.dir={tmp_path}", "trainer.max_steps=2", *FT_TINY, f"data.corpus={corpus}"])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved[CKPT_KEY]["head"] == "velocity" and saved["global_step"] == 2
