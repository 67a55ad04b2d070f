"""jaxdp.rules: bad input is a clear error, never a silent weaker guarantee (property-based).

Every privacy-relevant argument is tried with values drawn by hypothesis at each
entry point that takes it (primitives, plan, accountants, sampler, config). The
error must name the argument and its value and say what to do instead; where a
value is legitimate (σ = 0: no noise, no privacy) the documented behaviour is checked.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdp
from jaxdp import accounting
from jaxdp.audit import audit_training_run
from jaxdp.config import ConfigError, apply_overrides, load_config
from jaxdp.sampling import PoissonSampler
from jaxdp.train import train, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")
FAST = settings(max_examples=25, deadline=None)  # deadline=None: a first call may compile
FIX_WORDS = ("e.g.", "pass ", "choose ", "use ", "set ")

nan, inf = math.nan, math.inf
bad_clip = st.one_of(st.floats(max_value=0.0), st.sampled_from([inf, nan]))  # <= 0, -inf, inf, nan
bad_sigma = st.one_of(st.floats(max_value=0.0, exclude_max=True), st.sampled_from([inf, nan]))  # < 0, inf, nan
bad_delta = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(nan))
bad_rate = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(nan))


def assert_clear(error, name, value):
    """The message names the argument with its value, and says what to do."""
    message = str(error.value)
    assert f"{name}={value!r}" in message, message
    assert any(word in message for word in FIX_WORDS), message


def loss(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


def plan_kwargs(**overrides):
    kwargs = dict(dataset_size=1000, batch_size=10, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=100)
    return {**kwargs, **overrides}


def digits_config(section, key, value):
    config = load_config(DIGITS)
    (config[section] if section else config)[key] = value
    return config


@FAST
@given(c=bad_clip)
def test_clip_norm_not_finite_positive_is_refused_everywhere(c):
    with pytest.raises(ValueError) as e:
        jaxdp.clipped_grad(loss, l2_clip_norm=c)
    assert_clear(e, "l2_clip_norm", c)
    with pytest.raises(ValueError) as e:
        jaxdp.privatize(l2_clip_norm=c, noise_multiplier=1.0, expected_batch_size=8, key=0)
    assert_clear(e, "l2_clip_norm", c)
    with pytest.raises(ValueError) as e:
        jaxdp.PrivacyPlan(**plan_kwargs(l2_clip_norm=c))
    assert_clear(e, "l2_clip_norm", c)
    with pytest.raises(ValueError) as e:
        jaxdp.gradient_norm_stats(np.ones(3), np.ones(3), l2_clip_norm=c)
    assert_clear(e, "l2_clip_norm", c)
    with pytest.raises(ConfigError) as e:
        validate_config(digits_config("privacy", "l2_clip_norm", c), 1437)
    assert_clear(e, "privacy.l2_clip_norm", c)


@FAST
@given(sigma=bad_sigma)
def test_negative_or_non_finite_noise_multiplier_is_refused(sigma):
    with pytest.raises(ValueError) as e:
        jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=sigma, expected_batch_size=8, key=0)
    assert_clear(e, "noise_multiplier", sigma)
    with pytest.raises(ValueError) as e:
        jaxdp.PrivacyPlan(**plan_kwargs(noise_multiplier=sigma))
    assert_clear(e, "noise_multiplier", sigma)
    with pytest.raises(ValueError) as e:
        accounting.make_accountant("rdp", sampling_rate=0.01, noise_multiplier=sigma)
    assert_clear(e, "noise_multiplier", sigma)
    with pytest.raises(ConfigError) as e:
        validate_config(digits_config("privacy", "noise_multiplier", sigma), 1437)
    assert "privacy.noise_multiplier=" in str(e.value) and "finite number >= 0" in str(e.value)


def test_zero_noise_is_the_documented_non_private_mode():
    """σ = 0 is legitimate for tests and audits: no noise is added and no ε is claimed."""
    tx = jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=4, key=0)
    g = {"w": jnp.arange(3.0)}
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(out["w"], g["w"] / 4)  # exactly the mean, no noise
    plan = jaxdp.PrivacyPlan(**plan_kwargs(noise_multiplier=0.0))
    assert plan.epsilon(1e-5) == math.inf  # never a finite ε without noise
    with pytest.raises(ValueError, match="noise_multiplier=0: a run without noise has no privacy"):
        plan.make_accountant()
    with pytest.raises(ValueError) as e:
        accounting.make_accountant("rdp", sampling_rate=0.01, noise_multiplier=0.0)
    assert_clear(e, "noise_multiplier", 0.0)


@FAST
@given(delta=bad_delta)
def test_delta_outside_zero_one_is_refused(delta):
    acc = accounting.make_accountant("rdp", sampling_rate=0.01, noise_multiplier=1.0).compose(10)
    for fn in (acc.epsilon, jaxdp.PrivacyPlan(**plan_kwargs()).epsilon):
        with pytest.raises(ValueError) as e:
            fn(delta)
        assert_clear(e, "delta", delta)
    with pytest.raises(ValueError) as e:
        accounting.calibrate_noise_multiplier(3.0, delta, 0.01, 100)
    assert_clear(e, "delta", delta)
    with pytest.raises(ConfigError) as e:
        validate_config(digits_config("privacy", "delta", delta), 1437)
    assert f"privacy.delta={delta!r}" in str(e.value)


@FAST
@given(n=st.integers(2, 10**6), data=st.data())
def test_delta_above_one_over_n_is_refused_where_n_is_known(n, data):
    delta = data.draw(st.floats(min_value=1.0 / n, max_value=1.0, exclude_min=True, exclude_max=True))
    plan = jaxdp.PrivacyPlan(**plan_kwargs(dataset_size=n, batch_size=1))
    with pytest.raises(ValueError) as e:
        plan.epsilon(delta)
    assert_clear(e, "delta", delta)
    assert f"1/N = 1/{n}" in str(e.value)
    plan_message = str(e.value)
    config = digits_config("privacy", "delta", delta)
    config.batch_size = 1
    with pytest.raises(ConfigError) as e:
        validate_config(config, n)
    assert_clear(e, "privacy.delta", delta)
    assert str(e.value) == f"privacy.{plan_message}"  # one rule, one message (accounting.check_delta)
    with pytest.raises(ValueError) as e:  # the audit refuses it before training anything
        audit_training_run(
            plan, None, None, np.zeros((n - 2, 1)), np.zeros(n - 2), optimizer=None, num_canaries=2, delta=delta
        )
    assert str(e.value) == plan_message
    plan.epsilon(0.5 / n)  # below 1/N is fine


@FAST
@given(q=st.floats(1e-4, 0.5), data=st.data())
def test_delta_above_the_sampling_rate_is_refused_where_n_is_unknown(q, data):
    """Without N, δ > q is refused: q*N >= 1 (an expected batch of at least one) makes it exceed 1/N for any N."""
    from jaxdp.cli import main

    delta = data.draw(st.floats(min_value=q, max_value=1.0, exclude_min=True, exclude_max=True))
    acc = accounting.make_accountant("rdp", sampling_rate=q, noise_multiplier=1.0).compose(10)
    entry_points = [
        lambda: acc.epsilon(delta),
        lambda: accounting.attack_risk(acc, delta=delta),
        lambda: accounting.calibrate_noise_multiplier(3.0, delta, q, 100),
        lambda: accounting.max_steps(3.0, delta, q, 1.0),
    ]
    for fn in entry_points:
        with pytest.raises(ValueError) as e:
            fn()
        assert_clear(e, "delta", delta)
        assert "larger than the sampling rate" in str(e.value)
    args = ["account", "--sampling-rate", repr(q), "--noise-multiplier", "1", "--steps", "10", "--delta", repr(delta)]
    assert main(args) == 2
    assert acc.epsilon(q) > 0  # δ = q is allowed (N = 1/q, batches of one)


@FAST
@given(q=bad_rate)
def test_sampling_rate_outside_zero_one_is_refused(q):
    with pytest.raises(ValueError) as e:
        accounting.make_accountant("pld", sampling_rate=q, noise_multiplier=1.0)
    assert_clear(e, "sampling_rate", q)
    with pytest.raises(ValueError) as e:
        PoissonSampler(dataset_size=100, sampling_rate=q)
    assert_clear(e, "sampling_rate", q)
    with pytest.raises(ValueError) as e:
        accounting.calibrate_noise_multiplier(3.0, 1e-5, q, 100)
    assert_clear(e, "sampling_rate", q)
    with pytest.raises(ValueError) as e:
        accounting.max_steps(3.0, 1e-5, q, 1.0)
    assert_clear(e, "sampling_rate", q)


@FAST
@given(n=st.integers(1, 10**5), extra=st.integers(1, 10**5))
def test_batch_size_above_dataset_size_is_refused(n, extra):
    b = n + extra
    with pytest.raises(ValueError) as e:
        jaxdp.PrivacyPlan(**plan_kwargs(dataset_size=n, batch_size=b))
    assert f"batch_size={b} is larger than the dataset ({n} examples); choose batch_size <= {n}" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(digits_config(None, "batch_size", b), n)
    assert f"batch_size={b} is larger than the training set ({n} examples); choose batch_size <= {n}" in str(e.value)


@FAST
@given(b=st.integers(-5, 0))
def test_non_positive_batch_size_is_refused(b):
    with pytest.raises(ValueError) as e:
        jaxdp.PrivacyPlan(**plan_kwargs(batch_size=b))
    assert_clear(e, "batch_size", b)
    with pytest.raises(ValueError) as e:
        jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=b, key=0)
    assert f"expected_batch_size={b!r} must be a positive int" in str(e.value)


class BatchCentred(nnx.Module):
    """A cross-example layer: subtracts the batch mean of its input (mixes examples)."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense(x - x.mean(axis=0, keepdims=True))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), j=st.integers(1, 5))
def test_cross_example_layer_cannot_mix_examples_in_clipped_grad(seed, j):
    """Documented behaviour: each example is its own batch of one, so changing example j
    changes the clipped sum by example j's own contribution only."""
    graphdef, params, rest = nnx.split(BatchCentred(nnx.Rngs(0)), nnx.Param, ...)

    def xent(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x) + x[:, :3]  # a term that survives centring on one example
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    fn = jaxdp.clipped_grad(xent, l2_clip_norm=0.5)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 4)).astype(np.float32) * 3
    y = rng.integers(0, 3, 6).astype(np.int32)
    x2 = x.copy()
    x2[j] = rng.normal(size=4) * 10  # replace one example
    g, _ = fn(params, x, y)
    g2, _ = fn(params, x2, y)
    mask = np.eye(6, dtype=np.float32)[j]
    gj, _ = fn(params, x, y, example_mask=mask)
    gj2, _ = fn(params, x2, y, example_mask=mask)
    for a, b, c, d in zip(*(jax.tree_util.tree_leaves(t) for t in (g, g2, gj, gj2)), strict=True):
        np.testing.assert_allclose(a - c, b - d, rtol=1e-5, atol=1e-6)  # the other examples are untouched


def test_batchnorm_anywhere_is_refused_by_name():
    class Deep(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Sequential(nnx.BatchNorm(4, rngs=rngs))])

    with pytest.raises(ValueError, match=r"'blocks/1/layers/0' is BatchNorm.*nnx.GroupNorm.*nnx.LayerNorm"):
        jaxdp.models.check_dp_compatible(Deep(nnx.Rngs(0)))


@FAST
@given(dtype=st.sampled_from(["bfloat16", "float16"]), seed=st.integers(0, 2**16), sigma=st.floats(0.01, 100.0))
def test_low_precision_leaves_get_float32_noise_rounded_once(dtype, seed, sigma):
    """The noise is drawn in float32 and the noisy value rounded once (post-processing),
    never a coarse bfloat16/float16 draw."""
    x = jnp.asarray(np.random.default_rng(seed).normal(size=64), dtype)
    key = jax.random.key(seed)
    got = jaxdp.add_noise(key, {"w": x}, sigma)["w"]
    want = jaxdp.add_noise(key, {"w": x.astype(jnp.float32)}, sigma)["w"].astype(dtype)
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@FAST
@given(dtype=st.sampled_from(["int32", "int8", "uint8", "bool"]))
def test_integer_leaves_cannot_carry_noise(dtype):
    with pytest.raises(TypeError, match=rf"dtype {dtype}; only float and complex leaves.*Cast integer leaves"):
        jaxdp.add_noise(jax.random.key(0), {"w": jnp.zeros(3, dtype)}, 1.0)


@FAST
@given(size=st.integers(1, 8), wrong=st.integers(1, 8))
def test_mask_of_the_wrong_length_is_refused(size, wrong):
    if size == wrong:
        wrong += 1
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0)
    with pytest.raises(ValueError, match=rf"example_mask has shape \({wrong},\), expected \({size},\)"):
        fn(jnp.zeros(3), jnp.ones((size, 3)), jnp.ones(size), example_mask=jnp.ones(wrong))


def test_complex_loss_in_the_real_only_gradient_path_is_refused():
    """Complex data fed to a real model gives a complex loss: refused with the fix, not
    JAX's advice to pass holomorphic=True."""
    model = jaxdp.models.MLP(4, 3, hidden=(8,), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def mse(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y[:, None]) ** 2)

    x = jnp.ones((5, 4), jnp.complex64) * (1 + 2j)
    with pytest.raises(TypeError, match=r"complex loss \(dtype complex64\).*ComplexCNN.*real and imaginary parts"):
        jaxdp.clipped_grad(mse, l2_clip_norm=1.0)(params, x, jnp.ones(5))


@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from([(3,), (2, 5), (1, 4, 2)]), sigma=st.floats(0.5, 4.0))
def test_complex_leaves_get_the_full_variance_on_both_parts(shape, sigma):
    """Not jax.random.normal's complex convention (variance 1/2 per part): each part is
    exactly a float32 N(0, σ²) draw, so the mechanism is the real one in 2n dimensions."""
    key = jax.random.key(1)
    z = jaxdp.add_noise(key, {"z": jnp.zeros(shape, jnp.complex64)}, sigma)["z"]
    kr, ki = jax.random.split(jax.random.split(key, 1)[0])
    np.testing.assert_allclose(z.real, sigma * jax.random.normal(kr, shape), rtol=1e-6)
    np.testing.assert_allclose(z.imag, sigma * jax.random.normal(ki, shape), rtol=1e-6)


def test_inconsistent_multi_host_settings_are_a_config_error(tmp_path):
    """Caught before any backend starts, as the one-line ConfigError the CLI prints (not a traceback)."""
    from jaxdp.config import apply_overrides

    config = apply_overrides(
        load_config(DIGITS),
        [
            "distributed.coordinator_address=localhost:1",
            "distributed.num_processes=2",
            "distributed.process_id=5",
            f"workdir={tmp_path}",
        ],
    )
    with pytest.raises(ConfigError) as e:
        train(config, progress=False)
    assert_clear(e, "distributed.process_id", 5)


# -- the rules themselves: one function, one message, named by the caller --------------------------------------


@pytest.mark.parametrize(
    "check, bad, message",
    [
        (jaxdp.rules.check_clip_norm, 0.0, "is not a finite positive number"),
        (jaxdp.rules.check_noise_multiplier, -1.0, "must be a finite number >= 0"),
        (jaxdp.rules.check_target_epsilon, math.inf, "the target must be None (no target) or a finite number > 0"),
        (jaxdp.rules.check_sampling_rate, 1.5, "must lie in (0, 1]"),
        (jaxdp.rules.check_bands, 0, "must be a positive int"),
        (jaxdp.rules.check_sampling, "uniform", "is not supported by the privacy plan"),
    ],
)
def test_each_rule_names_the_key_its_caller_knows(check, bad, message):
    with pytest.raises(ValueError) as plain:
        check(bad)
    with pytest.raises(ValueError) as named:
        check(bad, "privacy.thing")
    assert message in str(plain.value) and message in str(named.value)
    assert str(named.value).startswith(f"privacy.thing={bad!r}")


@pytest.mark.parametrize("value", ["1.0", True, None, [1.0], math.nan])
def test_a_clip_norm_that_is_not_a_real_number_is_refused(value):
    with pytest.raises(ValueError, match="l2_clip_norm="):
        jaxdp.rules.check_clip_norm(value)


def test_the_same_rule_gives_the_same_message_at_every_entry_point(tmp_path):
    """The clipping bound is refused by clipped_grad, privatize, the plan and the config with one wording."""

    def message(fn):
        with pytest.raises(ValueError) as e:
            fn()
        return str(e.value)

    plan_args = dict(dataset_size=100, batch_size=10, noise_multiplier=1.0, num_steps=1)
    texts = [
        message(lambda: jaxdp.clipped_grad(lambda p, x: x.sum(), l2_clip_norm=-2.0)),
        message(lambda: jaxdp.privatize(l2_clip_norm=-2.0, noise_multiplier=1.0, expected_batch_size=4, key=1)),
        message(lambda: jaxdp.PrivacyPlan(l2_clip_norm=-2.0, **plan_args)),
        message(lambda: jaxdp.gradient_norm_stats(jnp.ones(2), jnp.ones(2), l2_clip_norm=-2.0)),
    ]
    assert len(set(texts)) == 1, texts
    config = load_config(os.path.join(ROOT, "configs", "digits.py:smoke"))
    with pytest.raises(ConfigError) as e:
        validate_config(apply_overrides(config, ["privacy.l2_clip_norm=-2.0"]))
    assert str(e.value) == texts[0].replace("l2_clip_norm=", "privacy.l2_clip_norm=")


def test_shuffle_with_noise_and_bands_without_cyclic_poisson_are_one_rule_each():
    for fn in (
        lambda: jaxdp.rules.check_shuffle_noise("shuffle", 1.0),
        lambda: jaxdp.PrivacyPlan(
            dataset_size=100, batch_size=10, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1, sampling="shuffle"
        ),
    ):
        with pytest.raises(ValueError, match="sampling='shuffle' with noise_multiplier=1.0: shuffled fixed-size"):
            fn()
    jaxdp.rules.check_shuffle_noise("shuffle", 0.0)  # non-private shuffle is allowed
    with pytest.raises(ValueError, match="bands=3 with sampling='poisson'"):
        jaxdp.rules.check_bands_sampling(3, "poisson")
    with pytest.raises(ValueError, match="bands=3 with sampling='poisson'"):
        jaxdp.PrivacyPlan(dataset_size=100, batch_size=10, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=1, bands=3)
