"""Tests of the numpy transforms (mmseg semantics) and of the FDA amplitude swap."""

import numpy as np
import pytest
import torch

from data_pipelines import fda, labels, transforms


def test_rescale_sizes_of_the_daformer_recipe():
    assert transforms.rescale_size(1914, 1052, (1280, 720)) == (1280, 704)  # GTA
    assert transforms.rescale_size(2048, 1024, (1024, 512)) == (1024, 512)  # Cityscapes
    assert transforms.rescale_size(1280, 760, (1280, 760)) == (1280, 760)  # SYNTHIA
    assert transforms.rescale_size(1280, 704, (1280, 720)) == (1280, 704)  # pre-resized: no-op
    assert transforms.rescale_size(1920, 1080, (1280, 720)) == (1280, 720)  # Dark Zurich


def test_resize_image_halving_averages_pixel_pairs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 12, 3)).astype(np.uint8)
    out = transforms.resize_image(image, 6, 4)
    blocks = image.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(out, np.rint(blocks), atol=1)
    assert transforms.resize_image(image, 12, 8) is image


def test_resize_label_is_nearest_with_floor_indexing():
    label = np.arange(48, dtype=np.uint8).reshape(6, 8)
    np.testing.assert_array_equal(transforms.resize_label(label, 4, 3), label[::2, ::2])
    assert set(np.unique(transforms.resize_label(label, 13, 11))) <= set(label.ravel())


def test_cat_max_ratio_acceptance_rule():
    one_class = np.zeros((4, 4), np.uint8)
    assert not transforms.crop_passes_cat_max_ratio(one_class, 0.75)  # needs > 1 class
    dominated = one_class.copy()
    dominated[0, :3] = 1  # 13 vs 3: 81 %
    assert not transforms.crop_passes_cat_max_ratio(dominated, 0.75)
    balanced = one_class.copy()
    balanced[:2] = 1
    assert transforms.crop_passes_cat_max_ratio(balanced, 0.75)
    ignored = dominated.copy()
    ignored[2:] = 255  # ignore pixels do not count: 5 vs 3 is 62.5 %
    assert transforms.crop_passes_cat_max_ratio(ignored, 0.75)


class _CountingRng:
    def __init__(self, seed):
        self.rng, self.calls = np.random.default_rng(seed), 0

    def integers(self, low, high):
        self.calls += 1
        return self.rng.integers(low, high)


def test_random_crop_redraws_at_most_ten_times_and_keeps_the_last():
    label = np.zeros((20, 20), np.uint8)  # no crop can pass
    rng = _CountingRng(0)
    transforms.random_crop_box(rng, label, (20, 20), (8, 8), 0.75)
    assert rng.calls == 2 * 11  # one draw + 10 re-draws, two integers each
    rng = _CountingRng(0)
    transforms.random_crop_box(rng, label, (20, 20), (8, 8), 1.0)
    assert rng.calls == 2  # cat_max_ratio 1: no check


def test_random_crop_prefers_mixed_crops():
    label = np.zeros((40, 40), np.uint8)
    label[:, 20:] = 1  # 16-wide crops pass only for x0 in 9..15: 7 of 25 offsets
    passed = {0.75: 0, 1.0: 0}
    for ratio in passed:
        rng = np.random.default_rng(1)
        for _ in range(200):
            y0, x0 = transforms.random_crop_box(rng, label, (40, 40), (16, 16), ratio)
            passed[ratio] += transforms.crop_passes_cat_max_ratio(
                label[y0 : y0 + 16, x0 : x0 + 16], 0.75
            )
    # One draw passes with p = 0.28; eleven draws with 1 - 0.72**11 = 0.97.
    assert passed[1.0] < 90 and passed[0.75] > 180


def test_crop_and_pad_pads_with_zero_and_ignore():
    image = np.full((5, 6, 3), 7, np.uint8)
    label = np.ones((5, 6), np.uint8)
    out_image, out_label = transforms.crop_and_pad(image, label, (0, 0), (8, 8))
    assert out_image.shape == (8, 8, 3) and out_label.shape == (8, 8)
    assert out_image[5:].max() == 0 and out_image[:5, :6].min() == 7
    assert set(np.unique(out_label[5:])) == {255} and set(np.unique(out_label[:, 6:])) == {255}


def test_normalize_uses_daformer_mean_and_std():
    image = np.array([[labels.IMAGENET_MEAN]]).round().astype(np.uint8)
    np.testing.assert_allclose(
        transforms.normalize(image), [[[0.0056, -0.0049, 0.0082]]], atol=1e-3
    )
    out = transforms.normalize(np.full((1, 1, 3), 255, np.uint8))
    mean, std = np.float32(labels.IMAGENET_MEAN), np.float32(labels.IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0], (255 - mean) / std)


def _fda_reference_torch(src, trg, beta):
    """FDA utils.FDA_source_to_target with today's torch.fft (CHW, corner blocks).

    The released `torch.irfft(X, 2, onesided=False)` (PyTorch <= 1.7) reads only the columns
    0..W//2 of X (ATen `_fft_cufft` narrows them): `torch.fft.irfft2` of those columns.
    """
    src_t = torch.from_numpy(src.transpose(2, 0, 1).astype(np.float64))
    trg_t = torch.from_numpy(trg.transpose(2, 0, 1).astype(np.float64))
    f_src, f_trg = torch.fft.fft2(src_t), torch.fft.fft2(trg_t)
    amp_src, pha_src, amp_trg = f_src.abs(), f_src.angle(), f_trg.abs()
    _, h, w = amp_src.shape
    b = int(np.floor(min(h, w) * beta))
    amp_src[:, 0:b, 0:b] = amp_trg[:, 0:b, 0:b]
    amp_src[:, 0:b, w - b : w] = amp_trg[:, 0:b, w - b : w]
    amp_src[:, h - b : h, 0:b] = amp_trg[:, h - b : h, 0:b]
    amp_src[:, h - b : h, w - b : w] = amp_trg[:, h - b : h, w - b : w]
    out = torch.fft.irfft2(torch.polar(amp_src, pha_src)[:, :, : w // 2 + 1], s=(h, w))
    return out.numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("beta", [0.01, 0.05, 0.09])
def test_fda_matches_the_reference_corner_swap(beta):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (64, 96, 3)).astype(np.uint8)
    trg = rng.integers(0, 256, (64, 96, 3)).astype(np.uint8)
    out = fda.fda_source_to_target(src, trg, beta)  # default window: 'torch', as FDA's train.py
    np.testing.assert_allclose(out, _fda_reference_torch(src, trg, beta), atol=1e-3)
    # The former name of the window is an alias of it.
    np.testing.assert_array_equal(fda.fda_source_to_target(src, trg, beta, "corners"), out)
    if int(64 * beta) > 0:
        assert np.abs(out - src).max() > 1.0


def test_fda_window_sizes_and_identity():
    # b = floor(64 * 0.05) = 3: low_freq_mutate's 4 b^2 corners, of which torch.irfft keeps
    # 2b (2b - 1) (the columns 0..W//2 and the mirror image of the left corners); (2b + 1)^2
    # for low_freq_mutate_np.
    for name in ("torch", "corners"):
        assert fda.low_frequency_mask(64, 96, 0.05, name).sum() == 2 * 3 * 5
    for name in ("numpy", "centered"):
        assert fda.low_frequency_mask(64, 96, 0.05, name).sum() == 7 * 7
    with pytest.raises(ValueError, match="window"):
        fda.low_frequency_mask(64, 96, 0.05, "full")
    with pytest.raises(ValueError, match="beta"):
        fda.low_frequency_mask(64, 96, 0.6)
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    np.testing.assert_allclose(fda.fda_source_to_target(src, src, 0.1), src, atol=1e-3)
    trg = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    np.testing.assert_allclose(fda.fda_source_to_target(src, trg, 0.0), src, atol=1e-3)


@pytest.mark.parametrize("window", ["numpy", "centered"])
def test_fda_centered_window_takes_the_target_low_frequency_amplitude(window):
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (32, 48, 3)).astype(np.uint8)
    trg = rng.integers(0, 256, (32, 48, 3)).astype(np.uint8)
    out = fda.fda_source_to_target(src, trg, 0.1, window=window)
    mask = fda.low_frequency_mask(32, 48, 0.1, window)
    amp_out = np.abs(np.fft.fft2(out.astype(np.float64), axes=(0, 1)))
    amp_trg = np.abs(np.fft.fft2(trg.astype(np.float64), axes=(0, 1)))
    np.testing.assert_allclose(amp_out[mask], amp_trg[mask], rtol=1e-4, atol=1e-2)
