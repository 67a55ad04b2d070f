"""jaxdp.train.callbacks: TrainCallback hooks and the parameter EMA (post-processing of public parameters)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.config import apply_overrides, load_config
from jaxdp.train import ParameterEMA, TrainCallback, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")


def test_ema_is_the_exponential_average_of_the_steps():
    ema = ParameterEMA(0.5)
    for value in (4.0, 2.0, 0.0):
        ema.on_step(1, {"w": jnp.full(2, value)})
    # 4 -> 0.5*4 + 0.5*2 = 3 -> 0.5*3 + 0.5*0 = 1.5
    np.testing.assert_allclose(np.asarray(ema.state_dict()["ema"]["w"]), [1.5, 1.5])
    restored = ParameterEMA(0.5)
    restored.load_state_dict(ema.state_dict())
    restored.on_step(4, {"w": jnp.full(2, 1.5)})
    np.testing.assert_allclose(np.asarray(restored.ema["w"]), [1.5, 1.5])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_ema_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match=f"ema_decay={decay!r} must lie in \\(0, 1\\)"):
        ParameterEMA(decay)


def test_callbacks_see_every_step_and_add_to_the_summary(tmp_path):
    class Recorder(TrainCallback):
        def __init__(self):
            self.steps, self.started = [], False

        def on_start(self, *, predict_logits, dataset, plan):
            self.started = plan.num_steps > 0 and callable(predict_logits)

        def on_step(self, step, params):
            self.steps.append(step)

        def on_end(self, params, workdir):
            return {"recorded_steps": len(self.steps), "not_covered_by_epsilon": ["recorded_steps"]}

    class Diagnostic(TrainCallback):
        def on_end(self, params, workdir):
            return {"probe": 1.0, "not_covered_by_epsilon": ["probe"]}

    rec = Recorder()
    config = apply_overrides(load_config(f"{DIGITS}:smoke"), [f"workdir={tmp_path}", "ema_decay=0.9"])
    summary = train(config, progress=False, callbacks=[rec, Diagnostic()])
    assert rec.started and rec.steps == list(range(1, summary["steps"] + 1))
    assert summary["recorded_steps"] == summary["steps"] and summary["probe"] == 1.0
    # Each callback's diagnostics join the loop's own list (neither replaces the other).
    assert {"loss", "fraction_clipped", "recorded_steps", "probe"} <= set(summary["not_covered_by_epsilon"])
    assert 0 <= summary["ema_test_accuracy"] <= 1 and summary["ema_decay"] == 0.9
