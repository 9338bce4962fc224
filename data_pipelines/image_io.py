"""Reading and writing the image files of the datasets, with errors that name the file.

PIL only. Two cases need care:
- SYNTHIA's `GT/LABELS/*.png` are 16-bit RGB PNGs with the class id in the first channel. PIL keeps
  only the high byte of each 16-bit sample (DAFormer's synthia.py notes "PIL does not work with the
  image format" and uses cv2). We decode the file twice, once with the big-endian raw mode (high
  bytes) and once with the little-endian one (which, read over big-endian data, yields the low
  bytes), so PNG unfiltering still runs in PIL's C decoder and the exact 16-bit ids come back.
- Corrupt or truncated files raise `CorruptImageError` naming the path; a colour-coded label (RGB
  with differing channels) raises `LabelFormatError`, since taking one channel of it would give
  silently wrong ids.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


class CorruptImageError(ValueError):
    """A file that PIL cannot decode (truncated, not an image, bad checksum)."""


class LabelFormatError(ValueError):
    """A label file that holds colours, not ids (e.g. a colour-coded RGB label).

    Not a `CorruptImageError`, so `--skip_corrupt` does not skip it: a corrupt file is one bad file
    among good ones, but a colour label means the whole label folder is the wrong kind of file
    (usually the `_color.png` files instead of the id files); skipping would quietly build a
    dataset with no labels at all.
    """


def _open_loaded(path: str | os.PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for bad files.
        raise CorruptImageError(f"cannot decode image {os.fspath(path)}: {e}") from e
    return image


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as RGB.

    Args:
      path: image file (PNG, JPEG, ...).

    Returns:
      uint8 [H, W, 3].
    """
    return np.asarray(_open_loaded(path).convert("RGB"))


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Reads a label PNG of raw ids: grey, palette, or RGB(A) with the id in every channel.

    Args:
      path: label file.

    Returns:
      integer [H, W] raw ids (uint8, or int32 for 16-bit files).

    Raises:
      CorruptImageError: PIL cannot decode the file.
      LabelFormatError: an RGB(A) file whose channels differ (colours, not ids).
    """
    image = _open_loaded(path)
    if image.mode in ("L", "P"):
        return np.asarray(image)
    if image.mode.startswith("I"):
        return np.asarray(image).astype(np.int32)
    # An RGB(A) label file: Cityscapes-style ids stored in every channel are ids; channels that
    # differ are colours (a colour-coded label), whose first channel is not an id.
    rgb = np.asarray(image.convert("RGB"))
    differ = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 0] != rgb[..., 2])
    if differ.any():
        y, x = np.argwhere(differ)[0]
        raise LabelFormatError(
            f"label {os.fspath(path)} is a colour image ({image.mode}, e.g. "
            f"{tuple(int(c) for c in rgb[y, x])} at x={x}, y={y}): a label must be a "
            "single-channel (grey) or palette PNG of ids"
        )
    return rgb[..., 0]


def read_first_channel_16bit(path: str | os.PathLike) -> np.ndarray:
    """Reads the first channel of a PNG at full 16-bit precision (SYNTHIA `GT/LABELS`).

    Args:
      path: PNG file, 16-bit RGB / RGBA, 16-bit grey, or 8-bit of any mode.

    Returns:
      int32 [H, W] values of the first channel.
    """
    try:
        with Image.open(path) as probe:
            raw_mode = probe.tile[0].args if probe.tile else None
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"cannot decode image {os.fspath(path)}: {e}") from e
    image = _open_loaded(path)
    if image.mode.startswith("I"):
        return np.asarray(image).astype(np.int32)
    if raw_mode not in ("RGB;16B", "RGBA;16B"):
        return np.asarray(image.convert("RGB"))[..., 0].astype(np.int32)
    high = np.asarray(image)[..., 0].astype(np.int32)
    low_image = Image.open(path)
    # The little-endian raw mode over big-endian samples picks the second (low) byte of each.
    low_image.tile = [t._replace(args=raw_mode.replace("16B", "16L")) for t in low_image.tile]
    try:
        low_image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"cannot decode image {os.fspath(path)}: {e}") from e
    low = np.asarray(low_image)[..., 0].astype(np.int32)
    return high * 256 + low


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Reads (width, height) from the header only.

    Args:
      path: image file.

    Returns:
      (width, height).
    """
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"cannot decode image {os.fspath(path)}: {e}") from e


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Encodes uint8 [H, W] or [H, W, 3] as PNG bytes (what the TFDS builders store).

    Args:
      array: uint8 [H, W] or [H, W, 3].
      compress_level: zlib level; 1 is fast and loses little size on photos.

    Returns:
      PNG file bytes.
    """
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, np.uint8)).save(
        buffer, format="PNG", compress_level=compress_level
    )
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decodes PNG bytes written by `encode_png`.

    Args:
      data: PNG file bytes.

    Returns:
      uint8 [H, W] or [H, W, 3] (the mode it was stored in).
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)
