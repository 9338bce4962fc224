"""DACS ClassMix, colour jitter and Gaussian blur on device, as DAFormer
(`mmseg/models/utils/dacs_transforms.py`, driven by `mmseg/models/uda/dacs.py`) with kornia 0.5.8
(DAFormer's pinned version: `kornia.augmentation.ColorJitter`, `kornia.filters.GaussianBlur2d`).

The reference, per training step:

1. `get_class_masks`: for each source image, draw ceil(n/2) = (n + n%2)/2 of the n classes in
   `torch.unique` over the WHOLE source label batch, uniformly without replacement; the mask is
   the image's pixels whose label is one of them.
2. Per image: mix (source where the mask is set, target elsewhere) for the image and the label;
   the weight becomes 1 on pasted pixels and the pseudo-label weight elsewhere.
3. Colour jitter on the mixed image when U(0,1) > 0.2 (one draw per step, shared by the batch):
   de-normalise to [0, 1], kornia `ColorJitter(0.2, 0.2, 0.2, 0.2)`, re-normalise. Kornia is
   called once per image, so every image draws its own four factors and its own order of the
   four adjustments (a random permutation).
4. Gaussian blur when U(0,1) > 0.5 (one draw per step): sigma ~ U(0.15, 1.15) drawn per image
   (`np.random.uniform` inside the per-image call), the same sigma along both axes, kernel size
   per axis k = floor(ceil(0.1 * side) - 0.5 + ceil(0.1 * side) % 2), the odd number at or
   just below ceil(0.1 * side) (51 for 512), reflect padding.

Kornia 0.5.8 ColorJitter, as transcribed here (factors drawn as U(1 - s, 1 + s), hue U(-s, s)):
brightness adds (factor - 1) and clamps to [0, 1]; contrast multiplies by the factor and clamps
(OpenCV-style, no mean); saturation multiplies S of HSV and clamps to [0, 1]; hue adds
factor * 2 pi to H in radians with `fmod(., 2 pi)`. The HSV conversions are kornia's: S = delta /
(V + 1e-6), H from the first maximal channel. These 0.5.8 formulas are kept on purpose: later
kornia releases changed `ColorJitter` towards torchvision's (multiplicative brightness, contrast
around the mean), which is not what DAFormer trained with.

Cost: under `vmap` each of the four positions evaluates all four adjustments and selects one
(two HSV round trips per position): about 0.6 s for 2 x 512 x 512 on our 2-core CPU, negligible
on an accelerator. The blur is two banded matrix products per image (0.1 s on the same CPU).

Deviations from the reference
-----------------------------
* Random numbers come from `jax.random` keys, so the draws differ from torch / numpy streams;
  the distributions are the same (a uniform subset of classes is the top-k of uniform scores).
* The class set is the labels 0..num_classes-1 plus, with `include_ignore=True` (the default,
  the reference's quirk), the ignore index 255 when it occurs in the batch: 255 then counts in n
  and can be drawn, which pastes source "ignore" pixels (weight 1, ignored by the loss anyway).
  `include_ignore=False` counts only real classes. Label values outside 0..num_classes-1 and
  the ignore index are not counted (the reference would count them; valid data has none).
* The blur is applied as two 1-D passes (the 2-D kornia kernel is their outer product), each a
  banded matrix product: equal up to float rounding.
* The apply-probabilities are given as probabilities of applying (`jitter_prob` 0.8,
  `blur_prob` 0.5) and tested as U > 1 - p, which is the reference's U > 0.2 and U > 0.5.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from data_pipelines.labels import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

# ---------------------------------------------------------------------------------------------
# ClassMix


def class_mix_masks(
    rng: jax.Array,
    src_labels: jax.Array,
    num_classes: int = 19,
    ignore_index: int = IGNORE_INDEX,
    include_ignore: bool = True,
) -> jax.Array:
    """DACS `get_class_masks`: per image, half of the batch's classes, as a pixel mask.

    Args:
      rng: PRNG key.
      src_labels: int [B, H, W] source labels (0..num_classes-1, or `ignore_index`).
      num_classes: number of real classes.
      ignore_index: the ignore label.
      include_ignore: count `ignore_index` as a class when present (the reference's quirk).

    Returns:
      float32 [B, H, W], 1 where the source pixel's class was drawn for that image.
    """
    batch = src_labels.shape[0]
    # Slot num_classes stands for the ignore index; other out-of-range values get no slot.
    slots = jnp.where(src_labels == ignore_index, num_classes, src_labels)
    slots = jnp.where((slots >= 0) & (slots <= num_classes), slots, num_classes + 1)
    # A reduction over the whole batch (not a scatter), so a batch-sharded input stays cheap.
    present = jnp.any(slots[..., None] == jnp.arange(num_classes + 1), axis=(0, 1, 2))
    if not include_ignore:
        present = present.at[num_classes].set(False)
    n = jnp.sum(present.astype(jnp.int32))
    n_chosen = (n + n % 2) // 2
    # Uniform k-subset of the present slots: rank uniform scores, absent slots last.
    scores = jax.random.uniform(rng, (batch, num_classes + 1))
    scores = jnp.where(present[None], scores, 2.0)
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    chosen = present[None] & (ranks < n_chosen)  # [B, K + 1]
    chosen = jnp.concatenate([chosen, jnp.zeros((batch, 1), bool)], axis=-1)  # no-slot column
    mask = jnp.take_along_axis(chosen, slots.reshape(batch, -1), axis=-1)
    return mask.reshape(src_labels.shape).astype(jnp.float32)


def mix(mask: jax.Array, src: jax.Array, tgt: jax.Array) -> jax.Array:
    """DACS `one_mix`: `src` where `mask` is set, `tgt` elsewhere.

    Args:
      mask: [B, H, W] 0/1 mask.
      src, tgt: [B, H, W] or [B, H, W, C] arrays of one dtype (images, labels or weights).

    Returns:
      The mixed array, shaped and typed as `src`.
    """
    m = mask.reshape(mask.shape + (1,) * (src.ndim - mask.ndim)) > 0.5
    return jnp.where(m, src, tgt)


def class_mix(
    mask: jax.Array,
    src_images: jax.Array,
    tgt_images: jax.Array,
    src_labels: jax.Array,
    pseudo_labels: jax.Array,
    pseudo_weight: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixed images, labels and pixel weights of DACS.

    Args:
      mask: float [B, H, W] from `class_mix_masks`.
      src_images, tgt_images: [B, H, W, 3] normalised images.
      src_labels, pseudo_labels: int [B, H, W].
      pseudo_weight: float [B, H, W] target weight from `teacher.pseudo_labels`.

    Returns:
      images [B, H, W, 3], labels int32 [B, H, W], weight float32 [B, H, W]
      (1 on pasted source pixels, the pseudo-label weight elsewhere).
    """
    images = mix(mask, src_images, tgt_images)
    labels = mix(mask, src_labels.astype(jnp.int32), pseudo_labels.astype(jnp.int32))
    weight = mix(mask, jnp.ones_like(pseudo_weight, jnp.float32), pseudo_weight.astype(jnp.float32))
    return images, labels, weight


# ---------------------------------------------------------------------------------------------
# Colour jitter (kornia 0.5.8 ColorJitter)


def rgb_to_hsv(image: jax.Array, eps: float = 1e-6) -> jax.Array:
    """kornia 0.5.8 `rgb_to_hsv` on [..., 3] RGB in [0, 1]: H in [0, 2 pi), S and V in [0, 1]."""
    maxc = jnp.max(image, axis=-1)
    minc = jnp.min(image, axis=-1)
    max_index = jnp.argmax(image, axis=-1)  # the first maximal channel, as kornia's cumsum trick
    v = maxc
    delta = maxc - minc
    s = delta / (v + eps)
    delta = jnp.where(delta == 0, jnp.ones_like(delta), delta)
    rc, gc, bc = (maxc - image[..., i] for i in range(3))
    candidates = jnp.stack([bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc], axis=-1)
    h = jnp.take_along_axis(candidates, max_index[..., None], axis=-1)[..., 0]
    h = h / delta
    h = jnp.mod(h / 6.0, 1.0)  # torch `%`: the result takes the divisor's sign
    h = 2 * math.pi * h
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
    """kornia 0.5.8 `hsv_to_rgb` on [..., 3] HSV (H in radians)."""
    h = image[..., 0] / (2 * math.pi)
    s, v = image[..., 1], image[..., 2]
    hi = jnp.mod(jnp.floor(h * 6), 6)
    f = jnp.mod(h * 6, 6) - hi
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    hi = hi.astype(jnp.int32)
    table = jnp.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], axis=-1)
    index = jnp.stack([hi, hi + 6, hi + 12], axis=-1)
    return jnp.take_along_axis(table, index, axis=-1)


def sample_color_jitter(
    rng: jax.Array, batch: int, strength: float = 0.2, one_order: bool = False
) -> dict[str, jax.Array]:
    """Per-image ColorJitter parameters, as kornia draws them with one call per image.

    Args:
      rng: PRNG key.
      batch: number of images B.
      strength: s of `ColorJitter(s, s, s, s)`.
      one_order: one permutation for the whole batch, as kornia 0.5.8 draws it for one call on
        a batch (the factors stay per image); False: one per image (one call per image).

    Returns:
      {'brightness', 'contrast', 'saturation': [B] in U(1 - s, 1 + s) (brightness and
       contrast bounds clamped below at 0), 'hue': [B] in U(-s, s), 'order': int32 [B, 4] a
       permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)}.
    """
    kb, kc, ks, kh, ko = jax.random.split(rng, 5)
    lo = max(0.0, 1.0 - strength)

    def factor(k, low, high):
        return jax.random.uniform(k, (batch,), jnp.float32, low, high)

    # A uniform random permutation per image: the ranks of four uniform draws.
    order = jnp.argsort(jax.random.uniform(ko, (1 if one_order else batch, 4)), axis=-1)
    order = jnp.broadcast_to(order, (batch, 4))
    return {
        "brightness": factor(kb, lo, min(2.0, 1.0 + strength)),
        "contrast": factor(kc, lo, 1.0 + strength),
        "saturation": factor(ks, lo, 1.0 + strength),
        "hue": factor(kh, max(-0.5, -strength), min(0.5, strength)),
        "order": order.astype(jnp.int32),
    }


def _adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    hsv = rgb_to_hsv(image)
    s = jnp.clip(hsv[..., 1] * factor, 0.0, 1.0)
    return hsv_to_rgb(hsv.at[..., 1].set(s))


def _adjust_hue(image: jax.Array, factor: jax.Array) -> jax.Array:
    hsv = rgb_to_hsv(image)
    h = jnp.fmod(hsv[..., 0] + factor * 2 * math.pi, 2 * math.pi)  # torch.fmod: C semantics
    return hsv_to_rgb(hsv.at[..., 0].set(h))


def color_jitter(images: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """kornia 0.5.8 `ColorJitter.apply_transform`, one image at a time with its own order.

    Args:
      images: float32 [B, H, W, 3] RGB in [0, 1].
      params: from `sample_color_jitter`.

    Returns:
      float32 [B, H, W, 3].
    """

    def one(image, b, c, s, h, order):
        ops = (
            lambda x: jnp.clip(x + (b - 1.0), 0.0, 1.0),
            lambda x: jnp.clip(x * c, 0.0, 1.0),
            lambda x: _adjust_saturation(x, s),
            lambda x: _adjust_hue(x, h),
        )
        # A loop, not four unrolled switches: the program holds each adjustment once.
        return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(order[i], ops, x), image)

    keys = ("brightness", "contrast", "saturation", "hue", "order")
    return jax.vmap(one)(images, *(params[k] for k in keys))


# ---------------------------------------------------------------------------------------------
# Gaussian blur (kornia 0.5.8 GaussianBlur2d)


def blur_kernel_size(side: int) -> int:
    """DAFormer's kernel size for an image side: the odd number at or below ceil(0.1 * side)."""
    c = math.ceil(0.1 * side)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_kernel1d(size: int, sigma: jax.Array) -> jax.Array:
    """kornia `gaussian(window_size, sigma)`: normalised taps [..., size] for sigma [...]."""
    x = jnp.arange(size, dtype=jnp.float32) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    sigma = jnp.asarray(sigma, jnp.float32)[..., None]
    g = jnp.exp(-(x**2) / (2 * sigma**2))
    return g / jnp.sum(g, axis=-1, keepdims=True)


def _band_matrix(taps: jax.Array, size: int) -> jax.Array:
    """[B, size, size + k - 1] matrices M with M[b, i, i + j] = taps[b, j]: a 1-D filter over
    a padded axis as a matrix product (fast on every backend, unlike per-image convolutions)."""
    k = taps.shape[-1]
    offset = jnp.arange(size + k - 1)[None, :] - jnp.arange(size)[:, None]  # [size, size + k - 1]
    inside = (offset >= 0) & (offset < k)
    return jnp.where(inside[None], taps[:, jnp.clip(offset, 0, k - 1)], 0.0)


def gaussian_blur(images: jax.Array, sigma: jax.Array, kernel_size: Sequence[int]) -> jax.Array:
    """kornia `GaussianBlur2d(kernel_size, (sigma, sigma))` with reflect padding, per image.

    Args:
      images: float [B, H, W, C].
      sigma: float [B], one standard deviation per image (both axes).
      kernel_size: (kh, kw), odd, each at most 2 * side - 1 (reflect padding).

    Returns:
      [B, H, W, C] in the dtype of `images`.
    """
    kh, kw = int(kernel_size[0]), int(kernel_size[1])
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {(kh, kw)}")
    batch, height, width = images.shape[:3]
    x = images.astype(jnp.float32)
    pad = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))
    x = jnp.pad(x, pad, mode="reflect")  # torch 'reflect': the edge is not repeated
    # Separable: rows, then columns, each a banded matrix product per image.
    rows = _band_matrix(gaussian_kernel1d(kh, sigma), height)  # [B, H, H + kh - 1]
    cols = _band_matrix(gaussian_kernel1d(kw, sigma), width)  # [B, W, W + kw - 1]
    precision = jax.lax.Precision.HIGHEST
    x = jnp.einsum("bhp,bpqc->bhqc", rows, x, precision=precision)
    x = jnp.einsum("bwq,bhqc->bhwc", cols, x, precision=precision)
    return x.astype(images.dtype)


# ---------------------------------------------------------------------------------------------
# The strong augmentation of the mixed images


def denormalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """DACS `denorm`: normalised [B, H, W, 3] -> [0, 1] (x * std + mean) / 255."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (images * std + mean) / 255.0


def renormalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """DACS `renorm_`: [0, 1] [B, H, W, 3] -> normalised (x * 255 - mean) / std."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (images * 255.0 - mean) / std


def sample_strong_augment(
    rng: jax.Array,
    batch: int,
    jitter_strength: float = 0.2,
    jitter_prob: float = 0.8,
    blur_prob: float = 0.5,
    decision_rng: jax.Array | None = None,
    per_call: bool = False,
) -> dict:
    """Every random draw of one step's `strong_augment`.

    Args:
      rng: PRNG key (the caller folds in the step).
      batch: number of images B.
      jitter_strength: kornia ColorJitter strength s (0.2).
      jitter_prob: probability that this step jitters (0.8: the reference's U > 0.2).
      blur_prob: probability that this step blurs (0.5: the reference's U > 0.5).
      decision_rng: the key of the two apply decisions; None: `rng`. The decisions depend on
        this key alone (not on B), so calls that share it share the step's decisions (the
        reference's one `strong_parameters`) while `rng` gives each call its own factors.
      per_call: one jitter order and one blur sigma for the whole batch, as one reference call
        on a batch (`strong_transform` on the source batch); False: per image, as the
        reference's one call per mixed image.

    Returns:
      {'jitter': bool scalar, 'blur': bool scalar (one draw each for the whole batch),
       'color': per-image `sample_color_jitter` parameters, 'sigma': float32 [B] in
       U(0.15, 1.15), one blur sigma per image (all equal with `per_call`)}.
    """
    k_jitter_u, k_jitter, k_blur_u, k_sigma = jax.random.split(rng, 4)
    if decision_rng is not None:
        k_jitter_u, _, k_blur_u, _ = jax.random.split(decision_rng, 4)
    sigma = jax.random.uniform(k_sigma, (1 if per_call else batch,), jnp.float32, 0.15, 1.15)
    return {
        "jitter": jax.random.uniform(k_jitter_u) > 1.0 - jitter_prob,
        "blur": jax.random.uniform(k_blur_u) > 1.0 - blur_prob,
        "color": sample_color_jitter(k_jitter, batch, jitter_strength, one_order=per_call),
        "sigma": jnp.broadcast_to(sigma, (batch,)),
    }


def strong_augment(
    rng: jax.Array,
    images: jax.Array,
    jitter_strength: float = 0.2,
    jitter_prob: float = 0.8,
    blur_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    decision_rng: jax.Array | None = None,
    per_call: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DACS `strong_transform` after the mix: colour jitter, then Gaussian blur.

    Args:
      rng: PRNG key (the caller folds in the step).
      images: float32 [B, H, W, 3] normalised mixed images.
      jitter_strength, jitter_prob, blur_prob, decision_rng, per_call: as
        `sample_strong_augment`.
      mean, std: the normalisation of `images` (mmseg `img_norm_cfg`, RGB).

    Returns:
      augmented images [B, H, W, 3] float32, and {'jitter', 'blur'}: float32 0/1 scalars saying
      whether each was applied this step.
    """
    batch, height, width = images.shape[:3]
    images = images.astype(jnp.float32)
    draws = sample_strong_augment(
        rng, batch, jitter_strength, jitter_prob, blur_prob, decision_rng, per_call
    )
    kernel = (blur_kernel_size(height), blur_kernel_size(width))

    def jitter(x):
        return renormalize(color_jitter(denormalize(x, mean, std), draws["color"]), mean, std)

    def blur(x):
        return gaussian_blur(x, draws["sigma"], kernel)

    # Real conditionals (one decision per step), so a skipped step costs nothing.
    images = jax.lax.cond(draws["jitter"], jitter, lambda x: x, images)
    images = jax.lax.cond(draws["blur"], blur, lambda x: x, images)
    applied = {k: draws[k].astype(jnp.float32) for k in ("jitter", "blur")}
    return images, applied
