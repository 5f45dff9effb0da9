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
from fm.baselines.celldancer import CellDancerConfig, CellDancerHead, first_occurrence
from fm.baselines.common import batch_from_dense, dense_counts
from fm.baselines.scscope import ScScopeConfig, ScScopeHead
from fm.baselines.scvi import SCVIConfig, SCVIHead
from fm.heads.base import LossOutput

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
    head = CellDancerHead(n_genes=5)
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


def _reference_loss(head: CellDancerHead, u_CG: np.ndarray, s_CG: np.ndarray) -> float:
    """The package's computation, one gene at a time: nn.Linear layers, sklearn kNN, its cosine rule."""
    c, total = head.config, 0.0
    for g in range(u_CG.shape[1]):
        net = [nn.Linear(2, 100), nn.Linear(100, 100), nn.Linear(100, 3)]
        for lin, w, b in zip(net, head.weights, head.biases, strict=True):
            lin.weight.data, lin.bias.data = w[g].detach().T.double(), b[g, 0].detach().double()
        u, s = torch.tensor(u_CG[:, g], dtype=torch.float64), torch.tensor(s_CG[:, g], dtype=torch.float64)
        umax, smax = u.max(), s.max()
        un, sn = u / umax, s / smax
        x = torch.nn.functional.leaky_relu(net[0](torch.stack([un, sn]).T))
        out = torch.sigmoid(net[2](torch.nn.functional.leaky_relu(net[1](x))))
        beta, gamma, alpha = out[:, 0], out[:, 1] * umax / smax, out[:, 2] * umax * 2
        uv, sv = (alpha - beta * un) * c.dt, (beta * un - gamma * sn) * c.dt
        points = np.stack([u.numpy(), s.numpy()], 1)
        nbrs = NearestNeighbors(n_neighbors=min(len(u) - 1, 30), algorithm="ball_tree").fit(points)
        indices = torch.tensor(nbrs.kneighbors(points)[1])  # the cell itself first, then 29 others
        unv, snv = un[indices.T[1:]] - un, sn[indices.T[1:]] - sn
        den = torch.sqrt(unv**2 + snv**2) * torch.sqrt(uv**2 + sv**2)
        den[den == 0] = -1
        cosine = torch.where(den != -1, (unv * uv + snv * sv) / den, torch.tensor(1.0, dtype=torch.float64))
        total += torch.mean(1 - torch.max(cosine, 0)[0]).item()
    return total


def test_celldancer_loss_matches_slow_reference():
    torch.manual_seed(0)
    batch = _us_batch(n_cells=45, n_genes=4, seed=3)
    head = CellDancerHead(n_genes=4, norm_cell_distribution=False, gene_chunk=3).double()
    batch = {**batch, **{k: batch[k].double() for k in (keys.B_UNSPLICED, keys.B_SPLICED)}}
    loss = head.loss(batch, head(batch, None)).loss.item()
    u_dense, s_dense = head.dense_us(batch)
    assert loss == pytest.approx(_reference_loss(head, u_dense.numpy(), s_dense.numpy()), rel=1e-9)


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
