"""fm's dynamical model (fm.velocity.dynamical): the analytic solution, truth beats its negation, a fit, unfit genes.

    .venv/bin/pytest -q tests/unit/test_velocity_dynamical.py
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from fm.velocity.dynamical import DynamicalConfig, GeneKinetics, fit_dynamics, solve


def _kinetics(G: int, seed: int = 0) -> GeneKinetics:
    """Genes with rates of the order the fit meets, beta != gamma except the last gene (the limit formula)."""
    rng = np.random.default_rng(seed)
    beta = 4 + 8 * rng.random(G)
    gamma = 2 + 6 * rng.random(G)
    gamma[-1] = beta[-1]
    t0 = -0.2 + 0.3 * rng.random(G)
    ts = 0.3 + 0.4 * rng.random(G)

    def f(x):
        return torch.as_tensor(np.asarray(x, np.float32))

    return GeneKinetics(f(np.log(gamma)), f(np.full(G, -2.0)), f(np.log(beta)), f(np.log(gamma)),
                        f(0.3 * rng.standard_normal(G)), f(t0), f(np.log(ts - t0)))


def test_analytic_solution_matches_ode_integration():
    from scipy.integrate import solve_ivp

    kin = _kinetics(5)
    alpha, alpha_off, beta, gamma, rho, t0, ts = (x.detach().double().numpy() for x in kin.rates())
    t_T = np.linspace(0, 1, 101)
    with torch.no_grad():
        _, _, u_TG, s_TG, _ = kin.state(torch.as_tensor(t_T, dtype=torch.float32)[:, None])
    for g in range(5):
        def rhs(t, y, g=g):
            a = alpha[g] if t0[g] <= t < ts[g] else alpha_off[g]
            return [a - beta[g] * y[0], beta[g] * y[0] - gamma[g] * y[1]]

        y0 = [alpha_off[g] / beta[g], alpha_off[g] / gamma[g]]  # off steady state before the onset
        sol = solve_ivp(rhs, (min(t0[g], 0.0), 1.0), y0, t_eval=t_T, rtol=1e-9, atol=1e-11, max_step=1e-3)
        np.testing.assert_allclose(u_TG[:, g].numpy(), sol.y[0], rtol=1e-4, atol=1e-5, err_msg=f"u of gene {g}")
        np.testing.assert_allclose(s_TG[:, g].numpy(), sol.y[1], rtol=1e-4, atol=1e-5, err_msg=f"s of gene {g}")


def test_beta_equal_gamma_limit_is_continuous():
    tau = torch.linspace(0, 2, 50, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    _, s_eq = solve(tau, 0.1 * one, 0.2 * one, one, 3 * one, 3 * one)
    _, s_near = solve(tau, 0.1 * one, 0.2 * one, one, 3 * one, 3 * one + 1e-5)
    torch.testing.assert_close(s_eq, s_near, rtol=1e-4, atol=1e-6)


def _model_data(N: int, G: int, noise: float, seed: int = 0):
    """Cells on the model's own curves with Gaussian noise: (u_obs, s_obs, t, true ds/dt, kinetics)."""
    kin = _kinetics(G, seed)
    rng = np.random.default_rng(seed)
    t_N = torch.as_tensor(np.sort(rng.random(N)), dtype=torch.float32)
    with torch.no_grad():
        uo, so, u, s, _ = kin.state(t_N[:, None])
        _, _, beta, gamma, *_ = kin.rates()
        v = beta * u - gamma * s
    u_obs = uo + noise * torch.randn(uo.shape, generator=torch.Generator().manual_seed(seed))
    s_obs = so + noise * torch.randn(so.shape, generator=torch.Generator().manual_seed(seed + 1))
    return u_obs, s_obs, t_N, v, kin


def test_objective_scores_truth_better_than_its_negation():
    """Negating the velocity is running each cell's clock backwards: the likelihood must see the difference."""
    u_obs, s_obs, t_N, v_NG, kin = _model_data(400, 20, noise=0.02)

    def nll(t):
        with torch.no_grad():
            uo, so, *_ = kin.state(t[:, None])
        return float(((u_obs - uo) ** 2 + (s_obs - so) ** 2).mean())

    truth, negation = nll(t_N), nll(1 - t_N)
    assert truth < 0.1 * negation, (truth, negation)
    # and the reversed clock is the negated velocity: on the same curves, ds/dt flips sign where the state is
    # visited in the other order (checked on the finite difference along the clock)
    with torch.no_grad():
        _, s_fwd, *_ = kin.state(t_N[:, None])
    ds = np.diff(s_fwd.numpy(), axis=0) / np.diff(t_N.numpy())[:, None]
    agree = np.sign(ds) == np.sign(v_NG.numpy()[:-1])
    assert agree.mean() > 0.95


def _graph(x_NP: np.ndarray, k: int = 15):
    import scipy.sparse as sp

    from fm.metrics.velocity import knn_indices

    nn = knn_indices(x_NP, k)
    N = len(x_NP)
    return sp.csr_matrix((np.ones(nn.size), (np.repeat(np.arange(N), k), nn.ravel())), shape=(N, N))


def test_fit_recovers_velocity_on_a_simulation_in_seconds():
    u_obs, s_obs, t_N, v_NG, _ = _model_data(600, 30, noise=0.03, seed=3)
    Ms, Mu = s_obs.clamp(min=0).numpy().astype(np.float64), u_obs.clamp(min=0).numpy().astype(np.float64)
    top = Ms + Mu >= np.percentile(Ms + Mu, 95, axis=0)
    gamma_ss = (top * Ms * Mu).sum(0) / (top * Ms * Ms).sum(0)
    start = time.perf_counter()
    fit = fit_dynamics(Ms, Mu, gamma_ss, _graph(np.c_[Ms, Mu]), DynamicalConfig(rounds=6, steps=80))
    elapsed = time.perf_counter() - start
    from fm.metrics.velocity import gene_spearman, sign_accuracy

    rho = gene_spearman(fit.velocity, v_NG.numpy())["median"]
    assert rho > 0.95, rho
    assert sign_accuracy(fit.velocity, v_NG.numpy()) > 0.9
    assert np.corrcoef(fit.latent_time, t_N.numpy())[0, 1] > 0.95
    assert elapsed < 30, elapsed
    assert fit.confidence.shape == Ms.shape and ((fit.confidence > 0) & (fit.confidence <= 1)).all()


def test_unfit_genes_are_nan_and_reported(caplog):
    import scipy.sparse as sp

    from data_prep.simulate import simulate
    from fm import keys
    from fm.velocity.neighbours import NeighbourConfig, neighbourhood
    from fm.velocity.teachers import TeacherConfig, run_teacher

    a = simulate(300, 12, seed=0)
    s, u = (sp.csr_matrix(a.layers[k]).toarray() for k in (keys.LAYER_SPLICED, keys.LAYER_UNSPLICED))
    u[:, 0] = 0  # no unspliced signal
    s[:, 1] = 0
    s[:2, 1] = 1  # spliced signal in 2 cells only
    nb, sn, un = neighbourhood(s, u, NeighbourConfig())
    with caplog.at_level(logging.WARNING, "fm.velocity.teachers"):
        r = run_teacher(TeacherConfig("fm_dynamical", max_iter=2), nb, sn, un, genes=list(a.var_names))
    for g in (0, 1):
        assert g in r.unfit and np.isnan(r.velocity[:, g]).all() and not r.velocity_genes[g]
        assert np.isnan(r.var["fit_gamma"][g]) and np.isnan(r.layers["velocity_confidence"][:, g]).all()
    assert "fm_dynamical teacher could not fit" in caplog.text and str(a.var_names[0]) in caplog.text
    fitted = np.setdiff1d(np.arange(a.n_vars), list(r.unfit))
    assert fitted.size and np.isfinite(r.velocity[:, fitted]).all()
    assert ((r.obs["latent_time"] >= 0) & (r.obs["latent_time"] <= 1)).all()


def test_config_names_the_field():
    with pytest.raises(ValueError, match="DynamicalConfig.velocity_at"):
        DynamicalConfig(velocity_at="somewhere")
    with pytest.raises(ValueError, match="DynamicalConfig.rounds"):
        DynamicalConfig(rounds=0)


def test_command_writes_scvelo_fields():
    """`fm velocity --method fm_dynamical` writes velocity, velocity_u, latent time, fit_* rates and confidence."""
    from pathlib import Path

    import anndata as ad

    from fm.velocity.command import velocity
    from fm.velocity.neighbours import NeighbourConfig
    from fm.velocity.teachers import TeacherConfig

    a = ad.read_h5ad(Path(__file__).resolve().parents[1] / "assets" / "velocity_sim_300x40.h5ad")
    velocity(a, TeacherConfig("fm_dynamical", max_iter=2), NeighbourConfig(), source="tiny")
    assert a.uns["fm"]["method"] == "fm_dynamical"
    assert ((a.obs["latent_time"] >= 0) & (a.obs["latent_time"] <= 1)).all()
    fitted = a.var["velocity_genes"].to_numpy(bool)
    assert fitted.any()
    for name in ("velocity", "velocity_u", "velocity_confidence"):
        assert np.isfinite(a.layers[name][:, fitted]).all(), name
    for name in ("fit_alpha", "fit_beta", "fit_gamma"):
        assert (a.var[name].to_numpy()[fitted] > 0).all(), name
    assert np.isfinite(a.var["fit_t_"].to_numpy()[fitted]).all()  # the switch; before 0 for genes already repressed
    with pytest.raises(ValueError, match="latent_time"):  # a second run refuses to replace them silently
        velocity(a, TeacherConfig("fm_dynamical", max_iter=2), NeighbourConfig(), source="tiny")


def test_rates_follow_scvelo_conventions():
    """velocity = fit_beta Mu / fit_scaling - fit_gamma Ms, velocity_u = scaling (alpha - beta Mu / scaling) at the
    observed moments, so a user can rebuild the velocity from var['fit_*'] as with scVelo."""
    u_obs, s_obs, _, _, _ = _model_data(200, 8, noise=0.02, seed=5)
    Ms, Mu = 3.0 * s_obs.clamp(min=0).numpy(), 0.5 * u_obs.clamp(min=0).numpy()  # other units than the model's
    fit = fit_dynamics(Ms, Mu, np.full(8, 0.2), _graph(np.c_[Ms, Mu]),
                       DynamicalConfig(rounds=1, steps=5, velocity_at="observed"))
    np.testing.assert_allclose(fit.velocity, fit.beta * Mu / fit.scaling - fit.gamma * Ms, rtol=1e-4, atol=1e-5)
    before_onset = fit.latent_time[:, None] < fit.t0
    after_switch = fit.latent_time[:, None] >= fit.t_switch
    alpha_NG = np.where(before_onset | after_switch, fit.alpha_off, fit.alpha)
    np.testing.assert_allclose(fit.velocity_u, fit.scaling * alpha_NG - fit.beta * Mu, rtol=1e-4, atol=1e-5)
