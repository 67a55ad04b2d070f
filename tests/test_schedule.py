"""jaxdp.schedule.after: when a computation runs, never what it computes."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.schedule import after


def _fn(a, b):
    return {"sum": a + b, "prod": a * jnp.sum(b)}


def test_after_computes_fn_whatever_the_arrays_hold():
    a, b = jnp.arange(4.0), jnp.ones(4) * 0.5
    want = _fn(a, b)
    for arrays in ([jnp.ones(3)], [jnp.full(3, jnp.nan)], [jnp.zeros(2), jnp.asarray([jnp.inf])], [jnp.zeros(0)]):
        for got in (after(arrays, _fn, a, b), jax.jit(lambda *arr: after(arr, _fn, a, b))(*arrays)):
            for k in want:
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    complex_arrays = [jnp.asarray([1 + 2j, jnp.nan], jnp.complex64), jnp.ones(2, jnp.bfloat16)]
    np.testing.assert_array_equal(after(complex_arrays, _fn, a, b)["sum"], want["sum"])


def test_after_waits_on_one_value_of_each_nonempty_array():
    """The result comes out of a cond whose predicate reads the arrays (so it cannot run before they exist);
    with only empty arrays there is nothing to wait for and no cond."""
    a, b = jnp.arange(4.0), jnp.ones(4)

    def eqns(*arrays):
        return jax.make_jaxpr(lambda *arr: after(arr, _fn, a, b))(*arrays).eqns

    conds = [e for e in eqns(jnp.ones((2, 3)), jnp.zeros(0), jnp.ones(5)) if e.primitive.name == "cond"]
    assert len(conds) == 1
    branches = conds[0].params["branches"]
    assert len(branches) == 2 and str(branches[0]) == str(branches[1])  # the same computation either way
    jaxpr = jax.make_jaxpr(lambda x, y: after([x, y], _fn, a, b))(jnp.ones(3), jnp.ones(2))
    (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    # The predicate is computed from the arrays: follow it back to the jaxpr's inputs.
    need = {cond.invars[0]}
    for e in reversed(jaxpr.eqns):
        if any(v in need for v in e.outvars):
            need |= {v for v in e.invars if not hasattr(v, "val")}  # variables, not literals
    used = need & set(jaxpr.jaxpr.invars)
    assert used == set(jaxpr.jaxpr.invars)
    assert not [e for e in eqns(jnp.zeros(0)) if e.primitive.name == "cond"]
