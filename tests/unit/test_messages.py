"""Error messages print plain Python values (``-2.0``, ``'A'``), never numpy reprs (``np.float32(-2.0)``,
``np.str_('A')``, numpy 2's repr of its scalars).

    python -m pytest -q tests/unit/test_messages.py
"""

from __future__ import annotations

import numpy as np
import pytest

from fm.data.tokenize import TokenizerConfig, tokenize_block
from tests.unit.test_tokenize import CELLS, _block


def test_bad_size_factor_message_has_the_plain_value():
    with pytest.raises(ValueError) as error:
        tokenize_block(_block(CELLS, size_factor=[1.0, -2.0]), TokenizerConfig(normalization="size_factor"),
                       np.random.default_rng(0))
    assert "size_factor=-2.0 " in str(error.value) and "np." not in str(error.value), str(error.value)


def test_unknown_cluster_message_lists_plain_names():
    import anndata as ad
    import pandas as pd

    from fm.evaluate import transitions_section

    adata = ad.AnnData(np.zeros((4, 2), np.float32), obs=pd.DataFrame({"clusters": [3, 3, 7, 7]}, index=list("abcd")))
    with pytest.raises(ValueError) as error:
        transitions_section(adata, [("3", "9")], "clusters", None)
    assert "['9'] not in obs['clusters'] (has ['3', '7'])" in str(error.value) and "np." not in str(error.value)
