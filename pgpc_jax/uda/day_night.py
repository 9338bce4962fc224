"""SePiCo's daytime -> nighttime pieces (Cityscapes -> Dark Zurich), after DANNet.

The teacher labels a night image from two predictions: its own softmax on the night image and its
softmax on the paired day image of the same place. For the classes whose appearance changes little
between day and night (road, sidewalk, building, wall, fence, vegetation, terrain, sky) the day
prediction gets weight `day_ratio` (0.8) where it is confident (day probability of that class >
0.4) and `1 - day_ratio` (0.2) elsewhere; every other class is taken from the night prediction
alone. The mixed scores are then multiplied by a per-class weight vector that favours rare classes,
and the pseudo label is their argmax (no renormalisation: the mixed scores need not sum to one).

The class weights come from 19 class frequencies `f` hard-coded in the released code:
`w = (mean(log f) - log f) / std(log f) * strength + 1`, std with Bessel's correction (torch's
default). Strength 0.05 is used for the pseudo-label mix and as the cross-entropy class weights of
the decode head during training; 0.16 is the strength noted in the released configuration for
test-time reweighting of the predictions. `pixel_class_weights` turns the weights into the pixel
weights of `losses.segmentation.cross_entropy` (torch's class-weighted cross-entropy).

All functions are pure jnp, take NHWC arrays with the class axis last, and are jit-able.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from data_pipelines.labels import IGNORE_INDEX

# Class frequencies of the 19 Cityscapes train classes (road ... bicycle), as hard-coded in
# SePiCo's `experiments.py` (ids 7 and 8) and DANNet's `train.py` / `evaluate.py`.
DARK_ZURICH_CLASS_FREQUENCIES = np.array(
    [
        0.36869696, 0.06084986, 0.22824049, 0.00655399, 0.00877272, 0.01227341, 0.00207795,
        0.0055127, 0.15928651, 0.01157818, 0.04018982, 0.01218957, 0.00135122, 0.06994545,
        0.00267456, 0.00235192, 0.00232904, 0.00098658, 0.00413907,
    ],
    np.float32,
)  # fmt: skip

# Class-weight strengths: training (pseudo-label mix and decode-head cross-entropy) and test time.
TRAIN_STRENGTH = 0.05
TEST_STRENGTH = 0.16
# Half-open class-index ranges treated as shift-insensitive: road, sidewalk, building, wall, fence
# (0-4) and vegetation, terrain, sky (8-10).
SHIFT_INSENSITIVE_CLASSES = ((0, 5), (8, 11))
DAY_RATIO = 0.8
DAY_CONFIDENCE = 0.4


def class_weights(
    frequencies=DARK_ZURICH_CLASS_FREQUENCIES,
    strength: float = TRAIN_STRENGTH,
    ddof: int = 1,
) -> jnp.ndarray:
    """Per-class weights from class frequencies, larger for rarer classes.

    `w_c = (mean(log f) - log f_c) / std(log f) * strength + 1`.

    Args:
      frequencies: float [C] positive class frequencies (default: the released Dark Zurich ones).
      strength: scale of the deviation from 1 (0.05 training, 0.16 test time).
      ddof: delta degrees of freedom of the standard deviation; 1 (unbiased, torch.std's default)
        as released.

    Returns:
      float32 [C].
    """
    log_f = jnp.log(jnp.asarray(frequencies, jnp.float32))
    return (jnp.mean(log_f) - log_f) / jnp.std(log_f, ddof=ddof) * strength + 1.0


def shift_insensitive_mask(
    num_classes: int, ranges: Sequence[tuple[int, int]] = SHIFT_INSENSITIVE_CLASSES
) -> np.ndarray:
    """bool [num_classes]: True for the classes inside the half-open `ranges`."""
    mask = np.zeros(num_classes, bool)
    for start, stop in ranges:
        mask[start:stop] = True
    return mask


def mix_day_night_probs(
    p_day: jnp.ndarray,
    p_night: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    day_ratio: float = DAY_RATIO,
    day_confidence: float = DAY_CONFIDENCE,
    shift_insensitive_classes: Sequence[tuple[int, int]] = SHIFT_INSENSITIVE_CLASSES,
) -> jnp.ndarray:
    """Mixes the teacher's day and night softmax into pseudo-label scores, as released.

    Per pixel and class c: `m_c = day_ratio` if c is shift-insensitive and `p_day_c >
    day_confidence`, `1 - day_ratio` if shift-insensitive otherwise, 0 for the other classes;
    `p_c = m_c * p_day_c + (1 - m_c) * p_night_c`, then `p_c * weights_c`. The confidence test is
    on the day probability of the same class; the result is not renormalised.

    Args:
      p_day: float [B, H, W, C] softmax on the paired day images.
      p_night: float [B, H, W, C] softmax on the night images.
      weights: float [C] class weights (`class_weights()`), or None for no reweighting.
      day_ratio: weight of a confident day prediction (0.8).
      day_confidence: day probability above which the day prediction counts as confident (0.4).
      shift_insensitive_classes: half-open class-index ranges mixed with the day prediction.

    Returns:
      float [B, H, W, C] mixed scores; the pseudo label is their argmax over the last axis.
    """
    insensitive = jnp.asarray(shift_insensitive_mask(p_night.shape[-1], shift_insensitive_classes))
    day_weight = jnp.where(p_day > day_confidence, day_ratio, 1.0 - day_ratio)
    day_weight = jnp.where(insensitive, day_weight, 0.0).astype(p_night.dtype)
    mixed = day_weight * p_day + (1.0 - day_weight) * p_night
    if weights is not None:
        mixed = mixed * jnp.asarray(weights, mixed.dtype)
    return mixed


def reweight_test_probs(
    probs: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    strength: float = TEST_STRENGTH,
) -> jnp.ndarray:
    """Test-time class reweighting of predictions on Dark Zurich night images.

    Multiplies the class scores by `class_weights(strength=strength)` (or `weights`); the
    prediction is the argmax of the result.

    Args:
      probs: float [..., C] class scores (softmax probabilities).
      weights: float [C] class weights; default `class_weights(strength=strength)` from the
        released frequencies.
      strength: strength of the default weights (0.16).

    Returns:
      float [..., C] reweighted scores.
    """
    if weights is None:
        weights = class_weights(strength=strength)
    return probs * jnp.asarray(weights, probs.dtype)


def pixel_class_weights(
    labels: jnp.ndarray, weights: jnp.ndarray, ignore_index: int = IGNORE_INDEX
) -> jnp.ndarray:
    """Per-pixel weights `weights[label]` for a class-weighted cross-entropy.

    torch's `F.cross_entropy(weight=w, reduction='none')` (the decode head's loss with SePiCo's
    class weights) multiplies each pixel's loss by `w[label]` without renormalising; so
    `losses.segmentation.cross_entropy(logits, labels, pixel_weight * pixel_class_weights(...))`
    is that loss. Ignored pixels get 1 (their loss is 0 anyway).

    Args:
      labels: int [B, H, W] train ids.
      weights: float [C] class weights (`class_weights()`).
      ignore_index: the ignored label.

    Returns:
      float32 [B, H, W].
    """
    weights = jnp.asarray(weights, jnp.float32)
    valid = labels != ignore_index
    return jnp.where(valid, weights[jnp.where(valid, labels, 0)], 1.0)
