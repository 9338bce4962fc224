"""FDA's low-frequency amplitude swap on device (Fourier Domain Adaptation, Yang & Soatto, CVPR
2020, Eq. 2-3), as YanchaoYang/FDA `utils/__init__.py` computes it.

Per image and per channel, on raw [0, 255] pixels before mean subtraction (the reference
subtracts `IMG_MEAN` only after the swap, `train.py`): the source keeps the phase of its 2-D DFT;
inside a low-frequency window its amplitude is replaced by the target's; the output is the real
part of the inverse DFT, not clipped. Both images have the same size. The window half-size is
`b = floor(min(H, W) * beta)` in index units (a square window, not the paper's βH x βW box), with
the reference's two window conventions:

* `'numpy'` (default): `FDA_source_to_target_np` with `low_freq_mutate_np` (the released demo).
  After `fftshift` the rows c_h-b .. c_h+b and columns c_w-b .. c_w+b, c = floor(size / 2), are
  swapped: frequencies -b..b on both axes, (2b+1) x (2b+1) coefficients. `np.real(ifft2(.))`
  gives the image. With beta = 0 (b = 0) the DC coefficient is still swapped: each channel takes
  the target's mean.
* `'torch'`: `FDA_source_to_target` with `low_freq_mutate` (what `train.py` and `SStrain.py`
  train with). On the unshifted spectrum it copies the four b x b corner blocks [0:b, 0:b],
  [0:b, W-b:W], [H-b:H, 0:b], [H-b:H, W-b:W], i.e. frequencies {-b..b-1} on both axes (2b x 2b
  after wrap-around, not symmetric under k -> -k). The image comes from `torch.irfft(...,
  onesided=False)` (PyTorch <= 1.7). On the GPU FDA trains on, ATen's `_fft_cufft` narrows that
  input to its columns 0..W//2 before cuFFT's complex-to-real transform, which assumes Hermitian
  symmetry: the right corner blocks are dropped and the right half of the spectrum is rebuilt
  as the mirror image k -> -k of the left half. Here that is one `ifft2` and its real part, of
  the amplitude mixed with the equivalent mask: the corner mask on columns 0..W//2, its mirror
  image on the others (`low_frequency_mask`). On column 0, where the corner mask is not
  symmetric (rows -b and +b), the real part keeps the Hermitian part, as numpy's `irfft2` does;
  cuFFT does not specify what it does with such input (these 2 of the 2b(2b-1) swapped
  coefficients). With beta = 0 (b = 0) nothing is swapped and the output is the source.

For a mask m and its mirror image m(-k), the real part of the inverse gives every frequency k the
source's phase and the amplitude (a(k) + a(-k)) / 2 of the mixed amplitude a = m A_t + (1-m) A_s:
where the window is symmetric (all of 'numpy'; all of 'torch' but the ends of column 0 at rows
+-b) the amplitude is exactly the target's.

Deviations from the reference
-----------------------------
* Computed in float32 / complex64 with `jnp.fft` (the numpy version computes in float64, the
  torch version in float32): equal to float32 rounding.
* NHWC batches [B, H, W, 3] instead of NCHW; the per-channel transform is the same. The channel
  order does not matter (the reference feeds BGR) as long as source and target share it.
* `beta` is limited to [0, 0.5]: beyond it the reference's centred slice starts at a negative
  index, which Python wraps around (an almost empty window). The paper uses 0.01, 0.05, 0.09.
* `pick_targets` draws a target per source image with replacement from a target batch; the
  reference (batch 1) pairs each source image with the next image of its shuffled target loader.

`data_pipelines/fda.py`, the host-side (grain) version of the same swap, has the same two windows
(`'numpy'`, `'torch'`; the aliases `'centered'` and `'corners'`) with the same masks
(`tests/uda_fourier_test.py` checks masks and outputs equal); its default is `'torch'`, the
training code's window, where this module's is `'numpy'`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

WINDOWS = ("numpy", "torch")


def window_half_size(height: int, width: int, beta: float) -> int:
    """FDA's b = floor(min(H, W) * beta), as `low_freq_mutate(_np)` computes it."""
    if not 0.0 <= beta <= 0.5:
        raise ValueError(f"beta must lie in [0, 0.5], got {beta}")
    return int(math.floor(min(height, width) * beta))


def low_frequency_mask(height: int, width: int, beta: float, window: str = "numpy") -> np.ndarray:
    """Where the amplitude is taken from the target, on the unshifted `fft2` spectrum.

    Built with numpy at trace time: a constant of the compiled function.

    Args:
      height: image height H.
      width: image width W.
      beta: FDA's L; b = floor(min(H, W) * beta).
      window: 'numpy' (`low_freq_mutate_np`) or 'torch' (`low_freq_mutate` followed by
        `torch.irfft(onesided=False)`, see the module docstring).

    Returns:
      bool [H, W].
    """
    b = window_half_size(height, width, beta)
    if window == "numpy":
        # Frequencies -b..b on both axes: the centred block of the fftshift-ed spectrum.
        shifted = np.zeros((height, width), bool)
        c_h, c_w = height // 2, width // 2
        shifted[c_h - b : c_h + b + 1, c_w - b : c_w + b + 1] = True
        return np.fft.ifftshift(shifted)
    if window == "torch":
        # The four corner blocks; an empty slice for b = 0 (rows H-0:H select nothing).
        corners = np.zeros((height, width), bool)
        rows = np.r_[0:b, height - b : height]
        cols = np.r_[0:b, width - b : width]
        corners[np.ix_(rows, cols)] = True
        # torch.irfft(onesided=False) reads only the columns 0..W//2 and mirrors them, so the
        # other columns are the corner mask at -k.
        mirrored = np.roll(corners[::-1, ::-1], (1, 1), axis=(0, 1))
        kept = np.arange(width) <= width // 2
        return np.where(kept[None, :], corners, mirrored)
    raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")


def fda_source_to_target(
    src: jax.Array, trg: jax.Array, beta: float, window: str = "numpy"
) -> jax.Array:
    """Gives each source image its paired target's low-frequency amplitude (FDA Eq. 3).

    Jit with `beta` and `window` static; shapes are fixed by the inputs.

    Args:
      src: [B, H, W, C] raw source images ([0, 255], any real dtype), not normalised.
      trg: [B, H, W, C] the target image for each source image, same shape.
      beta: FDA's L (`--LB`), a Python float in [0, 0.5]; the paper uses 0.01, 0.05, 0.09.
      window: 'numpy' (default, `FDA_source_to_target_np`) or 'torch' (`FDA_source_to_target`).

    Returns:
      float32 [B, H, W, C], the source in the target's style, not clipped.
    """
    if src.shape != trg.shape or src.ndim != 4:
        raise ValueError(f"src {src.shape} and trg {trg.shape} must be equal [B, H, W, C] shapes")
    mask = low_frequency_mask(src.shape[1], src.shape[2], beta, window)[None, :, :, None]
    spec_src = jnp.fft.fft2(src.astype(jnp.float32), axes=(1, 2))
    spec_trg = jnp.fft.fft2(trg.astype(jnp.float32), axes=(1, 2))
    amplitude = jnp.where(mask, jnp.abs(spec_trg), jnp.abs(spec_src))
    mixed = amplitude * jnp.exp(1j * jnp.angle(spec_src))
    return jnp.real(jnp.fft.ifft2(mixed, axes=(1, 2))).astype(jnp.float32)


def pick_targets(
    targets: jax.Array,
    num_sources: int,
    *,
    key: jax.Array | None = None,
    indices: jax.Array | None = None,
) -> jax.Array:
    """One target image per source image: given by `indices`, or drawn uniformly with `key`.

    Args:
      targets: [T, H, W, C] target images.
      num_sources: B, the number of source images.
      key: PRNG key; each source image draws one of the T targets, with replacement.
      indices: int [B] explicit choices in 0..T-1 (exactly one of `key`, `indices`).

    Returns:
      [B, H, W, C] the chosen targets, in the dtype of `targets`.
    """
    if (key is None) == (indices is None):
        raise ValueError("give exactly one of key and indices")
    if indices is None:
        indices = jax.random.randint(key, (num_sources,), 0, targets.shape[0])
    if indices.shape != (num_sources,):
        raise ValueError(f"indices must have shape ({num_sources},), got {indices.shape}")
    return jnp.take(targets, indices, axis=0)
