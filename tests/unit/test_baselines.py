"""Baseline heads (scVI, scScope, cellDancer): shapes, training, configs, and cellDancer against a slow reference.

.venv/bin/python -m pytest -q tests/unit/test_baselines.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from torch import nn

from fm import keys
from fm.baselines.celldancer import VIEW_ROW_NUMEL, CellDancerConfig, CellDancerHead, GeneAdam, first_occurrence
from fm.baselines.common import batch_from_dense, dense_counts
from fm.baselines.scscope import ScScopeConfig, ScScopeHead
from fm.baselines.scvi import SCVIConfig, SCVIHead
from fm.heads.base import LossOutput
from tests.tolerance import assert_close_rounding

V = 40


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; more threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


def _counts(n_cells=96, n_genes=V, seed=0):
    """Counts with structure: two cell groups with different gene programmes, NB noise."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n_cells)
    rate = rng.gamma(2.0, 1.0, (2, n_genes))
    mean_s = rate[group] * rng.lognormal(0, 0.3, (n_cells, 1)) * 3
    s = rng.negative_binomial(5, 5 / (5 + mean_s))
    u = rng.negative_binomial(5, 5 / (5 + 0.4 * mean_s))
    s[:, 0] += 1  # no empty cells
    return s, u


def _train(head, batch, steps, lr=1e-2, optimizer=None):
    torch.manual_seed(0)
    opt = optimizer or torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = head(batch, None)
        loss_out = head.loss(batch, out)
        assert isinstance(loss_out, LossOutput) and loss_out.is_finite()
        opt.zero_grad()
        loss_out.loss.backward()
        opt.step()
        losses.append(loss_out.loss.item())
    return losses


# --- shared ----------------------------------------------------------------------------------------------------------
def test_dense_counts_roundtrip():
    s, u = _counts(8)
    batch = batch_from_dense(s, u)
    assert np.array_equal(dense_counts(batch, "spliced", V).numpy(), s)
    assert np.array_equal(dense_counts(batch, "total", V).numpy(), s + u)
    with pytest.raises(ValueError, match="outside the 10 modelled genes"):
        dense_counts(batch, "spliced", 10)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [(SCVIConfig, "n_latent", 0), (SCVIConfig, "dropout", 1.5), (SCVIConfig, "modality", "both"),
     (ScScopeConfig, "n_iterations", 0), (CellDancerConfig, "n_neighbors", 1), (CellDancerConfig, "dt", -1.0)],
)  # fmt: skip
def test_configs_name_the_bad_field(cls, field, value):
    with pytest.raises((ValueError, TypeError), match=f"{cls.__name__}.{field}"):
        cls(n_genes=V, **{field: value})


# --- scVI ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["spliced", "unspliced", "total"])
def test_scvi_trains_and_shapes(modality):
    torch.manual_seed(0)
    s, u = _counts()
    batch = batch_from_dense(s, u)
    head = SCVIHead(SCVIConfig(n_genes=V, modality=modality, n_epochs_kl_warmup=0))
    losses = _train(head, batch, 40)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    head.eval()
    with torch.no_grad():
        out = head(batch, None)
    assert out["z_mean"].shape == (96, 10) and out["imputed"].shape == (96, V)
    assert torch.allclose(out["normalized_expression"].sum(1), torch.ones(96), atol=1e-5)
    lib = dense_counts(batch, modality, V).sum(1)
    assert torch.all(out["imputed"].sum(1) <= lib * (1 + 1e-5))  # zero inflation only removes mass


def test_scvi_defaults_and_kl_warmup_and_batch_covariate():
    head = SCVIHead(n_genes=V, batch_ids=["a", "b"])
    c = head.config
    assert (c.n_hidden, c.n_latent, c.n_layers, c.dropout, c.likelihood) == (128, 10, 1, 0.1, "zinb")
    assert head.px_r.shape == (V,)  # per-gene dispersion
    assert head.kl_weight == 0.0
    head.set_epoch(100)
    assert head.kl_weight == pytest.approx(0.25)
    s, u = _counts(16)
    batch = batch_from_dense(s, u)
    batch[keys.B_DATASET_ID] = ["a"] * 8 + ["b"] * 8
    out = head(batch, None)
    assert head.decoder[0][0].in_features == 10 + 2  # one-hot batch injected into the decoder
    assert head.loss(batch, out).parts.keys() == {"reconstruction", "kl_z"}
    batch[keys.B_DATASET_ID] = ["c"] * 16
    with pytest.raises(KeyError, match="'c'"):
        head(batch, None)


# --- scScope ---------------------------------------------------------------------------------------------------------
def test_scscope_trains_and_shapes():
    torch.manual_seed(0)
    s, u = _counts()
    batch = batch_from_dense(s, u)
    head = ScScopeHead(ScScopeConfig(n_genes=V, n_latent=8, n_iterations=3))
    losses = _train(head, batch, 40, lr=1e-3)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    out = head(batch, None)
    assert out["latent"].shape == (96, 3 * 8) and out["imputed"].shape == (96, V)
    assert out["outputs"].shape == (3, 96, V)
    assert set(head.loss(batch, out).parts) == {"reconstruction_t1", "reconstruction_t2", "reconstruction_t3"}


def test_scscope_imputer_writes_only_zero_entries():
    """The second iteration's input equals x wherever x is nonzero (the imputer fills zeros only)."""
    torch.manual_seed(0)
    s, u = _counts(16)
    s[:, 1::3] = 0
    batch = batch_from_dense(s, u)
    head = ScScopeHead(n_genes=V, n_latent=4, n_iterations=2)
    seen = []
    head.encoder[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    out = head(batch, None)
    x = out["expression"]
    nonzero = x != 0
    assert torch.equal(seen[1][nonzero], x[nonzero]) and torch.equal(seen[0], x)
    assert (seen[1][~nonzero] != 0).any()  # and it does write there


def test_scscope_t2_imputes_dropped_entries_better_than_t1():
    """Simulated counts with 20% of nonzero spliced entries dropped: T = 2 beats T = 1 on the dropped entries."""
    from data_prep.simulate import simulate

    adata = simulate(400, 60, regime="bifurcation", seed=0)
    s = adata.layers[keys.LAYER_SPLICED].toarray().astype(np.float32)
    u = adata.layers[keys.LAYER_UNSPLICED].toarray().astype(np.float32)
    rng = np.random.default_rng(1)
    s_drop = np.where((s > 0) & (rng.random(s.shape) < 0.2), 0, s)
    keep = s_drop.sum(1) > 0
    s, u, s_drop = s[keep], u[keep], s_drop[keep]
    dropped = (s > 0) & (s_drop == 0)
    batch = batch_from_dense(s_drop, u)
    truth = np.log1p(s * 1e4 / s_drop.sum(1, keepdims=True))  # the value the cell would show without dropout
    errors = {}
    for T in (1, 2):
        torch.manual_seed(0)
        head = ScScopeHead(n_genes=60, n_iterations=T)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3, betas=(0.05, 0.999))  # authors' beta1
        for step in range(300):
            idx = torch.from_numpy(np.random.default_rng(step).choice(len(s), 64, replace=False))
            mb = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0}
            loss = head.loss(mb, head(mb, None)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            imputed = head(batch, None)["imputed"].numpy()
        errors[T] = float(np.abs(imputed - truth)[dropped].mean())
    assert errors[2] < 0.9 * errors[1], errors
    print(f"scScope mean |error| on dropped entries: T=1 {errors[1]:.3f}, T=2 {errors[2]:.3f}")


# --- cellDancer ------------------------------------------------------------------------------------------------------
def _us_batch(n_cells=48, n_genes=5, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.gamma(2.0, 2.0, (n_cells, n_genes)).astype(np.float32) + 0.01
    s = (u * rng.uniform(0.5, 3, n_genes) + rng.gamma(1.0, 1.0, (n_cells, n_genes))).astype(np.float32)
    return batch_from_dense(s, u)


def test_celldancer_shapes_and_training():
    torch.manual_seed(0)
    batch = _us_batch()
    head = CellDancerHead(n_genes=5, patience=0)  # no early stopping: the loss is over the same genes throughout
    losses = _train(head, batch, 40, optimizer=head.optimizer())
    assert losses[-1] < losses[0]
    head.eval()
    out = head(batch, None)
    for name in ("alpha", "beta", "gamma", "velocity", "velocity_u"):
        assert out[name].shape == (48, 5)
    assert (out["beta"] > 0).all() and (out["beta"] < 1).all()  # sigmoid · β0 with β0 = 1
    assert torch.allclose(out["velocity"], (out["beta"] * out["u"].T - out["gamma"] * out["s"].T) * out["s_max"].T)


def test_celldancer_genes_are_independent():
    """A loss on gene g only gives gradient to gene g's weights; the joint loss gives each gene its own gradient."""
    torch.manual_seed(0)
    batch = _us_batch()
    head = CellDancerHead(n_genes=5, norm_cell_distribution=False)
    out = head(batch, None)
    from fm.baselines.celldancer import cosine_cost

    cost = cosine_cost(out["u"], out["s"], out["du"], out["ds"], out["valid"], out["u_max"], out["s_max"], 30, 2)
    cost[2].mean().backward()
    for p in head.parameters():
        others = torch.cat([p.grad[:2], p.grad[3:]])
        assert torch.all(others == 0) and p.grad[2].abs().sum() > 0
    joint = [p.grad[2].clone() for p in head.parameters()]
    head.zero_grad()
    head.loss(batch, head(batch, None)).loss.backward()
    for p, g in zip(head.parameters(), joint, strict=True):
        torch.testing.assert_close(p.grad[2], g)


def test_celldancer_cost_of_a_gene_does_not_depend_on_its_block():
    """A gene with fewer points than neighbours, in a block with a gene that has more (so a neighbour search runs
    over its padding too), costs what it costs alone; its padding lies where its predictions point, so padding
    taken for a neighbour would show."""
    from fm.baselines.celldancer import cosine_cost

    g = torch.Generator().manual_seed(0)
    u, s = torch.rand(2, 40, generator=g), torch.rand(2, 40, generator=g)
    du, ds = torch.randn(2, 40, generator=g), torch.randn(2, 40, generator=g)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 10:] = False  # gene 1: 10 points, left-aligned
    u[1, 10:] = u[1, :10].mean() + du[1, :10].mean() * torch.arange(1, 31)  # padding along its predictions
    s[1, 10:] = s[1, :10].mean() + ds[1, :10].mean() * torch.arange(1, 31)
    args = (u, s, du, ds, valid, torch.ones(2, 1), torch.ones(2, 1), 30)
    together, alone = cosine_cost(*args, 2, left_aligned=True), cosine_cost(*args, 1, left_aligned=True)
    torch.testing.assert_close(together, alone)
    assert (together[1, :10] > 0).all() and (together[1, 10:] == 0).all()


def _reference_loss(head: CellDancerHead, u_CG: np.ndarray, s_CG: np.ndarray) -> torch.Tensor:
    """The package's computation, one gene at a time: linear layers on gene g's weights, sklearn kNN, its cosine
    rule (every neighbour's cosine, then the max). Differentiable in the head's weights. With the head's
    ``norm_cell_distribution``, each gene on the first cell of each distinct point of the 0.01 grid."""
    c, total = head.config, 0.0
    for g in range(u_CG.shape[1]):
        layers = [(w[g].T, b[g, 0]) for w, b in zip(head.weights, head.biases, strict=True)]
        u, s = torch.tensor(u_CG[:, g], dtype=torch.float64), torch.tensor(s_CG[:, g], dtype=torch.float64)
        umax, smax = u.max(), s.max()
        un, sn = u / umax, s / smax
        if c.norm_cell_distribution:
            un, sn = torch.round(un, decimals=2), torch.round(sn, decimals=2)
            first = np.unique(np.stack([un.numpy(), sn.numpy()], 1), axis=0, return_index=True)[1]
            keep = torch.tensor(np.sort(first))
            un, sn = un[keep], sn[keep]
            u, s = un * umax, sn * smax
        x = torch.nn.functional.leaky_relu(torch.nn.functional.linear(torch.stack([un, sn]).T, *layers[0]))
        x = torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, *layers[1]))
        out = torch.sigmoid(torch.nn.functional.linear(x, *layers[2]))
        beta, gamma, alpha = out[:, 0], out[:, 1] * umax / smax, out[:, 2] * umax * 2
        uv, sv = (alpha - beta * un) * c.dt, (beta * un - gamma * sn) * c.dt
        points = np.stack([u.numpy(), s.numpy()], 1)
        nbrs = NearestNeighbors(n_neighbors=min(len(u) - 1, 30), algorithm="ball_tree").fit(points)
        indices = torch.tensor(nbrs.kneighbors(points)[1])  # the cell itself first, then 29 others
        unv, snv = un[indices.T[1:]] - un, sn[indices.T[1:]] - sn
        den = torch.sqrt(unv**2 + snv**2) * torch.sqrt(uv**2 + sv**2)
        zero = den == 0
        cosine = torch.where(zero, torch.tensor(1.0, dtype=torch.float64),
                             (unv * uv + snv * sv) / den.masked_fill(zero, 1.0))  # fmt: skip
        total = total + torch.mean(1 - torch.max(cosine, 0)[0])
    return total


def _integer_us(n_cells: int, seed: int = 3) -> dict:
    """Genes 0 and 2 on a small integer lattice (repeated points; 0: at most 25 distinct ones, fewer than the 30
    neighbours), genes 1 and 3 continuous."""
    rng = np.random.default_rng(seed)
    u, s = (rng.gamma(2.0, 2.0, (n_cells, 4)) + 0.01 for _ in range(2))
    u[:, 0], s[:, 0] = rng.integers(1, 6, n_cells), rng.integers(1, 6, n_cells)
    u[:, 2], s[:, 2] = rng.integers(1, 9, n_cells), rng.integers(1, 9, n_cells)
    return batch_from_dense(s.astype(np.float32), u.astype(np.float32))


@pytest.mark.parametrize(
    "n_cells, data, distinct",
    [
        (45, "continuous", False),  # more points than neighbours: a search
        (20, "continuous", False),  # fewer: every point is a neighbour
        (60, "integer", False),  # repeated points: zero-length displacements toward neighbours (cosine 1)
        (60, "integer", True),  # distinct grid points: one block, of genes with fewer points than neighbours and more
    ],
)
def test_celldancer_loss_and_gradient_match_slow_reference(n_cells, data, distinct):
    torch.manual_seed(0)
    batch = _us_batch(n_cells=n_cells, n_genes=4, seed=3) if data == "continuous" else _integer_us(n_cells)
    head = CellDancerHead(n_genes=4, norm_cell_distribution=distinct, gene_chunk=4 if distinct else 3,
                          input="counts" if data == "integer" else "normalized").double()  # fmt: skip
    batch = {**batch, **{k: batch[k].double() for k in (keys.B_UNSPLICED, keys.B_SPLICED, keys.B_UNSPLICED_COUNTS,
                                                         keys.B_SPLICED_COUNTS)}}  # fmt: skip
    loss = head.loss(batch, head(batch, None)).loss
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    u_dense, s_dense = head.dense_us(batch)
    reference = _reference_loss(head, u_dense.numpy(), s_dense.numpy())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9)
    reference.backward()
    for got, p in zip(grads, head.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("stop", [[1, 4], [0, 5], [0, 1, 2]])
def test_gene_adam_is_torch_adam_on_running_rows_and_leaves_the_others(stop):
    """Small rows (gathered and scattered back) and a 64 x 64 row (updated in place, run by run of running rows),
    with stopped rows inside, at the ends, and a leading run of them."""
    torch.manual_seed(0)
    shapes = [(6, 2, 5), (6, 1, 5), (6, 64, 64)]
    assert 64 * 64 >= VIEW_ROW_NUMEL > 2 * 5
    ours = [nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    running = torch.ones(6, dtype=torch.bool)
    opt = GeneAdam(ours, lambda: running, lr=1e-2, weight_decay=4e-3)
    ref_opt = torch.optim.Adam(ref, lr=1e-2, weight_decay=4e-3)
    for step in range(6):
        if step == 3:
            running[stop] = False  # these genes stop: their rows stay, the others go on as torch's Adam
            frozen = [p[stop].detach().clone() for p in ours]
            moments = [(opt.state[p]["exp_avg"][stop].clone(), opt.state[p]["exp_avg_sq"][stop].clone()) for p in ours]
        for p, q in zip(ours, ref, strict=True):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    keep = torch.tensor([i for i in range(6) if i not in stop])
    for p, q, f, (m, v) in zip(ours, ref, frozen, moments, strict=True):
        torch.testing.assert_close(p[keep], q[keep])
        assert torch.equal(p[stop], f)
        assert torch.equal(opt.state[p]["exp_avg"][stop], m) and torch.equal(opt.state[p]["exp_avg_sq"][stop], v)
        assert not torch.allclose(q[stop], f)  # torch's Adam would have moved them
        assert opt.state[p]["step"].item() == 6


def test_celldancer_early_stopping_follows_the_package_rule():
    """Smoothed cost 0.9 · cost + 0.1 · previous; a check every 10 steps; 3 checks without a new best stop a gene."""
    head = CellDancerHead(n_genes=3)
    has = torch.tensor([True, True, False])
    for step in range(1, 61):
        # gene 0 keeps improving; gene 1 is flat after its first check; gene 2 never has points
        head.track(torch.tensor([1.0 / step, 0.5, 0.0]), has)
        if step == 10:
            assert head.running.all()
    assert head.running.tolist() == [True, False, False]
    assert head.stopped_at.tolist() == [-1, 40, 30]  # best at 10, then 20, 30, 40 without: stopped at 40
    assert head.smoothed_cost[0].item() == pytest.approx(0.9 / 60 + 0.1 * (0.9 / 59 + 0.1 * (0.9 / 58)), rel=1e-2)


def test_celldancer_stopped_genes_are_not_run_and_keep_their_weights():
    torch.manual_seed(0)
    batch = _us_batch(n_genes=5)
    head = CellDancerHead(n_genes=5)
    head.running[[0, 3]] = False
    before = [p[[0, 3]].detach().clone() for p in head.parameters()]
    _train(head, batch, 5, optimizer=head.optimizer())
    out = head(batch, None)
    assert sorted(out["genes"].tolist()) == [1, 2, 4] and out["du"].shape[0] == 3
    for p, b in zip(head.parameters(), before, strict=True):
        assert torch.equal(p[[0, 3]], b)
    head.running[2] = False  # a gene stopping between steps: the next step runs without it
    assert sorted(head(batch, None)["genes"].tolist()) == [1, 4]
    head.eval()
    assert head(batch, None)["velocity"].shape == (48, 5)  # every gene predicts, the stopped ones with their weights


def _track_worker(rank: int, world: int, port: int, batches, result):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        head = CellDancerHead(n_genes=5, check_every=1, patience=1)
        head.loss(batches[rank], head(batches[rank], None))
        result[rank] = head.smoothed_cost.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_celldancer_early_stopping_sees_the_global_batch_on_every_rank():
    """2 gloo ranks with different cells: both smooth each gene's mean cost over all cells of both, so both stop the
    same genes (their weights would part otherwise)."""
    import socket

    import torch.multiprocessing as mp

    from fm.baselines.celldancer import cosine_cost

    batches = [_us_batch(n_cells=40, n_genes=5, seed=s) for s in (1, 2)]
    torch.manual_seed(0)
    head = CellDancerHead(n_genes=5, patience=0)
    total, count = torch.zeros(5), torch.zeros(5)
    for batch in batches:  # the per-gene maxima over both ranks' cells, as the ranks all-reduce them
        head._points(batch, fitting=True)
    for batch in batches:  # the global per-gene mean, from one process
        out = head(batch, None)
        cost = cosine_cost(out["u"], out["s"], out["du"], out["ds"], out["valid"], out["u_max"], out["s_max"], 30,
                           64, left_aligned=True)  # fmt: skip
        total.index_add_(0, out["genes"], (cost * out["valid"]).sum(1).detach())  # rows: out["genes"]
        count.index_add_(0, out["genes"], out["valid"].sum(1).float())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_track_worker, args=(2, port, batches, result), nprocs=2, join=True)
    torch.testing.assert_close(result[0], total / count)  # first step: the smoothed cost is the cost
    torch.testing.assert_close(result[1], total / count)
    assert not torch.allclose(total / count, torch.zeros(5))


def test_celldancer_row_sparse_gradient_equals_the_dense_one(monkeypatch):
    """Once GeneAdam keeps dense gradients, each block's weight gradient adds into them in place: the same gradient
    as the plain gather's, with two genes stopped (their rows keep what they had)."""
    import fm.baselines.celldancer as celldancer

    batch = _us_batch(n_genes=5)
    heads = []
    for _ in range(2):
        torch.manual_seed(0)
        heads.append(CellDancerHead(n_genes=5, patience=0, gene_chunk=2))  # 3 running genes: blocks of 2 and 1
        heads[-1].running[[0, 3]] = False
    sparse, dense = heads
    calls = []
    original = celldancer._GatherRows.apply
    monkeypatch.setattr(celldancer._GatherRows, "apply", lambda *a: (calls.append(1), original(*a))[1])
    opt = sparse.optimizer()
    opt.zero_grad()  # dense zeros: the sparse path from now on
    torch.manual_seed(1)
    sparse.loss(batch, sparse(batch, None)).loss.backward()
    torch.manual_seed(1)
    dense.loss(batch, dense(batch, None)).loss.backward()
    assert len(calls) == 12  # every weight and bias of both blocks went the in-place way
    for a, b in zip(sparse.parameters(), dense.parameters(), strict=True):
        assert not a.grad.is_sparse
        torch.testing.assert_close(a.grad[[1, 2, 4]], b.grad[[1, 2, 4]])
        assert torch.count_nonzero(a.grad[[0, 3]]) == 0


def test_celldancer_prediction_does_not_depend_on_its_tiling(monkeypatch):
    import fm.baselines.celldancer as celldancer

    torch.manual_seed(0)
    batch = _us_batch(n_cells=48, n_genes=5)
    head = CellDancerHead(n_genes=5, gene_chunk=2).eval()
    whole = head(batch, None)
    monkeypatch.setattr(celldancer, "PREDICT_TILE", 7)  # 1 gene x 7 cells per tile
    head.__dict__.pop("_points_cache", None)
    tiled = head(batch, None)
    for k in ("alpha", "beta", "gamma", "velocity", "velocity_u"):  # tiles change the matmuls' blocking, so rounding
        assert_close_rounding(tiled[k], whole[k], terms=head.config.n_hidden, msg=k)


def test_celldancer_prediction_does_not_depend_on_how_cells_are_batched():
    """Each gene is normalised by its maxima over the cells trained on (buffers saved with the weights), not over the
    batch predicted: the same cells predicted in one batch or in two give the same velocity (with a batch's own
    maxima, two batchings of the same cells gave scaled cosines 0.133 and -0.123)."""
    rng = np.random.default_rng(0)
    u = rng.gamma(2.0, 2.0, (60, 5)).astype(np.float32) + 0.01
    s = (u * rng.uniform(0.5, 3, 5) + rng.gamma(1.0, 1.0, (60, 5))).astype(np.float32)
    u[7, 2], s[8, 3] = 40.0, 60.0  # each gene's largest values in one cell, so that a half lacks them
    head = CellDancerHead(n_genes=5, patience=0, input="counts")
    _train(head, batch_from_dense(s, u), 3, optimizer=head.optimizer())
    np.testing.assert_array_equal(head.u_max.numpy(), u.max(0))  # the training data's maxima, recorded
    np.testing.assert_array_equal(head.s_max.numpy(), s.max(0))
    head.eval()
    whole = head(batch_from_dense(s, u), None)
    halves = [np.arange(0, 60, 2), np.arange(1, 60, 2)]
    for name in ("velocity", "velocity_u", "alpha", "beta", "gamma"):
        parts = torch.empty_like(whole[name])
        for cells in halves:
            parts[cells] = head(batch_from_dense(s[cells], u[cells]), None)[name]
        torch.testing.assert_close(parts, whole[name], rtol=1e-5, atol=1e-6)
    reloaded = CellDancerHead(n_genes=5, patience=0, input="counts")
    reloaded.load_state_dict(head.state_dict())  # the maxima travel with the weights (a release, a checkpoint)
    torch.testing.assert_close(reloaded.eval()(batch_from_dense(s[halves[0]], u[halves[0]]), None)["velocity"],
                               whole["velocity"][halves[0]], rtol=1e-5, atol=1e-6)


def test_celldancer_observes_the_maxima_of_cells_it_does_not_fit():
    """As the package, which normalises by all of a dataset's cells before it samples those to fit: after
    ``observe`` on every cell, training on a subset keeps the maxima of every cell."""
    batch = _us_batch(n_cells=48, n_genes=5)
    head = CellDancerHead(n_genes=5, patience=0)
    head.observe(batch)
    u, s = (x.amax(dim=0) for x in head.dense_us(batch))
    fit = {k: v[:20] if torch.is_tensor(v) else v[:20] for k, v in batch.items()}
    _train(head, fit, 2, optimizer=head.optimizer())
    torch.testing.assert_close(head.u_max, u, rtol=0, atol=0)
    torch.testing.assert_close(head.s_max, s, rtol=0, atol=0)
    assert (head.dense_us(fit)[0].amax(dim=0) < u).any()  # the fitted cells alone have smaller maxima


def test_celldancer_with_every_gene_stopped_gives_a_zero_loss_that_backpropagates():
    batch = _us_batch(n_genes=5)
    head = CellDancerHead(n_genes=5)
    head.running[:] = False
    out = head.loss(batch, head(batch, None))
    assert head.finished and out.loss.item() == 0 and out.loss.requires_grad
    out.loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in head.weights)


def test_celldancer_reuses_a_batch_points_only_while_it_is_unchanged():
    batch = _us_batch(n_genes=5)
    head = CellDancerHead(n_genes=5)
    first = head._points(batch, fitting=True)
    assert head._points(batch, fitting=True) is first
    batch[keys.B_SPLICED_COUNTS].mul_(2)  # an in-place change: the points are redone
    batch[keys.B_SPLICED].copy_(torch.log1p(torch.expm1(batch[keys.B_SPLICED]) * 2))
    again = head._points(batch, fitting=True)
    assert again is not first and not torch.equal(again[3], first[3])  # s_max doubled
    assert head._points({**batch}, fitting=True) is again  # a new dict of the same tensors: the same points


def test_celldancer_first_occurrence_matches_unique():
    rng = np.random.default_rng(0)
    u = np.round(rng.integers(0, 4, (3, 50)) / 4, 2)
    s = np.round(rng.integers(0, 3, (3, 50)) / 3, 2)
    first = first_occurrence(torch.tensor(u), torch.tensor(s)).numpy()
    for g in range(3):
        assert first[g].sum() == len(np.unique(np.stack([u[g], s[g]]), axis=1).T)
        kept = {(a, b) for a, b, f in zip(u[g], s[g], first[g], strict=True) if f}
        assert kept == set(zip(u[g], s[g], strict=True))


@pytest.mark.parametrize("name", ["scvi", "scscope", "celldancer"])
def test_head_configs_instantiate(name):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    heads = {"scvi": SCVIHead, "scscope": ScScopeHead, "celldancer": CellDancerHead}
    path = Path(__file__).resolve().parents[2] / "configs" / "head" / f"{name}.yaml"
    config = instantiate(OmegaConf.load(path))(n_genes=V)
    s, u = _counts(8)
    out = heads[name](config)(batch_from_dense(s, u), None)
    assert isinstance(out, dict)
