"""Numpy image / label transforms with mmseg's semantics (resize, crop, flip, pad, normalise).

Mirrored from mmseg 0.16 as DAFormer uses it (`mmseg/datasets/pipelines/transforms.py`, mmcv
`imrescale` / `imresize` with the cv2 backend):
- keep-ratio rescale: scale = min(long_max / long_side, short_max / short_side), new size
  `int(side * scale + 0.5)`;
- images: cv2 `INTER_LINEAR` (half-pixel centres, no antialiasing), labels: cv2 `INTER_NEAREST`
  (source index `floor(dst * src / dst_size)`);
- `RandomCrop(cat_max_ratio)`: draw a crop; up to 10 times, keep it if more than one class is
  present and the largest non-ignored class is < cat_max_ratio of the non-ignored pixels, else draw
  again (the last draw is kept unchecked);
- `Pad` to the crop size with 0 (image) / 255 (label); `Normalize` with DAFormer's RGB mean / std.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.labels import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

# float32 copies for `normalize` (R, G, B): the arithmetic stays in float32.
_MEAN = np.array(IMAGENET_MEAN, np.float32)
_STD = np.array(IMAGENET_STD, np.float32)


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio target size, as mmcv `rescale_size(..., return_scale=False)`.

    Args:
      width: image width.
      height: image height.
      scale: (a, b) bound; the long side fits max(a, b) and the short side min(a, b).

    Returns:
      (new_width, new_height).
    """
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(width, height), short_max / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left index, right index and right weight per output position (cv2 INTER_LINEAR)."""
    coord = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    coord = np.clip(coord, 0.0, src - 1)
    left = np.floor(coord).astype(np.int64)
    right = np.minimum(left + 1, src - 1)
    return left, right, (coord - left).astype(np.float32)


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize with cv2 `INTER_LINEAR` coordinates (no antialiasing), rounded to uint8.

    Args:
      image: uint8 [H, W, C].
      width: output width.
      height: output height.

    Returns:
      uint8 [height, width, C]; the input itself when the size already matches.
    """
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (height, width):
        return image
    top, bottom, wy = _linear_taps(src_h, height)
    left, right, wx = _linear_taps(src_w, width)
    rows = image.astype(np.float32)
    rows = rows[top] * (1 - wy)[:, None, None] + rows[bottom] * wy[:, None, None]
    out = rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_label(label: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize with cv2 `INTER_NEAREST` indexing.

    Args:
      label: integer [H, W].
      width: output width.
      height: output height.

    Returns:
      [height, width], same dtype; the input itself when the size already matches.
    """
    src_h, src_w = label.shape[:2]
    if (src_h, src_w) == (height, width):
        return label
    ys = np.minimum(np.floor(np.arange(height) * (src_h / height)).astype(np.int64), src_h - 1)
    xs = np.minimum(np.floor(np.arange(width) * (src_w / width)).astype(np.int64), src_w - 1)
    return label[ys[:, None], xs[None, :]]


def rescale(
    image: np.ndarray, label: np.ndarray | None, scale: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """mmseg `Resize(img_scale=scale, keep_ratio=True)`: image bilinear, label nearest.

    Args:
      image: uint8 [H, W, 3].
      label: integer [H, W] or None.
      scale: (a, b) keep-ratio bound, or None for no resize.

    Returns:
      (image [h, w, 3], label [h, w] or None).
    """
    if scale is None:
        return image, label
    width, height = rescale_size(image.shape[1], image.shape[0], scale)
    image = resize_image(image, width, height)
    if label is not None:
        label = resize_label(label, width, height)
    return image, label


def draw_crop_box(
    rng: np.random.Generator, shape: tuple[int, int], crop: tuple[int, int]
) -> tuple[int, int]:
    """A uniformly random crop offset, as mmseg `RandomCrop.get_crop_bbox`.

    Args:
      rng: numpy generator.
      shape: (H, W) of the image.
      crop: (crop_h, crop_w).

    Returns:
      (y0, x0) top-left corner.
    """
    margin_h = max(shape[0] - crop[0], 0)
    margin_w = max(shape[1] - crop[1], 0)
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))


def crop_passes_cat_max_ratio(label_crop: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's acceptance test: > 1 class and the largest one < cat_max_ratio of labelled pixels.

    Args:
      label_crop: uint8 [h, w] train ids.
      cat_max_ratio: maximum share of a single class.

    Returns:
      Whether the crop is accepted.
    """
    counts = np.bincount(label_crop.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_box(
    rng: np.random.Generator,
    label: np.ndarray | None,
    shape: tuple[int, int],
    crop: tuple[int, int],
    cat_max_ratio: float = 1.0,
) -> tuple[int, int]:
    """mmseg `RandomCrop(crop, cat_max_ratio)`: up to 10 re-draws for a crop not dominated by a class.

    Args:
      rng: numpy generator.
      label: uint8 [H, W] train ids (needed only when cat_max_ratio < 1).
      shape: (H, W) of the image.
      crop: (crop_h, crop_w).
      cat_max_ratio: 1.0 disables the check.

    Returns:
      (y0, x0) top-left corner.
    """
    y0, x0 = draw_crop_box(rng, shape, crop)
    if cat_max_ratio < 1.0 and label is not None:
        for _ in range(10):
            if crop_passes_cat_max_ratio(
                label[y0 : y0 + crop[0], x0 : x0 + crop[1]], cat_max_ratio
            ):
                break
            y0, x0 = draw_crop_box(rng, shape, crop)
    return y0, x0


def crop_and_pad(
    image: np.ndarray, label: np.ndarray, box: tuple[int, int], crop: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Crops at `box` and pads to the crop size (mmseg `Pad`: image 0, label 255).

    Args:
      image: uint8 [H, W, 3].
      label: uint8 [H, W].
      box: (y0, x0).
      crop: (crop_h, crop_w).

    Returns:
      (uint8 [crop_h, crop_w, 3], uint8 [crop_h, crop_w]).
    """
    y0, x0 = box
    image = image[y0 : y0 + crop[0], x0 : x0 + crop[1]]
    label = label[y0 : y0 + crop[0], x0 : x0 + crop[1]]
    pad_h, pad_w = crop[0] - image.shape[0], crop[1] - image.shape[1]
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    return image, label


def hflip(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of an image and its label.

    Args:
      image: [H, W, C].
      label: [H, W].

    Returns:
      (image, label) flipped left-right.
    """
    return image[:, ::-1], label[:, ::-1]


def normalize(image: np.ndarray) -> np.ndarray:
    """DAFormer `Normalize`: (x - mean) / std per RGB channel.

    Args:
      image: uint8 [..., 3] RGB.

    Returns:
      float32 [..., 3].
    """
    # In place, times the reciprocal: half the time of (x - mean) / std, equal to 3e-7.
    out = np.subtract(image, _MEAN, dtype=np.float32)
    out *= 1.0 / _STD
    return out
