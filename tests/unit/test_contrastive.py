"""Contrastive head: InfoNCE, global negatives with gradient across 2 gloo ranks, masking, configs, schedule.

    python -m pytest tests/unit/test_contrastive.py -q
"""

from __future__ import annotations

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fm import keys
from fm.heads.contrastive import RECON_MASK, ContrastiveConfig, ContrastiveHead, info_nce
from fm.model.config import ZorroConfig
from fm.model.zorro import ZorroEncoder
from fm.tasks.optim import OptimConfig, warmup_cosine
from tests.integration.pretrain_helpers import example_batch


def test_info_nce_perfect_and_random():
    x = F.normalize(torch.randn(8, 16), dim=-1)
    loss, acc = info_nce(x, x, torch.tensor(math.log(100.0)), offset=0)
    assert acc == 1.0 and loss < 0.1
    y = F.normalize(torch.randn(8, 16), dim=-1)
    loss, _ = info_nce(x, y, torch.tensor(0.0), offset=0)  # temperature 1, random keys: about log(8)
    assert abs(loss.item() - math.log(8)) < 0.5


def test_head_loss_parts_metrics_and_gradients():
    enc = ZorroEncoder(ZorroConfig.from_name("debug", vocab_size=50))
    head = ContrastiveHead(enc.cfg.d_model, ContrastiveConfig(w_recon=1.0))
    batch = head.prepare(example_batch(50), torch.Generator().manual_seed(0))
    out = head.loss(batch, head(batch, enc(batch)))
    assert set(out.parts) == {"modality", "fusion", "recon"}
    assert {"acc_s2u", "acc_u2s", "temperature"} <= set(out.metrics)
    assert out.is_finite()
    out.loss.backward()
    assert head.logit_scale.grad is not None and all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_masking_touches_only_real_tokens():
    head = ContrastiveHead(32, ContrastiveConfig(w_recon=1.0, mask_fraction=0.5))
    batch = example_batch(50, n_cells=20, n_genes=30)
    out = head.prepare(batch, torch.Generator().manual_seed(1))
    for key in (keys.B_SPLICED, keys.B_UNSPLICED):
        mask = out[RECON_MASK[key]]
        assert not (mask & ~batch[keys.B_GENE_MASK]).any()
        assert 0.3 < mask.sum() / batch[keys.B_GENE_MASK].sum() < 0.7
        assert (out[key][mask] == -1).all() and torch.equal(out[key][~mask], batch[key][~mask])
    assert ContrastiveHead(32).prepare(batch) is batch  # no reconstruction, no masking


def test_temperature_is_clamped():
    head = ContrastiveHead(32, ContrastiveConfig(t_min=0.05, temperature_init=0.1))
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert head.temperature == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"proj_dim": 1.5}, "ContrastiveConfig.proj_dim"), ({"w_fusion": -1.0}, "w_fusion"),
     ({"t_min": 0.5, "temperature_init": 0.1}, "t_min"), ({"learn_temperature": "yes"}, "learn_temperature")],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ContrastiveConfig(**kwargs)
    with pytest.raises(TypeError, match="OptimConfig.lr"):
        OptimConfig(lr="fast")


def test_warmup_cosine_shape():
    lr = [warmup_cosine(s, 10, 100, 0.1) for s in range(120)]
    assert lr[0] < lr[5] < lr[9] <= 1.0 and lr[10] == pytest.approx(1.0, abs=0.02)
    assert lr[100] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lr[10:], lr[11:]))


def _head_step(z_B4D: torch.Tensor, seed: int = 0):
    """Loss, input gradient and parameter gradients of a ContrastiveHead on pooled representations [B, 4, D]."""
    torch.manual_seed(seed)
    head = ContrastiveHead(z_B4D.shape[-1], ContrastiveConfig(proj_dim=5))
    z = z_B4D.clone().requires_grad_(True)
    enc = SimpleNamespace(**{f"z_{n}": z[:, i] for i, n in enumerate(("spliced", "unspliced", "fusion", "global"))})
    loss = head.loss({}, head({}, enc)).loss
    loss.backward()
    return loss.detach(), z.grad, {n: p.grad for n, p in head.named_parameters() if p.grad is not None}


def _head_worker(rank: int, world: int, port: int, z_all, result):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z_all.shape[0] // world
        result[rank] = _head_step(z_all[rank * b:(rank + 1) * b])
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_match_one_process_with_the_whole_batch():
    """2 ranks x 4 cells == 1 process x 8 cells: loss, gradients of the representations and of the head (DDP
    averages). Global negatives are gathered with gradient, and the projections' BatchNorm statistics are those of
    the global batch: with per-rank statistics the loss differs (the positive shares its rank's shift)."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    z_all = torch.randn(8, 4, 6) + torch.tensor([3.0, -3.0]).repeat_interleave(4)[:, None, None]  # ranks differ
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    result = manager.dict()
    mp.spawn(_head_worker, args=(2, port, z_all, result), nprocs=2, join=True)

    loss, z_grad, param_grads = _head_step(z_all)
    torch.testing.assert_close((result[0][0] + result[1][0]) / 2, loss)
    # each rank's gradient is that of the sum of the ranks' losses; DDP divides by the world size
    torch.testing.assert_close(torch.cat([result[0][1], result[1][1]]) / 2, z_grad)
    for name, grad in param_grads.items():
        torch.testing.assert_close((result[0][2][name] + result[1][2][name]) / 2, grad, msg=name)
    per_rank = (_head_step(z_all[:4])[0] + _head_step(z_all[4:])[0]) / 2  # what per-rank statistics would see
    assert not torch.allclose(per_rank, loss, atol=1e-3)
