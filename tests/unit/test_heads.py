"""Expression, velocity and generative heads on tiny batches (CPU, seeded): shapes, finite losses, losses that fall,
hidden-gene prediction, supervised velocity fit on a simulation, the dynamical velocity objective on a simulation
(warm start, streaming fit, truth better than its negation), generation schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm import keys
from fm.heads.expression import HIDDEN_MASK, QUERY_MASK, ExpressionConfig, ExpressionHead
from fm.heads.generative import GenerativeConfig, GenerativeHead, later_partners
from fm.heads.velocity import VelocityConfig, VelocityHead
from fm.metrics.velocity import gene_spearman, sign_accuracy

VOCAB, D = 40, 32


def make_encoder(vocab_size: int = VOCAB, d_model: int = D):
    from fm.model.config import ZorroConfig
    from fm.model.zorro import ZorroEncoder

    torch.manual_seed(0)
    return ZorroEncoder(ZorroConfig.from_name("debug", vocab_size=vocab_size, d_model=d_model))


def sim_batch(n_cells: int = 32, n_genes: int = 10, seed: int = 0, regime: str = "trajectory") -> tuple[dict, object]:
    """A batch with every simulated gene as a token (ids 1..G), normalised log1p values and the truth."""
    from data_prep.simulate import simulate

    adata = simulate(n_cells, n_genes, regime=regime, seed=seed, capture=2.0)
    s = np.asarray(adata.layers[keys.LAYER_SPLICED].todense(), dtype=np.float32)
    u = np.asarray(adata.layers[keys.LAYER_UNSPLICED].todense(), dtype=np.float32)
    lib_s, lib_u = s.sum(1).clip(min=1), u.sum(1).clip(min=1)
    mask = np.ones_like(s, dtype=bool)
    mask[0, -2:] = False  # some padding
    ids = np.where(mask, np.arange(1, n_genes + 1), 0)

    def t(x, dtype=torch.float32):
        return torch.as_tensor(np.asarray(x), dtype=dtype)

    batch = {
        keys.B_GENE_IDS: t(ids, torch.int64),
        keys.B_GENE_MASK: t(mask, torch.bool),
        keys.B_SPLICED: t(np.log1p(s / lib_s[:, None] * 100) * mask),
        keys.B_UNSPLICED: t(np.log1p(u / lib_u[:, None] * 100) * mask),
        keys.B_SPLICED_COUNTS: t(s * mask),
        keys.B_UNSPLICED_COUNTS: t(u * mask),
        keys.B_LIBRARY_SIZE_SPLICED: t(lib_s),
        keys.B_LIBRARY_SIZE_UNSPLICED: t(lib_u),
        keys.B_VELOCITY: t(np.where(mask, adata.layers[keys.LAYER_VELOCITY_TRUE], np.nan)),
        keys.B_VELOCITY_U: t(np.where(mask, adata.layers[keys.LAYER_VELOCITY_U_TRUE], np.nan)),
        keys.B_TIME: t(adata.obs[keys.OBS_TIME_TRUE].to_numpy()),
        keys.B_CELL_TYPE: list(adata.obs[keys.OBS_CLUSTERS].astype(str)),
    }
    return batch, adata


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine (5-15x slower at 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sim():
    return sim_batch()


def train(encoder, head, batch, steps: int, lr: float = 3e-3, freeze_encoder: bool = True) -> list[float]:
    """Adam on a fixed batch; a frozen encoder (the fine-tuning default, and fast) runs once per distinct input."""
    torch.manual_seed(0)
    params = [*head.parameters()] + ([] if freeze_encoder else [*encoder.parameters()])
    opt = torch.optim.Adam(params, lr=lr)
    losses, cache = [], {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        b = head.prepare(batch, gen)
        if freeze_encoder:
            if b is not cache.get("batch"):  # prepare returned a new (re-masked) batch
                with torch.no_grad():
                    cache = {"batch": b, "out": encoder(b)}
            enc_out = cache["out"]
        else:
            enc_out = encoder(b)
        out = head.loss(b, head(b, enc_out))
        assert out.is_finite()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def falls(losses: list[float], factor: float = 0.8) -> bool:
    return np.mean(losses[-3:]) < factor * np.mean(losses[:3])


# --- configs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ExpressionConfig, {"loss": "poisson"}, "loss"),
        (ExpressionConfig, {"mask_fraction": 1.0}, "mask_fraction"),
        (VelocityConfig, {"mode": "magic"}, "mode"),
        (VelocityConfig, {"n_neighbours": "3"}, "n_neighbours"),
        (VelocityConfig, {"rate_max": 0.0}, "rate_max"),
        (GenerativeConfig, {"n_layers": 0}, "n_layers"),
        (GenerativeConfig, {"logvar_min": 5.0}, "logvar_min"),
    ],
)
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        cls(**kwargs)


def test_heads_accept_mapping_configs():
    assert VelocityHead(D, VOCAB, {"mode": "supervised"}).config.mode == "supervised"
    with pytest.raises(TypeError, match="VelocityConfig"):
        VelocityHead(D, VOCAB, 3)


# --- expression ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["nb", "zinb", "mse"])
def test_expression_shapes_and_loss_falls(sim, loss):
    batch, _ = sim
    encoder, head = make_encoder(), ExpressionHead(D, VOCAB, {"loss": loss})
    b = head.prepare(batch, torch.Generator().manual_seed(0))
    hidden = b[HIDDEN_MASK]
    assert hidden.any() and not (hidden & ~batch[keys.B_GENE_MASK]).any()
    assert (b[keys.B_GENE_MASK].sum(1) >= 1).all() and torch.equal(b[QUERY_MASK], batch[keys.B_GENE_MASK])
    out = head(b, encoder(b))
    B, G = batch[keys.B_GENE_IDS].shape
    name = "spliced" if loss == "mse" else "spliced_mu"
    assert out[name].shape == (B, G) and out[name.replace("spliced", "unspliced")].shape == (B, G)
    if loss != "mse":  # mu sums to the library size over the cell's genes
        torch.testing.assert_close(out["spliced_mu"].sum(1), batch[keys.B_LIBRARY_SIZE_SPLICED])
    assert head.loss(b, out).is_finite()
    # training without re-masking (one encoder pass); count NLLs fall to the noise floor, MSE much further
    head = ExpressionHead(D, VOCAB, {"loss": loss, "mask_fraction": 0.0})
    assert falls(train(encoder, head, batch, 30, lr=1e-2), 0.5 if loss == "mse" else 0.95)


def test_expression_predicts_hidden_gene():
    """Gene 2 copies gene 1; gene 2 is always hidden from the encoder, so only the encoder's gene 1 can tell it."""
    g = torch.Generator().manual_seed(1)
    B, G = 64, 6
    values = torch.rand(B, G, generator=g) * 3
    values[:, 1] = values[:, 0]
    batch = {
        keys.B_GENE_IDS: torch.arange(1, G + 1).repeat(B, 1),
        keys.B_GENE_MASK: torch.ones(B, G, dtype=torch.bool),
        keys.B_SPLICED: values,
        keys.B_UNSPLICED: values * 0.5,
    }
    encoder = make_encoder()
    head = ExpressionHead(D, VOCAB, {"loss": "mse", "mask_fraction": 0.2, "loss_on": "hidden"})
    hidden = torch.zeros(B, G, dtype=torch.bool)
    hidden[:, 1] = True

    def hide(b, generator=None):  # a fixed hiding pattern instead of the random one
        b = {**b, QUERY_MASK: b[keys.B_GENE_MASK], HIDDEN_MASK: hidden, keys.B_GENE_MASK: ~hidden}
        for key in ("_expr_target_spliced", "_expr_target_unspliced"):
            b[key] = b[keys.B_SPLICED if "unspliced" not in key else keys.B_UNSPLICED]
        b[keys.B_SPLICED] = b[keys.B_SPLICED].masked_fill(hidden, 0.0)
        b[keys.B_UNSPLICED] = b[keys.B_UNSPLICED].masked_fill(hidden, 0.0)
        return b

    b = hide(batch)
    head.prepare = lambda batch, generator=None: b
    train(encoder, head, batch, 80, lr=1e-2)
    with torch.no_grad():
        pred = head(b, encoder(b))["spliced"][:, 1]
    mae = (pred - values[:, 1]).abs().mean().item()
    baseline = (values[:, 1].mean() - values[:, 1]).abs().mean().item()  # gene-mean imputation
    assert mae < 0.35 * baseline, (mae, baseline)


# --- velocity ------------------------------------------------------------------------------------------------------
def test_velocity_shapes_rates_positive(sim):
    batch, _ = sim
    encoder = make_encoder()
    for param in ("direct", "rates"):
        head = VelocityHead(D, VOCAB, {"mode": "supervised", "velocity_param": param})
        out = head(batch, encoder(batch))
        B, G = batch[keys.B_GENE_IDS].shape
        for name in ("velocity", "velocity_u", "alpha", "beta", "gamma"):
            assert out[name].shape == (B, G)
        assert all((out[r] > 0).all() and (out[r] < head.config.rate_max).all() for r in ("alpha", "beta", "gamma"))
        if param == "rates":
            expected = out["beta"] * batch[keys.B_UNSPLICED].expm1() - out["gamma"] * batch[keys.B_SPLICED].expm1()
            torch.testing.assert_close(out["velocity"], expected)
        assert head.loss(batch, out).is_finite()


def _spearman(encoder, head, batch, adata) -> float:
    with torch.no_grad():
        pred = head(batch, encoder(batch))["velocity"][1:].numpy()  # cell 0 has padding
    return gene_spearman(pred, adata.layers[keys.LAYER_VELOCITY_TRUE][1:])["median"]


@pytest.mark.parametrize("supervised_loss", ["mse", "cosine_mse"])
def test_velocity_supervised_fits_simulation(sim, supervised_loss):
    batch, adata = sim
    batch = {**batch, keys.B_VELOCITY: batch[keys.B_VELOCITY].clone()}
    batch[keys.B_VELOCITY][5, 3] = float("nan")  # unknown targets are skipped
    encoder, head = make_encoder(), VelocityHead(D, VOCAB, {"mode": "supervised", "supervised_loss": supervised_loss})
    before = _spearman(encoder, head, batch, adata)
    losses = train(encoder, head, batch, 60, lr=1e-2)
    after = _spearman(encoder, head, batch, adata)
    assert falls(losses, 0.7) and after > max(before + 0.3, 0.6), (before, after, losses[:3], losses[-3:])


def test_velocity_supervised_needs_target(sim):
    batch, _ = sim
    encoder, head = make_encoder(), VelocityHead(D, VOCAB, {"mode": "supervised"})
    b = {**batch, keys.B_VELOCITY: torch.full_like(batch[keys.B_VELOCITY], float("nan"))}
    with pytest.raises(ValueError, match=keys.B_VELOCITY):
        head.loss(b, head(b, encoder(b)))


def test_velocity_supervised_scores_truth_better_than_its_negation(sim):
    batch, _ = sim
    head = VelocityHead(D, VOCAB, {"mode": "supervised"})
    mask = batch[keys.B_GENE_MASK]
    truth = torch.nan_to_num(batch[keys.B_VELOCITY])
    loss = {sign: head.loss(batch, {"velocity": sign * truth, "velocity_u": sign * torch.nan_to_num(
        batch[keys.B_VELOCITY_U]), "query_mask": mask}).loss.item() for sign in (1.0, -1.0)}
    assert loss[1.0] < 1e-6 < 1.0 < loss[-1.0], loss


# --- velocity: the dynamical objective -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moments_sim():
    """fm's simulator (300 cells x 40 genes), its moments over 30 neighbours (no normalisation, as the truth), tokens =
    each cell's detected genes. fm_dynamical reaches sign accuracy 0.885, gene Spearman 0.82 on it."""
    from data_prep.simulate import simulate
    from fm.velocity.neighbours import NeighbourConfig, neighbourhood

    a = simulate(300, 40, regime="trajectory", seed=0, capture=3.0)
    nb, s, u = neighbourhood(a.layers[keys.LAYER_SPLICED], a.layers[keys.LAYER_UNSPLICED],
                             NeighbourConfig(normalization="none"))  # raw counts: the truth's units
    S, U = np.asarray(s.todense()), np.asarray(u.todense())
    det = (S > 0) | (U > 0)
    G = a.n_vars
    Ms, Mu = np.asarray(nb.Ms), np.asarray(nb.Mu)
    truth = np.asarray(a.layers[keys.LAYER_VELOCITY_TRUE])

    def batch(idx):
        return {keys.B_GENE_IDS: torch.as_tensor(np.tile(np.arange(1, G + 1), (len(idx), 1))),
                keys.B_GENE_MASK: torch.as_tensor(det[idx]),
                keys.B_SPLICED: torch.as_tensor(np.where(det[idx], np.log1p(S[idx]), 0), dtype=torch.float32),
                keys.B_UNSPLICED: torch.as_tensor(np.where(det[idx], np.log1p(U[idx]), 0), dtype=torch.float32),
                keys.B_MS: torch.as_tensor(np.where(det[idx], np.log1p(Ms[idx]), np.nan), dtype=torch.float32),
                keys.B_MU: torch.as_tensor(np.where(det[idx], np.log1p(Mu[idx]), np.nan), dtype=torch.float32)}

    return batch, truth, a.n_obs


class _Enc:
    def __init__(self, B: int):
        self.z_global = torch.zeros(B, D)


def _dynamical_head(batch, n: int, **cfg) -> VelocityHead:
    torch.manual_seed(0)
    head = VelocityHead(D, VOCAB + 1, {"mode": "dynamical", "warm_start_rounds": 3, **cfg})
    assert head.needs_warm_start()
    state = head.warm_start(batch(np.arange(a, min(a + 64, n))) for a in range(0, n, 64))
    head.load_state_dict(state, strict=False)
    assert not head.needs_warm_start()
    return head


def test_velocity_dynamical_objective_learns_the_true_direction(moments_sim):
    """The dynamical objective (warm start, then minibatch steps of its loss): velocity that follows the truth
    (sign and per-gene rank), where the negation of that velocity would score the complement."""
    batch, truth, n = moments_sim
    head = _dynamical_head(batch, n)
    opt = torch.optim.Adam(head.optim_groups(1e-3, 0.0))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(20):
        b = batch(rng.choice(n, 64, replace=False))
        out = head.loss(b, head(b, _Enc(64)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.isfinite(losses).all()
    head.eval()
    with torch.no_grad():
        out = head(batch(np.arange(n)), _Enc(n))
    v = out["velocity"].numpy()
    genes = np.isfinite(v).all(0)
    assert genes.sum() >= 10, genes.sum()
    # the truth scores better than its negation: the fitted velocity agrees with the true sign, its negation not
    sign, sign_neg = sign_accuracy(v[:, genes], truth[:, genes]), sign_accuracy(-v[:, genes], truth[:, genes])
    rho = gene_spearman(v[:, genes], truth[:, genes])["median"]
    assert sign > 0.8 > 0.2 > sign_neg and rho > 0.7, (sign, sign_neg, rho)
    conf, t = out["confidence"].numpy(), out["latent_time"].numpy()
    assert ((conf[:, genes] >= 0) & (conf[:, genes] <= 1)).all() and conf[:, genes].mean() > 0.3
    assert ((t >= 0) & (t <= 1)).all()
    assert np.isnan(v[:, ~genes]).all()  # a gene the warm start did not fit has no velocity


def test_velocity_dynamical_needs_moments(sim):
    batch, _ = sim
    head = VelocityHead(D, VOCAB, {"mode": "dynamical"})
    with pytest.raises(KeyError, match="neighbourhoods"):
        head(batch, make_encoder()(batch))


# --- generative ----------------------------------------------------------------------------------------------------
def test_later_partners(sim):
    batch, _ = sim
    partner, valid, dt = later_partners(batch, k=8)
    t = batch[keys.B_TIME]
    assert valid.float().mean() > 0.5
    assert (t[partner[valid]] > t[valid]).all() and torch.allclose(dt[valid], t[partner[valid]] - t[valid])


def test_generative_shapes_loss_falls(sim):
    batch, _ = sim
    encoder, head = make_encoder(), GenerativeHead(D, VOCAB, {"n_layers": 1})
    torch.manual_seed(0)
    out = head(batch, encoder(batch))
    B, G = batch[keys.B_GENE_IDS].shape
    assert out["mean"].shape == (B, G, 2) and out["logvar"].shape == (B, G, 2)
    assert head.loss(batch, out).is_finite()
    assert falls(train(encoder, head, batch, 30, lr=1e-2))


@pytest.mark.parametrize("n_iterations", [1, 3, 8])
def test_generate_unmasks_everything(sim, n_iterations):
    batch, _ = sim
    encoder, head = make_encoder(), GenerativeHead(D, VOCAB, {"n_layers": 1})
    with torch.no_grad():
        gen = head.generate(batch, encoder(batch), dt=0.5, n_iterations=n_iterations)
    n_masked = gen["n_masked"]
    assert len(n_masked) == n_iterations + 1 and n_masked[0] == batch[keys.B_GENE_MASK].sum()
    assert (n_masked[1:] < n_masked[:-1]).all() and n_masked[-1] == 0
    assert (gen["spliced"] >= 0).all() and (gen["spliced"][~batch[keys.B_GENE_MASK]] == 0).all()


def test_rollout_shapes(sim):
    batch, _ = sim
    encoder, head = make_encoder(), GenerativeHead(D, VOCAB, {"n_layers": 1, "n_iterations": 2})
    traj = head.rollout(encoder, batch, steps=3, dt=0.5)
    B, G = batch[keys.B_GENE_IDS].shape
    assert traj["spliced"].shape == (4, B, G) and traj["unspliced"].shape == (4, B, G)
    torch.testing.assert_close(traj["spliced"][0], batch[keys.B_SPLICED])
    torch.testing.assert_close(traj["time"], torch.tensor([0.0, 0.5, 1.0, 1.5]))
