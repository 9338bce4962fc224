"""The training state: one pytree that is all that is checkpointed and all that is donated."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """Everything a DAFormer-family run carries from step to step.

    Attributes:
      step: int32 scalar, the number of optimizer updates done.
      params: student parameters {'backbone', 'decode_head'}.
      batch_stats: student BatchNorm running statistics.
      opt_state: optax state of the student's optimizer.
      teacher_params: EMA teacher parameters (same tree as `params`); its BatchNorm uses batch
        statistics, as DAFormer's teacher stays in train mode.
      imnet_params: frozen encoder parameters for the ImageNet feature distance (the encoder as
        initialised: ImageNet weights in the real configs), or None when the distance is off.
      rng: base PRNG key; step t uses `fold_in(rng, t)`, so runs are deterministic and resumable.
      prototypes: method state beyond the segmentor (PGPC class prototypes, SePiCo statistics),
        or None.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    teacher_params: Any
    imnet_params: Any
    rng: jax.Array
    prototypes: Any = None

    @property
    def student_variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(config, variables, tx) -> TrainState:
    """The state at step 0: student = teacher = `variables`; the ImageNet encoder is a frozen
    copy of the initial encoder (ImageNet weights when `init_from` is an ImageNet MiT)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        teacher_params=jax.tree.map(jnp.copy, params),
        imnet_params=(
            jax.tree.map(jnp.copy, params["backbone"]) if config.uda.fd_lambda > 0 else None
        ),
        rng=jax.random.key(config.seed + 17),
        prototypes=_initial_prototypes(config, params),
    )


def _initial_prototypes(config, params):
    """Empty PGPC class prototypes (one per class, the width of the fused encoder stages)."""
    if config.contrast.variant != "pgpc":
        return None
    from pgpc_jax.losses.contrast import init_prototypes

    stages = [k for k in params["backbone"] if k.startswith("norm")]
    dim = sum(params["backbone"][k]["scale"].shape[0] for k in stages)
    return init_prototypes(config.model.num_classes, dim)
