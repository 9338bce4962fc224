"""DACS ClassMix, colour jitter and blur against DAFormer `dacs_transforms.py` and kornia 0.5.8
(the version DAFormer pins), which run here on the CPU."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

# kornia 0.5.8 scripts functions with torch.jit.script (deprecated in torch 2.x) at import, after
# setting a global 'always' filter for DeprecationWarning: record and drop those warnings here
# (the context manager also restores the filters kornia changed).
with warnings.catch_warnings(record=True):
    import kornia

from data_pipelines.labels import IMAGENET_MEAN, IMAGENET_STD
from pgpc_jax.uda import mixing


def _blocks(classes, height=8, width=12):
    """A [H, W] label image with one vertical band per class."""
    bands = np.array_split(np.arange(width), len(classes))
    label = np.zeros((height, width), np.int32)
    for c, cols in zip(classes, bands):
        label[:, cols] = c
    return label


def _drawn(mask, label):
    return set(np.unique(label[np.asarray(mask) > 0]).tolist())


@pytest.mark.parametrize("include_ignore, expected", [(True, 3), (False, 2)])
def test_class_mix_masks_draw_half_of_the_batch_classes(include_ignore, expected):
    # Both images hold every class of the batch, so each mask shows the image's drawn set.
    classes = [0, 4, 9, 255]  # n = 4 with the ignore label (quirk), 3 without
    labels = np.stack([_blocks(classes), _blocks(classes[::-1])])
    keys = jax.random.split(jax.random.key(0), 50)
    masks = jax.jit(
        jax.vmap(lambda k: mixing.class_mix_masks(k, labels, include_ignore=include_ignore))
    )(keys)
    masks = np.asarray(masks)
    assert masks.dtype == np.float32 and set(np.unique(masks)) <= {0.0, 1.0}
    n_classes = len(classes) if include_ignore else len(classes) - 1
    for draw in masks:
        for mask, label in zip(draw, labels):
            drawn = _drawn(mask, label)
            assert len(drawn) == (n_classes + n_classes % 2) // 2
            # The mask is exactly the pixels of the drawn classes.
            np.testing.assert_array_equal(mask, np.isin(label, list(drawn)))
            if not include_ignore:
                assert 255 not in drawn
    # Images draw independently.
    assert any(_drawn(d[0], labels[0]) != _drawn(d[1], labels[1]) for d in masks)


def test_class_mix_masks_choose_from_the_whole_batch_uniformly():
    # Image 0 holds {1, 2}, image 1 holds {3, 5, 7}: n = 5, ceil(5/2) = 3 classes per image, drawn
    # from all five, so each class is drawn with probability 3/5 and image 0 may get no pixel.
    labels = np.stack([_blocks([1, 2]), _blocks([3, 5, 7])])
    keys = jax.random.split(jax.random.key(1), 600)
    masks = np.asarray(jax.jit(jax.vmap(lambda k: mixing.class_mix_masks(k, labels)))(keys))
    for c in [1, 2]:
        freq = np.mean([c in _drawn(m[0], labels[0]) for m in masks])
        assert abs(freq - 0.6) < 0.07, (c, freq)
    for c in [3, 5, 7]:
        freq = np.mean([c in _drawn(m[1], labels[1]) for m in masks])
        assert abs(freq - 0.6) < 0.07, (c, freq)
    # P(neither 1 nor 2 drawn) = C(3,3)/C(5,3) = 0.1.
    empty = np.mean([m[0].sum() == 0 for m in masks])
    assert 0.05 < empty < 0.16, empty


def test_class_mix_pastes_source_pixels_and_sets_weights():
    rng = np.random.default_rng(0)
    b, h, w = 2, 8, 12
    src_img = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    tgt_img = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    src_lbl = np.stack([_blocks([0, 1, 2]), _blocks([2, 3, 255])])
    pl = rng.integers(0, 19, size=(b, h, w)).astype(np.int32)
    pw = np.full((b, h, w), 0.37, np.float32)
    pw[:, :2] = 0.0
    mask = mixing.class_mix_masks(jax.random.key(3), src_lbl)
    img, lbl, weight = jax.jit(mixing.class_mix)(mask, src_img, tgt_img, src_lbl, pl, pw)
    m = np.asarray(mask) > 0
    assert 0 < m.sum() < m.size
    # DACS one_mix: mask * source + (1 - mask) * target, for images, labels and weights.
    np.testing.assert_array_equal(np.asarray(img), np.where(m[..., None], src_img, tgt_img))
    np.testing.assert_array_equal(np.asarray(lbl), np.where(m, src_lbl, pl))
    np.testing.assert_array_equal(np.asarray(weight), np.where(m, 1.0, pw))
    assert lbl.dtype == jnp.int32 and weight.dtype == jnp.float32


def _kornia_jitter(images, params):
    """kornia 0.5.8 ColorJitter, called once per image as DAFormer does, with our factors."""
    aug = kornia.augmentation.ColorJitter(0.2, 0.2, 0.2, 0.2)
    out = []
    for i in range(images.shape[0]):
        p = {
            "brightness_factor": torch.tensor([float(params["brightness"][i])]),
            "contrast_factor": torch.tensor([float(params["contrast"][i])]),
            "saturation_factor": torch.tensor([float(params["saturation"][i])]),
            "hue_factor": torch.tensor([float(params["hue"][i])]),
            "order": torch.tensor(np.asarray(params["order"][i])),
        }
        x = torch.from_numpy(images[i : i + 1].transpose(0, 3, 1, 2).copy())
        out.append(aug.apply_transform(x, p).numpy().transpose(0, 2, 3, 1))
    return np.concatenate(out)


def test_color_jitter_matches_kornia_058():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(8, 16, 20, 3)).astype(np.float32)
    images[0, :4] = 0.5  # grey pixels: zero saturation, the hue's division guard
    images[1, :4, :, 0] = images[1, :4, :, 1]  # ties for the maximal channel
    images[2, :2] = 1.0  # saturated: the clamps
    params = mixing.sample_color_jitter(jax.random.key(1), 8, 0.2)
    ours = np.asarray(jax.jit(mixing.color_jitter)(images, params))
    ref = _kornia_jitter(images, params)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.abs(ours - images).mean() > 1e-3  # it did something


def test_sample_color_jitter_ranges_and_orders():
    p = jax.jit(mixing.sample_color_jitter, static_argnums=(1, 2))(jax.random.key(2), 512, 0.2)
    for k in ["brightness", "contrast", "saturation"]:
        v = np.asarray(p[k])
        assert v.min() >= 0.8 and v.max() <= 1.2 and v.std() > 0.1, k
    hue = np.asarray(p["hue"])
    assert hue.min() >= -0.2 and hue.max() <= 0.2 and hue.std() > 0.1
    order = np.asarray(p["order"])
    assert all(sorted(o) == [0, 1, 2, 3] for o in order)
    assert len({tuple(o) for o in order}) == 24  # every permutation occurs, per image


def test_hsv_round_trip_is_kornia():
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(2, 3, 8, 8)).astype(np.float32)
    ours = np.asarray(mixing.rgb_to_hsv(x.transpose(0, 2, 3, 1)))
    ref = kornia.color.rgb_to_hsv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    back = np.asarray(mixing.hsv_to_rgb(ours))
    ref_back = kornia.color.hsv_to_rgb(torch.from_numpy(ref.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(back, ref_back.numpy().transpose(0, 2, 3, 1), atol=2e-6)


@pytest.mark.parametrize("side", [8, 9, 10, 11, 19, 20, 64, 100, 500, 510, 512, 720, 1024, 1280])
def test_blur_kernel_size_is_daformers_rule(side):
    c = np.ceil(0.1 * side)
    assert mixing.blur_kernel_size(side) == int(np.floor(c - 0.5 + c % 2))
    assert mixing.blur_kernel_size(side) % 2 == 1


def test_gaussian_blur_matches_kornia_058():
    rng = np.random.default_rng(4)
    images = rng.normal(size=(3, 30, 52, 3)).astype(np.float32)  # non-square: kernel (3, 5)
    sigma = np.array([0.15, 0.73, 1.15], np.float32)  # one sigma per image, as DAFormer
    kernel = (mixing.blur_kernel_size(30), mixing.blur_kernel_size(52))
    assert kernel == (3, 5)
    ours = np.asarray(jax.jit(mixing.gaussian_blur, static_argnums=2)(images, sigma, kernel))
    for i in range(3):
        blur = kornia.filters.GaussianBlur2d(kernel, (float(sigma[i]), float(sigma[i])))
        ref = blur(torch.from_numpy(images[i : i + 1].transpose(0, 3, 1, 2).copy()))
        np.testing.assert_allclose(ours[i], ref.numpy()[0].transpose(1, 2, 0), atol=1e-5)


def test_normalisation_round_trip():
    x = np.random.default_rng(5).uniform(size=(1, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(mixing.denormalize(mixing.renormalize(x))), x, atol=1e-6)
    pixel = (np.array([255.0, 0.0, 128.0]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(
        np.asarray(mixing.denormalize(jnp.asarray(pixel, jnp.float32))),
        [1.0, 0.0, 128 / 255],
        atol=1e-6,
    )


def _key_where(jitter, blur):
    # The first key whose step-level draws (default probabilities) are (jitter, blur).
    for seed in range(100):
        draws = mixing.sample_strong_augment(jax.random.key(seed), 2)
        if bool(draws["jitter"]) == jitter and bool(draws["blur"]) == blur:
            return jax.random.key(seed)
    raise AssertionError("no key found")


def test_strong_augment_is_jitter_then_blur_in_unit_space():
    rng = np.random.default_rng(6)
    images = rng.normal(size=(2, 20, 30, 3)).astype(np.float32)
    augment = jax.jit(mixing.strong_augment)
    key = _key_where(jitter=True, blur=True)
    out, applied = augment(key, images)
    assert float(applied["jitter"]) == 1.0 and float(applied["blur"]) == 1.0
    draws = mixing.sample_strong_augment(key, 2)
    unit = np.asarray(mixing.denormalize(images))
    jittered = np.asarray(mixing.renormalize(_kornia_jitter(unit, draws["color"])))
    kernel = (mixing.blur_kernel_size(20), mixing.blur_kernel_size(30))
    expected = []
    for i in range(2):
        sigma = float(draws["sigma"][i])
        blur = kornia.filters.GaussianBlur2d(kernel, (sigma, sigma))
        x = torch.from_numpy(jittered[i : i + 1].transpose(0, 3, 1, 2).copy())
        expected.append(blur(x).numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(out), np.concatenate(expected), atol=1e-4)
    same, applied = augment(_key_where(jitter=False, blur=False), images)
    np.testing.assert_array_equal(np.asarray(same), images)
    assert float(applied["jitter"]) == 0.0 and float(applied["blur"]) == 0.0


def test_strong_augment_draws_jitter_80_and_blur_50_percent_per_step():
    keys = jax.random.split(jax.random.key(8), 2000)
    draws = jax.jit(jax.vmap(lambda k: mixing.sample_strong_augment(k, 2)))(keys)
    assert abs(float(draws["jitter"].mean()) - 0.8) < 0.03
    assert abs(float(draws["blur"].mean()) - 0.5) < 0.035
    sigma = np.asarray(draws["sigma"])
    assert sigma.min() >= 0.15 and sigma.max() <= 1.15 and abs(sigma.mean() - 0.65) < 0.02
    assert np.mean(sigma[:, 0] != sigma[:, 1]) == 1.0  # one sigma per image


def test_a_decision_key_shares_the_decisions_and_not_the_factors():
    # SePiCo augments the source, the target crop and the mixed images with one step's apply
    # decisions (from the decision key) but fresh colour factors per call (from each call's key).
    decisions = jax.random.key(11)
    calls = [
        mixing.sample_strong_augment(jax.random.key(20 + i), 3, decision_rng=decisions)
        for i in range(2)
    ]
    alone = mixing.sample_strong_augment(decisions, 5)
    for draws in calls:
        assert bool(draws["jitter"]) == bool(alone["jitter"])
        assert bool(draws["blur"]) == bool(alone["blur"])
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert not np.allclose(calls[0]["color"][name], calls[1]["color"][name])
    # Over many decision keys, both outcomes of each decision occur (the test could fail).
    outcomes = {
        bool(
            mixing.sample_strong_augment(jax.random.key(1), 2, decision_rng=jax.random.key(k))[
                "blur"
            ]
        )
        for k in range(20)
    }
    assert outcomes == {True, False}


def test_per_call_draws_one_order_and_one_sigma_for_the_batch():
    per_image = mixing.sample_strong_augment(jax.random.key(4), 6)
    per_call = mixing.sample_strong_augment(jax.random.key(4), 6, per_call=True)
    sigma, order = np.asarray(per_call["sigma"]), np.asarray(per_call["color"]["order"])
    assert np.all(sigma == sigma[0]) and np.all(order == order[0])
    assert sorted(order[0].tolist()) == [0, 1, 2, 3]
    assert len(set(np.asarray(per_image["sigma"]).tolist())) == 6
    assert len({tuple(o) for o in np.asarray(per_image["color"]["order"]).tolist()}) > 1
    # The factors stay per image.
    assert len(set(np.asarray(per_call["color"]["brightness"]).tolist())) == 6
