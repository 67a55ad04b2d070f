"""jaxdp.audit.guesses: the guesses both one-run tests make, and the input rules they share."""

import math

import numpy as np
import pytest

from jaxdp import rules
from jaxdp.audit.guesses import check_confidence, check_counts, check_statistic_delta, guess_counts_and_correct


def test_guesses_take_the_top_in_and_the_bottom_out():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, True, False])
    m, tried = guess_counts_and_correct(scores, included, (1 / 3, 2 / 3, 1.0))
    # k = 1: index 0 "in" (right), index 5 "out" (right); k = 2: 0, 1 in (1 right), 4, 5 out (1 right); k = 3.
    assert m == 6 and tried == [(2, 2), (4, 2), (6, 4)]
    # Fractions that round to the same k are tried once; k is at least 1 and at most m // 2.
    assert guess_counts_and_correct(scores, included, (0.01, 0.02, 1.0))[1] == [(2, 2), (6, 4)]


def test_ties_are_broken_by_index_never_by_membership():
    # Equal scores: the top k are the first k indices and the bottom k the last k, whatever the coin flips.
    included = np.array([False, False, True, True])
    assert guess_counts_and_correct(np.zeros(4), included, (0.5,)) == (4, [(2, 0)])
    assert guess_counts_and_correct(np.zeros(4), ~included, (0.5,)) == (4, [(2, 2)])


@pytest.mark.parametrize(
    "scores, included, fractions, message",
    [
        (np.zeros(4), np.zeros(3, bool), (0.5,), "same length m"),
        (np.zeros((2, 2)), np.zeros((2, 2), bool), (0.5,), "must be 1-D"),
        (np.array([0.0, np.nan]), np.zeros(2, bool), (0.5,), "NaN or inf"),
        (np.zeros(4), np.zeros(4, bool), (), "guess_fractions=()"),
        (np.zeros(4), np.zeros(4, bool), (1.5,), "guess_fractions=(1.5,)"),
        (np.zeros(1), np.zeros(1, bool), (0.5,), "at least 2"),
    ],
)
def test_bad_scores_are_refused(scores, included, fractions, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        guess_counts_and_correct(scores, included, fractions)


def test_counts():
    assert check_counts(10, np.int64(4), 3) == (10, 4, 3)
    for args, message in [
        ((10, 4, 5), "num_correct <= num_guesses"),
        ((3, 4, 1), "num_guesses <= num_canaries"),
        ((10, 4, -1), "num_correct=-1 must be an int >= 0"),
        ((10.0, 4, 1), "num_canaries=10.0 must be an int >= 0"),
        ((True, 1, 1), "num_canaries=True must be an int >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_counts(*args)


def test_confidence_names_the_caller():
    assert check_confidence(0.95) == 0.95
    for bad in (0, 1, 1.5, -0.1, math.nan, "x", None):
        with pytest.raises(ValueError, match=r"^confidence=.* must lie in \(0, 1\), e.g. 0.95.$"):
            check_confidence(bad)
    with pytest.raises(ValueError, match=r"^--confidence=1.5 must lie in \(0, 1\)"):
        check_confidence(1.5, "--confidence")


def test_statistic_delta_is_zero_or_the_delta_rule():
    assert check_statistic_delta(0) == 0.0 and check_statistic_delta(0.0) == 0.0 and check_statistic_delta(1e-5) == 1e-5
    for bad in (1.0, 1.5, -1e-5, math.nan, True, "0"):
        with pytest.raises(ValueError) as e:
            check_statistic_delta(bad)
        with pytest.raises(ValueError) as want:
            rules.check_delta(bad)
        assert str(e.value) == str(want.value)  # one rule, one message
