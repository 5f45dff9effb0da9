"""The zero-shot bench's gene panel (bench/velocity_zero_shot.py): datasets share kinetics, differ in cells and capture.

    .venv/bin/pytest -q tests/unit/test_bench_zero_shot.py
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scvelo")

from bench.velocity_zero_shot import JITTER, gene_panel, simulate_dataset  # noqa: E402


def test_datasets_of_a_panel_share_kinetics_not_cells():
    panel = gene_panel(12, seed=0)
    a, b = simulate_dataset(panel, 200, seed=1), simulate_dataset(panel, 200, seed=2)
    assert a.shape == b.shape == (200, 12) and list(a.var_names) == list(b.var_names)
    assert np.issubdtype(a.layers["spliced"].dtype, np.integer) and "velocity_true" in a.layers
    # the panel's rates, each dataset's jittered by ~5%, and the panel's switch times on the absolute clock ...
    for rate in ("true_alpha", "true_beta", "true_gamma"):
        ratio = np.log(a.var[rate].to_numpy() / b.var[rate].to_numpy())
        assert np.abs(ratio).max() < 6 * JITTER and ratio.std() > 0
    inside = panel.switch_time < 0.9 * min(a.obs["true_t"].max(), b.obs["true_t"].max())
    np.testing.assert_allclose(a.var["true_t_"][inside], panel.switch_time[inside], atol=0.5)
    np.testing.assert_allclose(b.var["true_t_"][inside], panel.switch_time[inside], atol=0.5)
    # ... while cells, windows and capture are the dataset's own
    assert not np.array_equal(a.obs["true_t"], b.obs["true_t"])
    assert a.uns["simulation"]["capture"] != b.uns["simulation"]["capture"]
    assert a.uns["simulation"]["jitter"] == JITTER
    # a training file carries no truth, and the same seed gives the same dataset
    assert "velocity_true" not in simulate_dataset(panel, 50, seed=1, truth=False).layers
    np.testing.assert_array_equal(simulate_dataset(panel, 200, seed=1).layers["spliced"].toarray(),
                                  a.layers["spliced"].toarray())
