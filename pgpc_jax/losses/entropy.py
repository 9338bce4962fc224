"""FDA's robust (Charbonnier-penalised) entropy of target predictions (Yang & Soatto, CVPR 2020,
Eq. 4), as YanchaoYang/FDA `model/deeplab.py` `ResNet101.forward` computes it in its 'train'
phase (`self.loss_ent`, weighted by `--entW` 0.005 in `train.py` and `SStrain.py`).

The reference, on the native-resolution logits x [B, C, h, w] (before any upsampling):
`P = softmax(x, 1)`, `logP = log_softmax(x, 1)`, `ent = -(P * logP).sum(1) / 2.9444` (ln 19,
"change when classes is not 19"), then `ent = ent ** 2.0 + 1e-8`, `ent = ent ** ita` and the
mean over all B*h*w pixels. `ita` is `--ita`, 2.0 in `train.py` (the forward's own default 1.5 is
never used there). No pixel is masked or ignored.

Deviations from the reference
-----------------------------
* The entropy is divided by log(C) for the given class count, so it lies in [0, 1] for any C;
  the reference's 2.9444 differs from ln 19 = 2.944439 by 1.3e-5 relative.
  `normalizer=2.9444` reproduces it.
* NHWC logits [B, H, W, C]; float64 inputs compute in float64, lower precisions in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def robust_entropy(
    logits: jax.Array,
    eta: float = 2.0,
    *,
    eps: float = 1e-8,
    normalizer: float | None = None,
) -> jax.Array:
    """Mean over pixels of ((H(p) / log C)^2 + eps)^eta, p the softmax of the logits.

    Args:
      logits: [B, H, W, C] unnormalised class scores.
      eta: the Charbonnier exponent (FDA's `ita`; 2.0 in the paper and `train.py`).
      eps: added to the squared entropy before the power, 1e-8 as the reference.
      normalizer: what the entropy is divided by; None for log(C). FDA's code uses 2.9444.

    Returns:
      scalar (float32, or float64 for float64 logits): the mean over all B*H*W pixels.
    """
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)  # [B, H, W]
    if normalizer is None:
        if logits.shape[-1] < 2:
            raise ValueError(f"need at least 2 classes to normalise by log C, got {logits.shape}")
        normalizer = math.log(logits.shape[-1])
    entropy = entropy / normalizer
    return jnp.mean((entropy**2 + eps) ** eta)
