"""NB and ZINB log-likelihoods against their closed forms (scipy.stats.nbinom; the ZINB mixture by hand).

.venv/bin/python -m pytest -q tests/unit/test_distributions.py
"""

import numpy as np
import pytest
import torch
from scipy import stats

from fm.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial, nb_log_prob, zinb_log_prob

X = np.array([0, 0, 1, 3, 7, 20, 150, 0, 2])
MU = np.array([0.5, 10.0, 1.0, 2.5, 7.0, 3.0, 120.0, 0.01, 1e3])
THETA = np.array([1.0, 0.3, 5.0, 2.0, 100.0, 0.8, 10.0, 4.0, 0.5])


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


def _nb_ref(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))  # n = theta, p = theta / (theta + mu)


@pytest.mark.parametrize("theta_scale", [1.0, 1e3, 1e6])
def test_nb_matches_scipy(theta_scale):
    theta = THETA * theta_scale
    got = nb_log_prob(_t(X), _t(MU), _t(theta), eps=0.0).numpy()
    np.testing.assert_allclose(got, _nb_ref(X, MU, theta), rtol=1e-7, atol=1e-7)


def test_nb_large_theta_is_poisson():
    got = nb_log_prob(_t(X), _t(MU), _t(np.full(len(X), 1e9)), eps=0.0).numpy()
    np.testing.assert_allclose(got, stats.poisson.logpmf(X, MU), rtol=1e-5, atol=1e-5)


def test_nb_float32_close_to_float64_and_eps_default():
    got = nb_log_prob(_t(X).float(), _t(MU).float(), _t(THETA).float())
    np.testing.assert_allclose(got.double().numpy(), _nb_ref(X, MU, THETA), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("theta_scale", [1.0, 1e4])
def test_zinb_matches_mixture(theta_scale):
    theta = THETA * theta_scale
    logits = np.linspace(-3, 3, len(X))
    pi = 1 / (1 + np.exp(-logits))
    log_nb = _nb_ref(X, MU, theta)  # the mixture in log space: NB(x) underflows for some entries
    ref = np.where(X == 0, np.logaddexp(np.log(pi), np.log1p(-pi) + log_nb), np.log1p(-pi) + log_nb)
    got = zinb_log_prob(_t(X), _t(MU), _t(theta), _t(logits), eps=0.0).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-7)
    assert (got[X == 0] >= np.log(pi[X == 0]) - 1e-12).all()  # a zero is at least as likely as the point mass


def test_zinb_extreme_logits_reduce_to_nb_and_point_mass():
    x, mu, theta = _t(X), _t(MU), _t(THETA)
    np.testing.assert_allclose(zinb_log_prob(x, mu, theta, _t(np.full(len(X), -50.0))).numpy(),
                               nb_log_prob(x, mu, theta).numpy(), atol=1e-9)  # fmt: skip
    at_zero = zinb_log_prob(x, mu, theta, _t(np.full(len(X), 50.0))).numpy()[X == 0]
    np.testing.assert_allclose(at_zero, 0.0, atol=1e-9)


def test_pmf_sums_to_one_and_classes():
    x = _t(np.arange(0, 2000))
    for dist in (NegativeBinomial(_t(7.0), _t(0.7)), ZeroInflatedNegativeBinomial(_t(7.0), _t(0.7), _t(0.3))):
        p = dist.log_prob(x).exp()
        assert abs(float(p.sum()) - 1) < 1e-6
        assert abs(float((p * x).sum()) - float(dist.mean)) < 1e-4
        assert abs(float((p * (x - dist.mean) ** 2).sum()) - float(dist.variance)) < 1e-2


def test_gradients_finite_at_zero_counts():
    mu = torch.tensor([1e-6, 2.0], requires_grad=True)
    theta = torch.tensor([1e-3, 1e5], requires_grad=True)
    logits = torch.tensor([0.0, 0.0], requires_grad=True)
    zinb_log_prob(torch.zeros(2), mu, theta, logits).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (mu, theta, logits))
