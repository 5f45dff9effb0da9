"""Count likelihoods: negative binomial (NB) and zero-inflated NB, parametrised as in scvi-tools.

One place for the count models that scVI-style baselines and the expression decoder share. The NB has mean ``mu`` and
inverse dispersion ``theta`` (variance ``mu + mu**2 / theta``); the ZINB adds a point mass at zero with probability
``sigmoid(zi_logits)``. Formulas follow scvi-tools' ``log_nb_positive`` / ``log_zinb_positive`` so that ELBOs are
comparable, with one change: ``theta * log(theta / (theta + mu))`` is written ``-theta * log1p(mu / theta)``, which
keeps its precision for large theta.

    .venv/bin/python -c "import torch; from fm.distributions import nb_log_prob; \
print(nb_log_prob(torch.tensor([0., 3.]), torch.tensor([2., 2.]), torch.tensor([5., 5.])))"

All functions broadcast their arguments; shapes are typically [B, G] (B cells, G genes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, eps: float = 1e-8) -> Tensor:
    """Elementwise log NB(x; mu, theta).

    Args:
        x: counts (non-negative; need not be integers).
        mu: mean, > 0.
        theta: inverse dispersion, > 0.
        eps: guards the logarithms at mu = 0 or theta = 0, as in scvi-tools.
    """
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        -theta * torch.log1p(mu / (theta + eps))  # = theta * (log(theta + eps) - log(theta + mu + eps))
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def zinb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Elementwise log ZINB(x; mu, theta, pi = sigmoid(zi_logits)).

    P(0) = pi + (1 - pi) NB(0) and P(x > 0) = (1 - pi) NB(x), computed in log space from the logits.
    """
    log_nb_zero = -theta * torch.log1p(mu / (theta + eps))  # log NB(0) = theta * log(theta / (theta + mu))
    # log(pi + (1 - pi) NB(0)) = log(1 + e^-l NB(0)) - log(1 + e^-l), with l the logits
    case_zero = F.softplus(log_nb_zero - zi_logits) - F.softplus(-zi_logits)
    case_nonzero = -F.softplus(zi_logits) + nb_log_prob(x, mu, theta, eps)  # log(1 - pi) + log NB(x)
    return torch.where(x <= eps, case_zero, case_nonzero)


class NegativeBinomial:
    """NB(mu, theta) with ``log_prob``, ``mean`` and ``variance`` (no sampling needed here)."""

    def __init__(self, mu: Tensor, theta: Tensor, eps: float = 1e-8):
        self.mu, self.theta, self.eps = mu, theta, eps

    def log_prob(self, x: Tensor) -> Tensor:
        return nb_log_prob(x, self.mu, self.theta, self.eps)

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def variance(self) -> Tensor:
        return self.mu + self.mu**2 / self.theta


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """ZINB(mu, theta, zi_logits): NB with an extra zero of probability ``sigmoid(zi_logits)``."""

    def __init__(self, mu: Tensor, theta: Tensor, zi_logits: Tensor, eps: float = 1e-8):
        super().__init__(mu, theta, eps)
        self.zi_logits = zi_logits

    @property
    def zi_probs(self) -> Tensor:
        return torch.sigmoid(self.zi_logits)

    def log_prob(self, x: Tensor) -> Tensor:
        return zinb_log_prob(x, self.mu, self.theta, self.zi_logits, self.eps)

    @property
    def mean(self) -> Tensor:
        return (1 - self.zi_probs) * self.mu

    @property
    def variance(self) -> Tensor:
        pi = self.zi_probs
        return (1 - pi) * self.mu * (self.mu + self.theta + pi * self.mu * self.theta) / self.theta
