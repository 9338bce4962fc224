"""Device mesh and shardings: data parallel over a ('data',) axis, state replicated.

The same code runs on one CPU, 8 fake CPU devices, one GPU, several processes and TPU pod
slices. Under several processes (multi-controller JAX) every process runs this same program and
sees only its own (addressable) devices, so arrays are never moved with a plain `device_put` of
host data onto the global mesh:
  * `global_batch`: each process gives its local share of the global batch,
    `jax.make_array_from_process_local_data` assembles the global array;
  * `replicate`: host values that every process holds identically (the initial state) are
    placed shard by shard with `jax.make_array_from_callback`;
  * `to_host`: a replicated result (metrics, the step counter) is read from this process's own
    copy, since a global array cannot be fetched whole by one process.
`jax.jit` with these shardings does the rest (gradients and BatchNorm statistics are reduced over
the whole batch by XLA).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all (or the first `num_devices`) devices."""
    n = num_devices or jax.device_count()
    if n > jax.device_count():
        raise ValueError(
            f"mesh.num_devices={n} but only {jax.device_count()} devices are visible "
            f"({jax.process_count()} process(es)); use 0 for all of them"
        )
    if jax.process_count() > 1 and n != jax.device_count():
        raise ValueError(
            f"mesh.num_devices={n}: a run of {jax.process_count()} processes uses all "
            f"{jax.device_count()} devices (set mesh.num_devices=0)"
        )
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Per-process batch size, with a clear error if the global batch does not divide."""
    devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f"{what}={global_batch_size} (global) does not divide over {devices} devices: "
            f"use a multiple of {devices}, e.g. --config.{what}={devices * max(1, global_batch_size // devices)}"
        )
    return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from each process's local part (same keys, static shapes)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _place(jax.random.key_data(x), sharding)  # typed keys stay keys
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    # A fresh host copy: donating the placed array never deletes the caller's arrays.
    host = np.array(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree that every process holds identically on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def abstract_replicated(tree: Any, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of `tree` with the replicated sharding (a restore target)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def to_host(tree: Any) -> Any:
    """numpy values of a pytree of replicated arrays, read from this process's first copy."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError(f"to_host: an array sharded as {x.sharding} is not replicated")
            x = x.addressable_data(0)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
