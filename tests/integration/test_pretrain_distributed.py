"""Two CPU processes through the real entry point (torchrun -m fm.train): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

    python -m pytest tests/integration/test_pretrain_distributed.py -q
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.integration.pretrain_helpers import TINY, build_corpus, csv_losses, run_module, torchrun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.getbasetemp() / "pretrain_data")


def _train(corpus, out, trainer: str, steps: int, *extra: str):
    args = [*torchrun(2), "-m", "fm.train", f"data.corpus={corpus}", f"hydra.run.dir={out}", f"trainer={trainer}",
            "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_steps={steps}",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}", *TINY, *extra]
    return run_module(args)


def _falls(losses: dict[int, float], n: int = 8) -> tuple[float, float]:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:n]) / n
    last = sum(losses[s] for s in steps[-n:]) / n
    return first, last


def test_ddp_two_processes_loss_falls(corpus, tmp_path):
    _train(corpus, tmp_path, "ddp", 50)
    losses = csv_losses(tmp_path)
    assert len(losses) >= 45 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    first, last = _falls(losses)
    assert last < first - 0.3, f"loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_consolidates(corpus, tmp_path, stage):
    steps = 30
    dump = tmp_path / "outputs.pt"
    _train(corpus, tmp_path, f"deepspeed_stage_{stage}", steps,
           "+callbacks.dump._target_=tests.integration.pretrain_helpers.DumpOutputs", f"+callbacks.dump.path={dump}")
    losses = csv_losses(tmp_path)
    assert len(losses) >= steps - 2 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    first, last = _falls(losses, 5)
    assert last < first, f"ZeRO-{stage}: loss did not fall ({first:.3f} -> {last:.3f})"

    ckpt_dir = tmp_path / "checkpoints" / f"step{steps:07d}.ckpt"
    assert ckpt_dir.is_dir(), sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    merged = tmp_path / "merged.ckpt"
    code = (
        "import sys, torch\n"
        "from fm.distributed import consolidate_zero_checkpoint\n"
        "from fm.tasks.pretrain import PretrainTask\n"
        "from tests.integration.pretrain_helpers import example_batch\n"
        f"consolidate_zero_checkpoint({str(ckpt_dir)!r}, {str(merged)!r})\n"
        f"task = PretrainTask.load_from_checkpoint({str(merged)!r}, map_location='cpu').eval()\n"
        "with torch.no_grad():\n"
        "    out = task(example_batch(task.model_config.vocab_size))\n"
        f"ref = torch.load({str(dump)!r})\n"
        "from tests.tolerance import assert_close_rounding\n"
        "from tests.unit.test_model import encoder_terms\n"
        "terms = encoder_terms(task.encoder)  # another process: its thread count may block the sums differently\n"
        "assert_close_rounding(out.z_fusion, ref['z_fusion'], terms=terms)\n"
        "assert_close_rounding(out.z_spliced, ref['z_spliced'], terms=terms)\n"
        # fine-tuning and init_ckpt read the folder as they read a file (fm.ckpt_io)
        "from fm.ckpt_io import load_training_checkpoint\n"
        f"folder = load_training_checkpoint({str(ckpt_dir)!r})\n"
        f"merged_ckpt = torch.load({str(merged)!r}, map_location='cpu', weights_only=False)\n"
        "meta = {k: v for k, v in folder['fm'].items() if k != 'rng'}  # the RNG states are tensors: compared below\n"
        "assert meta == {k: v for k, v in merged_ckpt['fm'].items() if k != 'rng'}\n"
        "assert torch.equal(folder['fm']['rng']['torch'], merged_ckpt['fm']['rng']['torch'])\n"
        "assert folder['state_dict'].keys() == merged_ckpt['state_dict'].keys()\n"
        "assert all(torch.equal(folder['state_dict'][k], v) for k, v in merged_ckpt['state_dict'].items())\n"
        "from fm.train import init_from_checkpoint\n"
        "with torch.no_grad():\n"
        "    [p.zero_() for p in task.parameters()]\n"
        f"init_from_checkpoint(task, {str(ckpt_dir)!r})  # init_ckpt=<ZeRO folder>\n"
        "with torch.no_grad():\n"
        "    again = task(example_batch(task.model_config.vocab_size))\n"
        "assert_close_rounding(again.z_fusion, ref['z_fusion'], terms=terms)\n"
        # fm export reads the ZeRO folder itself (consolidating it), and the release gives the same outputs
        "from fm.checkpoint import export, load_pretrained\n"
        f"release = export({str(ckpt_dir)!r}, {str(tmp_path / 'release')!r}, vocab={str(corpus / 'vocab.tsv')!r})\n"
        "loaded = load_pretrained(release).encode(example_batch(task.model_config.vocab_size))\n"
        "assert_close_rounding(loaded.z_fusion, ref['z_fusion'], terms=terms)\n"
    )
    run_module([sys.executable, "-c", code])
