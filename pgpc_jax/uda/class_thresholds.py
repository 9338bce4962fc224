"""FDA's per-class pseudo-label thresholds (Yang & Soatto, CVPR 2020, §3.4, "MBT").

Source [released]: YanchaoYang/FDA `getSudoLabel_multi.py: main()`. Three segmenters trained with
beta = 0.01, 0.05, 0.09 label every target training image: the weighted mean of their softmax
outputs (weights 0.3333, 0.3333 and 1 - 0.3333 - 0.3333), bilinearly upsampled to 512 x 1024
(`align_corners=True`), then per pixel the argmax (label) and the max (confidence). Over the
whole dataset, for each class c:
* x = the confidences of the pixels labelled c, sorted ascending; n = len(x);
* threshold_c = x[int(np.round(n * 0.66))] (numpy's round, half to even: n = 25 gives index 16),
  i.e. about the top 34 % of the class survive; 0 when no pixel is labelled c;
* every threshold above 0.9 is set to 0.9 (the confident pixels always survive);
and a pixel labelled c becomes 255 (ignored) where its confidence is strictly below
threshold_c. The comparison is made in float64 (the release stores the float32 confidences in
float64 arrays).

In this module:
* `multiband_prediction` [released]: the weighted mean and the argmax / max, jnp, any number of
  models (the release's three weights by default for three); the resize to the label size is the
  caller's.
* `class_thresholds` and `class_thresholds_from_chunks` [released], numpy, exact: per class the
  confidences are collected, chunk by chunk, and the order statistic is taken with
  `np.partition` (the same value as sorting). Memory: all confidences of in-range labels, in
  their own dtype (4 bytes a pixel for float32), plus a transient copy of the largest class.
  Cityscapes train at 512 x 1024 is 2975 x 524,288 = 1.56e9 pixels: about 6.2 GB in float32
  (the release holds float64 labels and confidences: 25 GB).
  [reconstructed] n = 1: the release's index round(0.66) = 1 is past the end (an IndexError);
  it is clamped to n - 1 here (the single confidence). For every n >= 2 it is in range.
* `confidence_bins`, `class_histogram` and `exact_thresholds` [released values], numpy, exact
  with bounded memory (the second pass of `python -m pgpc_jax.pseudo_label`): per class a
  histogram of `NUM_BINS` = 2^16 equal confidence bins of [0, 1] is summed over the dataset
  (C x 65536 int64: 10 MB for 19 classes). The bin of each class's order statistic follows from
  the counts; one more pass over the data collects only the confidences of that bin (the binning
  of float32 values by a power of two is exact, so the order is kept) and takes the exact value
  with `np.partition`; a class whose bin starts at or above the cap is capped without it. That
  pass holds one bin's confidences per class: a few thousand values for real softmax outputs,
  all of a class's pixels only when they share one bin (e.g. a constant confidence). The values
  equal `class_thresholds` over all the data.
* `confidence_histogram` and `thresholds_from_histogram` [reconstructed], an approximation,
  flagged as such: a per-class histogram of the confidences over `num_bins` equal bins of
  [0, 1], jnp and [fixed shape] (only [C, num_bins] counts leave the device), summed over the
  dataset on the host; the threshold is the lower edge of the bin that holds the released
  order statistic. For a power-of-two `num_bins` the binning of float32 confidences is exact, so
  approx <= exact < approx + 1 / num_bins before the cap, and the pixels kept by the
  approximate thresholds are a superset of those kept by the exact ones (the extra ones lie in
  one bin per class).
* `apply_thresholds` [released], [fixed shape]: the 255 rule, jnp, a `where`, not an index;
  labels outside [0, C) pass through unchanged. Thresholds given as a numpy array (as
  `class_thresholds` returns them, in float64) are first rounded *up* to the confidences' dtype
  (`round_up_thresholds`), so that the float32 comparison `conf < t` decides as the release's
  float64 one, the 0.9 cap included (float32(0.9) < 0.9: the release drops a pixel of
  confidence float32(0.9)). Confidences are expected in float32, as the release's softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.labels import IGNORE_INDEX

# The released rule: the value at 66 % of the ascending confidences, capped at 0.9.
FRACTION = 0.66
CAP = 0.9
# The threshold of a class that no pixel is labelled with.
ABSENT = 0.0
# Confidence bins of `class_histogram` / `exact_thresholds`: a power of two, so float32 values are
# binned exactly.
NUM_BINS = 1 << 16
# The release's model weights: a = b = 0.3333 and 1 - a - b for the third model.
MULTIBAND_WEIGHTS = (0.3333, 0.3333, 1.0 - 0.3333 - 0.3333)


# ------------------------------------------------------------------------------------------------
# Multi-band prediction [released]


def multiband_prediction(
    probabilities: jax.Array, weights: Sequence[float] | None = None
) -> tuple[jax.Array, jax.Array]:
    """Labels and confidences of the weighted mean of several models' softmax outputs.

    Args:
      probabilities: [M, B, H, W, C] softmax outputs of M models.
      weights: M weights; by default the release's (0.3333, 0.3333, 0.3334) for M = 3, else
        uniform.

    Returns:
      (labels int32 [B, H, W], confidences [B, H, W] in the dtype of `probabilities`): the argmax
      (first maximum on ties, as np.argmax) and the max of the weighted mean over the class axis.
    """
    num_models = probabilities.shape[0]
    if weights is None:
        weights = MULTIBAND_WEIGHTS if num_models == 3 else (1.0 / num_models,) * num_models
    if len(weights) != num_models:
        raise ValueError(f"{len(weights)} weights for {num_models} models")
    # Summed model by model, in the release's order (a * p1 + b * p2 + (1 - a - b) * p3).
    mean = weights[0] * probabilities[0]
    for w, p in zip(weights[1:], probabilities[1:]):
        mean = mean + w * p
    return jnp.argmax(mean, axis=-1).astype(jnp.int32), jnp.max(mean, axis=-1)


# ------------------------------------------------------------------------------------------------
# Exact thresholds [released], numpy


def order_index(counts: np.ndarray | int, fraction: float = FRACTION) -> np.ndarray:
    """The release's index int(np.round(n * fraction)) into n ascending values, clamped to n - 1.

    Args:
      counts: int n or [C] counts (n >= 1 where used).
      fraction: the share of values below the threshold (0.66).

    Returns:
      int64 array of the shape of `counts`.
    """
    counts = np.asarray(counts, np.int64)
    # n * fraction in float64 and round half to even, as np.round(len(x) * 0.66).
    index = np.round(counts * fraction).astype(np.int64)
    return np.minimum(index, counts - 1)  # the release indexes past the end for n = 1


def _cap(thresholds: np.ndarray, cap: float) -> np.ndarray:
    thresholds = thresholds.copy()
    thresholds[thresholds > cap] = cap
    return thresholds


def class_thresholds_from_chunks(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    *,
    fraction: float = FRACTION,
    cap: float = CAP,
    absent: float = ABSENT,
) -> np.ndarray:
    """FDA's per-class thresholds over a dataset given chunk by chunk, exactly as released.

    Memory: every confidence of an in-range label is kept until the end (see the module
    docstring).

    Args:
      chunks: (labels, confidences) pairs of equal shapes, any shape: predicted labels (ints;
        values outside [0, num_classes) are not counted) and their confidences (float32 as the
        release's softmax).
      num_classes: C.
      fraction: the order-statistic fraction (0.66).
      cap: the upper bound of a threshold (0.9).
      absent: the threshold of a class without pixels (0, which drops nothing).

    Returns:
      float64 [C] thresholds.
    """
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for labels, confidences in chunks:
        labels, confidences = np.asarray(labels), np.asarray(confidences)
        if labels.shape != confidences.shape:
            raise ValueError(f"labels {labels.shape} and confidences {confidences.shape} differ")
        for c in range(num_classes):
            values = confidences[labels == c]
            if values.size:
                per_class[c].append(values)
    thresholds = np.full((num_classes,), absent, np.float64)
    for c in range(num_classes):
        if not per_class[c]:
            continue
        values = np.concatenate(per_class[c])
        per_class[c] = []  # free the chunks before the next class is concatenated
        k = int(order_index(values.size, fraction))
        thresholds[c] = np.partition(values, k)[k]
    return _cap(thresholds, cap)


def class_thresholds(
    labels: np.ndarray,
    confidences: np.ndarray,
    num_classes: int,
    *,
    fraction: float = FRACTION,
    cap: float = CAP,
    absent: float = ABSENT,
) -> np.ndarray:
    """FDA's per-class thresholds of one array of predictions (all images at once), exact.

    Args:
      labels: int [...] predicted labels; values outside [0, num_classes) are not counted.
      confidences: [...] their confidences, same shape.
      num_classes: C.
      fraction, cap, absent: as `class_thresholds_from_chunks`.

    Returns:
      float64 [C] thresholds.
    """
    return class_thresholds_from_chunks(
        [(labels, confidences)], num_classes, fraction=fraction, cap=cap, absent=absent
    )


# ------------------------------------------------------------------------------------------------
# Exact thresholds with bounded memory [released values], numpy


def confidence_bins(confidences: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """int64 bin of each float32 confidence in `num_bins` equal bins of [0, 1] (1 in the last).

    With a power-of-two `num_bins` the product is exact, so the bins keep the values' order.
    """
    scaled = np.asarray(confidences, np.float32) * np.float32(num_bins)
    return np.clip(scaled.astype(np.int64), 0, num_bins - 1)


def class_histogram(
    labels: np.ndarray, confidences: np.ndarray, num_classes: int, num_bins: int = NUM_BINS
) -> np.ndarray:
    """int64 [C, num_bins] counts of the confidences per predicted class (labels outside [0, C)
    are not counted)."""
    labels = np.asarray(labels, np.int64).ravel()
    counted = (labels >= 0) & (labels < num_classes)
    flat = labels[counted] * num_bins + confidence_bins(np.ravel(confidences)[counted], num_bins)
    return np.bincount(flat, minlength=num_classes * num_bins).reshape(num_classes, num_bins)


def exact_thresholds(
    histogram: np.ndarray,
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    *,
    quantile: float = FRACTION,
    cap: float = CAP,
    absent: float = ABSENT,
) -> np.ndarray:
    """FDA's per-class thresholds, exact, from the histogram and one more pass over the data.

    Args:
      histogram: int [C, K] `class_histogram` counts summed over the dataset (K a power of two).
      chunks: returns a fresh iterable of the same (labels, float32 confidences) pairs that
        made the histogram; read once, and only when a threshold lies below the cap.
      quantile, cap, absent: as `class_thresholds_from_chunks` (its fraction).

    Returns:
      float64 [C]: equal to `class_thresholds` over all the chunks.
    """
    histogram = np.asarray(histogram, np.int64)
    num_classes, num_bins = histogram.shape
    counts = histogram.sum(axis=1)
    present = counts > 0
    index = order_index(np.maximum(counts, 1), quantile)
    cumulative = np.cumsum(histogram, axis=1)
    bins = np.argmax(cumulative > index[:, None], axis=1)  # the bin of the order statistic
    before = np.where(bins > 0, cumulative[np.arange(num_classes), bins - 1], 0)
    rank = index - before  # its rank inside that bin
    # A bin starting at or above the cap holds a value that is capped whatever it is.
    need = present & (bins / num_bins < cap)
    thresholds = np.where(present, float(cap), float(absent))
    if need.any():
        parts: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        for labels, conf in chunks():
            labels = np.asarray(labels, np.int64).ravel()
            conf = np.asarray(conf, np.float32).ravel()
            in_range = (labels >= 0) & (labels < num_classes)
            safe = np.where(in_range, labels, 0)
            keep = in_range & need[safe] & (confidence_bins(conf, num_bins) == bins[safe])
            kept_labels, kept_conf = labels[keep], conf[keep]
            for c in np.unique(kept_labels):
                parts[c].append(kept_conf[kept_labels == c])
        for c in np.flatnonzero(need):
            values = np.concatenate(parts[c]) if parts[c] else np.zeros((0,), np.float32)
            if values.size <= rank[c]:
                raise ValueError(f"class {c}: the chunks do not match the histogram")
            thresholds[c] = np.partition(values, rank[c])[rank[c]]
    return np.where(thresholds > cap, float(cap), thresholds)


# ------------------------------------------------------------------------------------------------
# Histogram thresholds [reconstructed], an approximation


def confidence_histogram(
    labels: jax.Array, confidences: jax.Array, num_classes: int, num_bins: int = 4096
) -> jax.Array:
    """Per-class counts of the confidences in `num_bins` equal bins of [0, 1]; jit-able.

    Sum the results over the dataset on the host in int64 (`np.asarray(h, np.int64)`): one call
    counts in int32.

    Args:
      labels: int [...] predicted labels; values outside [0, num_classes) are not counted.
      confidences: [...] float confidences in [0, 1], same shape.
      num_classes: C (static).
      num_bins: K (static); a power of two bins float32 confidences exactly.

    Returns:
      int32 [C, K]: bin k holds the confidences in [k / K, (k + 1) / K), the last one also 1.
    """
    labels = jnp.asarray(labels).ravel()
    confidences = jnp.asarray(confidences).ravel()
    counted = (labels >= 0) & (labels < num_classes)
    bins = jnp.clip(jnp.floor(confidences * num_bins).astype(jnp.int32), 0, num_bins - 1)
    flat = jnp.where(counted, labels.astype(jnp.int32), 0) * num_bins + bins
    counts = jnp.zeros((num_classes * num_bins,), jnp.int32).at[flat].add(counted.astype(jnp.int32))
    return counts.reshape(num_classes, num_bins)


def thresholds_from_histogram(
    histogram: np.ndarray,
    *,
    fraction: float = FRACTION,
    cap: float = CAP,
    absent: float = ABSENT,
) -> np.ndarray:
    """Approximate thresholds: the lower edge of the bin holding the released order statistic.

    Args:
      histogram: int [C, K] counts (`confidence_histogram`, summed over the dataset).
      fraction, cap, absent: as `class_thresholds_from_chunks`.

    Returns:
      float64 [C]; before the cap, within [exact - 1/K, exact] of `class_thresholds` for a
      power-of-two K.
    """
    histogram = np.asarray(histogram, np.int64)
    num_bins = histogram.shape[1]
    counts = histogram.sum(axis=1)
    present = counts > 0
    k = order_index(np.maximum(counts, 1), fraction)
    # The value of ascending index k lies in the first bin whose cumulative count exceeds k.
    cumulative = np.cumsum(histogram, axis=1)
    bins = np.argmax(cumulative > k[:, None], axis=1)
    thresholds = np.where(present, bins / num_bins, absent)
    return _cap(thresholds, cap)


# ------------------------------------------------------------------------------------------------
# Pseudo-labels [released]


def round_up_thresholds(thresholds: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Float64 thresholds as the smallest values of `dtype` not below them.

    For a confidence c of that dtype, `c < t` holds exactly when `c < round_up(t)`: with these,
    the comparison in `dtype` decides as the release's float64 comparison.
    """
    thresholds = np.asarray(thresholds, np.float64)
    rounded = thresholds.astype(dtype)
    below = rounded.astype(np.float64) < thresholds
    return np.where(below, np.nextafter(rounded, np.asarray(np.inf, dtype)), rounded).astype(dtype)


def apply_thresholds(
    labels: jax.Array,
    confidences: jax.Array,
    thresholds: jax.Array | np.ndarray,
    ignore: int = IGNORE_INDEX,
) -> jax.Array:
    """Pseudo-labels: `ignore` where the confidence is strictly below its class's threshold.

    Args:
      labels: int [...] predicted labels; values outside [0, C) are returned unchanged.
      confidences: float [...] their confidences, same shape.
      thresholds: [C]. A numpy array (float64, as `class_thresholds` returns) is rounded up to the
        confidences' dtype first (`round_up_thresholds`); a jax array is used as it is (under
        `jax.jit`, pass `round_up_thresholds(t, dtype)` or close over the numpy array).
      ignore: the label of dropped pixels (255).

    Returns:
      int32 [...] pseudo-labels.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    confidences = jnp.asarray(confidences)
    if isinstance(thresholds, np.ndarray):
        thresholds = round_up_thresholds(thresholds, confidences.dtype)
    thresholds = jnp.asarray(thresholds, confidences.dtype)
    num_classes = thresholds.shape[0]
    in_range = (labels >= 0) & (labels < num_classes)
    per_pixel = thresholds[jnp.clip(labels, 0, num_classes - 1)]
    return jnp.where(in_range & (confidences < per_pixel), ignore, labels)
