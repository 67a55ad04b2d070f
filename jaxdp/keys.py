"""Secret noise keys that carry all of their entropy.

Every noise key jaxdp builds goes through :func:`key_from_secret`. A secret is a
Python int of up to :data:`SECRET_BITS` (128) bits; :func:`new_secret` draws one
from the OS (``secrets.randbits``). The key is a ``threefry2x32`` key whose 64-bit
state is the secret's two low 32-bit words, with the two high words folded in
(``jax.random.fold_in``), so every bit of the secret changes the key and an
attacker who sees released noisy updates must search the key's whole 64-bit state
(threefry's state size; 2**64 keys, not the 2**32 that ``jax.random.key(int)``
keeps with x64 off).

Why not ``jax.random.key(seed)``: with ``jax_enable_x64`` off (JAX's default) it
keeps only the low 32 bits of ``seed``, so ``key(s)`` and ``key(s % 2**32)`` give
the same noise and 2**32 guesses recover it. Multi-host runs must not send the
secret through a JAX int64 either (it is int32 there too):
:func:`broadcast_secret` sends 32-bit words.

A fixed, known secret (``key=0`` in a test, ``privacy.noise_seed``) voids the
guarantee: anyone who knows it recomputes and subtracts the noise.
"""

from __future__ import annotations

import numbers
import secrets as _os_secrets

import jax
import numpy as np

SECRET_BITS = 128
_WORDS = SECRET_BITS // 32
_IMPL = "threefry2x32"


def new_secret() -> int:
    """A fresh secret of :data:`SECRET_BITS` bits from the OS's entropy. Never print or log it."""
    return _os_secrets.randbits(SECRET_BITS)


def check_secret(secret, name: str = "key") -> int:
    """``secret`` as a Python int in [0, 2**128), or a ValueError naming ``name``, the value and the fix."""
    if isinstance(secret, bool) or not isinstance(secret, numbers.Integral):
        raise ValueError(
            f"{name}={secret!r} must be an int secret (0 <= {name} < 2**{SECRET_BITS}) or a JAX PRNG key; "
            "draw one with jaxdp.keys.new_secret()."
        )
    value = int(secret)
    if not 0 <= value < 2**SECRET_BITS:
        raise ValueError(
            f"{name}={value} is outside [0, 2**{SECRET_BITS}): a secret has at most {SECRET_BITS} bits and a "
            "larger or negative int would not be used whole; draw one with jaxdp.keys.new_secret()."
        )
    return value


def secret_words(secret: int) -> np.ndarray:
    """The secret as ``(4,)`` uint32 words, least significant first."""
    value = check_secret(secret, "secret")
    return np.asarray([(value >> (32 * i)) & 0xFFFFFFFF for i in range(_WORDS)], dtype=np.uint32)


def secret_from_words(words) -> int:
    """Inverse of :func:`secret_words`."""
    words = np.asarray(words, dtype=np.uint32).reshape(-1)
    if words.shape != (_WORDS,):
        raise ValueError(f"expected {_WORDS} uint32 words, got shape {words.shape}.")
    return sum(int(w) << (32 * i) for i, w in enumerate(words))


def key_from_secret(secret: int) -> jax.Array:
    """The ``threefry2x32`` noise key of an int secret; every bit of the secret is used.

    The two low words are the key's state, the two high words are folded in, so
    secrets that differ in any bit (``s`` vs ``s % 2**32``, ``s + 2**32``,
    ``s + 2**64``) give different keys.

    Example:
      >>> import jaxdp
      >>> key = jaxdp.key_from_secret(jaxdp.new_secret())  # secret: real runs
    """
    w = secret_words(secret)
    key = jax.random.wrap_key_data(np.asarray(w[:2]), impl=_IMPL)
    for word in w[2:]:
        key = jax.random.fold_in(key, np.uint32(word))
    return key


def as_key(key, name: str = "key") -> jax.Array:
    """A PRNG key array passes through; an int is a secret turned into a key by :func:`key_from_secret`."""
    if isinstance(key, jax.Array) and key.shape == () and _is_key(key):
        return key
    if isinstance(key, jax.Array | np.ndarray) and not _is_key(key):
        if key.shape == (2,) and key.dtype == np.uint32:  # a raw (legacy PRNGKey) key: its 64 bits are its state
            return jax.random.wrap_key_data(key, impl=_IMPL)
        if key.shape == ():
            return key_from_secret(check_secret(key.item(), name))
        raise ValueError(
            f"{name} has shape {key.shape} and dtype {key.dtype}: pass a PRNG key (jaxdp.key_from_secret(secret)) "
            "or an int secret."
        )
    if isinstance(key, jax.Array):
        raise ValueError(f"{name} is a batch of {key.shape} keys; pass one key.")
    return key_from_secret(check_secret(key, name))


def broadcast_secret(secret: int) -> int:
    """Process 0's secret on every process of a multi-host run (identity with one process).

    Sent as uint32 words: a JAX int64 is int32 with x64 off and would keep 32 bits.
    """
    words = secret_words(secret)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        words = np.asarray(multihost_utils.broadcast_one_to_all(words))
    return secret_from_words(words)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
