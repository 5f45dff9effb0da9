"""VelocityConfig: the modes (dynamical by default, supervised), velocity_param=auto resolving to a free velocity, and
errors that name the field; the removed kinetic mode is refused.

    python -m pytest tests/unit/test_velocity_config.py -q
"""

from __future__ import annotations

import pytest

from fm.heads.velocity import VelocityConfig


def test_defaults_are_the_self_supervised_dynamical_model():
    c = VelocityConfig()
    assert c.mode == "dynamical" and c.clock == "fit" and c.velocity_param == "direct"


@pytest.mark.parametrize("mode", ["supervised", "dynamical"])
@pytest.mark.parametrize("param", ["direct", "rates"])
def test_explicit_choice_is_kept(mode, param):
    assert VelocityConfig(mode=mode, velocity_param=param).velocity_param == param


@pytest.mark.parametrize("field, value", [("velocity_param", "free"), ("mode", "kinetic"), ("clock", "guess"),
                                          ("n_grid", 3), ("min_sd", 0.0), ("kinetics_lr", -1.0)])
def test_bad_choice_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VelocityConfig(**{field: value})
