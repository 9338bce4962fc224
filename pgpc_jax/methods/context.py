"""What a method's losses see in one step: the batches, the step, its key, the method state,
and the forward functions bound to this step's parameters.

The forwards (outputs as `Segmentor.__call__`: {'logits', 'features', <auxiliary heads>}):

* `student(images, rng)`: train mode, dropout and drop path from `rng`. It threads the BatchNorm
  statistics from call to call, as DAFormer's student runs BN on the source and then on the mixed
  batch and updates its running statistics twice; the step keeps the last ones.
  `student.auxiliary(images, rng)` runs the encoder and the auxiliary heads only.
* `teacher(images)`: the EMA teacher (None if the method has none): BatchNorm on batch statistics
  (DAFormer's teacher stays in train mode; its running statistics are never used), no dropout,
  gradients stopped.
* `imnet(images)`: the frozen ImageNet encoder's features (None unless the method needs it),
  gradients stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


class Student:
    """The student forward at `params`, threading BatchNorm statistics across calls."""

    def __init__(self, model, params: Any, batch_stats: Any):
        self.model, self.params, self.batch_stats = model, params, batch_stats

    def _apply(self, images: jax.Array, rng: jax.Array, method=None) -> dict[str, Any]:
        outputs, updated = self.model.apply(
            {"params": self.params, "batch_stats": self.batch_stats},
            images,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
            method=method,
        )
        # A forward without the decode head returns only the statistics it moved.
        self.batch_stats = {**self.batch_stats, **updated["batch_stats"]}
        return outputs

    def __call__(self, images: jax.Array, rng: jax.Array) -> dict[str, Any]:
        return self._apply(images, rng)

    def auxiliary(self, images: jax.Array, rng: jax.Array) -> dict[str, Any]:
        """The encoder and the auxiliary heads only (`Segmentor.auxiliary_outputs`, mmseg's
        `mode='aux'`): the decode head neither runs nor moves its BatchNorm statistics."""
        return self._apply(images, rng, self.model.auxiliary_outputs)


def bind_teacher(model, params: Any, batch_stats: Any) -> Callable[[jax.Array], dict]:
    def teacher(images: jax.Array, auxiliary_only: bool = False) -> dict[str, Any]:
        outputs, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            dropout=False,
            mutable=["batch_stats"],
            method=model.auxiliary_outputs if auxiliary_only else None,
        )
        return jax.lax.stop_gradient(outputs)

    return teacher


def bind_imnet(model, backbone_params: Any) -> Callable[[jax.Array], list]:
    def imnet(images: jax.Array) -> list[jax.Array]:
        features = model.apply(
            {"params": {"backbone": backbone_params}},
            images,
            method=lambda m, x: m.encode(x, train=False),
        )
        return jax.lax.stop_gradient(features)

    return imnet


@dataclasses.dataclass
class Context:
    """One step's inputs to `method.make_losses(config)(ctx)`.

    Attributes:
      src: the source batch dict ('image' [B, H, W, 3] normalised, 'label' int [B, H, W], and
        whatever else the source pipeline gives).
      tgt: the target batch dict ('image', and 'label' where the dataset has one; a method uses
        it only where its config allows an oracle).
      step: int32 scalar, the step being taken (0-based).
      rng: this step's key, `fold_in(state.rng, step)`.
      method_state: the method's state from the previous step (`init_state` at step 0).
      student, teacher, imnet: the bound forwards described in the module docstring.
    """

    src: dict
    tgt: dict
    step: jax.Array
    rng: jax.Array
    method_state: Any
    student: Student
    teacher: Callable | None
    imnet: Callable | None
