"""Noise keys carry the whole secret: never the 32 bits that ``jax.random.key(int)`` keeps with x64 off."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp import keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 0x9E3779B97F4A7C15_F39CC0605CEDC834  # a 128-bit secret (test only: a known secret voids privacy)


def _data(key):
    return tuple(np.asarray(jax.random.key_data(key)).tolist())


def _noise(key, n=64):
    """The first noisy update of privatize(key=...) on a zero gradient sum."""
    tx = jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1, key=key)
    zeros = {"w": jnp.zeros(n)}
    update, _ = tx.update(zeros, tx.init(zeros))
    return np.asarray(update["w"])


@pytest.mark.parametrize("seed", [S, 2**40 + 12345, 2**63 + 1])
def test_noise_from_seed_differs_from_its_low_32_bits_and_from_seed_plus_2_32(seed):
    """``jax.random.key(seed)`` gives S, S mod 2**32 and S + 2**32 the same key: privatize must not."""
    base = _noise(seed)
    for other in {seed % 2**32, seed + 2**32, (seed + 2**64) % 2**128, seed ^ (1 << 127)}:
        assert not np.allclose(base, _noise(other)), hex(other)
    np.testing.assert_array_equal(base, _noise(seed))  # deterministic given the secret
    np.testing.assert_array_equal(base, _noise(keys.key_from_secret(seed)))  # int = key_from_secret(int)


def test_every_bit_of_the_secret_changes_the_key():
    """128 one-bit flips of a random secret give 128 distinct keys, none equal to the original."""
    secret = keys.new_secret()
    seen = {_data(keys.key_from_secret(secret))}
    for bit in range(keys.SECRET_BITS):
        seen.add(_data(keys.key_from_secret(secret ^ (1 << bit))))
    assert len(seen) == keys.SECRET_BITS + 1


def test_new_secrets_have_128_bits_of_entropy():
    """The top bit is set about half the time, all words vary, no two draws repeat (from OS entropy)."""
    draws = [keys.new_secret() for _ in range(400)]
    assert len(set(draws)) == len(draws)
    assert all(0 <= d < 2**128 for d in draws)
    top = sum(d >> 127 for d in draws)
    assert 140 < top < 260  # Binomial(400, 1/2): 5 sigma = 50
    words = np.stack([keys.secret_words(d) for d in draws])
    assert all(len(set(words[:, i].tolist())) == len(draws) for i in range(4))
    assert {keys.secret_from_words(w) for w in words} == set(draws)


def test_train_draws_128_bit_secrets_and_builds_its_noise_key_from_all_of_them():
    from jaxdp.train import privacy_seed

    draws = [privacy_seed(None) for _ in range(64)]
    assert max(d.bit_length() for d in draws) > 100
    assert (
        len(
            {_data(keys.key_from_secret(d % 2**32)) for d in draws[:8]}
            | {_data(keys.key_from_secret(d)) for d in draws[:8]}
        )
        == 16
    )


def test_train_setup_noise_key_uses_the_whole_seed(tmp_path):
    """The key in a run's optimizer state (what jaxdp train adds noise with) differs for S and S mod 2**32."""
    from jaxdp.config import apply_overrides, load_config
    from jaxdp.train import setup_run

    config = apply_overrides(load_config(os.path.join(ROOT, "configs/digits.py:smoke")), [f"workdir={tmp_path}"])
    key_leaves = []
    for seed in (S, S % 2**32):
        run = setup_run(config, secret_seed=seed)
        leaves = [
            x
            for x in jax.tree_util.tree_leaves(run.state.opt_state)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        ]
        assert len(leaves) == 1
        key_leaves.append(_data(leaves[0]))
    assert key_leaves[0] != key_leaves[1]
    assert key_leaves[0] == _data(keys.key_from_secret(S))


@pytest.mark.parametrize("bad", [-1, 2**128, 1.5, "7", True, None])
def test_an_int_key_that_cannot_be_used_whole_is_refused(bad):
    with pytest.raises(ValueError, match=r"new_secret\(\)"):
        jaxdp.privatize(l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1, key=bad)


def test_plan_privatizer_and_banded_use_the_whole_secret():
    plan = jaxdp.PrivacyPlan(dataset_size=100, batch_size=10, l2_clip_norm=1.0, noise_multiplier=1.0, num_steps=5)
    zeros = {"w": jnp.zeros(32)}
    outs = []
    for seed in (S, S % 2**32):
        tx = optax.chain(plan.privatizer(seed), optax.sgd(1.0))
        outs.append(np.asarray(tx.update(zeros, tx.init(zeros))[0]["w"]))
        banded = jaxdp.privatize_banded(
            l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1, key=seed, coefficients=[1.0]
        )
        np.testing.assert_array_equal(banded.update(zeros, banded.init(zeros))[0]["w"], _noise(seed, 32))
    assert not np.allclose(outs[0], outs[1])


def test_multi_host_key_equals_the_one_host_key():
    """Two processes on loopback: both end with process 0's 128-bit secret (a JAX int64 broadcast keeps 32
    bits with x64 off) and the key one process builds from it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "multihost_key_check.py"), str(port), str(i), str(secret)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, secret in enumerate([S, 12345])
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert all(g["processes"] == 2 for g in got)
    assert [int(g["secret"]) for g in got] == [S, S]
    want = list(_data(keys.key_from_secret(S)))
    assert got[0]["key_data"] == got[1]["key_data"] == want


def test_a_128_bit_secret_survives_the_checkpoint_meta(tmp_path):
    """A resumed run rebuilds its key from the saved secret: all 128 bits must come back."""
    from jaxdp.train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, {"w": jnp.ones(2)}, {"secret_seed": S})
    assert ckpt.meta(1)["secret_seed"] == S
    ckpt.close()


def test_checkpointed_keys_come_back_with_their_own_implementation(tmp_path):
    """A threefry noise key restores as threefry, bit for bit, whatever JAX's default implementation is."""
    from jaxdp.train.checkpoint import Checkpointer

    state = {"noise": keys.key_from_secret(S), "other": jax.random.key(0, impl="rbg")}
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, state, {})
    restored, _ = ckpt.restore(1, state)
    ckpt.close()
    for name in state:
        assert str(jax.random.key_impl(restored[name])) == str(jax.random.key_impl(state[name]))
        assert _data(restored[name]) == _data(state[name])
