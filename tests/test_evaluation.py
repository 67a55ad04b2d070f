"""jaxdp.train.evaluation: accuracy in fixed-shape batches."""

import numpy as np
import pytest

from jaxdp.train import evaluate


def test_accuracy_over_a_padded_last_batch_compiles_one_shape():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    shapes = set()

    def predict(params, xb):
        shapes.add(xb.shape)
        return (xb[:, 0] > params).astype(np.int32)

    assert evaluate(predict, 0.0, x, y, batch=4) == 1.0
    assert shapes == {(4, 3)}  # 10 = 4 + 4 + 2 padded to 4
    flipped = 1 - y
    assert evaluate(predict, 0.0, x, flipped, batch=4) == 0.0
    assert evaluate(predict, 0.0, x, np.where(np.arange(10) < 5, y, flipped), batch=4) == 0.5


def test_empty_or_mismatched_sets_are_refused():
    with pytest.raises(ValueError, match="no examples"):
        evaluate(lambda p, x: x, None, np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="3 examples but y has 2 labels"):
        evaluate(lambda p, x: x, None, np.zeros((3, 2)), np.zeros(2))
