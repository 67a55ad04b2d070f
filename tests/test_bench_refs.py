"""The benchmark's reference implementations compute what jaxdp computes (same model, same clipped sum).

The jax_privacy and Opacus checks need the optional ``bench`` extra and are
skipped without it (CI does not install it); the error-message and optax checks
always run.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdp
from jaxdp.bench import refs
from jaxdp.bench.models import MODELS, param_count, random_batch
from jaxdp.models import WideResNet
from jaxdp.train import classification_loss

CLIP = 0.5  # small enough that most examples are clipped (checked below)


def _problem(model_name, batch=6):
    if model_name == "mnist_cnn":
        shape, model = MODELS["mnist_cnn"].input_shape, MODELS["mnist_cnn"].build(0)
    else:  # a tiny WRN: same blocks (GroupNorm, weight-standardised convs, strided shortcuts), cheap
        shape, model = (8, 8, 3), WideResNet((8, 8, 3), 10, depth=10, width=1, groups=4, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = random_batch(shape, 10, batch, seed=1)
    return classification_loss(graphdef, rest), params, jnp.asarray(x), jnp.asarray(y)


def _jaxdp_sum(loss_fn, params, x, y):
    g, aux = jaxdp.clipped_grad(loss_fn, l2_clip_norm=CLIP, return_norms=True)(params, x, y)
    assert int(jnp.sum(aux.norms > CLIP)) >= 2, "the check should exercise clipping"
    return g


def _assert_trees_close(a, b):
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6), a, b)


@pytest.mark.parametrize("name", ["jax_privacy", "opacus"])
def test_missing_package_is_a_clear_import_error(monkeypatch, name):
    for module in ("jax_privacy", "opacus"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'jaxdp\[bench\]'"):
        refs.REFERENCES[name]("mnist_cnn", 4, 1)


def test_an_unknown_opacus_mode_is_named():
    with pytest.raises(ValueError, match="mode='ew'.*'hooks' or 'ghost'"):
        refs.build_opacus("mnist_cnn", 4, mode="ew")


def test_unknown_and_pending_models_are_named():
    with pytest.raises(ValueError, match="model_name='resnet50'.*mnist_cnn"):
        refs.REFERENCES["optax"]("resnet50", 4, 1)
    with pytest.raises(NotImplementedError, match="TransformerClassifier"):
        refs.REFERENCES["optax"]("transformer", 4, 1)
    with pytest.raises(ValueError, match="model_name='mlp' has no PyTorch twin.*mnist_cnn, wrn16_4"):
        refs.REFERENCES["optax"]("mlp", 4, 1)


@pytest.mark.slow  # ~13 s of timing (CI's slow step)
def test_jaxdp_and_optax_runners_time_the_same_model():
    """jaxdp's own runner (run_private_step) and the optax reference run on the same model and report ex/s."""
    ours, theirs = refs.jaxdp_private("mnist_cnn", 4, 1), refs.REFERENCES["optax"]("mnist_cnn", 4, 1)
    assert ours["params"] == theirs["params"] == 26010
    assert ours["ex_per_s"] > 0 and theirs["ex_per_s"] > 0 and ours["compile_s"] > 0
    assert "run_private_step" in ours["notes"] and "differentially_private_aggregate" in theirs["notes"]


@pytest.mark.slow  # ~22 s: compiles optax's per-example aggregator on the MNIST CNN (CI's slow step)
def test_optax_aggregator_without_noise_is_jaxdp_clipped_mean():
    loss_fn, params, x, y = _problem("mnist_cnn")
    per_example = jax.vmap(jax.grad(lambda p, xi, yi: loss_fn(p, xi[None], yi[None])), in_axes=(None, 0, 0))(
        params, x, y
    )
    tx = optax.contrib.differentially_private_aggregate(CLIP, 0.0, key=jax.random.key(0))
    mean, _ = tx.update(per_example, tx.init(params))
    _assert_trees_close(jax.tree_util.tree_map(lambda g: g * len(x), mean), _jaxdp_sum(loss_fn, params, x, y))


@pytest.mark.parametrize("model_name", ["mnist_cnn", "tiny_wrn"])
@pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning")  # inside jax_privacy 2.0.0
def test_jax_privacy_clipped_sum_equals_jaxdp(model_name):
    jax_privacy = pytest.importorskip("jax_privacy")
    loss_fn, params, x, y = _problem(model_name)
    theirs = jax_privacy.clipped_grad(loss_fn, l2_clip_norm=CLIP, batch_argnums=(1, 2))(params, x, y)
    _assert_trees_close(theirs, _jaxdp_sum(loss_fn, params, x, y))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("model_name", ["mnist_cnn", "tiny_wrn"])
@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_opacus_twin_clipped_sum_equals_jaxdp(model_name, mode):
    """Opacus on the PyTorch twin (hook or ghost mode), σ = 0 and lr = 1: the parameter change is
    -(clipped sum) / batch."""
    torch = pytest.importorskip("torch")
    opacus = pytest.importorskip("opacus")
    from jaxdp.bench import torch_ref

    loss_fn, params, x, y = _problem(model_name)
    if model_name == "mnist_cnn":
        twin = torch_ref.make("mnist_cnn")
    else:
        twin = torch_ref.WideResNet(3, 10, depth=10, width=1, groups=4)
    assert sum(p.numel() for p in twin.parameters()) == param_count(params)
    torch_ref.load_flax(twin, params)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(np.asarray(y).astype(np.int64))
    before = {k: v.detach().clone() for k, v in twin.named_parameters()}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=len(xt))
    made = opacus.PrivacyEngine().make_private(
        module=twin,
        optimizer=torch.optim.SGD(twin.parameters(), lr=1.0),
        data_loader=loader,
        criterion=torch.nn.CrossEntropyLoss(),
        noise_multiplier=0.0,
        max_grad_norm=CLIP,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    model, optimizer = made[0], made[1]
    criterion = made[2] if mode == "ghost" else torch.nn.CrossEntropyLoss()
    criterion(model(xt), yt).backward()
    optimizer.step()
    after = dict(twin.named_parameters())
    theirs = {k: ((before[k] - after[k].detach()) * len(xt)).numpy() for k in before}

    ours = {
        ".".join(str(p) for p in path).replace("kernel", "weight").replace("scale", "weight"): np.asarray(v[...])
        for path, v in nnx.to_flat_state(_jaxdp_sum(loss_fn, params, x, y))
    }
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else (v.T if v.ndim == 2 else v)
        np.testing.assert_allclose(theirs[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
