"""The README's 'use the primitives in your own step' snippet runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_snippet_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"<!-- tested: primitives -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its tested primitives snippet"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 25
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    params = namespace["params"]
    # One private step moved the parameters away from their zero init.
    assert float(abs(params["w"]).sum()) > 0


def test_readme_own_loop_runs_and_spends_the_planned_budget(capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"<!-- tested: loop -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its tested own-loop snippet"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    accountant, plan, state = namespace["accountant"], namespace["plan"], namespace["state"]
    assert accountant.steps == plan.num_steps == int(state.step) == 50
    assert accountant.epsilon(1e-5) <= 3.0
    out = capsys.readouterr().out
    assert "epsilon = 3.00 after 50 steps" in out, out


def test_readme_nnx_tutorial_block_trains_privately(capsys):
    """The Flax NNX MNIST tutorial made private: one accounted step per Poisson draw, the plan's ε, and a
    model that learned something (test accuracy well above the 10% of chance)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"<!-- tested: nnx -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its tested Flax NNX tutorial block"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    accountant, plan, metrics = namespace["accountant"], namespace["plan"], namespace["metrics"]
    assert accountant.steps == plan.num_steps == 100
    assert accountant.epsilon(1e-5) <= 4.0
    assert float(metrics.compute()["accuracy"]) > 0.25
    out = capsys.readouterr().out
    assert "at epsilon = 4.00" in out, out
