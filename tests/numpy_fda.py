"""Test oracle: a numpy (float64) transcription of FDA's released spectral transfer and robust
entropy (YanchaoYang/FDA `utils/__init__.py`, `model/deeplab.py`), written for this project.

It works on NCHW arrays as the reference does (any leading axes; the transform acts on the last
two). `fda_source_to_target_np` follows `FDA_source_to_target_np` / `low_freq_mutate_np`.
`fda_source_to_target_torch` follows `FDA_source_to_target` / `extract_ampl_phase` /
`low_freq_mutate`, with the PyTorch <= 1.7 calls written in numpy: `torch.rfft(x, 2,
onesided=False)` is the full `fft2`, and `torch.irfft(X, 2, onesided=False, signal_sizes=(H, W))`
narrows X to its columns 0..W//2 and takes the complex-to-real inverse (ATen `_fft_cufft`, the
GPU path FDA trained on), which is `np.fft.irfft2` of the narrowed spectrum. `robust_entropy` is the 'train'
branch of `ResNet101.forward`.
"""

from __future__ import annotations

import numpy as np


def low_freq_mutate_np(amp_src, amp_trg, L):
    """The centred (2b+1) x (2b+1) block of the fftshift-ed target amplitude into the source's."""
    a_src = np.fft.fftshift(amp_src, axes=(-2, -1))
    a_trg = np.fft.fftshift(amp_trg, axes=(-2, -1))
    h, w = a_src.shape[-2:]
    b = int(np.floor(min(h, w) * L))
    c_h, c_w = int(np.floor(h / 2.0)), int(np.floor(w / 2.0))
    rows, cols = slice(c_h - b, c_h + b + 1), slice(c_w - b, c_w + b + 1)
    a_src[..., rows, cols] = a_trg[..., rows, cols]
    return np.fft.ifftshift(a_src, axes=(-2, -1))


def fda_source_to_target_np(src, trg, L):
    """[..., H, W] float64: the source with the target's centred low-frequency amplitude."""
    fft_src = np.fft.fft2(np.asarray(src, np.float64), axes=(-2, -1))
    fft_trg = np.fft.fft2(np.asarray(trg, np.float64), axes=(-2, -1))
    amp_src, pha_src = np.abs(fft_src), np.angle(fft_src)
    amp_trg = np.abs(fft_trg)
    amp_new = low_freq_mutate_np(amp_src, amp_trg, L)
    return np.real(np.fft.ifft2(amp_new * np.exp(1j * pha_src), axes=(-2, -1)))


def low_freq_mutate(amp_src, amp_trg, L):
    """The four b x b corner blocks of the unshifted target amplitude into the source's."""
    h, w = amp_src.shape[-2:]
    b = int(np.floor(min(h, w) * L))
    for rows in (slice(0, b), slice(h - b, h)):
        for cols in (slice(0, b), slice(w - b, w)):
            amp_src[..., rows, cols] = amp_trg[..., rows, cols]
    return amp_src


def fda_source_to_target_torch(src, trg, L):
    """[..., H, W] float64: the training code's transfer, with torch.irfft's narrowing."""
    src = np.asarray(src, np.float64)
    fft_src = np.fft.fft2(src, axes=(-2, -1))
    fft_trg = np.fft.fft2(np.asarray(trg, np.float64), axes=(-2, -1))
    # extract_ampl_phase: sqrt(re^2 + im^2), atan2(im, re).
    amp_src = np.sqrt(fft_src.real**2 + fft_src.imag**2)
    pha_src = np.arctan2(fft_src.imag, fft_src.real)
    amp_trg = np.sqrt(fft_trg.real**2 + fft_trg.imag**2)
    amp_new = low_freq_mutate(amp_src.copy(), amp_trg, L)
    spec = np.cos(pha_src) * amp_new + 1j * np.sin(pha_src) * amp_new
    h, w = src.shape[-2:]
    return np.fft.irfft2(spec[..., : w // 2 + 1], s=(h, w), axes=(-2, -1))


def robust_entropy(logits_nchw, ita=2.0, normalizer=None):
    """Scalar: mean over B*H*W of ((entropy / normalizer)^2 + 1e-8)^ita, classes on axis 1."""
    x = np.asarray(logits_nchw, np.float64)
    if normalizer is None:
        normalizer = np.log(x.shape[1])
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    ent = -1.0 * (p * log_p).sum(axis=1)  # [B, H, W]
    ent = ent / normalizer
    ent = ent**2.0 + 1e-8
    ent = ent**ita
    return ent.mean()
