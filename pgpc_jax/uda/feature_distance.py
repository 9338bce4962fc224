"""ImageNet feature distance of DAFormer (`mmseg/models/uda/dacs.py` `calc_feat_dist`,
`masked_feat_dist`; `mmseg/utils/utils.py` `downscale_label_ratio`).

The student's last encoder stage is pulled towards the same stage of a frozen ImageNet encoder
on source cells whose (downscaled) label is a "thing" class. Differences from the reference,
both for robustness under jit: where no cell qualifies the reference's `torch.mean` of an empty
selection is NaN; here the loss is 0 with a zero gradient. The L2 norm has a zero gradient
where the two features are equal (torch's `norm` backward does the same), not a NaN.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from data_pipelines.labels import IGNORE_INDEX, THING_CLASSES


def downscale_label_ratio(
    labels: jax.Array,
    scale: int,
    min_ratio: float = 0.75,
    num_classes: int = 19,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Downscale labels by `scale` keeping only pure cells, as DAFormer's `downscale_label_ratio`.

    The ignore label gets its own one-hot bin; each `scale` x `scale` cell is average-pooled
    (trailing rows / columns that do not fill a cell are dropped, as `avg_pool2d`); the cell takes
    its majority bin if that bin's share is >= `min_ratio`, else `ignore_index` (also when the
    majority is the ignore bin).

    Args:
      labels: int [B, H, W].
      scale: integer factor > 1.
      min_ratio: purity needed to keep a cell.
      num_classes: number of real classes.
      ignore_index: the ignore label.

    Returns:
      int32 [B, H // scale, W // scale].
    """
    if scale <= 1:
        raise ValueError(f"scale must be > 1, got {scale}")
    batch, height, width = labels.shape
    h, w = height // scale, width // scale
    labels = labels[:, : h * scale, : w * scale]
    bins = jnp.where(labels == ignore_index, num_classes, labels)
    onehot = jax.nn.one_hot(bins, num_classes + 1, dtype=jnp.float32)  # [B, H, W, K + 1]
    shares = onehot.reshape(batch, h, scale, w, scale, num_classes + 1).mean(axis=(2, 4))
    ratio = jnp.max(shares, axis=-1)
    out = jnp.argmax(shares, axis=-1).astype(jnp.int32)
    out = jnp.where((out == num_classes) | (ratio < min_ratio), ignore_index, out)
    return out


def _safe_l2(x: jax.Array) -> jax.Array:
    # ||x|| over the last axis with a zero (not NaN) gradient at x = 0.
    sq = jnp.sum(jnp.square(x), axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def feature_distance(
    student_feat: jax.Array,
    imnet_feat: jax.Array,
    labels: jax.Array,
    thing_classes: Sequence[int] = THING_CLASSES,
    min_ratio: float = 0.75,
    num_classes: int = 19,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Mean L2 distance between student and ImageNet features over thing-class cells.

    Args:
      student_feat: [B, h, w, C] last-stage student features (any float dtype).
      imnet_feat: [B, h, w, C] the frozen ImageNet encoder's features (gradient stopped here).
      labels: int [B, H, W] source labels; the scale is W // w, as DAFormer's
        `gt.shape[-1] // feat.shape[-1]`.
      thing_classes: classes whose cells count.
      min_ratio: cell purity of `downscale_label_ratio`.
      num_classes: number of real classes.
      ignore_index: the ignore label.

    Returns:
      float32 scalar: the mean over kept cells of ||student - imnet||_2 over channels (before
      DAFormer's lambda); 0 when no cell is kept.
    """
    scale = labels.shape[2] // student_feat.shape[2]
    cells = downscale_label_ratio(labels, scale, min_ratio, num_classes, ignore_index)
    if cells.shape[1:] != student_feat.shape[1:3]:
        raise ValueError(
            f"labels {labels.shape} downscaled by {scale} give {cells.shape[1:]}, "
            f"not the feature grid {student_feat.shape[1:3]}"
        )
    things = jnp.asarray(thing_classes, jnp.int32)
    mask = jnp.any(cells[..., None] == things, axis=-1).astype(jnp.float32)
    diff = student_feat.astype(jnp.float32) - jax.lax.stop_gradient(imnet_feat).astype(jnp.float32)
    dist = _safe_l2(diff)  # [B, h, w]
    count = jnp.sum(mask)
    return jnp.sum(dist * mask) / jnp.maximum(count, 1.0)
