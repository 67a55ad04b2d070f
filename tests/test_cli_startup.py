"""The command line answers help and bad arguments without importing JAX; the package face is lazy; ``jaxdp
account --epochs`` counts the steps ``jaxdp train`` runs.

Nothing here times anything: start-up is checked by what a call imports (``sys.modules`` afterwards).
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "optax", "flax", "tensorflow_datasets", "tensorflow", "dp_accounting", "orbax")

# Runs main() as the console script does (argv from the command line, SystemExit caught), then prints the exit
# code and the heavy modules that got imported, as JSON on the last line of stdout.
_PROBE = f"""
import json, sys
from jaxdp.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps([code, sorted(m for m in {HEAVY!r} if m in sys.modules)]))
"""


def _probe(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.stdout.strip(), out.stderr
    code, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    return {"code": code, "heavy": heavy, "stderr": out.stderr}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["account", "--help"],
        ["bench", "--help"],
        ["data", "prepare", "--help"],
        ["audit", "--help"],
    ],
)
def test_help_imports_nothing_heavy(argv):
    result = _probe(*argv)
    assert result["code"] == 0, result["stderr"]
    assert result["heavy"] == [], f"`jaxdp {' '.join(argv)}` imported {result['heavy']}"


@pytest.mark.parametrize(
    "argv",
    [
        ["trian"],  # argparse: unknown command
        ["train"],  # argparse: --config missing
        ["train", "--config", "configs/digits.py", "--bogus"],
        ["train", "--config", "no_such_config.py"],
        ["train", "--config", "configs/digits.py:big"],
        ["train", "--config", "configs/digits.py", "no_such_key=1"],
        ["account", "--sampling-rate", "2", "--noise-multiplier", "1", "--steps", "10"],
        ["account", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--epochs", "1.5"],
        ["account", "--sampling-rate", "0.01", "--noise-multiplier", "1", "--steps", "10", "--delta", "0.5"],
    ],
)
def test_bad_arguments_are_answered_without_importing_jax(argv):
    result = _probe(*argv)
    assert result["code"] == 2, result
    assert re.match(r"jaxdp( \w+)*: error: ", result["stderr"].strip().splitlines()[-1]), result["stderr"]
    assert result["heavy"] == [], f"`jaxdp {' '.join(argv)}` imported {result['heavy']}"


def test_import_jaxdp_and_config_are_light():
    code = f"import sys, jaxdp, jaxdp.config; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_public_name_resolves_and_is_listed():
    code = """
import jaxdp
names = set(dir(jaxdp))
missing = [n for n in jaxdp.__all__ if n not in names]
from jaxdp import clipped_grad, PrivacyPlan
import jaxdp.plan, jaxdp.clipping
assert clipped_grad is jaxdp.clipping.clipped_grad and jaxdp.PrivacyPlan is PrivacyPlan is jaxdp.plan.PrivacyPlan
assert jaxdp.rules.__name__ == "jaxdp.rules" and jaxdp.accounting.__name__ == "jaxdp.accounting"
unresolved = [n for n in jaxdp.__all__ if getattr(jaxdp, n, None) is None]
try:
    jaxdp.no_such_name
    raised = False
except AttributeError as e:
    raised = "no_such_name" in str(e)
print(missing, unresolved, raised)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]", "True"], out.stdout


def test_type_checking_imports_match_the_lazy_table():
    """What IDEs and type checkers see (the ``if TYPE_CHECKING:`` imports) is what ``__getattr__`` returns."""
    import jaxdp

    with open(jaxdp.__file__) as f:
        tree = ast.parse(f.read())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {}
    for node in ast.walk(block):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                seen[alias.name] = node.module if node.module != "jaxdp" else f"jaxdp.{alias.name}"
    lazy = dict(jaxdp._HOMES, rules="jaxdp.rules")
    assert seen == lazy
    assert set(seen) == set(jaxdp.__all__)


# --- jaxdp account --epochs: the steps jaxdp train runs ----------------------------------------------------------


def _account(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxdp.cli", "account", "--noise-multiplier", "1.1", "--accountants", "rdp", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def _train_steps(dataset_size: int, batch_size: int, epochs: int) -> int:
    """The steps `jaxdp train epochs=K` plans, by the trainer's own rule."""
    from jaxdp.config import apply_overrides, load_config
    from jaxdp.train.setup import run_steps_per_epoch

    config = apply_overrides(
        load_config(os.path.join(ROOT, "configs", "digits.py")), [f"batch_size={batch_size}", f"epochs={epochs}"]
    )
    return config.epochs * run_steps_per_epoch(config, dataset_size)


@pytest.mark.parametrize(
    "rate_args",
    [
        ["--sampling-rate", "0.0042666667"],  # README's q = 256/60000
        ["--batch-size", "256", "--dataset-size", "60000"],
    ],
)
def test_account_epochs_are_the_steps_train_runs_and_say_so(rate_args):
    """60 epochs of q = 256/60000 are 60 x 234 = 14,040 steps in jaxdp train (not 60 x 234.375 = 14,062);
    account reports the same count, with the epochs and steps per epoch, in the JSON and in the header."""
    expected = _train_steps(60000, 256, 60)
    assert expected == 14040
    out = _account(*rate_args, "--epochs", "60", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["steps"], result["epochs"], result["steps_per_epoch"]) == (expected, 60, 234)
    out = _account(*rate_args, "--epochs", "60")
    header = out.stdout.splitlines()[0]
    assert "steps=14040 = 60 epochs x 234 steps" in header and "as jaxdp train" in header, header


def test_account_steps_given_directly_have_no_epochs():
    out = _account("--sampling-rate", "0.0042666667", "--steps", "14062", "--json")
    result = json.loads(out.stdout)
    assert (result["steps"], result["epochs"], result["steps_per_epoch"]) == (14062, None, None)


def test_account_partial_epochs_are_refused_with_the_steps_to_use():
    """jaxdp train runs whole epochs (epochs is an int >= 1): --epochs 1.5 used to account for 351 steps that no
    training run takes. Now it is one line naming the value and both fixes."""
    out = _account("--sampling-rate", "0.0042666667", "--epochs", "1.5")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("jaxdp: error: --epochs=1.5 is not a whole number of epochs")
    assert "--epochs 2" in line and "--steps 351" in line, line
