"""SePiCo's class-balanced crop (CBC) of the target image on device, as the released
`RandomCrop.__call__` (`mmseg/models/utils/ours_transforms.py`, BIT-DA/SePiCo) that
`SePiCo.random_crop` applies to the teacher's pseudo label of each un-cropped target image.

The reference, per image: draw a box offset (y, x) with `np.random.randint(0, H - h + 1)` and
`np.random.randint(0, W - w + 1)`; score it on the pseudo label inside the box; repeat for 10 boxes
in all and keep the box whose score is strictly greater than every earlier one (so the first of
equal best scores, and the first box when every score is 0). The score of a box, with `counts` the
pixel counts of the labels in it other than the ignore index:

    score = sum over classes with count > 1 of log(count)
            if more than one class is present and max(counts) / sum(counts) < cat_max_ratio,
    score = 0 otherwise (one class, a class above the ratio, or only ignored pixels).

The ignore index counts neither as a class nor in the share's denominator. Classes with a count of
1 add log 1 = 0, so the `count > 1` filter changes nothing.

Here the boxes are drawn from a `jax.random` key (`draw_offsets`; the same uniform distribution,
another random stream), scored from per-class summed-area tables of the whole label (one pass,
whatever the number of boxes) and the image is cut with `jax.lax.dynamic_slice`, so every shape is
static under jit. `best_offsets` takes explicit boxes, for tests and for callers with their own.

Deviations from the reference, for static shapes:
* the crop must fit in the image (the reference crops a smaller image whole); a `ValueError`
  says so at trace time;
* labels must lie in [0, num_classes) or be the ignore index; other values are not counted
  (the reference would count them as a class);
* the score is computed in float32 (log and sum, as the reference's `cnt.float().log().sum()`),
  the share too (the reference divides in float64), which can only matter when the share lies
  within 1e-7 of `cat_max_ratio`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from data_pipelines.labels import IGNORE_INDEX


def _check_sizes(image_size: Sequence[int], crop_size: Sequence[int]) -> tuple[int, int]:
    height, width = (int(s) for s in image_size)
    crop_h, crop_w = (int(s) for s in crop_size)
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(
            f"class-balanced crop: crop_size={tuple(crop_size)} must be positive and fit in the "
            f"image {height}x{width}; set a crop no larger than the target image"
        )
    return crop_h, crop_w


def _onehot(labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
    """int32 one-hot [..., C] of labels; the ignore index and labels outside [0, C) are zeros."""
    labels = jnp.where(labels == ignore_index, -1, labels)
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)


def score_from_counts(counts: jax.Array, cat_max_ratio: float = 0.75) -> jax.Array:
    """The CBC score of boxes given their class pixel counts.

    Args:
      counts: int or float [..., C], pixels of each class in a box (ignored pixels excluded).
      cat_max_ratio: a box whose largest class holds this share or more scores 0.

    Returns:
      float32 [...], 0 unless more than one class is present and the largest share is below
      `cat_max_ratio`; then the sum over classes with count > 1 of log(count).
    """
    counts = counts.astype(jnp.float32)
    num_present = jnp.sum(counts > 0, axis=-1)
    total = jnp.sum(counts, axis=-1)
    share = jnp.max(counts, axis=-1) / jnp.maximum(total, 1.0)
    balanced = (num_present > 1) & (share < cat_max_ratio)
    logs = jnp.where(counts > 1, jnp.log(jnp.maximum(counts, 1.0)), 0.0)
    return jnp.where(balanced, jnp.sum(logs, axis=-1), 0.0)


def crop_score(
    label_crop: jax.Array,
    num_classes: int = 19,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """The CBC score of one cropped label map.

    Args:
      label_crop: int [h, w] labels of the box.
      num_classes: C.
      cat_max_ratio: see `score_from_counts`.
      ignore_index: the label that counts neither as a class nor in the share.

    Returns:
      float32 scalar.
    """
    counts = jnp.sum(_onehot(label_crop, num_classes, ignore_index), axis=(0, 1))  # [C]
    return score_from_counts(counts, cat_max_ratio)


def draw_offsets(
    key: jax.Array,
    batch: int,
    image_size: Sequence[int],
    crop_size: Sequence[int],
    num_boxes: int = 10,
) -> jax.Array:
    """Random box offsets, y ~ U{0..H-h} and x ~ U{0..W-w} independently (the reference's
    `np.random.randint(0, margin + 1)`).

    Args:
      key: PRNG key.
      batch: B.
      image_size: (H, W).
      crop_size: (h, w), no larger than the image.
      num_boxes: K candidate boxes per image (10 in the reference).

    Returns:
      int32 [B, K, 2] (y, x) top-left corners.
    """
    crop_h, crop_w = _check_sizes(image_size, crop_size)
    height, width = (int(s) for s in image_size)
    maxval = jnp.array([height - crop_h + 1, width - crop_w + 1], jnp.int32)
    return jax.random.randint(key, (batch, num_boxes, 2), 0, maxval, dtype=jnp.int32)


def box_scores(
    candidates: jax.Array,
    pseudo_label: jax.Array,
    crop_size: Sequence[int],
    num_classes: int = 19,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """CBC scores of explicit boxes, counted with per-class summed-area tables.

    Args:
      candidates: int [B, K, 2] (y, x) top-left corners, each box inside the image.
      pseudo_label: int [B, H, W].
      crop_size: (h, w).
      num_classes: C.
      cat_max_ratio: see `score_from_counts`.
      ignore_index: the ignore label.

    Returns:
      float32 [B, K].
    """
    batch, height, width = pseudo_label.shape
    crop_h, crop_w = _check_sizes((height, width), crop_size)
    onehot = _onehot(pseudo_label, num_classes, ignore_index)  # [B, H, W, C]
    table = jnp.cumsum(jnp.cumsum(onehot, axis=1), axis=2)
    table = jnp.pad(table, ((0, 0), (1, 0), (1, 0), (0, 0)))  # [B, H + 1, W + 1, C]
    y, x = candidates[..., 0], candidates[..., 1]  # [B, K]
    b = jnp.arange(batch)[:, None]
    counts = (
        table[b, y + crop_h, x + crop_w]
        - table[b, y, x + crop_w]
        - table[b, y + crop_h, x]
        + table[b, y, x]
    )  # [B, K, C]
    return score_from_counts(counts, cat_max_ratio)


def best_offsets(
    candidates: jax.Array,
    pseudo_label: jax.Array,
    crop_size: Sequence[int],
    num_classes: int = 19,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """The best-scoring box of each image; the first one among equal scores, as the reference
    (a later box replaces the kept one only with a strictly greater score).

    Args:
      candidates: int [B, K, 2] (y, x) top-left corners.
      pseudo_label: int [B, H, W].
      crop_size: (h, w).
      num_classes, cat_max_ratio, ignore_index: see `box_scores`.

    Returns:
      int32 [B, 2].
    """
    scores = box_scores(
        candidates, pseudo_label, crop_size, num_classes, cat_max_ratio, ignore_index
    )
    best = jnp.argmax(scores, axis=1)  # the first maximum
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0].astype(jnp.int32)


def choose_crop(
    key: jax.Array,
    pseudo_label: jax.Array,
    crop_size: Sequence[int],
    num_boxes: int = 10,
    num_classes: int = 19,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Class-balanced crop offsets: `num_boxes` random boxes per image, the best one kept.

    Args:
      key: PRNG key.
      pseudo_label: int [B, H, W], the teacher's pseudo label of the un-cropped images.
      crop_size: (h, w).
      num_boxes: candidates per image (10 in the reference).
      num_classes: C.
      cat_max_ratio: 0.75 in the reference's SePiCo configs.
      ignore_index: the ignore label.

    Returns:
      int32 [B, 2] (y, x) top-left corners, for `apply_crop`.
    """
    batch, height, width = pseudo_label.shape
    candidates = draw_offsets(key, batch, (height, width), crop_size, num_boxes)
    return best_offsets(
        candidates, pseudo_label, crop_size, num_classes, cat_max_ratio, ignore_index
    )


def apply_crop(x: jax.Array, offsets: jax.Array, crop_size: Sequence[int]) -> jax.Array:
    """Cut each image's box: out[b] = x[b, y:y + h, x:x + w, ...].

    Args:
      x: [B, H, W, ...] images, labels or weights.
      offsets: int [B, 2] (y, x), each box inside the image.
      crop_size: (h, w).

    Returns:
      [B, h, w, ...], the dtype of x.
    """
    crop_h, crop_w = _check_sizes(x.shape[1:3], crop_size)

    def one(image: jax.Array, offset: jax.Array) -> jax.Array:
        start = (offset[0], offset[1]) + (0,) * (image.ndim - 2)
        return jax.lax.dynamic_slice(image, start, (crop_h, crop_w) + image.shape[2:])

    return jax.vmap(one)(x, offsets.astype(jnp.int32))
