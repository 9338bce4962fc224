"""The training state: one pytree that is all that is checkpointed and all that is donated."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from pgpc_jax import methods


@flax.struct.dataclass
class TrainState:
    """Everything a DAFormer-family run carries from step to step.

    Attributes:
      step: int32 scalar, the number of optimizer updates done.
      params: student parameters {'backbone', 'decode_head'}.
      batch_stats: student BatchNorm running statistics.
      opt_state: optax state of the student's optimizer.
      teacher_params: EMA teacher parameters (same tree as `params`), or None when the method
        has no teacher; its BatchNorm uses batch statistics, as DAFormer's teacher stays in
        train mode.
      imnet_params: frozen encoder parameters for the ImageNet feature distance (the encoder as
        initialised: ImageNet weights in the real configs), or None when the method needs none.
      rng: base PRNG key; step t uses `fold_in(rng, t)`, so runs are deterministic and resumable.
      method_state: the method's state beyond the segmentor (PGPC class prototypes, SePiCo
        statistics), a pytree of fixed-size arrays, or None.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    teacher_params: Any
    imnet_params: Any
    rng: jax.Array
    method_state: Any = None

    @property
    def student_variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(config, variables, tx) -> TrainState:
    """The state at step 0 of `config.method`: teacher = student = `variables` when the method
    has a teacher; the ImageNet encoder, when it needs one, a frozen copy of the initial encoder
    (ImageNet weights when `init_from` is an ImageNet MiT); the method's initial state."""
    method = methods.get(config.method)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        teacher_params=jax.tree.map(jnp.copy, params) if method.needs_teacher(config) else None,
        imnet_params=(
            jax.tree.map(jnp.copy, params["backbone"]) if method.needs_imnet(config) else None
        ),
        rng=jax.random.key(config.seed + 17),
        method_state=method.init_state(config, params),
    )
