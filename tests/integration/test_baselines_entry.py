"""The baselines (scVI, scScope, cellDancer) through the real fine-tuning entry point and configs, on CPU.

    python -m pytest tests/integration/test_baselines_entry.py -q
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fm import finetune, train
from fm.ckpt_meta import CKPT_KEY, CheckpointMismatchError
from fm.tasks.baseline import BaselineTask, load_baseline
from tests.integration.pretrain_helpers import TINY, LossRecorder, build_corpus

pytestmark = pytest.mark.slow

N_GENES = 40
# the pretraining tiny settings without the model and task ones; every gene of a cell is a token
BASE = [o for o in TINY if not o.startswith(("model=", "task.", "data.max_genes"))] + [f"data.max_genes={N_GENES}"]
# each baseline's recipe, with a learning rate that shows learning within a few dozen steps where the paper's is slow
RECIPES = {
    "scvi": ["head.n_epochs_kl_warmup=3"],
    "scscope": ["head.learning_rate=3e-3"],
    "celldancer": ["data.batch_size=64", "head.input=counts"],  # per-10k values saturate alpha0 = 2 u_max
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("baselines") / "data", n_cells=200, n_genes=N_GENES)


def compose(corpus, out, *overrides):
    return train.compose([f"data.corpus={corpus}", f"output_dir={out}", *BASE, *overrides], "finetune")


def _mean(values):
    return sum(values) / len(values)


class KLWeights(LossRecorder):
    """Also records scVI's KL weight and the trainer's epoch at every step."""

    def __init__(self):
        super().__init__()
        self.kl: dict[int, tuple[int, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.kl[trainer.global_step] = (trainer.current_epoch, pl_module.head.kl_weight)


@pytest.mark.parametrize("name", ["scvi", "scscope", "celldancer"])
def test_baseline_trains_through_finetune_entry(corpus, tmp_path, name):
    rec = KLWeights() if name == "scvi" else LossRecorder()
    steps = 36
    result = finetune.run(compose(corpus, tmp_path, f"head={name}", f"trainer.max_steps={steps}", *RECIPES[name]),
                          callbacks=[rec])
    task = result["task"]
    assert isinstance(task, BaselineTask) and task.head_name == name
    losses = [rec.losses[s] for s in sorted(rec.losses)]
    assert len(losses) == steps
    assert _mean(losses[-5:]) < 0.9 * _mean(losses[:5]), losses
    if name == "scvi":  # the KL weight is epoch / 3: it moves with the stream's epochs, not the steps
        epochs = {epoch: weight for epoch, weight in rec.kl.values()}
        assert len(epochs) >= 3, epochs
        assert all(w == pytest.approx(min(1.0, e / 3)) for e, w in epochs.items()), epochs
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved[CKPT_KEY]["head"] == name
    assert saved[CKPT_KEY]["vocab_hash"] == result["datamodule"].vocab.hash
    loaded = load_baseline(tmp_path / "checkpoints" / "last.ckpt", result["datamodule"].vocab.hash)
    for k, v in task.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_celldancer_run_ends_when_every_gene_has_stopped(corpus, tmp_path):
    """As the package's: genes stop early, and the run ends when the last one does, before max_steps."""
    rec = LossRecorder()
    overrides = ["head=celldancer", "trainer.max_steps=300", "head.check_every=2", "head.patience=1",
                 *RECIPES["celldancer"]]  # fmt: skip
    head = finetune.run(compose(corpus, tmp_path, *overrides), callbacks=[rec])["task"].head
    assert head.finished and (head.stopped_at > 0).all()
    assert len(rec.losses) == int(head.stopped_at.max()) < 300  # the step that stopped the last gene was the last


class GradNorms(L.Callback):
    """The gradient norm before the trainer's clipping (on_before_optimizer_step) and after the step (clipping is in
    place; the next step's closure zeroes the gradients only later)."""

    def __init__(self):
        self.before, self.at_step = [], []

    @staticmethod
    def _norm(optimizer) -> float:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.at_step.append(self._norm(trainer.optimizers[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self._norm(optimizer))


def test_baselines_are_not_gradient_clipped(corpus, tmp_path):
    """The trainer config clips at norm 1 (for the decoders); a baseline trains with its package's recipe, no clip."""
    rec = GradNorms()
    cfg = compose(corpus, tmp_path, "head=scvi", "trainer.max_steps=4", *RECIPES["scvi"])
    assert cfg.trainer.gradient_clip_val == 1.0
    finetune.run(cfg, callbacks=[rec])
    assert len(rec.at_step) == 4 and max(rec.before) > 1.0  # clipping at 1 would have changed these norms
    assert rec.at_step == pytest.approx(rec.before, rel=1e-6)


@pytest.mark.parametrize("name", ["scvi", "celldancer"])
def test_baseline_resumes_exactly(corpus, tmp_path, name):
    """Stop after 6 steps and resume to 12: the same losses as 12 steps uninterrupted (scVI samples and drops out;
    cellDancer samples points, and its genes stop early: a check every 2 steps, so some stop before and after 6)."""
    recipe = {"scvi": ["head.n_epochs_kl_warmup=3"],
              "celldancer": [*RECIPES["celldancer"], "head.check_every=2", "head.patience=1"]}[name]  # fmt: skip
    head = [f"head={name}", *recipe, "callbacks.model_checkpoint.every_n_train_steps=6"]
    full, first, second = LossRecorder(), LossRecorder(), LossRecorder()
    task = finetune.run(compose(corpus, tmp_path / "full", *head, "trainer.max_steps=12"), callbacks=[full])["task"]
    if name == "celldancer":  # the resume crosses early stops: genes stopped before step 6 and after it
        stopped = task.head.stopped_at
        assert ((stopped > 0) & (stopped <= 6)).any() and ((stopped > 6) | (stopped < 0)).any(), stopped
    finetune.run(compose(corpus, tmp_path / "part", *head, "trainer.max_steps=6"), callbacks=[first])
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    finetune.run(compose(corpus, tmp_path / "part", *head, "trainer.max_steps=12", f"ckpt_path={ckpt}"),
                 callbacks=[second])
    assert sorted(second.losses) == list(range(7, 13))
    resumed = {**first.losses, **second.losses}
    assert resumed == pytest.approx(full.losses, rel=1e-5)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        pytest.param(["head=scvi", "data.max_genes=8"], ValueError, "data.max_genes=8", id="max-genes"),
        pytest.param(["head=scscope", "checkpoint=x.ckpt"], ValueError, "head=scscope is a baseline",
                     id="checkpoint-given"),
        pytest.param(["head=velocity"], ValueError, "checkpoint: head=VelocityConfig", id="decoder-needs-checkpoint"),
    ],
)
def test_bad_input_fails_before_training(corpus, tmp_path, overrides, error, match):
    rec = LossRecorder()
    with pytest.raises(error, match=match):
        finetune.run(compose(corpus, tmp_path, "trainer.max_steps=2", *overrides), callbacks=[rec])
    assert not rec.started


def test_checkpoint_of_another_head_is_refused(corpus, tmp_path):
    finetune.run(compose(corpus, tmp_path / "a", "head=scscope", "trainer.max_steps=2"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointMismatchError, match="head 'scscope' differs from 'scvi'"):
        finetune.run(compose(corpus, tmp_path / "b", "head=scvi", "trainer.max_steps=4", f"ckpt_path={ckpt}"))
