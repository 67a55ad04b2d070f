"""Ghost clipping (clipping_impl="ghost" | "auto") against the vmap path and a per-example loop.

Privacy rests on two things tested here: the ghost norms and clipped sums equal the
materialised ones (every branch: Gram and direct norms for dense and conv layers,
the embedding formula, per-parameter gradients for biases and scales), and any
parameter use the analysis cannot bound is refused, never approximated.
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cnn_problem, tree_allclose, tree_equal
from flax import nnx
from test_clipping import reference_clipped_sum

import jaxdp
from jaxdp import GhostUnsupported
from jaxdp.clipping import ghost, vmap
from jaxdp.models import MLP, GroupNormCNN, weight_standardize
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


# Clipped sums agree to this relative tolerance: ghost's clip factor divides by a rigorous upper
# bound of the norm under float rounding (see jaxdp/clipping/ghost.py, site_norms), so an example that
# is clipped is scaled up to ~1e-3 more than on the vmap path. Norms themselves agree to 1e-4.
RTOL = 2e-3

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
        tree_allclose(g_ghost, g_vmap, rtol=RTOL, atol=1e-6)
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
    tree_allclose(g_ghost, g_vmap, rtol=RTOL, atol=1e-5)
    keep = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(a_ghost.norms)[keep], np.asarray(a_vmap.norms)[keep], rtol=1e-4, atol=1e-6)
    assert int(a_ghost.num_clipped) == int(a_vmap.num_clipped) > 0  # the bound binds on some examples
    np.testing.assert_allclose(a_ghost.loss[keep], a_vmap.loss[keep], rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(g_ghost))


def _assert_ghost_equals_the_loop(loss_fn, params, x, y, *, rtol, atol):
    """The clipped sum (one example masked) and the norms equal a loop over examples in numpy."""
    mask = np.ones(x.shape[0])
    mask[2] = 0
    want, norms = reference_clipped_sum(loss_fn, params, x, y, 0.5, mask=mask)
    got, aux = _run(loss_fn, params, x, y, jnp.asarray(mask), "ghost")
    tree_allclose(got, want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(aux.norms), norms, rtol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "cnn-nnx"])
def test_ghost_equals_the_per_example_loop(name):
    _assert_ghost_equals_the_loop(*problem(name), rtol=RTOL, atol=1e-5)


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
        fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.3, clipping_impl="ghost")
        for i, total in enumerate(_contributions(fn, params, x, y, n=4)):
            assert total <= 0.3 * (1 + 1e-5), (seed, i, total)


def test_unmasked_nonfinite_example_is_dropped_and_counted():
    loss_fn, params, x, y = problem("mlp")
    x = x.at[4].set(jnp.inf)
    mask = jnp.ones((x.shape[0],))
    g_vmap, a_vmap = _run(loss_fn, params, x, y, mask, "vmap")
    g_ghost, a_ghost = _run(loss_fn, params, x, y, mask, "ghost")
    assert int(a_ghost.num_nonfinite) == int(a_vmap.num_nonfinite) == 1
    tree_allclose(g_ghost, g_vmap, rtol=RTOL, atol=1e-6)


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


class InlineStandardised(nnx.Module):
    """The standardisation formula written inline (not jaxdp's weight_standardize): not verified, refused."""

    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

    def __call__(self, x):
        k = self.kernel[...]
        return x @ ((k - k.mean(0)) / jnp.sqrt(k.var(0) + 1e-5))


def test_an_inline_weight_standardisation_is_refused():
    _refused(InlineStandardised(nnx.Rngs(0)), np.ones((3, 4), np.float32), r"params\['kernel'\].*used by `reduce_sum`")


def test_parameter_in_the_loss_itself_is_refused():
    loss_fn, params, x, y = problem("mlp")

    def regularised(p, x, y):
        return loss_fn(p, x, y) + 1e-3 * sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(p))

    with pytest.raises(GhostUnsupported, match="used by `integer_pow`|used by `mul`|combined with"):
        _run(regularised, params, x, y, jnp.ones((x.shape[0],)), "ghost")


def test_eight_bit_floats_and_complex_are_refused():
    loss_fn, params, x, y = problem("mlp")

    with pytest.raises(GhostUnsupported, match="float8_e4m3fn"):
        _run(_in(jnp.float8_e4m3fn, loss_fn), params, x, y, jnp.ones((x.shape[0],)), "ghost")

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
    calls, vmap_calls = [], []
    original, original_vmap = ghost.chunk, vmap.chunk
    monkeypatch.setattr(ghost, "chunk", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setattr(vmap, "chunk", lambda *a, **kw: vmap_calls.append(1) or original_vmap(*a, **kw))
    _run(loss_fn, params, x, y, jnp.ones((x.shape[0],)), "auto")
    assert calls
    assert not vmap_calls


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


class DirectLayouts(nnx.Module):
    """Kernels whose per-example gradient X^T G is formed for its norm and summed as is (the
    direct path): each in a layout where putting that gradient back in the parameter's own
    layout could go wrong."""

    def __init__(self, rngs):
        key = rngs.params
        self.w_left = nnx.Param(0.3 * jax.random.normal(key(), (3, 4)))  # (out, in) @ x^T, 8 positions
        self.w_pairs = nnx.Param(0.3 * jax.random.normal(key(), (2, 3, 2)))  # contracts dims 1, 0 (swapped)
        self.w_mid = nnx.Param(0.3 * jax.random.normal(key(), (3, 2, 4)))  # free dim in the middle
        self.w_t = nnx.Param(0.3 * jax.random.normal(key(), (2, 4)))  # stored (out, in), used transposed
        self.k_flat = nnx.Param(0.3 * jax.random.normal(key(), (5 * 5, 3)))  # 5x5x1x3 HWIO kept flat
        self.k_ohwi = nnx.Param(0.3 * jax.random.normal(key(), (2, 3, 3, 3)))  # OHWI, stride 2, dilation
        self.k_1d = nnx.Param(0.3 * jax.random.normal(key(), (3, 2, 2)))  # 1-D: WIO
        self.head = nnx.Linear(12 + 4 + 8 + 16 + 2 + 2, 3, rngs=rngs)

    def __call__(self, x):
        b = x.shape[0]
        seq = x[:, :48].reshape(b, 8, 6)  # 8 positions of 6 features
        a = jax.lax.dot_general(self.w_left[...], seq[..., :4], (((1,), (2,)), ((), ())))  # (3, b, 8)
        p = jnp.einsum("bpji,ijo->bpo", seq.reshape(b, 8, 3, 2), self.w_pairs[...])  # (b, 8, 2)
        m = jnp.einsum("bpik,ijk->bpj", jnp.concatenate([seq, -seq], -1).reshape(b, 8, 3, 4), self.w_mid[...])
        t = seq[..., 2:6] @ self.w_t[...].T  # (b, 8, 2)
        img = x[:, 48:].reshape(b, 8, 8, 1)
        k = self.k_flat[...].reshape(5, 5, 1, 3)
        c = jnp.tanh(jax.lax.conv_general_dilated(img, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        d = jax.lax.conv_general_dilated(
            c,
            self.k_ohwi[...],
            (2, 2),
            [(2, 1), (1, 2)],
            rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "OHWI", "NHWC"),
        )
        e = jax.lax.conv_general_dilated(
            seq[..., :2], self.k_1d[...], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )
        feats = [a.transpose(1, 0, 2)[..., ::2].reshape(b, -1), p[:, ::4].reshape(b, -1), m[:, ::2].reshape(b, -1)]
        feats += [t.reshape(b, -1), d.mean((1, 2)), e.mean((1, 2))[:, None].repeat(2, -1)]
        return self.head(jnp.tanh(jnp.concatenate(feats, axis=-1)))


def test_direct_per_example_gradients_are_put_back_in_each_layout(monkeypatch):
    """The direct path's gradients, summed as normed, equal vmap's in every layout (a wrong layout
    would permute the sum), and every kernel here took that path."""
    direct = set()
    choose = ghost._choose_form  # private: decides which sites form per-example gradients (the direct form)

    def spy(site, *a):
        out = choose(site, *a)
        if out[0] == "direct":
            direct.add(site.leaf)
        return out

    monkeypatch.setattr(ghost, "_choose_form", spy)
    x = np.random.default_rng(7).normal(size=(6, 48 + 64)).astype(np.float32)
    loss_fn, params, x, y = _nnx_problem(DirectLayouts(nnx.Rngs(0)), x, 3)
    _assert_ghost_equals_vmap(loss_fn, params, x, y, jnp.ones((6,)).at[2].set(0.0), clip=0.05)
    names = ghost.leaf_names(params)
    kernels = {n for n in names if "head" not in n}
    assert {names[i] for i in direct} == kernels


class DirectConvs(nnx.Module):
    """Convolutions on the direct path whose im2col matrix (ghost._conv_patches_t, built one spatial dim at a
    time) is easy to get wrong: channels-first input, a 3-D kernel with stride, dilation and uneven padding,
    and a convolution that sees two images per example (its own batch dim inside one example)."""

    def __init__(self, rngs):
        key = rngs.params
        self.k_nchw = nnx.Param(0.3 * jax.random.normal(key(), (3, 2, 3, 2)))  # OIHW, stride (2, 1)
        self.k_3d = nnx.Param(0.3 * jax.random.normal(key(), (2, 3, 2, 1, 3)))  # DHWIO
        self.k_pair = nnx.Param(0.3 * jax.random.normal(key(), (4, 4, 1, 3)))  # HWIO, two images per example
        self.head = nnx.Linear(3 + 3 + 6, 3, rngs=rngs)

    def __call__(self, x):
        b = x.shape[0]
        img = x[:, :72].reshape(b, 2, 6, 6)  # NCHW
        c = jax.lax.conv_general_dilated(img, self.k_nchw[...], (2, 1), [(1, 0), (0, 2)], rhs_dilation=(1, 2))
        vol = x[:, 72 : 72 + 64].reshape(b, 4, 4, 4, 1)
        v = jax.lax.conv_general_dilated(
            vol,
            self.k_3d[...],
            (1, 2, 1),
            "SAME",
            rhs_dilation=(2, 1, 1),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        pair = x[:, 136:].reshape(b * 2, 8, 8, 1)  # each example holds two 8x8 images
        q = jax.lax.conv_general_dilated(
            pair, self.k_pair[...], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        q = jnp.tanh(q).mean((1, 2)).reshape(b, 6)
        feats = [jnp.tanh(c).mean((2, 3)), jnp.tanh(v).mean((1, 2, 3)), q]
        return self.head(jnp.tanh(jnp.concatenate(feats, axis=-1)))


def test_direct_conv_patches_in_each_layout_equal_vmap(monkeypatch):
    """Each kernel here is taken on the direct path, from ghost._conv_patches_t; the clipped sum and norms equal
    vmap's (a wrong row or column of the im2col matrix changes both), and the matrix equals _conv_layout's
    per-offset pieces side by side."""
    patched, patches, diffs = set(), ghost._conv_patches_t, []

    def spy(site, x):
        out = patches(site, x)
        patched.add(site.leaf)
        g = jnp.zeros((x.shape[0], *site.out_shape), x.dtype)
        pieces, _ = ghost._conv_layout(site, x, g)  # the Gram form's blocks: (B, T, C) per window offset
        diff = jnp.max(jnp.abs(out - jnp.swapaxes(jnp.concatenate(pieces, -1), 1, 2)))
        jax.debug.callback(lambda d: diffs.append(float(d)), diff)  # traced under jit: compared when it runs
        return out

    monkeypatch.setattr(ghost, "_conv_patches_t", spy)
    x = np.random.default_rng(8).normal(size=(5, 72 + 64 + 128)).astype(np.float32)
    loss_fn, params, x, y = _nnx_problem(DirectConvs(nnx.Rngs(0)), x, 3)
    _assert_ghost_equals_vmap(loss_fn, params, x, y, jnp.ones((5,)).at[1].set(0.0), clip=0.05)
    names = ghost.leaf_names(params)
    assert {names[i] for i in patched} == {n for n in names if n.startswith("params['k_")}
    assert diffs and max(diffs) == 0.0


@pytest.mark.parametrize("batch", [7, 8])  # 7: chunks padded with zero examples; 8: a chunk count that divides it
def test_direct_conv_products_in_chunks_equal_vmap(monkeypatch, batch):
    """A convolution whose im2col matrix outgrows the layer's input forms its direct products in chunks of examples
    (ghost._patch_chunk, a loop): clipped sum and norms equal vmap's, with a masked example, for a batch the
    chunks divide and one they do not."""
    seen, chunk = [], ghost._patch_chunk

    def spy(site, x):
        c = chunk(site, x)
        seen.append((x.shape[0], c))
        return c

    monkeypatch.setattr(ghost, "_patch_chunk", spy)
    x = np.random.default_rng(9).normal(size=(batch, 72 + 64 + 128)).astype(np.float32)
    loss_fn, params, x, y = _nnx_problem(DirectConvs(nnx.Rngs(0)), x, 3)
    _assert_ghost_equals_vmap(loss_fn, params, x, y, jnp.ones((batch,)).at[3].set(0.0), clip=0.05)
    assert any(c < b for b, c in seen), seen  # some site was formed in more than one chunk


class GramConvs(nnx.Module):
    """Convolutions on the Gram forms (4 positions, many channels), whose im2col pieces are 9x their input: one
    kernel plain, one standardised."""

    def __init__(self, rngs):
        key = rngs.params
        self.k = nnx.Param(0.3 * jax.random.normal(key(), (3, 3, 8, 32)))
        self.k_ws = nnx.Param(jax.random.normal(key(), (3, 3, 32, 32)))
        self.head = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        dims = ("NHWC", "HWIO", "NHWC")
        h = jnp.tanh(jax.lax.conv_general_dilated(x, self.k[...], (1, 1), "SAME", dimension_numbers=dims))
        h = jax.lax.conv_general_dilated(h, weight_standardize(self.k_ws[...]), (1, 1), "SAME", dimension_numbers=dims)
        return self.head(jnp.tanh(h).mean((1, 2)))


@pytest.mark.parametrize("batch", [7, 8])
def test_gram_statistics_of_x_in_chunks_equal_vmap(monkeypatch, batch):
    """The Gram forms' statistics of X (ghost._site_x_stats: its Gram matrix, position norms, row sums) are formed
    from the convolution's input in chunks of examples where the pieces outgrow it: clipped sum and norms equal
    vmap's, with a masked non-finite example, on both Gram forms."""
    chunks, x_stats = [], ghost._x_stats

    def spy(pieces):
        if len(pieces) > 1:  # a convolution's (the dense head has one piece, X itself)
            chunks.append(pieces[0].shape[0])
        return x_stats(pieces)

    monkeypatch.setattr(ghost, "_x_stats", spy)
    forms, choose = set(), ghost._choose_form
    monkeypatch.setattr(ghost, "_choose_form", lambda *a: forms.add((out := choose(*a))[0]) or out)
    # The fallback (each example's own X^T G) would hide wrong statistics behind exact norms: it must not be taken.
    fallbacks, trusted_or_direct = [], ghost._trusted_or_direct

    def spy_fallback(*a):
        out = trusted_or_direct(*a)
        jax.debug.callback(lambda use: fallbacks.append(bool(use)), out[3].use)
        return out

    monkeypatch.setattr(ghost, "_trusted_or_direct", spy_fallback)
    x = np.random.default_rng(10).normal(size=(batch, 2, 2, 8)).astype(np.float32)
    loss_fn, params, x, y = _nnx_problem(GramConvs(nnx.Rngs(0)), x, 3)
    _assert_ws_ghost_equals_vmap(loss_fn, params, x.at[2].set(jnp.nan), y, jnp.ones((batch,)).at[2].set(0.0))
    assert {"gram", "ws_gram"} <= forms
    assert chunks and max(chunks) < batch  # every convolution's statistics were formed in chunks
    assert fallbacks and not any(fallbacks)


@pytest.mark.parametrize(
    "w_shape, shape, dims",
    [((4,), (3, 4), (1,)), ((1, 4), (5, 4), (0, 1)), ((2, 1, 3), (2, 6, 3, 5), (0, 1, 2)), ((3, 1), (2, 3, 4), (1, 2))],
)
def test_broadcast_as_product_equals_broadcast_and_its_transpose(w_shape, shape, dims):
    """ghost._broadcast_as_product (the per-example gradients' broadcast, whose transpose is a dot): the same values
    as broadcast_in_dim and the same vjp, to float32 rounding of the sum it transposes to."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    ct = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ref, ref_vjp = jax.vjp(lambda v: jax.lax.broadcast_in_dim(v, shape, dims), w)
    out, out_vjp = jax.vjp(lambda v: ghost._broadcast_as_product(v, shape, dims), w)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(out_vjp(ct)[0]), np.asarray(ref_vjp(ct)[0]), rtol=1e-6, atol=1e-6)


def test_ghost_coverage_says_why_without_computing():
    loss_fn, params, x, y = problem("transformer")
    assert jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y) is None
    loss_fn, params, x, y = _nnx_problem(Shared(nnx.Rngs(0)), np.ones((3, 4), np.float32), 2)
    assert "used twice" in jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y)


# -- adversarial numerics and uses found in review ---------------------------------------------


def _contributions(fn, *args, n):
    """Each example's clipped contribution alone (one-hot mask), as the sum's norm (taken in float64: a float32
    norm of the sum is itself off by ~1e-7 of it)."""
    call = jax.jit(lambda m: fn(*args, example_mask=m)[0])
    return [
        math.sqrt(
            sum(
                float(np.sum(np.square(np.asarray(v, np.float64))))
                for v in jax.tree_util.tree_leaves(call(jnp.zeros((n,)).at[i].set(1.0)))
            )
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("width", [32, 4])  # 2 positions x 32 -> the Gram formula; x 4 -> the direct one
def test_cancelling_output_gradients_stay_within_the_bound(width):
    """Two identical positions with huge opposite targets: the Gram terms are ~1e8 and cancel in float32.
    The clip factor uses a rounding-error bound, so no example may contribute more than C."""
    model = nnx.Linear(width, width, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, x, t):
        return jnp.mean((nnx.merge(graphdef, p)(x) - t) ** 2)

    rng = np.random.default_rng(0)
    n = 12
    xs = rng.normal(size=(n, 1, width)).astype(np.float32) * 5
    u = rng.normal(size=(n, 1, width)).astype(np.float32) * 1e4
    x, t = jnp.asarray(np.concatenate([xs, xs], 1)), jnp.asarray(np.concatenate([u, -u], 1))
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost")
    assert max(_contributions(fn, params, x, t, n=n)) <= 1.0 + 1e-6


def test_cancelling_embedding_gradients_stay_within_the_bound():
    """The same token twice with output gradients a and -a + small: the pairwise formula cancels."""

    def loss(table, idx, a, b):
        e = table[idx]
        return jnp.sum(e[:, 0] * a) + jnp.sum(e[:, 1] * b)

    rng = np.random.default_rng(0)
    n = 16
    idx = jnp.asarray(np.repeat(rng.integers(0, 50, (n, 1)), 2, 1))
    a = rng.normal(size=(n, 16)).astype(np.float32) * 1e4
    b = jnp.asarray(-a + rng.normal(size=(n, 16)).astype(np.float32) * 0.5)
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost")
    assert max(_contributions(fn, jnp.zeros((50, 16)), idx, jnp.asarray(a), b, n=n)) <= 1.0 + 1e-6


def test_complex_promotion_is_refused_and_a_bfloat16_matmul_with_a_float32_result_equals_vmap():
    w = jnp.ones((8, 4))
    x = jnp.ones((3, 8)) * (1 + 1j)
    with pytest.raises(GhostUnsupported, match="complex64"):
        jaxdp.clipped_grad(lambda w, x: jnp.mean(jnp.abs(x @ w) ** 2), l2_clip_norm=1.0, clipping_impl="ghost")(w, x)

    def mixed(w, x):  # bfloat16 operands, float32 result: the usual mixed-precision matmul
        y = jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return jnp.mean(y**2)

    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)), jnp.float32)
    (g_v, a_v), (g_g, a_g) = (
        jaxdp.clipped_grad(mixed, l2_clip_norm=1.0, clipping_impl=impl)(w, x) for impl in ("vmap", "ghost")
    )
    assert int(a_g.num_clipped) == int(a_v.num_clipped) > 0
    np.testing.assert_allclose(np.asarray(g_g), np.asarray(g_v), rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(g_v))))


def test_a_custom_derivative_rule_on_a_parameter_is_refused_and_auto_uses_it_via_vmap():
    @jax.custom_vjp
    def scaled_matmul(x, w):
        return x @ w

    def fwd(x, w):
        return x @ w, (x, w)

    def bwd(res, g):  # a rule that is not the body's derivative: vmap clips this one
        x, w = res
        return g @ w.T, 10.0 * (x.T @ g)

    scaled_matmul.defvjp(fwd, bwd)

    def loss(w, x):
        return jnp.mean(jnp.tanh(scaled_matmul(x, w)) ** 2)

    w, x = jnp.ones((4, 3)) * 0.1, jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    with pytest.raises(GhostUnsupported, match="custom derivative rule"):
        jaxdp.clipped_grad(loss, l2_clip_norm=0.1, clipping_impl="ghost")(w, x)
    g_auto, _ = jaxdp.clipped_grad(loss, l2_clip_norm=0.1, clipping_impl="auto")(w, x)
    g_vmap, _ = jaxdp.clipped_grad(loss, l2_clip_norm=0.1, clipping_impl="vmap")(w, x)
    np.testing.assert_allclose(np.asarray(g_auto), np.asarray(g_vmap), rtol=1e-6)


def test_negative_conv_padding_and_out_of_range_fill_gathers_equal_vmap():
    rng = np.random.default_rng(2)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.3, jnp.float32)
    table = jnp.asarray(rng.normal(size=(10, 4)) * 0.3, jnp.float32)

    def loss(p, img, idx):
        c = jax.lax.conv_general_dilated(
            img, p["k"], (1, 1), [(-1, 2), (1, 0)], dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        e = jnp.take(p["t"], idx, axis=0, mode="fill", fill_value=0.0)  # index 12 is out of range: dropped
        return jnp.mean(jnp.tanh(c) ** 2) + jnp.mean(jnp.tanh(e) ** 2)

    params = {"k": kernel, "t": table}
    img = jnp.asarray(rng.normal(size=(5, 6, 6, 2)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 13, (5, 3)), jnp.int32)
    mask = jnp.ones((5,))
    g, a = jaxdp.clipped_grad(loss, l2_clip_norm=0.05, clipping_impl="ghost", return_norms=True)(
        params, img, idx, example_mask=mask
    )
    gv, av = jaxdp.clipped_grad(loss, l2_clip_norm=0.05, return_norms=True)(params, img, idx, example_mask=mask)
    assert int(a.num_nonfinite) == 0
    np.testing.assert_allclose(np.asarray(a.norms), np.asarray(av.norms), rtol=1e-4)
    tree_allclose(g, gv, rtol=RTOL, atol=1e-7)


def test_auto_falls_back_when_the_ghost_path_fails_to_trace(monkeypatch, caplog):
    loss_fn, params, x, y = problem("mlp")

    def broken(*args):
        raise RuntimeError("simulated")

    monkeypatch.setattr(ghost, "site_weighted_sum", broken)
    with caplog.at_level(logging.WARNING, logger="jaxdp"):
        g_auto, _ = _run(loss_fn, params, x, y, jnp.ones((x.shape[0],)), "auto")
    assert any("did not trace (RuntimeError: simulated)" in r.getMessage() for r in caplog.records)
    g_vmap, _ = _run(loss_fn, params, x, y, jnp.ones((x.shape[0],)), "vmap")
    tree_allclose(g_auto, g_vmap, rtol=1e-6, atol=1e-7)


# -- review II: cancellation must not drop examples, mixed result precision, matmul precision -------------


def _cancelling_dense(scale, n=32, width=32, near=0.0, dtype=jnp.float32, preferred=None):
    """A dense layer on two (nearly) equal positions with opposite targets of size ``scale``: the Gram
    terms of each example's norm are huge and cancel. ``preferred``: the matmul's result dtype."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(width, width)), jnp.float32)

    def loss(w, x, t):
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=preferred)
        return jnp.mean((y - t) ** 2)

    xs = (rng.normal(size=(n, 1, width)) * 5).astype(np.float32)
    xs2 = xs + (rng.normal(size=xs.shape) * near).astype(np.float32)
    u = rng.normal(size=(n, 1, width)) * scale
    x = jnp.asarray(np.concatenate([xs, xs2], 1))
    t = jnp.asarray(np.concatenate([u, -u], 1), dtype)
    return loss, w, x, t


def _cancelling_clipped_sum_float64(w, x, t, clip):
    """:func:`_cancelling_dense`'s clipped sum in float64 (each example's gradient X^T G by formula), and the
    clipped sum of |X|^T |G|: the size of the terms that cancel, which sets float32's rounding of the sum."""
    w, x, t = (np.asarray(a, np.float64) for a in (w, x, t))
    y = x @ w
    g = 2 * (y - t) / y[0].size  # d mean((y - t)^2) / dy, per example
    per = np.einsum("btd,bte->bde", x, g)
    factor = np.minimum(1.0, clip / np.sqrt(np.sum(per**2, axis=(1, 2))))[:, None, None]
    return np.sum(per * factor, 0), np.sum(np.einsum("btd,bte->bde", np.abs(x), np.abs(g)) * factor, 0)


def _ghost_matches_vmap_under_cancellation(loss, w, x, t):
    n = x.shape[0]
    (g_v, a_v), (g_g, a_g) = (
        jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl=impl))(w, x, t) for impl in ("vmap", "ghost")
    )
    assert int(a_g.num_nonfinite) == int(a_v.num_nonfinite) == 0  # no finite example is dropped
    assert int(a_g.num_clipped) == int(a_v.num_clipped) > 0
    # Both equal the float64 sum up to float32's rounding of the terms that cancel (at most 0.52 u of their size
    # measured, on both paths, at both XLA optimisation levels). Compared with each other at a fixed 1e-4 they
    # agreed only while both paths rounded in one order: at 1e6 the terms are ~1e4 times the sum.
    ref, size = _cancelling_clipped_sum_float64(w, x, t, 1.0)
    u = float(jnp.finfo(jnp.float32).eps) / 2
    for g in (g_g, g_v):
        err = np.abs(np.asarray(g, np.float64) - ref)
        assert np.all(err <= 2 * u * size), float(np.max(err / (u * size)))
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost")
    assert max(_contributions(fn, w, x, t, n=n)) <= 1.0 + 1e-6


@pytest.mark.parametrize("scale", [1e4, 1e5, 1e6])
def test_cancelling_gram_estimates_drop_nothing_and_equal_vmap(scale):
    """float32: cancellation made the Gram estimate negative, and ghost dropped finite examples as NaN
    (12 of 32 at 1e5, |sum| 0.098 against vmap's 7.99). Now: nothing dropped, sum == vmap, each <= C."""
    _ghost_matches_vmap_under_cancellation(*_cancelling_dense(scale))


@pytest.mark.parametrize("x64", [False, True])
def test_float32_products_with_a_float64_result_are_bounded_at_float32(x64):
    """x64 on, float32 operands, ``preferred_element_type=float64``: the dtype check passes, and the
    rounding slack was taken from float64 while the Gram products ran in float32 (3.5 C from one example).
    The slack now uses the lowest precision on the site."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        _ghost_matches_vmap_under_cancellation(
            *_cancelling_dense(1e5, near=1e-3, dtype=dtype, preferred=jnp.float64 if x64 else None)
        )


def test_site_roundoff_is_the_lowest_precision_on_the_site():
    with jax.enable_x64(True):
        loss, w, x, t = _cancelling_dense(1.0, n=2, dtype=jnp.float64, preferred=jnp.float64)
        _, sites, _ = ghost.analyse(loss, w, (jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t[0]))
        (site,) = sites
        assert site.out_dtype == jnp.float64
        assert ghost.site_roundoff(site, w) == float(jnp.finfo(jnp.float32).eps) / 2
        w64 = w.astype(jnp.float64)
        _, sites64, _ = ghost.analyse(loss, w64, (jax.ShapeDtypeStruct(x.shape[1:], jnp.float64), t[0]))
        assert ghost.site_roundoff(sites64[0], w64) == float(jnp.finfo(jnp.float64).eps) / 2


def _dot_precisions(jaxpr, out):
    """(output shape, precision) of every dot_general / conv in ``jaxpr`` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.append((tuple(eqn.outvars[0].aval.shape), eqn.params.get("precision")))
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else [v]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _dot_precisions(sub.jaxpr, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _dot_precisions(sub, out)
    return out


@pytest.mark.parametrize("t", [1, 3])  # one position (an MLP) and a few (a token model), both Gram
def test_ghost_products_run_at_highest_precision_whatever_the_default(t):
    """Under a low default matmul precision (TF32 on GPUs and bfloat16 passes on TPUs are the defaults
    there), every product ghost forms for a norm or the clipped sum (Gram matrices, the weighted weight
    gradient) runs at HIGHEST, so the float32 rounding bound holds. (CPUs ignore the setting: this
    checks the program, the GPU/TPU behaviour follows from it.)"""
    d_in, d_out, n = 48, 40, 4
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, t, d_in)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, t, d_out)), jnp.float32)

    def loss(w, x, y):
        return jnp.mean((x @ w - y) ** 2)

    highest = jax.lax.Precision.HIGHEST
    with jax.default_matmul_precision("bfloat16"):
        fn = jaxdp.clipped_grad(loss, l2_clip_norm=0.1, clipping_impl="ghost")
        dots = _dot_precisions(jax.make_jaxpr(fn)(w, x, y).jaxpr, [])
        g_ghost, _ = jax.jit(fn)(w, x, y)
    grams = [p for shape, p in dots if shape in ((n, t, t), (n, t))]
    weight_grads = [p for shape, p in dots if shape in ((d_in, d_out), (d_out, d_in))]  # XLA may form it transposed
    assert grams and weight_grads
    assert all(p == (highest, highest) for p in grams + weight_grads), dots
    g_vmap, _ = jaxdp.clipped_grad(loss, l2_clip_norm=0.1, clipping_impl="vmap")(w, x, y)
    np.testing.assert_allclose(g_ghost, g_vmap, rtol=2e-4, atol=1e-6)


def test_a_standardised_kernels_recorded_output_and_gram_products_run_at_highest_precision():
    """The Gram form through weight standardisation takes <g', w'> from the layer's own output Z = X W': that
    product (and the per-channel Gram products) run at HIGHEST under a low default matmul precision."""
    d_in, d_out, n, t = 48, 40, 4, 3
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, t, d_in)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, t, d_out)), jnp.float32)

    def loss(w, x, y):
        return jnp.mean((x @ weight_standardize(w) - y) ** 2)

    with jax.default_matmul_precision("bfloat16"):
        fn = jaxdp.clipped_grad(loss, l2_clip_norm=0.1, clipping_impl="ghost")
        dots = _dot_precisions(jax.make_jaxpr(fn)(w, x, y).jaxpr, [])
        g_ghost, _ = jax.jit(fn)(w, x, y)
    outputs = [p for shape, p in dots if shape[-2:] == (t, d_out)]  # Z = X W' (the probed forward) and K G
    assert len(outputs) >= 2 and all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in outputs), dots
    g_vmap, _ = jaxdp.clipped_grad(loss, l2_clip_norm=0.1, clipping_impl="vmap")(w, x, y)
    np.testing.assert_allclose(g_ghost, g_vmap, rtol=WS_RTOL, atol=1e-6)


def test_tiny_inputs_against_huge_output_gradients_stay_within_the_bound():
    """x ~ 1.3e-20 against output gradients ~ 1.5e18 (finite loss): unscaled, every square flushed to zero
    and the bound was 0, so one example contributed 20 C (review II). Each example's X and G are now scaled by
    powers of two before the Gram products."""
    d, t, n = 64, 16, 4
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(d, d)) * 0.1, jnp.float32)

    def loss(w, x, y):
        return jnp.sum((x @ w) * y)

    x = rng.normal(size=(n, t, d)).astype(np.float32)
    y = rng.normal(size=(n, t, d)).astype(np.float32)
    x[0], y[0] = 1.3e-20, 1.5e18
    x, y = jnp.asarray(x), jnp.asarray(y)
    for per_layer, mb in ((False, None), (True, None), (False, 2)):
        fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost", per_layer=per_layer, microbatch_size=mb)
        assert max(_contributions(fn, w, x, y, n=n)) <= 1.0 + 1e-6, (per_layer, mb)
    g_v, _ = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="vmap")(w, x, y)
    g_g, _ = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost")(w, x, y)
    np.testing.assert_allclose(g_g, g_v, rtol=1e-4, atol=1e-5)


def test_power_of_two_scaling_is_exact_over_the_whole_exponent_range():
    """ghost._scaled (two multiplies, in place of jnp.ldexp's per-element frexp and power) scales each example by
    2^-e exactly, for every float32 exponent e an example's largest value can have: its largest value lands in
    [0.5, 1) and every normal value equals the float64 result bit for bit. At e > 126 a single factor 2^-e is
    subnormal, and a CPU that treats it as zero would scale every value to 0; a subnormal input may be kept or
    flushed (as XLA's CPU products flush it), never scaled wrong."""
    rng = np.random.default_rng(0)
    es = np.arange(-125, 129)  # the largest value 0.75 * 2^e normal (below, this CPU's max reads it as 0: e = 0)
    mantissa = rng.uniform(0.5, 1.0, (len(es), 256)) * rng.choice([-1.0, 1.0], (len(es), 256))
    a = np.ldexp(mantissa * np.ldexp(1.0, rng.integers(-40, 1, (len(es), 256))), es[:, None]).astype(np.float32)
    a[:, 0] = np.ldexp(0.75, es).astype(np.float32)  # each example's largest value
    e = ghost._pow2_exponent([jnp.asarray(a)])
    np.testing.assert_array_equal(np.asarray(e), es)
    got = np.asarray(jax.jit(ghost._scaled)(jnp.asarray(a), e))
    exact = np.ldexp(a.astype(np.float64), -es[:, None])
    normal = np.abs(a) >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(got[normal], exact[normal].astype(np.float32))
    np.testing.assert_array_equal(got[:, 0], 0.75)
    sub = ~normal
    assert sub.any()
    assert np.all((got[sub] == 0) | (got[sub] == exact[sub].astype(np.float32)))


def test_distinct_tokens_are_not_over_clipped():
    """Only same-token pairs round in the embedding formula: with distinct tokens and every example clipped,
    the sum is vmap's to 5e-4 (the slack over all pairs gave 4e-3 here, 2% at V=10000, d=768, T=256)."""
    v, d, t, n = 4000, 256, 128, 4  # T^2 < 8 V: the pairwise formula
    rng = np.random.default_rng(0)
    head = jnp.asarray(rng.normal(size=(d, 4)) * 0.05, jnp.float32)

    def loss(table, tok, y):
        logits = table[tok].mean(axis=1) @ head
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])

    table = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    tok = jnp.asarray(np.stack([rng.permutation(v)[:t] for _ in range(n)]), jnp.int32)
    y = jnp.asarray(rng.integers(0, 4, n), jnp.int32)
    g_v, a_v = jaxdp.clipped_grad(loss, l2_clip_norm=1e-3, clipping_impl="vmap")(table, tok, y)
    g_g, a_g = jaxdp.clipped_grad(loss, l2_clip_norm=1e-3, clipping_impl="ghost")(table, tok, y)
    assert int(a_v.num_clipped) == int(a_g.num_clipped) == n
    assert float(jnp.linalg.norm(g_g - g_v) / jnp.linalg.norm(g_v)) < 5e-4  # 2.1e-4 measured; 4.1e-3 before


# -- ghost clipping through weight standardisation ---------------------------------------------
# W' = (W - mean_c) / s_c per output channel: the gradient with respect to W is (1/s_c) P (g'_c - beta_c w'_c / n),
# whose norm ghost takes from ||g'_c||^2, <g'_c, 1> and <g'_c, w'_c> (see ghost._ws_gram_norms), or by forming
# each example's gradient and taking it back through the standardisation (the direct form).


class StandardisedDense(nnx.Module):
    """Dense layers on a short sequence: a standardised kernel on the Gram path (T = 3 positions, 24 x 32),
    one on the direct path (T = 3, 4 x 24), one used transposed (channels not last: the direct path)."""

    def __init__(self, rngs, eps=1e-5):
        self.first = nnx.Param(jax.random.normal(rngs.params(), (4, 24)))
        self.wide = nnx.Param(jax.random.normal(rngs.params(), (24, 32)))
        self.turned = nnx.Param(jax.random.normal(rngs.params(), (5, 32)))
        self.eps = eps

    def __call__(self, x):
        h = jnp.tanh(x @ weight_standardize(self.first[...], eps=self.eps))
        h = jnp.tanh(h @ weight_standardize(self.wide[...], eps=self.eps))
        return jnp.einsum("btc,oc->bo", h, weight_standardize(self.turned[...], eps=self.eps))


def _ws_problem(name):
    rng = np.random.default_rng(4)
    if name == "wrn":  # 8x8 input: the last two stages' convolutions are on the Gram path
        model, x = WideResNet((8, 8, 3), 10, depth=10, width=1, rngs=nnx.Rngs(0)), rng.normal(size=(6, 8, 8, 3))
        return _nnx_problem(model, x.astype(np.float32), 10)
    if name == "gn_cnn":
        model = GroupNormCNN((12, 12, 1), 10, features=(8, 16), groups=4, rngs=nnx.Rngs(0))
        return _nnx_problem(model, rng.normal(size=(6, 12, 12, 1)).astype(np.float32), 10)
    if name == "dense":
        return _nnx_problem(StandardisedDense(nnx.Rngs(0)), rng.normal(size=(6, 3, 4)).astype(np.float32), 5)
    if name == "dense-eps1":
        model = StandardisedDense(nnx.Rngs(0), eps=1.0)
        return _nnx_problem(model, rng.normal(size=(6, 3, 4)).astype(np.float32), 5)
    raise KeyError(name)


# The bound on a standardised kernel's norm grows with n (entries per channel): ~1e-6 n relative here, so
# a clipped example's factor is up to ~0.2% smaller than the vmap path's at n = 2304 (WRN-16-4's last stage).
WS_RTOL = 5e-3


@pytest.mark.parametrize("name", ["wrn", "gn_cnn", "dense", "dense-eps1"])
def test_weight_standardised_models_on_ghost_equal_vmap_with_masks(name):
    loss_fn, params, x, y = _ws_problem(name)
    mask = jnp.ones((x.shape[0],)).at[1].set(0.0)
    _assert_ws_ghost_equals_vmap(loss_fn, params, x.at[1].set(jnp.nan), y, mask)  # masked: contributes zero


def _assert_ws_ghost_equals_vmap(loss_fn, params, x, y, mask):
    """With weight-standardised kernels (WS_RTOL): the same clipped sum, norms of the unmasked examples and
    number clipped (some) as vmap, and a finite sum, whole-gradient and per-layer clipping."""
    keep = np.asarray(mask) > 0
    for per_layer in (False, True):
        g_vmap, a_vmap = _run(loss_fn, params, x, y, mask, "vmap", per_layer=per_layer, clip=0.5)
        g_ghost, a_ghost = _run(loss_fn, params, x, y, mask, "ghost", per_layer=per_layer, clip=0.5)
        tree_allclose(g_ghost, g_vmap, rtol=WS_RTOL, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a_ghost.norms)[keep], np.asarray(a_vmap.norms)[keep], rtol=1e-4)
        assert int(a_ghost.num_clipped) == int(a_vmap.num_clipped) > 0
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(g_ghost))


def test_weight_standardised_models_take_every_ws_form(monkeypatch):
    """The problems above do reach the Gram formula, the direct form and the transposed use."""
    seen = []
    for fn_name in ("_ws_gram_norms", "_to_leaf"):
        original = getattr(ghost, fn_name)

        def spy(site, *a, _original=original, _name=fn_name, **kw):
            if ghost._reparam_index(site.chain) is not None:
                seen.append((_name, ghost._ws_channels_match(site, *_dims(site))))
            return _original(site, *a, **kw)

        monkeypatch.setattr(ghost, fn_name, spy)
    loss_fn, params, x, y = _ws_problem("dense")
    _run(loss_fn, params, x, y, jnp.ones((x.shape[0],)), "ghost")
    assert ("_ws_gram_norms", True) in seen  # `wide`
    assert ("_to_leaf", False) in seen  # `turned`, channels not last


def _dims(site):
    shape = site.chain[ghost._reparam_index(site.chain)].outvars[0].aval.shape
    return int(np.prod(shape[:-1])), shape[-1]


@pytest.mark.parametrize("name", ["gn_cnn", "dense"])
def test_weight_standardised_models_on_ghost_equal_the_per_example_loop(name):
    _assert_ghost_equals_the_loop(*_ws_problem(name), rtol=WS_RTOL, atol=1e-6)


def _standardised_dense_loss(eps=1e-5):
    def loss(w, x, t):
        return jnp.sum(x @ weight_standardize(w, eps=eps) * t)

    return loss


def _projected_away(direction, scale, n, n_in=48, d_out=40, t=2):
    """(w, x, targets) of a standardised dense layer whose examples' gradients with respect to W' are huge
    (``scale``) and nearly along the all-ones vector or along w'_0: what the standardisation removes."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(n_in, d_out)), jnp.float32)
    base = np.ones(n_in) if direction == "ones" else np.asarray(weight_standardize(w))[:, 0]
    x = base[None, None, :] * rng.uniform(0.5, 2, size=(n, t, 1)) + rng.normal(size=(n, t, n_in)) * 1e-3
    g = np.zeros((n, t, d_out))
    g[:, :, 0] = rng.normal(size=(n, t)) * scale
    g[:, :, 1:] = rng.normal(size=(n, t, d_out - 1)) * 1e-2
    return w, jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)


@pytest.mark.parametrize("direction", ["ones", "kernel"])
@pytest.mark.parametrize("scale", [1e2, 1e5])
def test_standardised_gradients_the_projection_removes_stay_within_the_bound(direction, scale):
    """Each example's gradient with respect to W' is huge and (nearly) along the all-ones vector or along
    w'_0, both of which the standardisation's Jacobian removes: ||g'||^2, S^2/n and beta^2/n are huge
    and cancel. No example may contribute more than C, nothing finite is dropped, and the sum = vmap's."""
    n = 16
    args = _projected_away(direction, scale, n)
    loss = _standardised_dense_loss()
    (g_v, a_v), (g_g, a_g) = (
        jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl=impl))(*args) for impl in ("vmap", "ghost")
    )
    assert int(a_g.num_nonfinite) == int(a_v.num_nonfinite) == 0
    assert int(a_g.num_clipped) == int(a_v.num_clipped)
    np.testing.assert_allclose(np.asarray(g_g), np.asarray(g_v), rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(g_v))))
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost")
    assert max(_contributions(fn, *args, n=n)) <= 1.0 + 1e-6


def test_random_standardised_models_stay_within_the_bound():
    """One example at a time, on random standardised models and inputs at several scales: ||clipped sum|| <= C."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        w = jnp.asarray(rng.normal(size=(24, 32)) * 10.0**seed, jnp.float32)
        x = jnp.asarray(rng.normal(size=(4, 3, 24)) * 10.0 ** (2 - seed), jnp.float32)
        t = jnp.asarray(rng.normal(size=(4, 3, 32)) * 10.0 ** (seed - 1), jnp.float32)
        fn = jaxdp.clipped_grad(_standardised_dense_loss(), l2_clip_norm=0.3, clipping_impl="ghost")
        assert max(_contributions(fn, w, x, t, n=4)) <= 0.3 * (1 + 1e-5), seed


class Restandardised(nnx.Module):
    def __init__(self, rngs, how):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))
        self.other = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))
        self.how = how

    def __call__(self, x):
        k = self.kernel[...]
        if self.how == "twice":
            return x @ weight_standardize(weight_standardize(k))
        if self.how == "scaled":  # a nonlinear step before the standardisation
            return x @ weight_standardize(jnp.tanh(k))
        if self.how == "sum":  # two parameters standardised together
            return x @ weight_standardize(k + self.other[...])
        if self.how == "shared":  # the standardised kernel used twice
            kw = weight_standardize(k)
            return (x @ kw) * (x @ kw)
        raise KeyError(self.how)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("twice", "standardised twice"),
        ("scaled", "used by `tanh`"),
        ("sum", "combined with another parameter in `add`"),
        ("shared", "used twice"),
    ],
)
def test_what_the_standardisation_cannot_cover_is_refused(how, match):
    _refused(Restandardised(nnx.Rngs(0), how), np.ones((3, 4), np.float32), match)


def test_a_batched_standardisation_is_refused_and_auto_equals_vmap():
    """Under jax.vmap the standardisation's statistics are per slice, not over every axis but the last: its body
    differs from the verified one, so it is analysed as any call and refused (review: accepted before, one
    example contributed 5.7 C)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(
        rng.normal(size=(4, 8, 32)) * (1 + 5 * np.arange(4))[:, None, None] + 3 * np.arange(4)[:, None, None]
    )
    x, t = jnp.asarray(rng.normal(size=(4, 2, 4, 8))), jnp.asarray(rng.normal(size=(4, 2, 32)))

    def loss(w, x, t):
        return jnp.sum(jnp.einsum("btli,lio->bto", x, jax.vmap(weight_standardize)(w)) * t)

    assert "used by `reduce_sum`" in jaxdp.clipped_grad(loss, l2_clip_norm=1.0).ghost_coverage(w, x, t)
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="auto")
    assert max(_contributions(fn, w, x, t, n=4)) <= 1.0 + 1e-6


def test_eps_zero_is_refused():
    """With eps = 0 a constant channel's derivative is NaN, and the weighted backward carried it into the sum
    (review: NaN entries where vmap gives zeros)."""
    w = jnp.ones((8, 3)).at[:, 1].set(jnp.arange(8.0))

    def loss(w, x, y):
        return jnp.sum(x @ weight_standardize(w, eps=0.0) * y)

    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost")
    with pytest.raises(GhostUnsupported, match="eps=0.0; ghost clipping needs a finite eps > 0"):
        fn(w, jnp.ones((2, 3, 8)), jnp.ones((2, 3, 3)))


def test_x64_float32_kernel_with_float64_inputs_equals_vmap():
    """float32 kernel, float64 inputs (x64 on): the fallback's branches once had different dtypes (a TypeError)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.normal(size=(24, 32)), jnp.float32)
        x = jnp.asarray(rng.normal(size=(4, 3, 24)), jnp.float64)
        t = jnp.asarray(rng.normal(size=(4, 3, 32)), jnp.float64)
        g = [
            jaxdp.clipped_grad(_standardised_dense_loss(), l2_clip_norm=0.3, clipping_impl=i)(w, x, t)[0]
            for i in ("ghost", "vmap")
        ]
    np.testing.assert_allclose(np.asarray(g[0]), np.asarray(g[1]), rtol=WS_RTOL, atol=1e-6)


def test_a_standardisation_eps_that_is_not_a_constant_is_refused():
    def loss(p, x, y):
        return jnp.sum(x @ weight_standardize(p["w"], eps=p["eps"]) * y)

    params = {"w": jnp.ones((4, 3)) + jnp.arange(12.0).reshape(4, 3), "eps": jnp.asarray(1e-5)}
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost")
    with pytest.raises(GhostUnsupported, match="non-constant eps"):
        fn(params, jnp.ones((2, 4)), jnp.ones((2, 3)))


def test_weight_standardised_recipe_models_are_covered_by_ghost():
    """WRN-16-4 (the recipe's shape) and the GroupNorm CNN: `auto` takes the ghost path (it did vmap before)."""
    model = WideResNet((32, 32, 3), 10, rngs=nnx.Rngs(0))
    loss_fn, params, x, y = _nnx_problem(model, np.ones((2, 32, 32, 3), np.float32), 10)
    assert jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y) is None
    loss_fn, params, x, y = _ws_problem("gn_cnn")
    assert jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).ghost_coverage(params, x, y) is None


def test_explain_reports_the_form_each_site_takes(monkeypatch):
    """`explain` (what `jaxdp bench --explain` prints) names the form the ghost path then takes, per site."""
    loss_fn, params, x, y = _ws_problem("dense")
    rows = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).explain_ghost(params, x, y)
    taken = []
    original = ghost._choose_form
    monkeypatch.setattr(ghost, "_choose_form", lambda *a: taken.append(original(*a)[0]) or original(*a))
    _run(loss_fn, params, x, y, jnp.ones((x.shape[0],)), "ghost")
    assert [r["form"] for r in rows] == taken[: len(rows)]
    assert {"ws_gram", "direct"} <= set(taken)
    wide = next(r for r in rows if "wide" in r["parameter"])
    assert (wide["form"], wide["T"], wide["d_in"], wide["d_out"], wide["standardised"]) == ("ws_gram", 3, 24, 32, True)
    assert wide["gram_cost"] == 6 * 3 * 3 * (24 + 32) < wide["direct_cost"] == 6 * 3 * 24 * 32
    loss_fn, params, x, y = _nnx_problem(Shared(nnx.Rngs(0)), np.ones((3, 4), np.float32), 2)
    assert "used twice" in jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).explain_ghost(params, x, y)


@pytest.mark.parametrize("name", ["transformer", "dp_mnist_cnn"])
def test_the_gram_form_is_taken_where_twice_its_cost_is_below_the_direct_one(name):
    """Each kernel's form follows the rule the bench's explain prints (the Gram side counted twice: its bound and
    scaling cost about as much again); both forms occur."""
    loss_fn, params, x, y = problem(name)
    rows = [r for r in jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).explain_ghost(params, x, y) if r["T"]]
    kernels = [r for r in rows if r["form"] in ("gram", "direct")]
    assert {r["form"] for r in kernels} == {"gram", "direct"}
    for r in kernels:
        assert (r["form"] == "gram") == (2 * r["gram_cost"] < r["direct_cost"]), r


def test_a_dropped_examples_nan_changes_no_bit_of_the_ghost_sum():
    """Two choices on the ghost path read the examples' data: the direct sites' gradients are formed after the
    backward (a cond on one value of every site's output gradient, which example 0 holds), and core.scaled_sum
    takes one product or zeroes the dropped rows first (are the dropped examples finite?). Neither shows: example
    0 holding NaN (dropped as non-finite) and example 0 holding finite garbage, masked, give the same bits, and
    the vmap path's sum with example 0 masked."""
    loss_fn, params, x, y = problem("dp_mnist_cnn")
    assert "direct" in {r["form"] for r in jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).explain_ghost(params, x, y)}
    fn = jax.jit(jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.2, clipping_impl="ghost"))
    ones, without_0 = jnp.ones(x.shape[0]), jnp.ones(x.shape[0]).at[0].set(0.0)
    g_nan, aux = fn(params, x.at[0].set(jnp.nan), y, example_mask=ones)
    assert int(aux.num_nonfinite) == 1
    g_masked, _ = fn(params, x.at[0].set(3.0), y, example_mask=without_0)
    assert tree_equal(g_nan, g_masked)
    g_vmap, _ = _run(loss_fn, params, x, y, without_0, "vmap", per_layer=False, clip=0.2)
    tree_allclose(g_nan, g_vmap, rtol=RTOL, atol=1e-6)


class StandardisedTable(nnx.Module):
    """An embedding table read through weight standardisation: the token-match formula has no Jacobian in it."""

    def __init__(self, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (40, 8)))
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, tokens):
        return self.head(weight_standardize(self.table[...])[tokens].mean(axis=1))


def test_a_standardised_embedding_table_is_not_given_the_token_match_formula():
    tokens = np.random.default_rng(0).integers(0, 40, (6, 4))
    tokens[:, 1] = tokens[:, 0]  # repeated tokens
    loss_fn, params, x, y = _nnx_problem(StandardisedTable(nnx.Rngs(0)), tokens, 3)
    rows = jaxdp.clipped_grad(loss_fn, l2_clip_norm=1.0).explain_ghost(params, x, y)
    assert next(r for r in rows if "table" in r["parameter"])["form"] == "parameter"
    _assert_ghost_equals_vmap(loss_fn, params, x, y, jnp.ones((6,)).at[3].set(0.0))


# -- mixed precision: a model computed in bfloat16 / float16 from float32 parameters ----------------


def _in(dtype, loss_fn):
    """``loss_fn`` computed in ``dtype`` from float32 parameters and inputs (each cast on the way in), its loss in
    float32: mixed precision as a config's ``model.dtype`` sets it up."""

    def cast(v):
        return v.astype(dtype) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v

    def loss(p, *args):
        args = [jax.tree_util.tree_map(cast, a) for a in args]
        return loss_fn(jax.tree_util.tree_map(cast, p), *args).astype(jnp.float32)

    return loss


def _problem_in(dtype, name):
    loss_fn, params, x, y = _ws_problem(name) if name in ("wrn", "gn_cnn", "dense") else problem(name)
    return _in(dtype, loss_fn), params, x, y


# The vmap path's per-example gradients are the model's own low-precision products (rounded to bfloat16 or
# float16); ghost's are formed from the same recorded values in float32: they agree to the low precision.
MIXED_TOL = {jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


@pytest.mark.parametrize(
    "dtype,name",
    [(jnp.bfloat16, n) for n in [*PROBLEMS, "gn_cnn", "dense"]]
    + [pytest.param(jnp.bfloat16, "wrn", marks=pytest.mark.slow)]
    + [(jnp.float16, n) for n in ["mlp", "dp_mnist_cnn", "transformer", "dense"]],
)
def test_mixed_precision_on_ghost_equals_vmap_with_masks(dtype, name):
    """bfloat16 / float16 models: ghost covers them, and its clipped sum and norms equal the vmap path's to
    that precision; a masked example (NaN input) contributes nothing."""
    loss_fn, params, x, y = _problem_in(dtype, name)
    n = x.shape[0]
    mask = jnp.ones((n,)).at[1].set(0.0)
    x = x.at[1].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x
    assert jaxdp.clipped_grad(loss_fn, l2_clip_norm=0.5).ghost_coverage(params, x, y) is None
    g_vmap, a_vmap = _run(loss_fn, params, x, y, mask, "vmap")
    g_ghost, a_ghost = _run(loss_fn, params, x, y, mask, "ghost")
    tol = MIXED_TOL[dtype]
    # Relative to the largest entry anywhere: a bias before a normalisation has a zero gradient, and both
    # paths give it rounding noise.
    scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree_util.tree_leaves(g_vmap))
    tree_allclose(g_ghost, g_vmap, rtol=tol, atol=tol * scale)
    keep = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(a_ghost.norms)[keep], np.asarray(a_vmap.norms)[keep], rtol=tol / 4)
    assert int(a_ghost.num_clipped) == int(a_vmap.num_clipped) > 0
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(g_ghost))


def _mixed_dense_reference(w, b, x, t, dtype, clip):
    """The clipped sum, one example at a time in float64, of each example's gradient formed from the values the
    low-precision model records: its input X and output gradient G (both in ``dtype``), X^T G and sum_t G."""
    total_w, total_b, norms = np.zeros(w.shape), np.zeros(b.shape), []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].astype(dtype)

        def loss_of_y(y, i=i):
            return jnp.sum((y.astype(jnp.float32) - t[i : i + 1]) ** 2)

        y = xi @ w.astype(dtype) + b.astype(dtype)
        g = np.asarray(jax.grad(loss_of_y)(y)[0], np.float64)  # (T, d_out), in dtype
        gw, gb = np.asarray(xi[0], np.float64).T @ g, g.sum(0)
        norm = math.sqrt(float(np.sum(gw**2) + np.sum(gb**2)))
        norms.append(norm)
        f = min(1.0, clip / norm)
        total_w, total_b = total_w + f * gw, total_b + f * gb
    return total_w, total_b, np.asarray(norms)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("width", [32, 4])  # T = 3 positions: 32 -> the Gram form, 4 -> the direct one
def test_mixed_precision_ghost_equals_the_float32_products_of_its_recorded_values(dtype, width):
    """Ghost's clipped sum is formed in float32 from the low-precision values (not rounded to bfloat16 again,
    as a bfloat16 weighted backward or sum would be): it equals a float64 loop over examples to float32
    rounding, 100x closer than the low precision's own rounding."""
    rng = np.random.default_rng(3)
    # Small integers and quarters: the low-precision forward is exact however XLA sums it, so the loop sees
    # the very output gradients the model records (random floats gave outputs 1 ulp apart in another order).
    w = jnp.asarray(rng.integers(-1, 2, size=(width, width)) / 4, jnp.float32)
    b = jnp.asarray(rng.integers(-2, 3, size=(width,)) / 4, jnp.float32)
    x = jnp.asarray(rng.integers(-2, 3, size=(8, 3, width)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(8, 3, width)) * 4, jnp.float32)

    def loss(p, x, t):
        y = x.astype(dtype) @ p["w"].astype(dtype) + p["b"].astype(dtype)
        return jnp.sum((y.astype(jnp.float32) - t) ** 2)

    want_w, want_b, norms = _mixed_dense_reference(w, b, x, t, dtype, clip=1.0)
    assert sum(norms > 1.0) > 0
    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="ghost", return_norms=True)
    got, aux = jax.jit(fn)({"w": w, "b": b}, x, t)
    np.testing.assert_allclose(np.asarray(aux.norms), norms, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["w"]), want_w, rtol=1e-4, atol=1e-5 * np.max(np.abs(want_w)))
    np.testing.assert_allclose(np.asarray(got["b"]), want_b, rtol=1e-4, atol=1e-5 * np.max(np.abs(want_b)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("width", [32, 4])
@pytest.mark.parametrize("impl", ["ghost", "vmap"])
def test_mixed_precision_contributions_stay_within_the_bound_under_cancellation(dtype, width, impl):
    """The float32 cancellation case computed in bfloat16 / float16: the Gram terms cancel, the chunk takes each
    example's own gradient, and no example contributes more than C on either path (measured in float64)."""
    loss, w, x, t = _cancelling_dense(1e4 if dtype == jnp.bfloat16 else 1e2, n=16, width=width)
    fn = jaxdp.clipped_grad(_in(dtype, loss), l2_clip_norm=1.0, clipping_impl=impl)
    got = _contributions(fn, w, x, t, n=16)
    assert 0.99 < max(got) <= 1.0 + 1e-7  # clipped examples, none above C
    assert int(jax.jit(fn)(w, x, t)[1].num_nonfinite) == 0  # nothing dropped


@pytest.mark.parametrize("direction", ["ones", "kernel"])
def test_mixed_precision_standardised_gradients_stay_within_the_bound(direction):
    """The standardisation's Jacobian removes a huge gradient along 1 or w'_0, in a bfloat16 model: ghost takes the
    Jacobian of the standardisation computed in float32 (the output it needs formed from that float32 W', not
    the model's bfloat16 output) and no example contributes more than C."""
    n = 8
    args = _projected_away(direction, 1e4, n)
    for impl in ("ghost", "vmap"):
        fn = jaxdp.clipped_grad(_in(jnp.bfloat16, _standardised_dense_loss()), l2_clip_norm=1.0, clipping_impl=impl)
        assert max(_contributions(fn, *args, n=n)) <= 1.0 + 1e-7, impl


def test_a_mixed_precision_site_is_bounded_at_float32():
    """The values are bfloat16, but every product ghost forms from them runs in float32: its rounding is float32's."""
    loss, w, x, t = _cancelling_dense(1.0, n=2)
    _, sites, _ = ghost.analyse(_in(jnp.bfloat16, loss), w, (jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t[0]))
    (site,) = sites
    assert site.out_dtype == jnp.bfloat16 and ghost._narrow(site)
    assert ghost.site_roundoff(site, w) == float(jnp.finfo(jnp.float32).eps) / 2


@pytest.mark.parametrize("per_layer", [False, True])
def test_mixed_precision_norm_and_sum_read_the_same_recorded_values(per_layer):
    """Review: XLA (excess precision allowed, its default) fed the weighted backward an unrounded float32 input
    where the Gram norm read the bfloat16-rounded one: a bfloat16 embedding -> dense -> gelu -> dense model
    contributed 1.00015 C (per layer: 1.00096 of the leaf's budget). Both now read one widened copy."""
    rng = np.random.default_rng(0)
    n, t, v, d = 8, 6, 50, 16
    params = {
        "emb": jnp.full((v, d), 1.0039, jnp.float32),  # rounds to 1.0 in bfloat16
        "w1": jnp.asarray(rng.normal(size=(d, 64)) / 4, jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(64, 10)) / 8, jnp.float32),
    }
    idx = jnp.asarray(rng.integers(0, v, size=(n, t)), jnp.int32)
    target = jnp.asarray(rng.normal(size=(n, t, 10)) * 50, jnp.float32)

    def loss(p, i, target):
        h = jax.nn.gelu(p["emb"][i] @ p["w1"] + p["b1"])
        return jnp.sum(((h @ p["w2"]).astype(jnp.float32) - target) ** 2)

    fn = jaxdp.clipped_grad(_in(jnp.bfloat16, loss), l2_clip_norm=1.0, clipping_impl="ghost", per_layer=per_layer)
    if not per_layer:
        assert max(_contributions(fn, params, idx, target, n=n)) <= 1.0 + 1e-7
        return
    call = jax.jit(lambda m: fn(params, idx, target, example_mask=m)[0])
    budget = 1.0 / math.sqrt(len(params))
    for i in range(n):
        for name, g in call(jnp.zeros((n,)).at[i].set(1.0)).items():
            assert float(np.linalg.norm(np.asarray(g, np.float64))) <= budget * (1 + 1e-7), (i, name)


@pytest.mark.parametrize("dtype,clip", [(jnp.bfloat16, 1.0041), (jnp.float16, 1.0005)])
def test_parameters_stored_in_low_precision_are_summed_in_float32(dtype, clip):
    """Review: a bfloat16 / float16 parameter (no float32 copy) had its clipped sum rounded back to its dtype after
    the factor was set: 1.0037 C (Gram form), 1.0013 C (embedding table); a bfloat16 bias crashed ghost. C is not
    a number of that dtype, so a rounded contribution would land above it."""
    n, d = 4, 32
    x = jnp.zeros((n, 1, d), dtype).at[:, 0, 0].set(1.0)  # T = 1: the Gram form
    t = jnp.zeros((n, 1, d), jnp.float32).at[:, 0, 0].set(jnp.asarray([3.0, 7.0, 11.0, 50.0]))

    def dense(p, x, t):
        return 0.5 * jnp.sum(((x @ p["w"] + p["b"]).astype(jnp.float32) - t) ** 2)

    idx = jnp.zeros((n, 2), jnp.int32).at[:, 1].set(5)

    def embedding(table, i, t):
        return 0.5 * jnp.sum((table[i].astype(jnp.float32) - t[:, :, :8]) ** 2)

    params = {"w": jnp.zeros((d, d), dtype), "b": jnp.zeros((d,), dtype)}
    for loss, p, a in ((dense, params, x), (embedding, jnp.zeros((64, 8), dtype), idx)):
        (g_v, a_v), (g_g, a_g) = (
            jax.jit(jaxdp.clipped_grad(loss, l2_clip_norm=clip, clipping_impl=impl))(p, a, t)
            for impl in ("vmap", "ghost")
        )
        assert int(a_g.num_clipped) == int(a_v.num_clipped) > 0
        scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree_util.tree_leaves(g_v))
        tree_allclose(g_g, g_v, rtol=1e-2, atol=1e-2 * scale)
        fn = jaxdp.clipped_grad(loss, l2_clip_norm=clip, clipping_impl="ghost")
        assert max(_contributions(fn, p, a, t, n=n)) <= clip * (1 + 1e-7)


def test_a_standardised_kernel_is_differentiated_at_the_models_rounded_point():
    """Review: kernel 1000 + 0.05 noise in a bfloat16 model. Rounding flattens it, and the model standardises the
    flattened kernel; ghost standardised the unrounded one, and its sum differed from vmap's by 93% of the largest
    entry (both within C). The wide chain now takes the rounded value with the identity's derivative."""
    rng = np.random.default_rng(1)
    n = 8
    w = jnp.asarray(1000 + rng.normal(size=(48, 40)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, 2, 48)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(n, 2, 40)), jnp.float32)

    def loss(w, x, t):
        return jnp.sum((x @ weight_standardize(w)).astype(jnp.float32) * t)

    g_v, g_g = (
        jax.jit(jaxdp.clipped_grad(_in(jnp.bfloat16, loss), l2_clip_norm=1e6, clipping_impl=impl))(w, x, t)[0]
        for impl in ("vmap", "ghost")
    )
    np.testing.assert_allclose(np.asarray(g_g), np.asarray(g_v), atol=1e-2 * float(jnp.max(jnp.abs(g_v))))


@pytest.mark.parametrize("impl", ["vmap", "ghost"])
def test_the_sum_of_many_leaves_norms_is_bounded(impl):
    """Review, both paths: the leaves' squared norms were added in float32 with no slack. One leaf with norm 1 and
    300 scalar leaves whose squares fall just under half an ulp of 1 each rounded away: 1.000009 C (1.00006 C at
    2,000 leaves). The total now carries gamma_K."""
    k, n = 300, 2
    names = ["a"] + [f"b{i:05d}" for i in range(k)]
    params = {name: jnp.zeros((), jnp.float32) for name in names}
    row = np.full((k + 1,), np.float32(2.0**-12 * (1 - 2.0**-20)), np.float32)
    row[0] = 1.0
    x = jnp.asarray(np.stack([row] * n))

    def loss(p, x):
        return sum(p[name] * x[:, j] for j, name in enumerate(names)).sum()

    fn = jaxdp.clipped_grad(loss, l2_clip_norm=0.5, clipping_impl=impl)
    assert max(_contributions(fn, params, x, n=n)) <= 0.5 * (1 + 1e-7)


def test_the_vmap_paths_own_sum_of_squares_is_bounded():
    """Review: vmap's per-example norm (one float32 reduction) had no slack: 1.00000096 C on a bfloat16 embedding and
    dense layer. It is now summed in two stages with its rounding in the bound, as ghost's direct form is."""
    n, t, v, d, o = 4, 2, 10, 16, 64
    params = {"emb": jnp.full((v, d), 1.0039, jnp.float32), "w": jnp.zeros((d, o), jnp.float32)}
    idx = jnp.asarray(np.arange(n * t).reshape(n, t) % v, jnp.int32)
    target = jnp.asarray(np.random.default_rng(0).normal(size=(n, t, o)) * 100, jnp.float32)

    def loss(p, i, target):
        y = p["emb"].astype(jnp.bfloat16)[i] @ p["w"].astype(jnp.bfloat16)
        return jnp.sum((y.astype(jnp.float32) - target) ** 2)

    fn = jaxdp.clipped_grad(loss, l2_clip_norm=1.0, clipping_impl="vmap")
    assert max(_contributions(fn, params, idx, target, n=n)) <= 1.0 + 1e-7
