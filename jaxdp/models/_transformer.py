"""A small transformer classifier over token sequences (no cross-example mixing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["TransformerClassifier"]


class _SelfAttention(nnx.Module):
    """Multi-head softmax self-attention with explicit q/k/v/out projections.

    Written out (rather than ``nnx.MultiHeadAttention``) so every operation is
    visible: attention mixes *tokens of one example*, never examples of a batch.
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads} (e.g. dim=64, heads=4).")
        self.heads = heads
        self.q = nnx.Linear(dim, dim, rngs=rngs)
        self.k = nnx.Linear(dim, dim, rngs=rngs)
        self.v = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.heads

        def split(y):  # (B, T, D) -> (B, H, T, D/H)
            return y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k) / jnp.sqrt(jnp.asarray(d // h, x.dtype))
        weights = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("bhts,bhsd->bhtd", weights, v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.out(y)


class _Block(nnx.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = _SelfAttention(dim, heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class TransformerClassifier(nnx.Module):
    """Token + learned position embeddings, ``depth`` pre-LN blocks, mean-pool, linear head.

    Every layer acts on one example's tokens (LayerNorm normalises each token's
    features; attention mixes tokens of the same sequence), so per-example
    gradients are exact and it passes :func:`jaxdp.models.check_dp_compatible`.
    It is the benchmark's model where per-example gradients cost the most memory
    relative to the forward pass (many small dense layers, activations per token).

    Args:
      vocab_size: number of distinct token ids; inputs must lie in ``[0, vocab_size)``.
      num_classes: number of output logits.
      max_len: sequence length T the position table covers (inputs are ``(B, T')``, T' <= T).
      dim: model width.
      heads: attention heads (must divide ``dim``).
      depth: number of blocks.
      mlp_dim: hidden width of each block's MLP.
      rngs: ``nnx.Rngs`` for initialisation (keyword-only).

    Example:
      >>> model = TransformerClassifier(100, 3, max_len=16, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 3)
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        max_len: int,
        dim: int = 64,
        heads: int = 4,
        depth: int = 2,
        mlp_dim: int = 128,
        rngs: nnx.Rngs,
    ):
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int.")
        self.max_len = max_len
        self.tokens = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.positions = nnx.Embed(max_len, dim, rngs=rngs)
        self.blocks = nnx.List([_Block(dim, heads, mlp_dim, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(
                f"tokens of shape {tokens.shape} do not fit: expected int (batch, length) with length <= "
                f"max_len={self.max_len}."
            )
        t = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(jnp.arange(t))[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))
