"""FDA: Fourier Domain Adaptation's low-frequency amplitude swap (Yang & Soatto, CVPR 2020).

The source image keeps its phase; the low-frequency part of its amplitude spectrum is replaced by
the target image's. The window half-size is `b = floor(min(H, W) * beta)` as YanchaoYang/FDA
`utils/__init__.py` computes it. Two window shapes exist in that file and both are offered:
- `'corners'` (default): `low_freq_mutate`, used by FDA's `train.py` through
  `FDA_source_to_target`; on the unshifted spectrum it swaps the four b×b corner blocks, i.e.
  frequencies {0..b-1} ∪ {-b..-1} on each axis.
- `'centered'`: `low_freq_mutate_np` (the demo), the (2b+1)×(2b+1) block around the centre of the
  fftshift-ed spectrum, i.e. frequencies {-b..b} on each axis.
The reference works on raw [0, 255] pixels before mean subtraction and does not clip; neither do we.
"""

from __future__ import annotations

import numpy as np


def low_freq_window(height: int, width: int, beta: float, window: str = "corners") -> np.ndarray:
    """Boolean mask of the swapped frequencies on the unshifted (np.fft.fft2) spectrum.

    Args:
      height: image height H.
      width: image width W.
      beta: FDA's L; b = floor(min(H, W) * beta).
      window: 'corners' (FDA train.py) or 'centered' (FDA demo).

    Returns:
      bool [H, W].
    """
    b = int(np.floor(min(height, width) * beta))
    mask = np.zeros((height, width), bool)
    if window == "corners":
        rows = np.r_[0:b, height - b : height] if b else np.array([], int)
        cols = np.r_[0:b, width - b : width] if b else np.array([], int)
        mask[np.ix_(rows, cols)] = True
    elif window == "centered":
        centre_h, centre_w = height // 2, width // 2
        shifted = np.zeros((height, width), bool)
        shifted[centre_h - b : centre_h + b + 1, centre_w - b : centre_w + b + 1] = True
        mask = np.fft.ifftshift(shifted)
    else:
        raise ValueError(f"window must be 'corners' or 'centered', got {window!r}")
    return mask


def fda_source_to_target(
    source: np.ndarray, target: np.ndarray, beta: float = 0.01, window: str = "corners"
) -> np.ndarray:
    """Gives the source image the target's low-frequency amplitude (its "style").

    Args:
      source: [H, W, C] image (uint8 or float), raw pixel values.
      target: [H, W, C] image of the same shape.
      beta: FDA's L (the paper uses 0.01, 0.05, 0.09).
      window: 'corners' (FDA train.py, default) or 'centered' (FDA demo).

    Returns:
      float32 [H, W, C], not clipped (as the reference).
    """
    if source.shape != target.shape:
        raise ValueError(f"source {source.shape} and target {target.shape} shapes differ")
    fft_src = np.fft.fft2(source.astype(np.float64), axes=(0, 1))
    fft_trg = np.fft.fft2(target.astype(np.float64), axes=(0, 1))
    amplitude, phase = np.abs(fft_src), np.angle(fft_src)
    mask = low_freq_window(source.shape[0], source.shape[1], beta, window)
    amplitude[mask] = np.abs(fft_trg)[mask]
    mixed = np.fft.ifft2(amplitude * np.exp(1j * phase), axes=(0, 1))
    return np.real(mixed).astype(np.float32)
