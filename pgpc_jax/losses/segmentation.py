"""Pixel-weighted cross-entropy as mmseg 0.16 computes it for DAFormer
(`mmseg/models/losses/cross_entropy_loss.py` `cross_entropy`, `mmseg/models/losses/utils.py`
`weight_reduce_loss`, with the logits upsampled as `decode_head.losses` does).

`F.cross_entropy(reduction='none', ignore_index=255)` gives 0 on ignored pixels; the loss is
multiplied by the pixel weight and then averaged over ALL B*H*W pixels, ignored ones included in
the denominator (mmseg's `reduction='mean'` without `avg_factor`).

The negative log-likelihood is picked with a one-hot product, not `take_along_axis`: on the CPU,
XLA constant-folds the scatter-add of the gather's gradient for seconds (measured on this
machine, [2, 128, 128, 19] logits and 512x512 labels: compile and first run of value_and_grad
1.1 s with one-hot, 4.9 s with take_along_axis; the same steady time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from data_pipelines.labels import IGNORE_INDEX
from pgpc_jax.models.layers import resize_bilinear


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """mmseg's weighted cross-entropy of stride-4 logits against full-resolution labels.

    Args:
      logits: [B, h, w, K] (any float dtype; computed in float32), upsampled bilinearly with
        align_corners=False to the label size, as mmseg `resize` in `BaseDecodeHead.losses`.
      labels: int [B, H, W]; `ignore_index` pixels contribute 0 but count in the mean.
      weight: float [B, H, W] pixel weights, or None for 1.
      ignore_index: the ignored label.

    Returns:
      float32 scalar: sum over pixels of weight * CE, divided by B*H*W.
    """
    logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3], align_corners=False)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32)
    nll = -jnp.sum(onehot * log_probs, axis=-1) * valid.astype(jnp.float32)  # [B, H, W]
    if weight is not None:
        nll = nll * weight.astype(jnp.float32)
    return jnp.mean(nll)
