"""Checkpoint retention from configs/callbacks, the throughput monitor (Lightning's, fm's FLOP count), the FLOP
estimate against torch's counter.

    python -m pytest tests/unit/test_train_callbacks.py -q
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fm import keys
from fm.model.config import ZorroConfig, encoder_flops
from fm.model.zorro import ZorroEncoder
from fm.tasks.callbacks import ThroughputMonitor

MATMULS = ("mm", "addmm")
CALLBACKS = Path(__file__).parents[2] / "configs" / "callbacks" / "default.yaml"


class _Task(L.LightningModule):
    """A linear model on batches in the collator's layout, with the encoder config the monitor counts FLOPs from."""

    def __init__(self):
        super().__init__()
        self.model_config = ZorroConfig.from_name("debug")
        self.layer = torch.nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[keys.B_SPLICED]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        mask = torch.arange(6)[None] < torch.tensor([6, 3, 0, 4])[:, None]
        batch = {keys.B_GENE_MASK: mask, keys.B_SPLICED: torch.rand(4, 6)}
        return torch.utils.data.DataLoader([batch] * 40, batch_size=None)


def _trainer(tmp_path, callbacks, steps):
    return L.Trainer(default_root_dir=tmp_path, max_steps=steps, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


def test_step_checkpoints_keep_the_latest_k(tmp_path):
    cfg = OmegaConf.load(CALLBACKS).model_checkpoint
    cfg.dirpath, cfg.every_n_train_steps = str(tmp_path / "ckpt"), 2
    assert cfg.save_top_k == 3
    _trainer(tmp_path, [instantiate(cfg)], 12).fit(_Task())
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["last.ckpt", "step0000008.ckpt", "step0000010.ckpt", "step0000012.ckpt"], names


def test_throughput_monitor_logs_rates_and_flops_every_n_steps(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(1))
    monitor = ThroughputMonitor(window=4, log_every_n_steps=2)
    _trainer(tmp_path, [monitor], 10).fit(_Task())
    assert set(monitor.last) >= {"perf/cells_per_s", "perf/tokens_per_s", "perf/tflops_per_device"}, monitor.last
    assert monitor.last["perf/cells_per_s"] > 0 and monitor.last["perf/tokens_per_s"] > 0
    assert not synced  # on CPU never; on CUDA once per logged step
    assert monitor._tokens == 10 * 2 * (6 + 3 + 0 + 4)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_flop_estimate_matches_torch_counter(mlp):
    """The matmuls against torch's FLOP counter on an encoder: within the few % of the embeddings, pooling and
    global projection the estimate leaves out. (CPU SDPA's fused kernel is not counted by torch, so attention is
    compared by its closed form only.)"""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ZorroConfig.from_name("debug", mlp=mlp, d_model=64, n_heads=4, depth=3)
    enc = ZorroEncoder(cfg)
    B, G = 3, 40
    batch = {keys.B_GENE_IDS: torch.randint(0, 1000, (B, G)), keys.B_GENE_MASK: torch.ones(B, G, dtype=torch.bool),
             keys.B_SPLICED: torch.rand(B, G), keys.B_UNSPLICED: torch.rand(B, G)}
    with FlopCounterMode(display=False) as counter:
        enc(batch)
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] in MATMULS)
    estimate = encoder_flops(cfg, B, G, attention="none")
    assert 0.85 < estimate / counted <= 1.0, (estimate, counted)
    L, D = 2 * G + cfg.n_fusion, cfg.d_model
    dense, zorro = (encoder_flops(cfg, B, G, attention=a) - estimate for a in ("dense", "zorro"))
    assert dense == B * cfg.depth * 4 * L * L * D and zorro == B * cfg.depth * 4 * (2 * G * G + cfg.n_fusion * L) * D
