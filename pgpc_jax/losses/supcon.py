"""A supervised pixel contrast between two pixel-aligned views of the same images: the
`fda_supcon` recipe's term, between each target image and its source-styled version
[reconstructed: no released code; `docs/method.md`, "FDA + supervised contrast"].

Pixels are sampled at the same positions in both views (FDA's styling keeps the geometry), so
sample i of view A and sample i of view B are the same pixel. For an anchor a_i of view A the
candidates are all valid samples of view B; its positives are those with its pseudo-label
(itself in the other view included), its negatives the others:

  l_i = -1/|P(i)| sum_{p in P(i)} [ a_i.b_p / tau - log sum_{j valid} exp(a_i.b_j / tau) ]

the mean of l_i over the valid anchors, and (`symmetric`) the same with the views swapped, the
two directions averaged (the supervised contrastive loss of Khosla et al. 2020, with anchors
and candidates in different views). Embeddings are used as given (L2-normalised by the
projection head). The samples are drawn by `losses/contrast.py: sample_class_balanced` (a fixed
count per image, round-robin over the classes present).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _direction(a, b, labels, valid, temperature):
    dtype = jnp.promote_types(a.dtype, jnp.float32)
    logits = jnp.einsum("md,nd->mn", a.astype(dtype), b.astype(dtype)) / temperature
    # A finite floor, not -inf: a batch without a valid sample gives 0 and finite gradients.
    logits = jnp.where(valid[None, :], logits, jnp.finfo(dtype).min / 2)
    log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    positive = (labels[:, None] == labels[None, :]) & valid[None, :] & valid[:, None]
    count = jnp.sum(positive, axis=1)
    per_anchor = -jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(count, 1)
    anchors = valid & (count > 0)
    return jnp.sum(jnp.where(anchors, per_anchor, 0.0)) / jnp.maximum(jnp.sum(anchors), 1)


def paired_supcon(
    view_a: jax.Array,
    view_b: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    temperature: float = 0.1,
    symmetric: bool = True,
) -> jax.Array:
    """The supervised contrast between two aligned views of M sampled pixels.

    Args:
      view_a: [M, D] embeddings of the samples in view A (the target image).
      view_b: [M, D] embeddings of the same pixels in view B (its source-styled version).
      labels: int [M] the samples' pseudo-labels.
      valid: bool [M] which samples count (invalid ones are neither anchors nor candidates).
      temperature: tau.
      symmetric: average with the B-anchored direction.

    Returns:
      scalar (0 without a valid sample).
    """
    loss = _direction(view_a, view_b, labels, valid, temperature)
    if symmetric:
        loss = 0.5 * (loss + _direction(view_b, view_a, labels, valid, temperature))
    return loss
