"""The benchmarks' one timer: blocks interleaved, sized from one timed call, medians; bad arguments refused."""

import pytest

from jaxdp.bench import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fn(clock, log, name, seconds):
    def fn():
        log.append(name)
        clock.now += seconds
        return None

    return fn


def test_blocks_alternate_after_one_warmup_each(monkeypatch):
    clock, log = FakeClock(), []
    monkeypatch.setattr(timing, "perf_counter", clock)
    fns = {"a": _fn(clock, log, "a", 0.1), "b": _fn(clock, log, "b", 0.3)}
    t = timing.time_interleaved(fns, 3, iters={"a": 2, "b": 1})
    assert log == ["a", "b"] + ["a", "a", "b"] * 3
    assert t["a"].seconds == pytest.approx(0.1) and t["b"].seconds == pytest.approx(0.3)
    assert (t["a"].iters, t["b"].iters) == (2, 1)


def test_block_sized_from_one_timed_call_and_median_of_blocks(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "perf_counter", clock)
    durations = iter([0.1] * 5 + [1.0] + [0.1] * 100)  # the sizing call, block 1 (4 calls), then a slow call

    def fn():
        clock.now += next(durations)

    t = timing.time_interleaved({"f": fn}, 3, block_s=0.35, warmup=False)["f"]
    assert t.iters == 4  # ceil(0.35 / 0.1)
    assert t.seconds == pytest.approx(0.1) and t.min_s == pytest.approx(0.1)
    assert t.max_s == pytest.approx((1.0 + 3 * 0.1) / 4)  # the slow block is counted, not the median
    assert timing.time_per_call(lambda: None, 1, 1) >= 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"repeats": 0}, r"repeats=0 must be an int >= 1"),
        ({"repeats": 1, "iters": 0}, r"iters for 'f' is 0"),
        ({"repeats": 1, "iters": {"g": 1}}, r"iters for 'f' is None"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timing.time_interleaved({"f": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="no functions"):
        timing.time_interleaved({}, 1)
