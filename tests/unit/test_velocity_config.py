"""VelocityConfig.velocity_param=auto resolves by mode: a free velocity when supervised, the rates when kinetic.

    python -m pytest tests/unit/test_velocity_config.py -q
"""

from __future__ import annotations

import pytest

from fm.heads.velocity import VelocityConfig


@pytest.mark.parametrize("mode, expected", [("supervised", "direct"), ("kinetic", "rates")])
def test_auto_resolves_by_mode(mode, expected):
    assert VelocityConfig(mode=mode).velocity_param == expected


@pytest.mark.parametrize("mode", ["supervised", "kinetic"])
@pytest.mark.parametrize("param", ["direct", "rates"])
def test_explicit_choice_is_kept(mode, param):
    assert VelocityConfig(mode=mode, velocity_param=param).velocity_param == param


def test_unknown_choice_names_the_field():
    with pytest.raises(ValueError, match="VelocityConfig.velocity_param"):
        VelocityConfig(velocity_param="free")
