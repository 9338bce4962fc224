"""FDA: Fourier Domain Adaptation's low-frequency amplitude swap (Yang & Soatto, CVPR 2020).

The host-side (numpy, per image) twin of `pgpc_jax.uda.fourier`, for grain pipelines: the same
windows, the same result up to float rounding (`tests/uda_fourier_test.py` checks both windows
against the on-device version). The source image keeps its phase; inside a low-frequency window
its amplitude spectrum is replaced by the target image's; the output is the real part of the
inverse DFT, on raw [0, 255] pixels before mean subtraction and not clipped, as the reference.

The window half-size is `b = floor(min(H, W) * beta)` as YanchaoYang/FDA `utils/__init__.py`
computes it [released], for beta in [0, 0.5] (beyond 0.5 the reference's centred slice starts at
a negative index and wraps around). The two released windows [released]:
- `'torch'` (default; alias `'corners'`): `FDA_source_to_target` / `low_freq_mutate`, what FDA's
  `train.py` and `SStrain.py` train with. It copies the four b x b corner blocks of the unshifted
  spectrum, then `torch.irfft(..., onesided=False)` reads only the columns 0..W//2 and takes the
  others as their mirror image k -> -k. The mask here is that corner mask on columns 0..W//2 and
  its mirror image on the others, 2b(2b-1) coefficients; the real part of the full inverse of
  the mixed spectrum is then what the narrowed complex-to-real inverse gives.
- `'numpy'` (alias `'centered'`): `FDA_source_to_target_np` / `low_freq_mutate_np` (the demo), the
  (2b+1) x (2b+1) block around the centre of the fftshift-ed spectrum, frequencies -b..b on each
  axis. With beta = 0 it still swaps the DC coefficient (each channel takes the target's mean).

The mask is rebuilt here in numpy rather than imported from `pgpc_jax.uda.fourier`: the data
layer does not import the library layer. Earlier versions of this module named the windows
`'centered'` and `'corners'`; their `'corners'` took the real part of the inverse of the full
corner-masked spectrum, which half-swapped the ring max(|k_y|, |k_x|) = b and so differed from
the training code there. `'corners'` now means the `'torch'` window.
"""

from __future__ import annotations

import math

import numpy as np

WINDOWS = ("numpy", "torch")
# Names used before the windows took pgpc_jax.uda.fourier's names.
WINDOW_ALIASES = {"centered": "numpy", "corners": "torch"}


def _window_name(window: str) -> str:
    name = WINDOW_ALIASES.get(window, window)
    if name not in WINDOWS:
        allowed = WINDOWS + tuple(WINDOW_ALIASES)
        raise ValueError(f"window must be one of {allowed}, got {window!r}")
    return name


def low_frequency_mask(height: int, width: int, beta: float, window: str = "torch") -> np.ndarray:
    """Where the amplitude is taken from the target, on the unshifted `np.fft.fft2` spectrum.

    Args:
      height: image height H.
      width: image width W.
      beta: FDA's L in [0, 0.5]; b = floor(min(H, W) * beta).
      window: 'torch' (alias 'corners', FDA's train.py) or 'numpy' (alias 'centered', the demo).

    Returns:
      bool [H, W].
    """
    name = _window_name(window)
    if not 0.0 <= beta <= 0.5:
        raise ValueError(f"beta must lie in [0, 0.5], got {beta}")
    b = int(math.floor(min(height, width) * beta))
    if name == "numpy":
        # Frequencies -b..b on both axes: the centred block of the fftshift-ed spectrum.
        shifted = np.zeros((height, width), bool)
        c_h, c_w = height // 2, width // 2
        shifted[c_h - b : c_h + b + 1, c_w - b : c_w + b + 1] = True
        return np.fft.ifftshift(shifted)
    # The four corner blocks written by low_freq_mutate; for b = 0 every slice is empty.
    corners = np.zeros((height, width), bool)
    corners[:b, :b] = corners[:b, width - b :] = True
    corners[height - b :, :b] = corners[height - b :, width - b :] = True
    # torch.irfft(onesided=False) keeps the columns 0..W//2; the others become the mirror image
    # of the kept half, i.e. the corner mask at -k.
    mirrored = np.roll(corners[::-1, ::-1], (1, 1), axis=(0, 1))
    kept = np.arange(width) <= width // 2
    return np.where(kept[None, :], corners, mirrored)


# The name this module used before; same function.
low_freq_window = low_frequency_mask


def fda_source_to_target(
    source: np.ndarray, target: np.ndarray, beta: float = 0.01, window: str = "torch"
) -> np.ndarray:
    """Gives the source image the target's low-frequency amplitude (its "style"), FDA Eq. 3.

    Args:
      source: [H, W, C] image (uint8 or float), raw pixel values.
      target: [H, W, C] image of the same shape.
      beta: FDA's L in [0, 0.5] (the paper uses 0.01, 0.05, 0.09).
      window: 'torch' (default, alias 'corners') or 'numpy' (alias 'centered').

    Returns:
      float32 [H, W, C], not clipped (as the reference).
    """
    if source.shape != target.shape:
        raise ValueError(f"source {source.shape} and target {target.shape} shapes differ")
    mask = low_frequency_mask(source.shape[0], source.shape[1], beta, window)[:, :, None]
    fft_src = np.fft.fft2(source.astype(np.float64), axes=(0, 1))
    fft_trg = np.fft.fft2(target.astype(np.float64), axes=(0, 1))
    amplitude = np.where(mask, np.abs(fft_trg), np.abs(fft_src))
    mixed = np.fft.ifft2(amplitude * np.exp(1j * np.angle(fft_src)), axes=(0, 1))
    return np.real(mixed).astype(np.float32)
