"""Data parallelism with JAX's own sharding: a 1-D mesh over a ``data`` axis.

The batch is sharded over ``data``; parameters and optimizer state (including
the noise key) are replicated. :func:`data_parallel` runs the clipped-gradient
function on each device's own examples under ``jax.shard_map`` and sums the
clipped sums with ``psum``; the noise is then generated once from the
replicated key, so every device holds the *same* noisy update.

Why ``shard_map`` and not jit's automatic partitioning: with jax 0.10.2 on
(forced) CPU devices, auto-partitioning the ``vmap`` of a convolution's gradient
over a sharded batch gave wrong per-example norms (0.37 off on norms of ~1; the
loss was right), i.e. wrong clipping. Each device clipping its own examples
locally has no such cross-device rewrite, and tests/test_distributed.py checks
8 devices against 1.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdp.clipping import ClippedGradAux, ClippedGradFn, batch_argnums

__all__ = ["data_parallel", "initialize", "make_mesh", "place_rows", "replicate", "replicated_sharding", "shard_batch"]

DATA_AXIS = "data"


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Start multi-host JAX (``jax.distributed.initialize``) when configured.

    With an empty ``coordinator_address`` this does nothing (single host). On TPU
    pods and managed clusters, pass ``coordinator_address="auto"`` to let JAX
    discover everything itself. A second call in a process that already joined
    does nothing, so :func:`jaxdp.train.train` can call it after the user did.

    It must run before anything starts a JAX backend (``jax.devices()``, a
    computation, an orbax ``CheckpointManager``): JAX raises otherwise.
    """
    if not coordinator_address or jax.distributed.is_initialized():
        return
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return
    if num_processes < 1 or not (0 <= process_id < num_processes):
        raise ValueError(
            f"distributed.num_processes={num_processes} and distributed.process_id={process_id} are "
            "inconsistent: need num_processes >= 1 and 0 <= process_id < num_processes; set process_id to each "
            "process's index, e.g. 0 and 1 for two processes."
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` (default: all) devices."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are visible.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Place every leaf of ``tree`` on every device of ``mesh``.

    Multi-host: every process must pass the same values (the model is built from
    the public ``config.seed``, the noise key from the broadcast secret seed); each
    places its copy on its own devices only, since ``jax.device_put`` refuses a
    sharding with devices of other processes.
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def shard_batch(mesh: Mesh, tree: Any) -> Any:
    """Shard the leading (example) axis of every leaf over the ``data`` axis.

    ``tree`` holds the *global* batch as NumPy arrays, identical on every host
    (the sampler is deterministic given the broadcast secret seed); each process
    places only the rows its own devices own (``addressable_devices_indices_map``),
    so multi-host runs need no extra communication. Arrays already sharded this way
    are passed through as they are.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    n = mesh.devices.size
    nproc = jax.process_count()

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already sharded over this mesh's "data" axis (e.g. by the caller, once): no copy
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(
                f"batch of {x.shape[0]} examples cannot be split evenly over {n} devices; "
                f"use a physical batch size divisible by {n}."
            )
        if nproc == 1:
            return jax.device_put(x, sharding)
        return place_rows(x, sharding)

    return jax.tree_util.tree_map(put, tree)


def place_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Build a global array from a host-local copy of all of it: each host places the
    rows its own devices own, whatever the mesh's device order (multi-host path)."""
    index_map = sharding.addressable_devices_indices_map(x.shape)
    pieces = [jax.device_put(x[index], device) for device, index in index_map.items()]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, pieces)


def data_parallel(grad_fn: ClippedGradFn, mesh: Mesh):
    """Run a clipped-gradient function data-parallel over ``mesh``'s ``data`` axis.

    The batched arguments (``grad_fn.batch_argnums``) are sharded over ``data``;
    ``params`` and unbatched arguments are replicated. Each device clips its own examples;
    the clipped sums and the counters are summed across devices (``psum``), the
    per-example outputs stay sharded. Returns ``fn(params, *batch, example_mask)``
    with the same outputs as ``grad_fn`` on the whole batch.
    """
    data = PartitionSpec(DATA_AXIS)
    replicated = PartitionSpec()

    def fn(params, *batch, example_mask):
        # Only the batched arguments are split over devices; the others are
        # replicated, so every device evaluates its examples with all of them.
        batched = batch_argnums(grad_fn.batch_argnums, len(batch))
        specs = tuple(data if (i + 1) in batched else replicated for i in range(len(batch)))

        def local(p, b, m):
            g, aux = grad_fn(p, *b, example_mask=m)
            g = jax.lax.psum(g, DATA_AXIS)
            aux = aux._replace(
                num_clipped=jax.lax.psum(aux.num_clipped, DATA_AXIS),
                num_nonfinite=jax.lax.psum(aux.num_nonfinite, DATA_AXIS),
            )
            return g, aux

        aux_spec = ClippedGradAux(
            loss=data,
            norms=data if grad_fn.return_norms else None,
            aux=data if grad_fn.has_aux else None,
            num_clipped=replicated,
            num_nonfinite=replicated,
        )
        mapped = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(replicated, specs, data),
            out_specs=(replicated, aux_spec),
            check_vma=False,  # the microbatch scan starts from an unsharded zero carry
        )
        return mapped(params, tuple(batch), example_mask)

    return fn
