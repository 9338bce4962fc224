"""FDA's amplitude swap on device (`pgpc_jax/uda/fourier.py`): against the numpy transcription of
both released conventions (`tests/numpy_fda.py`) on non-square images, the output spectrum
against the window read as frequency sets, beta = 0, the host-side `data_pipelines/fda.py`, and
the target picking."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import fda as host_fda
from pgpc_jax.uda import fourier
from tests import numpy_fda as ref

# b = floor(min(H, W) * beta) for H, W = 20, 31: 0, 0, 1, 2, 4, 10.
_BETAS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5)


@functools.cache
def _jitted(beta, window):
    return jax.jit(functools.partial(fourier.fda_source_to_target, beta=beta, window=window))


def _images(shape, seed):
    """Two NCHW float64 image batches of raw pixel values in [0, 255]."""
    rng = np.random.default_rng(seed)
    src = rng.uniform(0.0, 255.0, shape)
    # A smooth, brighter target, so that its low frequencies differ from the source's.
    _, _, h, w = shape
    ramp = np.linspace(0.0, 1.0, h)[:, None] * np.linspace(0.0, 1.0, w)[None, :]
    trg = 40.0 + 180.0 * ramp + rng.uniform(0.0, 30.0, shape)
    return src, trg


def _nhwc(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)).astype(np.float32)


def _signed_frequencies(n):
    return np.rint(np.fft.fftfreq(n, 1.0 / n)).astype(int)  # 0, 1, ..., -1


def _window_as_frequencies(h, w, b, window):
    """The swapped set of the released code, read as frequencies [H, W] (unshifted layout)."""
    k_h, k_w = np.meshgrid(_signed_frequencies(h), _signed_frequencies(w), indexing="ij")
    if window == "numpy":
        return (np.abs(k_h) <= b) & (np.abs(k_w) <= b)
    # low_freq_mutate's corners are {0..b-1} U {-b..-1} on each axis; torch.irfft reads the
    # columns 0..W//2 and takes the others as the mirror image of those.
    corners = lambda kh, kw: (kh >= -b) & (kh < b) & (kw >= -b) & (kw < b)  # noqa: E731
    read = np.arange(w)[None, :] <= w // 2
    return np.where(read, corners(k_h, k_w), corners(-k_h, -k_w))


def _mirror(a):
    """a(-k) for a spectrum [..., H, W] in the unshifted layout."""
    return np.roll(a[..., ::-1, ::-1], (1, 1), axis=(-2, -1))


@pytest.mark.parametrize("window", fourier.WINDOWS)
@pytest.mark.parametrize("beta", _BETAS)
def test_matches_numpy_transcription(window, beta):
    transcribed = {"numpy": ref.fda_source_to_target_np, "torch": ref.fda_source_to_target_torch}
    for shape in ((2, 3, 20, 31), (1, 3, 21, 30)):
        src, trg = _images(shape, seed=shape[2])
        got = _jitted(beta, window)(_nhwc(src), _nhwc(trg))
        assert got.dtype == jnp.float32 and got.shape == _nhwc(src).shape
        want = np.moveaxis(transcribed[window](src, trg, beta), 1, -1)
        # float32 FFTs of ~600 values up to 255: errors of about 1e-4 (measured: at most 1.3e-4).
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-4, rtol=0)
        if fourier.window_half_size(shape[2], shape[3], beta) > 0:
            assert np.abs(want - np.moveaxis(src, 1, -1)).max() > 1.0  # the swap did something


@pytest.mark.parametrize("window", fourier.WINDOWS)
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.2])
def test_spectrum_swapped_only_inside_window_and_phase_kept(window, beta):
    src, trg = _images((2, 3, 20, 31), seed=1)
    h, w = src.shape[-2:]
    b = fourier.window_half_size(h, w, beta)
    out = np.moveaxis(np.asarray(_jitted(beta, window)(_nhwc(src), _nhwc(trg))), -1, 1)
    spec_out, spec_src, spec_trg = (np.fft.fft2(x, axes=(-2, -1)) for x in (out, src, trg))
    amp_src, amp_trg = np.abs(spec_src), np.abs(spec_trg)

    window_set = _window_as_frequencies(h, w, b, window)
    np.testing.assert_array_equal(window_set, fourier.low_frequency_mask(h, w, beta, window))
    # A real output keeps the Hermitian part: amplitude (a(k) + a(-k)) / 2 of the mixed one.
    mixed = np.where(window_set, amp_trg, amp_src)
    expected = 0.5 * (mixed + _mirror(mixed))
    scale = amp_src.max()
    np.testing.assert_allclose(np.abs(spec_out), expected, atol=1e-5 * scale)
    # Outside the window and its mirror image nothing changed; where both hold, all is target.
    outside = ~window_set & ~_mirror(window_set)
    both = window_set & _mirror(window_set)
    assert outside.sum() > 0 and both.sum() > 0
    np.testing.assert_allclose(
        np.abs(spec_out)[..., outside], amp_src[..., outside], atol=1e-5 * scale
    )
    np.testing.assert_allclose(np.abs(spec_out)[..., both], amp_trg[..., both], atol=1e-5 * scale)
    # The check can fail: source and target amplitudes differ by far more than the tolerance.
    assert np.median(np.abs(amp_trg - amp_src)[..., both]) > 100 * 1e-5 * scale
    # The phase of the source everywhere (compared as unit phasors, away from zero amplitude).
    phasor = lambda s: s / np.maximum(np.abs(s), 1e-30)  # noqa: E731
    big = (np.abs(spec_out) > 1e-3 * scale) & (amp_src > 1e-3 * scale)
    np.testing.assert_allclose(phasor(spec_out)[big], phasor(spec_src)[big], atol=1e-4)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.2])
def test_window_sizes_and_symmetry(beta):
    h, w = 20, 31
    b = fourier.window_half_size(h, w, beta)
    centred = fourier.low_frequency_mask(h, w, beta, "numpy")
    torch_mask = fourier.low_frequency_mask(h, w, beta, "torch")
    # low_freq_mutate_np: (2b+1)^2 coefficients, symmetric, so the inverse is already real.
    assert centred.sum() == (2 * b + 1) ** 2
    np.testing.assert_array_equal(centred, _mirror(centred))
    # low_freq_mutate writes 4 b^2; after torch.irfft's narrowing, 2b columns of 2b rows on the
    # kept side and b - 1 mirrored ones: 2b (2b - 1). Symmetric except the ends of column 0.
    assert torch_mask.sum() == 2 * b * (2 * b - 1)
    asymmetric = np.argwhere(torch_mask != _mirror(torch_mask))
    np.testing.assert_array_equal(asymmetric, [[b, 0], [h - b, 0]])


def test_beta_zero():
    src, trg = _images((2, 3, 20, 31), seed=2)
    x, y = _nhwc(src), _nhwc(trg)
    # 'torch': b = 0 makes every slice empty, the source comes back.
    np.testing.assert_allclose(np.asarray(_jitted(0.0, "torch")(x, y)), x, atol=1e-3)
    # 'numpy': the centred slice c:c+1 still swaps the DC coefficient: each channel takes the
    # target's mean (the DC phase of non-negative images is 0) and keeps its own variations.
    out = np.asarray(_jitted(0.0, "numpy")(x, y))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), y.mean(axis=(1, 2)), atol=1e-3)
    np.testing.assert_allclose(
        out - out.mean(axis=(1, 2), keepdims=True),
        x - x.mean(axis=(1, 2), keepdims=True),
        atol=2e-3,
    )
    assert np.abs(x.mean(axis=(1, 2)) - y.mean(axis=(1, 2))).min() > 1.0


@pytest.mark.parametrize(
    "host_window, window",
    [("numpy", "numpy"), ("torch", "torch"), ("centered", "numpy"), ("corners", "torch")],
)
@pytest.mark.parametrize("beta", [0.0, 0.05, 0.1, 0.2])
def test_host_pipeline_equals_device_window(host_window, window, beta):
    # data_pipelines/fda.py (numpy, per HWC image, float64) has the same windows under the same
    # names, and its former names as aliases: 'centered' -> 'numpy', 'corners' -> 'torch'.
    transcribed = {"numpy": ref.fda_source_to_target_np, "torch": ref.fda_source_to_target_torch}
    for shape, seed in (((2, 3, 20, 31), 3), ((1, 3, 21, 30), 4)):
        src, trg = _images(shape, seed=seed)
        x, y = _nhwc(src), _nhwc(trg)
        h, w = x.shape[1:3]
        np.testing.assert_array_equal(
            host_fda.low_frequency_mask(h, w, beta, host_window),
            fourier.low_frequency_mask(h, w, beta, window),
        )
        host = np.stack(
            [host_fda.fda_source_to_target(a, b, beta, host_window) for a, b in zip(x, y)]
        )
        assert host.dtype == np.float32 and host.shape == x.shape
        got = np.asarray(_jitted(beta, window)(x, y))
        np.testing.assert_allclose(host, got, atol=5e-4, rtol=0)
        # Against the transcription as well, to float32 rounding of values up to ~255.
        want = np.moveaxis(
            transcribed[window](np.moveaxis(x, -1, 1), np.moveaxis(y, -1, 1), beta), 1, -1
        )
        np.testing.assert_allclose(host, want, atol=1e-4, rtol=0)
        if window == "numpy" or fourier.window_half_size(h, w, beta) > 0:
            assert np.abs(host - x).max() > 1.0  # the swap did something


def test_host_pipeline_torch_window_is_not_the_full_inverse_of_the_corners():
    # The former host 'corners' took np.real(ifft2) of the full corner-masked spectrum; the
    # training code's torch.irfft(onesided=False) ignores the right-hand corners instead. The
    # two differ exactly on the ring max(|k_h|, |k_w|) = b, which the former version half-swapped.
    src, trg = _images((1, 3, 20, 31), seed=5)
    x, y = _nhwc(src)[0].astype(np.float64), _nhwc(trg)[0].astype(np.float64)
    h, w = x.shape[:2]
    b = fourier.window_half_size(h, w, 0.1)
    k_h, k_w = np.meshgrid(_signed_frequencies(h), _signed_frequencies(w), indexing="ij")
    corners = (k_h >= -b) & (k_h < b) & (k_w >= -b) & (k_w < b)
    spec_src, spec_trg = np.fft.fft2(x, axes=(0, 1)), np.fft.fft2(y, axes=(0, 1))
    amplitude = np.where(corners[..., None], np.abs(spec_trg), np.abs(spec_src))
    full = np.real(np.fft.ifft2(amplitude * np.exp(1j * np.angle(spec_src)), axes=(0, 1)))
    host = host_fda.fda_source_to_target(x, y, 0.1, "corners")
    diff = np.abs(np.fft.fft2(host - full, axes=(0, 1)))  # [H, W, C]
    ring = np.maximum(np.abs(k_h), np.abs(k_w)) == b
    scale = np.abs(spec_src).max()
    assert diff[~ring].max() < 1e-5 * scale
    assert diff[ring].max() > 1e-2 * scale


def test_integer_images_and_errors():
    src, trg = _images((1, 3, 20, 31), seed=5)
    x, y = np.rint(_nhwc(src)).astype(np.uint8), np.rint(_nhwc(trg)).astype(np.uint8)
    np.testing.assert_allclose(
        np.asarray(fourier.fda_source_to_target(x, y, 0.1)),
        np.asarray(fourier.fda_source_to_target(x.astype(np.float32), y.astype(np.float32), 0.1)),
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="beta"):
        fourier.fda_source_to_target(x, y, 0.6)
    with pytest.raises(ValueError, match="window"):
        fourier.fda_source_to_target(x, y, 0.1, window="corners")
    with pytest.raises(ValueError, match="shapes"):
        fourier.fda_source_to_target(x, y[:, :, :30], 0.1)


def test_pick_targets():
    targets = jnp.arange(4 * 2 * 3 * 3, dtype=jnp.float32).reshape(4, 2, 3, 3)
    got = fourier.pick_targets(targets, 3, indices=jnp.array([2, 0, 2]))
    np.testing.assert_array_equal(got, np.asarray(targets)[[2, 0, 2]])

    pick = jax.jit(lambda key: fourier.pick_targets(targets, 64, key=key))
    drawn = np.asarray(pick(jax.random.key(0)))
    firsts = drawn[:, 0, 0, 0] / targets[1, 0, 0, 0]  # the target index of each draw
    assert set(np.rint(firsts).astype(int).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(drawn, pick(jax.random.key(0)))
    assert not np.array_equal(drawn, pick(jax.random.key(1)))
    with pytest.raises(ValueError, match="exactly one"):
        fourier.pick_targets(targets, 3)
    with pytest.raises(ValueError, match="exactly one"):
        fourier.pick_targets(targets, 3, key=jax.random.key(0), indices=jnp.zeros(3, int))
