"""jaxdp.config: config files and command-line overrides (unknown keys and wrong types are errors naming them)."""

import os

import pytest

from jaxdp.config import ConfigError, apply_overrides, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def test_overrides_cast_types():
    config = apply_overrides(
        load_config(DIGITS), ["privacy.l2_clip_norm=2", "--config.privacy.per_layer=true", "model.kwargs.hidden=32"]
    )
    assert config.privacy.l2_clip_norm == 2.0 and isinstance(config.privacy.l2_clip_norm, float)
    assert config.privacy.per_layer is True and config.model.kwargs.hidden == (32,)
    with pytest.raises(ConfigError, match="privacy.per_layer"):
        apply_overrides(load_config(DIGITS), ["privacy.per_layer=2"])
