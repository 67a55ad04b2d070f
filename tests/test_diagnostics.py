"""gradient_norm_stats (jaxdp/clipping/diagnostics.py) against NumPy."""

import math

import jax
import numpy as np
import pytest

import jaxdp


def test_gradient_norm_stats_against_numpy():
    rng = np.random.default_rng(0)
    norms = rng.gamma(2.0, 1.0, size=200).astype(np.float32)
    norms[[3, 50]] = np.inf  # non-finite gradients are dropped by clipped_grad: not counted
    norms[7] = np.nan
    mask = (rng.random(200) < 0.8).astype(np.float32)
    clip = 1.5
    keep = (mask > 0) & np.isfinite(norms)
    kept = norms[keep].astype(np.float64)
    got = jax.jit(lambda n, m: jaxdp.gradient_norm_stats(n, m, l2_clip_norm=clip, quantiles=(0.1, 0.5, 0.9)))(
        norms, mask
    )
    assert int(got["examples"]) == keep.sum()
    np.testing.assert_allclose(float(got["grad_norm_mean"]), kept.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(got["clip_bias_bound"]), np.maximum(kept - clip, 0).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(got["fraction_clipped"]), (kept > clip).mean(), rtol=1e-6)
    for q in (10, 50, 90):
        np.testing.assert_allclose(float(got[f"grad_norm_q{q}"]), np.quantile(kept, q / 100), rtol=1e-5)
    # The bias bound bounds what clipping moves the mean by (here on real per-example gradients).
    g = rng.normal(size=(50, 4)) * rng.gamma(2.0, 1.0, size=(50, 1))
    n = np.linalg.norm(g, axis=1)
    clipped = g * np.minimum(1.0, clip / n)[:, None]
    bound = float(jaxdp.gradient_norm_stats(n, np.ones(50), l2_clip_norm=clip)["clip_bias_bound"])
    assert np.linalg.norm(g.mean(0) - clipped.mean(0)) <= bound + 1e-6
    empty = jaxdp.gradient_norm_stats(norms, np.zeros(200), l2_clip_norm=clip)
    assert int(empty["examples"]) == 0 and math.isnan(float(empty["grad_norm_mean"]))
    with pytest.raises(ValueError, match="l2_clip_norm=0"):
        jaxdp.gradient_norm_stats(norms, mask, l2_clip_norm=0)
    for bad in ((0.995, 0.995), (0.5, 1.5), (-0.1,)):
        with pytest.raises(ValueError, match="quantiles="):
            jaxdp.gradient_norm_stats(norms, mask, l2_clip_norm=clip, quantiles=bad)
    assert "grad_norm_q99.5" in jaxdp.gradient_norm_stats(norms, mask, l2_clip_norm=clip, quantiles=(0.995, 1.0))
