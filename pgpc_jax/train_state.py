"""The training state: one pytree that is all that is checkpointed and all that is donated."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


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
