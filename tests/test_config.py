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


CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_is_one_line_listing_the_known_ones(name):
    """`--config configs/digits.py:big` was a ValueError traceback (and configs/digits_cnn.py:big blamed digits.py)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "jaxdp.cli", "train", "--config", f"configs/{name}:big"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"jaxdp: error: configs/{name}:big: unknown variant 'big'"), line
    assert "'smoke'" in line and f"configs/{name}:smoke" in line and f"configs/{name} (no variant)" in line, line


@pytest.mark.parametrize("name", CONFIGS)
def test_every_declared_variant_loads(name):
    from jaxdp.config import config_module

    path = os.path.join(ROOT, "configs", name)
    variants = config_module(path).VARIANTS
    assert variants, name
    for variant in (None, *variants):
        config = load_config(path if variant is None else f"{path}:{variant}")
        assert config.workdir.startswith("runs/") and config.epochs >= 1


def test_a_config_rejecting_its_argument_or_taking_none_is_a_config_error(tmp_path):
    """Any config file, not only ours: a ValueError from get_config(arg) is a one-line ConfigError, and a
    get_config() without a parameter given ``path.py:arg`` says it has no variants."""
    own = tmp_path / "own.py"
    own.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    if arg not in (None, 'tiny'):\n"
        "        raise ValueError(f'variant {arg!r}: use tiny')\n"
        "    return ml_collections.ConfigDict({'a': 1})\n"
    )
    with pytest.raises(ConfigError, match=r"own.py:huge: variant 'huge': use tiny"):
        load_config(f"{own}:huge")
    assert load_config(f"{own}:tiny").a == 1
    plain = tmp_path / "plain.py"
    plain.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'a': 1})\n")
    with pytest.raises(ConfigError, match=r"has no variants .*takes no argument"):
        load_config(f"{plain}:smoke")


EXPERIMENT_CONFIGS = sorted(
    os.path.join(d, "configs", f)
    for d in ("experiments/bam", "experiments/langevin", "experiments/complex_valued")
    for f in os.listdir(os.path.join(ROOT, d, "configs"))
    if f.endswith(".py")
)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS)
def test_experiment_configs_refuse_an_unknown_variant(path):
    """The experiments' configs accepted any variant name (``:big`` silently ran the full recipe)."""
    with pytest.raises(ConfigError, match=r"big"):
        load_config(os.path.join(ROOT, path) + ":big")
