"""Ghost clipping (clipping_impl="ghost" | "auto") against the vmap path and a per-example loop.

Privacy rests on two things tested here: the ghost norms and clipped sums equal the
materialised ones (every branch: Gram and direct norms for dense and conv layers,
the embedding formula, per-parameter gradients for biases and scales), and any
parameter use the analysis cannot bound is refused, never approximated.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cnn_problem, tree_allclose
from flax import nnx
from test_clipping import reference_clipped_sum

import jaxdp
from jaxdp import GhostUnsupported
from jaxdp.models import MLP
from jaxdp.models._recipes import DPMnistCNN, WideResNet
from jaxdp.train import classification_loss


class Block(nnx.Module):
    """A pre-LayerNorm transformer block classifier: embedding, attention, MLP, head."""

    def __init__(self, vocab, seq, dim, classes, *, rngs, heads=2):
        self.heads = heads
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, dim)))
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.q = nnx.Linear(dim, dim, rngs=rngs)
        self.k = nnx.Linear(dim, dim, rngs=rngs)
        self.v = nnx.Linear(dim, dim, rngs=rngs)
        self.o = nnx.Linear(dim, dim, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens) + self.pos[...]
        b, t, d = h.shape
        a = self.ln1(h)

        def split(z):
            return z.reshape(b, t, self.heads, d // self.heads)

        q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads), axis=-1)
        h = h + self.o(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))
        h = h + self.down(jax.nn.gelu(self.up(self.ln2(h))))
        return self.head(h.mean(axis=1))


def _nnx_problem(model, x, classes, seed=0):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    y = jnp.asarray(np.random.default_rng(seed).integers(0, classes, x.shape[0]), jnp.int32)
    return classification_loss(graphdef, rest), params, jnp.asarray(x), y


def problem(name):
    rng = np.random.default_rng(1)
    if name == "mlp":
        return _nnx_problem(MLP(12, 3, hidden=(16, 8), rngs=nnx.Rngs(0)), rng.normal(size=(10, 12)), 3)
    if name in ("cnn-dp", "cnn-nnx"):
        return make_cnn_problem(name.removeprefix("cnn-"))
    if name == "dp_mnist_cnn":  # strided 'SAME' and 'VALID' convolutions
        return _nnx_problem(DPMnistCNN((28, 28, 1), 10, rngs=nnx.Rngs(0)), rng.normal(size=(6, 28, 28, 1)), 10)
    if name == "transformer":
        return _nnx_problem(Block(50, 6, 8, 4, rngs=nnx.Rngs(0)), rng.integers(0, 50, (7, 6)), 4)
    raise KeyError(name)


PROBLEMS = ["mlp", "cnn-dp", "cnn-nnx", "dp_mnist_cnn", "transformer"]


def _run(loss_fn, params, x, y, mask, impl, **kw):
    fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=kw.pop("clip", 0.5), return_norms=True, clipping_impl=impl, **kw)
    return jax.jit(lambda p, x, y, m: fn(p, x, y, example_mask=m))(params, x, y, mask)


def _assert_ghost_equals_vmap(loss_fn, params, x, y, mask, clip=0.2):
    """Same clipped sum and same norms of the unmasked examples, whole-gradient and per-layer clipping."""
    keep = np.asarray(mask) > 0
    for per_layer in (False, True):
        g_vmap, a_vmap = _run(loss_fn, params, x, y, mask, "vmap", per_layer=per_layer, clip=clip)
        g_ghost, a_ghost = _run(loss_fn, params, x, y, mask, "ghost", per_layer=per_layer, clip=clip)
        tree_allclose(g_ghost, g_vmap, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a_ghost.norms)[keep], np.asarray(a_vmap.norms)[keep], rtol=1e-4)


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_ghost_equals_vmap_with_masks(name, per_layer, microbatch_size):
    loss_fn, params, x, y = problem(name)
    n = x.shape[0]
    mask = jnp.ones((n,)).at[1].set(0.0).at[n - 1].set(0.0)
    x = x.at[1].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x  # masked: must contribute zero
    kw = dict(per_layer=per_layer, microbatch_size=microbatch_size)
    g_vmap, a_vmap = _run(loss_fn, params, x, y, mask, "vmap", **kw)
    g_ghost, a_ghost = _run(loss_fn, params, x, y, mask, "ghost", **kw)
    tree_allclose(g_ghost, g_vmap, rtol=1e-4, atol=1e-5)
    keep = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(a_ghost.norms)[keep], np.asarray(a_vmap.norms)[keep], rtol=1e-4, atol=1e-6)
    assert int(a_ghost.num_clipped) == int(a_vmap.num_clipped) > 0  # the bound binds on some examples
    np.testing.assert_allclose(a_ghost.loss[keep], a_vmap.loss[keep], rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(g_ghost))


@pytest.mark.parametrize("name", ["mlp", "cnn-nnx"])
def test_ghost_equals_the_per_example_loop(name):
    loss_fn, params, x, y = problem(name)
    mask = np.ones(x.shape[0])
    mask[2] = 0
    want, norms = reference_clipped_sum(loss_fn, params, x, y, 0.5, mask=mask)
    got, aux = _run(loss_fn, params, x, y, jnp.asarray(mask), "ghost")
    tree_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux.norms), norms, rtol=1e-4)


class Shapes(nnx.Module):
    """Layers sized so that each norm formula is taken: dense with T = 1 (Gram) and T = 9 with
    small widths (direct), conv with many channels on a 2x2 map (Gram) and few channels on
    a 6x6 map (direct), embedding with T^2 < V (pairwise) and T^2 >= V (per-row gradient)."""

    def __init__(self, rngs):
        self.emb_big = nnx.Embed(1000, 4, rngs=rngs)  # T = 9: 81 < 1000, pairwise formula
        self.emb_small = nnx.Embed(20, 4, rngs=rngs)  # 81 >= 20: per-example row gradient
        self.thin = nnx.Linear(8, 3, rngs=rngs)  # T = 9, 9 * 11 > 24: direct
        self.conv_small = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)  # 36 positions: direct
        self.conv_wide = nnx.Conv(4, 64, (3, 3), strides=(3, 3), padding="VALID", rngs=rngs)  # 4 positions: Gram
        self.wide = nnx.Linear(64 * 4 + 27, 40, rngs=rngs)  # T = 1: Gram
        self.head = nnx.Linear(40, 3, rngs=rngs)

    def __call__(self, x):
        tokens, image = x[..., :9].astype(jnp.int32), x[..., 9:].reshape(x.shape[0], 6, 6, 3)
        e = jnp.concatenate([self.emb_big(tokens), self.emb_small(tokens % 20)], axis=-1)
        t = jnp.tanh(self.thin(e)).reshape(x.shape[0], -1)
        c = jnp.tanh(self.conv_wide(jnp.tanh(self.conv_small(image)))).reshape(x.shape[0], -1)
        return self.head(jnp.tanh(self.wide(jnp.concatenate([t, c], axis=-1))))


def test_every_norm_formula_equals_vmap():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.integers(0, 1000, (8, 9)), rng.normal(size=(8, 108))], axis=1).astype(np.float32)
    loss_fn, params, x, y = _nnx_problem(Shapes(nnx.Rngs(0)), x, 3)
    _assert_ghost_equals_vmap(loss_fn, params, x, y, jnp.ones((8,)).at[0].set(0.0))


def test_each_clipped_contribution_is_within_the_bound():
    """One example at a time, on random models and inputs at several scales: ||clipped sum|| <= C."""
    for seed in range(6):
        loss_fn, params, x, y = _nnx_problem(
            Block(30, 5, 8, 3, rngs=nnx.Rngs(seed)), np.random.default_rng(seed).integers(0, 30, (4, 5)), 3, seed
        )
        params = jax.tree_util.tree_map(lambda p, s=1 + 3 * seed: p * s, params)  # large gradients too
        for i in range(4):
            mask = jnp.zeros((4,)).at[i].set(1.0)
            g, aux = _run(loss_fn, params, x, y, mask, "ghost", clip=0.3)
            total = float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(g))))
            assert total <= 0.3 * (1 + 1e-5), (seed, i, total, float(aux.norms[i]))


def test_unmasked_nonfinite_example_is_dropped_and_counted():
    loss_fn, params, x, y = problem("mlp")
    x = x.at[4].set(jnp.inf)
    mask = jnp.ones((x.shape[0],))
    g_vmap, a_vmap = _run(loss_fn, params, x, y, mask, "vmap")
    g_ghost, a_ghost = _run(loss_fn, params, x, y, mask, "ghost")
    assert int(a_ghost.num_nonfinite) == int(a_vmap.num_nonfinite) == 1
    tree_allclose(g_ghost, g_vmap, rtol=1e-4, atol=1e-6)


# -- what ghost clipping must refuse -----------------------------------------------------------


class Shared(nnx.Module):
    """The same dense layer applied twice (tied weights)."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.lin(jnp.tanh(self.lin(x))))


class Nonlinear(nnx.Module):
    """A parameter inside a nonlinearity: its gradient is not (input x output gradient)."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 2, rngs=rngs)
        self.gate = nnx.Param(jnp.ones((4,)))

    def __call__(self, x):
        return self.lin(x * jnp.tanh(self.gate[...]))


def _refused(model, x, match, classes=2):
    loss_fn, params, x, y = _nnx_problem(model, x, classes)
    with pytest.raises(GhostUnsupported, match=match):
        _run(loss_fn, params, x, y, jnp.ones((x.shape[0],)), "ghost")
    return loss_fn, params, x, y


def test_shared_weights_are_refused():
    _refused(Shared(nnx.Rngs(0)), np.ones((3, 4), np.float32), r"params\['lin'\]\['kernel'\].*used twice")


def test_parameter_in_a_nonlinearity_is_refused():
    _refused(Nonlinear(nnx.Rngs(0)), np.ones((3, 4), np.float32), r"params\['gate'\].*used by `tanh`")


def test_weight_standardised_convolution_is_refused():
    _refused(
        WideResNet((8, 8, 3), 10, depth=10, width=1, rngs=nnx.Rngs(0)),
        np.ones((2, 8, 8, 3), np.float32),
        r"params\[.*\]\['kernel'\]",
        classes=10,
    )


def test_parameter_in_the_loss_itself_is_refused():
    loss_fn, params, x, y = problem("mlp")

    def regularised(p, x, y):
        return loss_fn(p, x, y) + 1e-3 * sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(p))

    with pytest.raises(GhostUnsupported, match="used by `integer_pow`|used by `mul`|combined with"):
        _run(regularised, params, x, y, jnp.ones((x.shape[0],)), "ghost")


def test_low_precision_and_complex_are_refused():
    loss_fn, params, x, y = problem("mlp")

    def bf16(p, x, y):
        return loss_fn(jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), p), x.astype(jnp.bfloat16), y)

    with pytest.raises(GhostUnsupported, match="bfloat16"):
        _run(bf16, params, x, y, jnp.ones((x.shape[0],)), "ghost")

    def complex_loss(w, x):
        return jnp.mean(jnp.abs(x @ w) ** 2)

    w = jnp.ones((3, 2), jnp.complex64)
    fn = jaxdp.clipped_grad(complex_loss, l2_clip_norm=1.0, clipping_impl="ghost")
    with pytest.raises(GhostUnsupported, match="complex"):
        fn(w, jnp.ones((4, 3), jnp.complex64))


def test_auto_falls_back_to_vmap_saying_why_once(caplog):
    loss_fn, params, x, y = _nnx_problem(Shared(nnx.Rngs(0)), np.random.default_rng(0).normal(size=(5, 4)), 2)
    mask = jnp.ones((5,))
    fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.5, clipping_impl="auto")
    with caplog.at_level(logging.WARNING, logger="jaxdp"):
        g_auto, _ = fn(params, x, y, example_mask=mask)
        fn(params, x, y, example_mask=mask)
    said = [r for r in caplog.records if "clipping_impl='auto'" in r.getMessage()]
    assert len(said) == 1 and "used twice" in said[0].getMessage()
    g_vmap, _ = _run(loss_fn, params, x, y, mask, "vmap")
    tree_allclose(g_auto, g_vmap, rtol=1e-6, atol=1e-7)


def test_auto_takes_the_ghost_path_when_covered(monkeypatch):
    loss_fn, params, x, y = problem("mlp")
    calls = []
    original = jaxdp.ClippedGradFn._ghost_chunk
    monkeypatch.setattr(jaxdp.ClippedGradFn, "_ghost_chunk", lambda self, *a: calls.append(1) or original(self, *a))
    _run(loss_fn, params, x, y, jnp.ones((x.shape[0],)), "auto")
    assert calls


def test_bad_clipping_impl_and_example_grad_with_ghost_are_errors():
    loss_fn, *_ = problem("mlp")
    with pytest.raises(ValueError, match=r"clipping_impl='fast' is not one of \('vmap', 'ghost', 'auto'\)"):
        jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, clipping_impl="fast")
    with pytest.raises(ValueError, match="cannot clip a custom example_grad"):
        jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0, clipping_impl="ghost", example_grad=lambda vg, p: vg(p))


class Layouts(nnx.Module):
    """Less common uses: a weight on the left of the matmul, two contracting dims, NCHW and
    dilated convolutions, a depthwise convolution, a sliced and a scaled parameter."""

    def __init__(self, rngs):
        key = rngs.params
        self.w_left = nnx.Param(0.3 * jax.random.normal(key(), (5, 12)))  # (out, in) @ x^T
        self.w_two = nnx.Param(0.3 * jax.random.normal(key(), (3, 4, 6)))  # contracts two dims
        self.k_nchw = nnx.Param(0.3 * jax.random.normal(key(), (4, 3, 3, 3)))  # OIHW
        self.k_depth = nnx.Param(0.3 * jax.random.normal(key(), (3, 3, 1, 4)))  # HWIO, 4 groups
        self.pos = nnx.Param(0.3 * jax.random.normal(key(), (20, 4)))  # sliced to 12 rows
        self.scale = nnx.Param(jnp.ones((4,)))
        self.head = nnx.Linear(10 + 6 + 4 * 4 + 4 * 4 + 4, 3, rngs=rngs)

    def __call__(self, x):
        b = x.shape[0]
        flat = x[:, :12]
        xx = jnp.stack([flat, jnp.tanh(flat)], axis=-1)  # (b, 12, 2): two positions per example
        a = jax.lax.dot_general(self.w_left[...], xx, (((1,), (1,)), ((), ())))  # parameter on the left
        a = a.transpose(1, 0, 2).reshape(b, -1)
        two = jnp.einsum("bij,ijo->bo", x[:, :12].reshape(b, 3, 4), self.w_two[...])
        img = x[:, 12:].reshape(b, 3, 4, 4)  # NCHW
        c = jax.lax.conv_general_dilated(img, self.k_nchw[...], (1, 1), "SAME", rhs_dilation=(2, 2))
        d = jax.lax.conv_general_dilated(
            jnp.tanh(c).transpose(0, 2, 3, 1),
            self.k_depth[...],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=4,
        )
        tok = (flat.reshape(b, 12, 1) * self.pos[:12] * 0.5).sum(1) * -self.scale[...]
        feats = [a, two, jnp.tanh(c).mean(1).reshape(b, -1), d.mean(-1).reshape(b, -1), tok]
        return self.head(jnp.tanh(jnp.concatenate(feats, axis=-1)))


def test_less_common_layouts_equal_vmap():
    x = np.random.default_rng(5).normal(size=(6, 12 + 48)).astype(np.float32)
    loss_fn, params, x, y = _nnx_problem(Layouts(nnx.Rngs(0)), x, 3)
    _assert_ghost_equals_vmap(loss_fn, params, x, y, jnp.ones((6,)).at[3].set(0.0))


def test_ghost_coverage_says_why_without_computing():
    loss_fn, params, x, y = problem("transformer")
    assert jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y) is None
    loss_fn, params, x, y = _nnx_problem(Shared(nnx.Rngs(0)), np.ones((3, 4), np.float32), 2)
    assert "used twice" in jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y)
