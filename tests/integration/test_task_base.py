"""The shared training plan (fm.tasks.base) on 2 CPU ranks: a non-finite loss on one rank makes every rank raise
(nan_policy=stop) or every rank skip the step (nan_policy=skip), under DDP and DeepSpeed ZeRO-2; none is left
waiting in a collective (a hang fails the test by its timeout).

    python -m pytest tests/integration/test_task_base.py -q
    python -m torch.distributed.run --nproc_per_node 2 -m tests.integration.test_task_base OUT stop ddp   # a worker
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fm import keys
from fm.heads.base import LossOutput
from fm.tasks.base import TaskBase
from fm.tasks.optim import OptimConfig
from tests.integration.pretrain_helpers import run_module, torchrun

NAN_RANK, NAN_STEP, STEPS = 1, 2, 5


class TinyTask(TaskBase):
    """A linear model whose loss is NaN once, on one rank, at one step."""

    def __init__(self, nan_policy: str):
        super().__init__(nan_policy=nan_policy, optim=OptimConfig(lr=1e-2, warmup_steps=0))
        self.net = nn.Linear(4, 1)
        self.poisoned = False

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        loss = self.net(batch["x"]).pow(2).mean()
        if self.global_step == NAN_STEP and self.global_rank == NAN_RANK and not self.poisoned:
            self.poisoned = True  # once: a skipped step does not advance the step counter
            loss = loss * float("nan")
        return LossOutput(loss)

    def checkpoint_meta(self) -> dict:
        return {}

    def check_checkpoint(self, meta: dict | None) -> None:
        pass


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, generator=g), keys.B_GENE_MASK: torch.ones(3, dtype=torch.bool)} for _ in range(64)]


def worker(out: Path, policy: str, strategy: str) -> None:
    """One rank: fit TinyTask; write what happened to ``out/rank{r}.json`` (an error is recorded, not raised)."""
    import lightning as L
    from torch.utils.data import DataLoader

    if strategy == "deepspeed":
        from fm.distributed import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=2, logging_batch_size_per_gpu=4)
    task = TinyTask(policy)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision="32-true")
    result: dict = {}
    try:
        trainer.fit(task, DataLoader(_batches(), batch_size=4))
    except FloatingPointError as err:
        result["error"] = str(err)
    weights = torch.cat([p.detach().flatten().float() for p in task.net.parameters()])
    result.update(rank=trainer.global_rank, step=trainer.global_step, skipped=task.skipped_steps,
                  weights=weights.tolist())
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _run(tmp_path: Path, policy: str, strategy: str) -> list[dict]:
    run_module([*torchrun(2), "-m", "tests.integration.test_task_base", str(tmp_path), policy, strategy], timeout=300)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_nan_on_one_rank_stops_every_rank(tmp_path, strategy):
    ranks = _run(tmp_path, "stop", strategy)
    for r in ranks:
        assert "error" in r, f"rank {r['rank']} did not stop"
        assert f"at step {NAN_STEP}" in r["error"] and "task.nan_policy=stop" in r["error"]
        assert r["step"] == NAN_STEP


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, strategy):
    ranks = _run(tmp_path, "skip", strategy)
    for r in ranks:
        assert "error" not in r, r.get("error")
        assert r["skipped"] == 1 and r["step"] == STEPS, r
        assert all(torch.isfinite(torch.tensor(r["weights"])))
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"])  # the ranks still hold one model


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
