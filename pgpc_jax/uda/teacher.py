"""EMA teacher and pseudo-labels, as DAFormer's DACS (`mmseg/models/uda/dacs.py`).

* `update_teacher` mirrors `_init_ema_weights` / `_update_ema`: at step 0 the teacher is a copy of
  the student; at step t > 0, teacher <- a_t * teacher + (1 - a_t) * student with
  a_t = min(1 - 1/(t+1), alpha). Only parameters are averaged (DAFormer iterates `parameters()`),
  so the teacher's BatchNorm running statistics are never touched: the caller keeps none.
* `pseudo_labels` mirrors the pseudo-label block of `DACS.forward_train`: softmax, max, and one
  weight for the whole batch, the share of pixels whose confidence reaches the threshold,
  broadcast to every pixel; the top and bottom rows get weight 0 (`pseudo_weight_ignore_top`,
  `pseudo_weight_ignore_bottom`). `per_pixel=True` is our option: weight 1 on confident pixels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _alpha_and_complement(step: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    # DAFormer computes a_t and 1 - a_t in float64 (Python floats) and torch rounds each to
    # float32 when it multiplies a float32 tensor. t/(t+1) and 1/(t+1) are those values rounded
    # once; 1 - alpha is taken in Python, so a_t = alpha gives torch's (1 - alpha) bit for bit.
    t = jnp.asarray(step, jnp.float32)
    ramp = t / (t + 1.0)
    use_ramp = ramp < jnp.float32(alpha)
    a = jnp.where(use_ramp, ramp, jnp.float32(alpha))
    one_minus_a = jnp.where(use_ramp, 1.0 / (t + 1.0), jnp.float32(1.0 - alpha))
    return a, one_minus_a


def ema_alpha(step: jax.Array | int, alpha: float = 0.999) -> jax.Array:
    """Teacher momentum at `step`: min(1 - 1/(t+1), alpha), float32 scalar (0 at step 0)."""
    return _alpha_and_complement(jnp.asarray(step), alpha)[0]


def update_teacher(
    teacher_params: Any, student_params: Any, step: jax.Array | int, alpha: float = 0.999
) -> Any:
    """EMA update of the teacher parameter tree, a pure function of `step`.

    Args:
      teacher_params: the teacher's parameter tree (anything at step 0: it is replaced).
      student_params: the student's parameter tree, same structure and shapes.
      step: int scalar, the 0-based iteration (DAFormer's `local_iter`) at whose start the
        update runs.
      alpha: the momentum ceiling (DAFormer's final config: 0.999).

    Returns:
      The new teacher tree: an exact copy of the student at step 0, else
      a_t * teacher + (1 - a_t) * student leaf by leaf, in each leaf's dtype.
    """
    step = jnp.asarray(step)
    a, one_minus_a = _alpha_and_complement(step, alpha)

    def leaf(t, s):
        ema = a.astype(t.dtype) * t + one_minus_a.astype(s.dtype) * s
        # A copy, not 0 * teacher + student: the teacher at step 0 may hold anything.
        return jnp.where(step == 0, s, ema).astype(t.dtype)

    return jax.tree.map(leaf, teacher_params, jax.lax.stop_gradient(student_params))


def kept_rows(height: int, ignore_top: int, ignore_bottom: int) -> jax.Array:
    """bool [height]: the rows whose pseudo-labels are used (not in the top / bottom margins)."""
    rows = jnp.arange(height)
    return (rows >= ignore_top) & (rows < height - ignore_bottom)


def pseudo_labels(
    teacher_logits: jax.Array,
    threshold: float = 0.968,
    ignore_top: int = 15,
    ignore_bottom: int = 120,
    per_pixel: bool = False,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Pseudo-labels and their weights from the teacher's logits.

    Args:
      teacher_logits: [B, H, W, K] logits at the label resolution (DAFormer upsamples in
        `encode_decode` before the softmax). Gradients are stopped.
      threshold: confidence needed for a pixel to count as confident (0.968).
      ignore_top: number of top rows whose weight is 0 (0 disables, as the reference's `> 0`).
      ignore_bottom: number of bottom rows whose weight is 0 (0 disables).
      per_pixel: False: DAFormer's scalar weight, the share of confident pixels over the whole
        (global) batch, B*H*W pixels, broadcast. True: 1 on confident pixels, 0 elsewhere.

    Returns:
      labels: int32 [B, H, W], argmax class.
      weight: float32 [B, H, W].
      stats: {'confidence': mean max-probability, 'coverage': share of confident pixels},
        float32 scalars over the whole batch.
    """
    logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    confidence = jnp.max(probs, axis=-1)  # [B, H, W]
    labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    confident = (confidence >= threshold).astype(jnp.float32)
    coverage = jnp.mean(confident)
    weight = confident if per_pixel else jnp.broadcast_to(coverage, confident.shape)
    keep = kept_rows(logits.shape[1], ignore_top, ignore_bottom)
    weight = weight * keep[None, :, None].astype(jnp.float32)
    stats = {"confidence": jnp.mean(confidence), "coverage": coverage}
    return labels, weight, stats
