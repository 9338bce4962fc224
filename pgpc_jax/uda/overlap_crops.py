"""PiPa's pair of overlapping target crops for the patch contrast, on device and at fixed shapes.

Source [released]: PiPa (Chen et al., ACM MM 2023), `chen742/PiPa`,
`PiPa_DAFormer/dataloaders/city.py: PairCityDataset.__getitem__` (the crop pair; the CAC loader,
config `PiPa_DAFormer/configs/cac/config.json`: crop 720, `stride` 8, `iou_bound` [0.1, 1.0])
and the `# get overlap part` loop of `PiPa_DAFormer/mmseg/models/uda/dacs.py:
DACS.forward_train` (flip undone, overlap cut at `// 8`).

The released rule, per image of size H x W and crop h x w:

* crop 1: `x1 ~ U{0..W-w}`, `y1 ~ U{0..H-h}` (`random.randint`, both ends included);
* up to 50 tries of crop 2: `x2 ~ U{0..W-w}`, `y2 ~ U{0..H-h}`, then snapped so that the offset
  from crop 1 is a multiple of the stride, `x2 = (x2 - x1) // s * s + x1` (floor division), and
  `x2 += s` if that is negative (the result stays in 0..W-w and keeps `x2 = x1 mod s`); the try
  is accepted when the crops overlap (`w - |x2-x1| > 0` and `h - |y2-y1| > 0`) and
  `IoU = inter / (2 h w - inter)` lies in [lo, hi], both ends included;
* no accepted try: crop 2 = crop 1;
* the overlap in each crop's pixels, `ul` (inclusive) and `br` (exclusive), (y, x):
  `ul1 = max(0, o2 - o1)`, `br1 = min(size, size + o2 - o1)`, and the same with 1 and 2
  swapped;
* each crop flipped horizontally with p = 0.5, independently (the returned `ul`/`br` are in the
  un-flipped crop);
* on the features at stride 8 (the fused decoder feature at H/4, avg-pooled by 2), each view's
  flip is undone and the overlap cut as `[ul // 8 : br // 8]` per axis, row-major.

[fixed shape] The tries are `num_tries` candidates drawn at once, each snapped and tested; the
first accepted one is kept (`argmax` of the acceptance mask), and crop 1's offset when none is.
The first accepted try of a sequence of independent tries is exactly what the released loop
returns, so the boxes have the released distribution; only the random stream differs.
`boxes_from_draws` takes the draws as arrays, for tests and callers with their own draws.

[fixed shape] The overlap at feature stride s is returned as gather indices of the full grid
size h/s x w/s (the largest possible overlap: identical crops), with a validity mask. Position
(i, j) pairs cell (ul1/s + (i, j)) of view 1 with cell (ul2/s + (i, j)) of view 2 in the
un-flipped grids; the indices point into each view's feature map as the network saw it (flipped
when the crop was), so `gather_overlap(feats, idx)` undoes the flip. The valid positions, read
row-major, are the released `output_ul[:, ul // 8 : br // 8, ...]` flattened, batch after batch.

Deviations [fixed shape]:

* The crops must fit in the image and h, w must be multiples of the stride (720 and 8 as
  released); a `ValueError` says so at trace time. The released loader pads a smaller image and
  clips `br` at `H // s * s`; that clip never binds when the crop fits.
* IoU is computed in float32 (the release: Python float64); a candidate whose IoU lies within
  float32 rounding of a bound can be decided differently.

Not here: the released loader's rescale (long side in [0.8, 2.0] x 2048), and each crop's
photometric augmentation (Gaussian blur p = 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) p = 0.8,
grayscale p = 0.2), the caller's (e.g. `uda.mixing`) with its own key per crop.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


class CropPair(NamedTuple):
    """Two overlapping crops per image.

    offsets1, offsets2: int32 [B, 2] (y, x) top-left corners in the image.
    flips: bool [B, 2] whether crop 1 / crop 2 is flipped horizontally.
    accepted: bool [B]; False where no try was accepted and crop 2 = crop 1 (the fallback).
    """

    offsets1: jax.Array
    offsets2: jax.Array
    flips: jax.Array
    accepted: jax.Array


def _check_sizes(
    image_size: Sequence[int], crop_size: Sequence[int], stride: int
) -> tuple[int, int, int, int]:
    height, width = (int(s) for s in image_size)
    crop_h, crop_w = (int(s) for s in crop_size)
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(
            f"overlap crops: crop_size={tuple(crop_size)} must be positive and fit in the image "
            f"{height}x{width}"
        )
    if stride < 1 or crop_h % stride or crop_w % stride:
        raise ValueError(
            f"overlap crops: crop_size={tuple(crop_size)} must be a multiple of stride={stride}"
        )
    return height, width, crop_h, crop_w


def crop_iou(offsets1: jax.Array, offsets2: jax.Array, crop_size: Sequence[int]) -> jax.Array:
    """IoU of two equal-size boxes, as the release: inter / (2 h w - inter), 0 without overlap.

    Args:
      offsets1, offsets2: int [..., 2] (y, x) corners.
      crop_size: (h, w).

    Returns:
      float32 [...].
    """
    crop_h, crop_w = (int(s) for s in crop_size)
    delta = jnp.abs(jnp.asarray(offsets2, jnp.int32) - jnp.asarray(offsets1, jnp.int32))
    extent = jnp.maximum(jnp.asarray([crop_h, crop_w], jnp.int32) - delta, 0)  # [..., 2]
    inter = (extent[..., 0] * extent[..., 1]).astype(jnp.float32)
    return inter / (2.0 * crop_h * crop_w - inter)


def snap_to_stride(offsets1: jax.Array, raw: jax.Array, stride: int) -> jax.Array:
    """The released snap of crop 2's draw: `(raw - o1) // s * s + o1`, plus s if negative.

    Args:
      offsets1: int [..., 2] crop 1's corner (broadcast against raw).
      raw: int [..., 2] drawn corners of crop 2.
      stride: s.

    Returns:
      int32 [..., 2]: offsets from crop 1 that are multiples of s, inside
      [0, max(raw, offsets1)] (at most the draw, or at most crop 1's where the +s applied).
    """
    offsets1 = jnp.asarray(offsets1, jnp.int32)
    snapped = jnp.floor_divide(jnp.asarray(raw, jnp.int32) - offsets1, stride) * stride + offsets1
    return jnp.where(snapped < 0, snapped + stride, snapped)


def boxes_from_draws(
    offsets1: jax.Array,
    raw_tries: jax.Array,
    flips: jax.Array,
    crop_size: Sequence[int],
    stride: int = 8,
    iou_range: Sequence[float] = (0.1, 1.0),
) -> CropPair:
    """The released selection of crop 2 among explicit tries: the first accepted, else crop 1.

    Args:
      offsets1: int [B, 2] crop 1's (y, x).
      raw_tries: int [B, T, 2] crop 2's drawn (y, x) per try, before snapping.
      flips: bool [B, 2] the two flip decisions.
      crop_size: (h, w).
      stride: s, the grid of the offset between the crops (8).
      iou_range: (lo, hi), both included ([0.1, 1.0]).

    Returns:
      CropPair.
    """
    crop_h, crop_w = (int(s) for s in crop_size)
    offsets1 = jnp.asarray(offsets1, jnp.int32)
    tries = snap_to_stride(offsets1[:, None], raw_tries, stride)  # [B, T, 2]
    delta = jnp.abs(tries - offsets1[:, None])
    overlaps = (crop_h - delta[..., 0] > 0) & (crop_w - delta[..., 1] > 0)
    iou = crop_iou(offsets1[:, None], tries, crop_size)
    lo, hi = (float(v) for v in iou_range)
    ok = overlaps & (iou >= lo) & (iou <= hi)  # [B, T]
    first = jnp.argmax(ok, axis=1)  # the first accepted try (0 when none, then unused)
    accepted = jnp.any(ok, axis=1)
    chosen = jnp.take_along_axis(tries, first[:, None, None], axis=1)[:, 0]
    offsets2 = jnp.where(accepted[:, None], chosen, offsets1)
    return CropPair(offsets1, offsets2, jnp.asarray(flips, bool), accepted)


def draw_crop_pairs(
    key: jax.Array,
    batch: int,
    image_size: Sequence[int],
    crop_size: Sequence[int],
    stride: int = 8,
    iou_range: Sequence[float] = (0.1, 1.0),
    num_tries: int = 50,
    flip_prob: float = 0.5,
) -> CropPair:
    """Random crop pairs with the released distribution (module docstring).

    Args:
      key: PRNG key.
      batch: B.
      image_size: (H, W) of the image the crops are cut from.
      crop_size: (h, w), fitting in the image, multiples of `stride` ((720, 720)).
      stride: s (8).
      iou_range: (lo, hi) ([0.1, 1.0]).
      num_tries: T, the released `max_iters` (50).
      flip_prob: probability of each crop's horizontal flip (0.5).

    Returns:
      CropPair.
    """
    height, width, crop_h, crop_w = _check_sizes(image_size, crop_size, stride)
    k_first, k_tries, k_flip = jax.random.split(key, 3)
    maxval = jnp.array([height - crop_h + 1, width - crop_w + 1], jnp.int32)
    offsets1 = jax.random.randint(k_first, (batch, 2), 0, maxval, dtype=jnp.int32)
    raw = jax.random.randint(k_tries, (batch, num_tries, 2), 0, maxval, dtype=jnp.int32)
    flips = jax.random.uniform(k_flip, (batch, 2)) < flip_prob
    return boxes_from_draws(offsets1, raw, flips, crop_size, stride, iou_range)


def overlap_boxes(
    pair: CropPair, crop_size: Sequence[int]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The overlap in each crop's (un-flipped) pixels, as the released `overlap*_ul/br`.

    Args:
      pair: CropPair.
      crop_size: (h, w).

    Returns:
      (ul1, br1, ul2, br2), int32 [B, 2] (y, x); ul inclusive, br exclusive.
    """
    size = jnp.asarray([int(s) for s in crop_size], jnp.int32)
    d = pair.offsets2 - pair.offsets1
    ul1, br1 = jnp.maximum(0, d), jnp.minimum(size, size + d)
    ul2, br2 = jnp.maximum(0, -d), jnp.minimum(size, size - d)
    return ul1, br1, ul2, br2


def cut_crops(
    x: jax.Array, offsets: jax.Array, flips: jax.Array, crop_size: Sequence[int]
) -> jax.Array:
    """Cut each image's box and flip it horizontally where asked.

    Args:
      x: [B, H, W, ...] images, labels or weights.
      offsets: int [B, 2] (y, x), e.g. `pair.offsets1`.
      flips: bool [B], e.g. `pair.flips[:, 0]`.
      crop_size: (h, w), fitting in the image.

    Returns:
      [B, h, w, ...], the dtype of x.
    """
    crop_h, crop_w = (int(s) for s in crop_size)
    if not (0 < crop_h <= x.shape[1] and 0 < crop_w <= x.shape[2]):
        raise ValueError(f"cut_crops: crop_size={tuple(crop_size)} must fit in {x.shape[1:3]}")

    def one(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
        start = (offset[0], offset[1]) + (0,) * (image.ndim - 2)
        crop = jax.lax.dynamic_slice(image, start, (crop_h, crop_w) + image.shape[2:])
        return jnp.where(flip, jnp.flip(crop, axis=1), crop)

    return jax.vmap(one)(x, jnp.asarray(offsets, jnp.int32), jnp.asarray(flips, bool))


def overlap_feature_indices(
    pair: CropPair, crop_size: Sequence[int], stride: int = 8
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Paired indices of the overlap's cells in the two views' feature grids, flips undone.

    The feature grid of a crop is (h / s) x (w / s), read row-major; the crop offsets must differ
    by multiples of s (as drawn here). Position (i, j) of the output is the overlap's cell
    (i, j): the same scene cell in both views.

    Args:
      pair: CropPair.
      crop_size: (h, w), multiples of s.
      stride: s, the feature stride (8 as released).

    Returns:
      (idx1, idx2, valid): int32 [B, h/s, w/s] flat indices into view 1's / view 2's feature
      map as the network produced it (flipped where the crop was), and bool [B, h/s, w/s] marking
      the overlap's cells (the top-left oh x ow block). Invalid positions hold index 0.
    """
    crop_h, crop_w = (int(s) for s in crop_size)
    if stride < 1 or crop_h % stride or crop_w % stride:
        raise ValueError(f"crop_size={tuple(crop_size)} must be a multiple of stride={stride}")
    grid_h, grid_w = crop_h // stride, crop_w // stride
    ul1, br1, ul2, _ = overlap_boxes(pair, crop_size)
    extent = (br1 - ul1) // stride  # [B, 2] overlap cells per axis, equal in both views
    rows = jnp.arange(grid_h, dtype=jnp.int32)[None, :, None]
    cols = jnp.arange(grid_w, dtype=jnp.int32)[None, None, :]
    valid = (rows < extent[:, 0, None, None]) & (cols < extent[:, 1, None, None])

    def index(ul: jax.Array, flip: jax.Array) -> jax.Array:
        r = jnp.where(valid, ul[:, 0, None, None] // stride + rows, 0)
        c = jnp.where(valid, ul[:, 1, None, None] // stride + cols, 0)
        # The network saw the flipped crop: un-flipped column c is its column grid_w - 1 - c.
        c = jnp.where(flip[:, None, None] & valid, grid_w - 1 - c, c)
        return r * grid_w + c

    return index(ul1, pair.flips[:, 0]), index(ul2, pair.flips[:, 1]), valid


def gather_overlap(feats: jax.Array, idx: jax.Array) -> jax.Array:
    """Pick the overlap's cells out of one view's feature map.

    Args:
      feats: [B, gh, gw, ...] features, labels or confidences at the feature stride.
      idx: int [B, oh, ow] from `overlap_feature_indices`.

    Returns:
      [B, oh, ow, ...]; rows at invalid positions are cell 0's (mask them).
    """
    batch, grid_h, grid_w = feats.shape[:3]
    flat = feats.reshape((batch, grid_h * grid_w) + feats.shape[3:])
    picked = jax.vmap(lambda f, i: jnp.take(f, i.reshape(-1), axis=0))(flat, idx)
    return picked.reshape(idx.shape + feats.shape[3:])
