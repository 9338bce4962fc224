"""Device mesh and shardings: data parallel over a ('data',) axis, state replicated.

The same code runs on one CPU, 8 fake CPU devices, one GPU, several processes and TPU pod
slices: each process feeds its local share of the global batch, `global_batch` assembles the
global array, and `jax.jit` with these shardings does the rest (gradients and BatchNorm
statistics are reduced over the whole batch by XLA).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all (or the first `num_devices`) devices."""
    n = num_devices or jax.device_count()
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Per-process batch size, with a clear error if the global batch does not divide."""
    devices = mesh.devices.size
    if global_batch_size % devices:
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


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree on every device (a copy, so donating it never deletes the caller's arrays)."""
    sharding = replicated(mesh)

    def put(x):
        x = jnp.copy(x) if isinstance(x, jax.Array) else np.array(x)  # typed keys stay keys
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)
