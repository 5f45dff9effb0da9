"""Error messages print plain Python values (``-2.0``), never numpy 2's reprs of its scalars (``np.float32(-2.0)``).

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

