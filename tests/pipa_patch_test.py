"""PiPa's patch contrast: the overlapping crop pair (hand-worked boxes, IoU, snapping, fallback,
flips undone at stride 8), scene points paired across the two views, draws against the released
loop (`tests/numpy_pipa_patch.py`), the directional loss against the transcription of the
released block, golden values worked out by hand, padding, float64 finite-difference gradients,
and the bank rows and their three-step memory."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.losses import pipa_patch
from pgpc_jax.uda import overlap_crops as oc
from pgpc_jax.uda import ring_buffer
from tests import numpy_pipa_patch as ref

_IMAGE = (64, 96)  # H, W
_CROP = (32, 48)  # h, w: a 4 x 6 feature grid at stride 8
_S = 8

# Jitted once per static configuration (eager dispatch of many small ops is slow on CPU).
_draw = jax.jit(
    oc.draw_crop_pairs,
    static_argnames=("batch", "image_size", "crop_size", "stride", "iou_range", "num_tries"),
)
_boxes = jax.jit(oc.boxes_from_draws, static_argnames=("crop_size", "stride", "iou_range"))
_indices = jax.jit(oc.overlap_feature_indices, static_argnames=("crop_size", "stride"))

# ------------------------------------------------------------------------------------------------
# Geometry, worked by hand (offsets and draws as (y, x))

# Image 0: crop 1 at (5, 10); the draw (20, 3) snaps to (5 + 8, 10 - 8) = (13, 2):
#   overlap 24 x 40 = 960, union 2 * 1536 - 960 = 2112, IoU 0.4545: accepted at once.
# Image 1: crop 1 at (5, 3); the draw (5, 0): x - x1 = -3 -> floor(-3 / 8) * 8 = -8 -> -5 < 0
#   -> +8 -> 3: identical crops, IoU 1, accepted (hi = 1 is included).
# Image 2: crop 1 at (0, 0); draw (0, 48): no overlap (48 - 48 = 0), rejected; draw (30, 40)
#   -> (24, 40): 8 x 8 = 64 / (3072 - 64), IoU 0.021 < 0.1, rejected; draw (9, 17) -> (8, 16):
#   24 x 32 = 768 / 2304 = 1/3, accepted.
# Image 3: crop 1 at (32, 48); every draw is rejected -> crop 2 = crop 1, not accepted.
_OFFSETS1 = np.array([[5, 10], [5, 3], [0, 0], [32, 48]])
_TRIES = np.array(
    [
        [[20, 3], [0, 0], [0, 0]],
        [[5, 0], [0, 0], [0, 0]],
        [[0, 48], [30, 40], [9, 17]],
        [[0, 0], [0, 0], [1, 7]],  # (0, 0): 0 x 0; (1, 7) -> (0, 0): no overlap either
    ]
)
_FLIPS = np.array([[True, False], [False, True], [False, False], [True, True]])


def _hand_pair():
    return _boxes(_OFFSETS1, _TRIES, _FLIPS, crop_size=_CROP, stride=_S, iou_range=(0.1, 1.0))


def test_boxes_and_iou_by_hand():
    pair = _hand_pair()
    np.testing.assert_array_equal(pair.offsets2, [[13, 2], [5, 3], [8, 16], [32, 48]])
    np.testing.assert_array_equal(pair.accepted, [True, True, True, False])
    np.testing.assert_allclose(
        oc.crop_iou(pair.offsets1, pair.offsets2, _CROP), [960 / 2112, 1.0, 1 / 3, 1.0], rtol=1e-6
    )
    ul1, br1, ul2, br2 = oc.overlap_boxes(pair, _CROP)
    np.testing.assert_array_equal(ul1, [[8, 0], [0, 0], [8, 16], [0, 0]])
    np.testing.assert_array_equal(br1, [[32, 40], [32, 48], [32, 48], [32, 48]])
    np.testing.assert_array_equal(ul2, [[0, 8], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(br2, [[24, 48], [32, 48], [24, 32], [32, 48]])
    # A range that excludes IoU 1 rejects image 1's draws, which all snap to crop 1 itself
    # ((0, 0): (0 - 5) // 8 * 8 + 5 = -3 -> 5 and (0 - 3) // 8 * 8 + 3 = -5 -> 3): fallback.
    strict = _boxes(_OFFSETS1, _TRIES, _FLIPS, crop_size=_CROP, stride=_S, iou_range=(0.1, 0.99))
    np.testing.assert_array_equal(strict.accepted, [True, False, True, False])
    np.testing.assert_array_equal(strict.offsets2[1], _OFFSETS1[1])


def test_snap_keeps_the_offset_on_the_grid():
    raw = np.arange(0, 49)[:, None].repeat(2, 1)
    first = np.array([3, 20])
    snapped = np.asarray(oc.snap_to_stride(first, raw, _S))
    assert np.all((snapped - first) % _S == 0)
    # At most the draw, except where the +s branch lifts a negative value: then at most crop 1.
    assert np.all((snapped >= 0) & (snapped <= np.maximum(raw, first)))
    assert np.all(snapped[snapped > raw] <= np.broadcast_to(first, raw.shape)[snapped > raw])
    # Against the released per-axis rule, one value at a time.
    for r in range(49):
        for axis in range(2):
            want = (r - first[axis]) // _S * _S + first[axis]
            want = want + _S if want < 0 else want
            assert snapped[r, axis] == want


def test_overlap_indices_by_hand():
    idx1, idx2, valid = _indices(_hand_pair(), crop_size=_CROP, stride=_S)
    assert idx1.shape == idx2.shape == valid.shape == (4, 4, 6)
    # Image 0: the overlap is 3 x 5 cells; view 1 cells (1.., 0..), view 2 cells (0.., 1..).
    # View 1 was flipped: its un-flipped column c is column 5 - c of the network's map.
    want_valid = np.zeros((4, 6), bool)
    want_valid[:3, :5] = True
    np.testing.assert_array_equal(valid[0], want_valid)
    rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(idx1[0][:3, :5], (1 + rows) * 6 + (5 - cols))
    np.testing.assert_array_equal(idx2[0][:3, :5], rows * 6 + (1 + cols))
    assert int(idx1[0, 0, 0]) == 11 and int(idx2[0, 0, 0]) == 1
    # Image 1: identical crops, view 2 flipped: every cell, view 2's columns mirrored.
    assert bool(valid[1].all())
    full_r, full_c = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    np.testing.assert_array_equal(idx1[1], full_r * 6 + full_c)
    np.testing.assert_array_equal(idx2[1], full_r * 6 + 5 - full_c)
    # Image 2: 3 x 4 cells, no flips: view 1 from cell (1, 2), view 2 from cell (0, 0).
    assert int(valid[2].sum()) == 12 and bool(valid[2][:3, :4].all())
    np.testing.assert_array_equal(idx1[2][:3, :4], (1 + full_r[:3, :4]) * 6 + 2 + full_c[:3, :4])
    np.testing.assert_array_equal(idx2[2][:3, :4], full_r[:3, :4] * 6 + full_c[:3, :4])
    # Padding positions point at cell 0.
    assert int(jnp.abs(jnp.where(valid, 0, idx1)).sum()) == 0


def test_cut_crops_flips_by_hand():
    image = np.arange(2 * 64 * 96).reshape(2, 64, 96)
    crops = oc.cut_crops(image, np.array([[5, 10], [0, 48]]), np.array([False, True]), _CROP)
    np.testing.assert_array_equal(crops[0], image[0, 5:37, 10:58])
    np.testing.assert_array_equal(crops[1], image[1, 0:32, 48:96][:, ::-1])
    with pytest.raises(ValueError, match="fit"):
        oc.cut_crops(image, np.zeros((2, 2), int), np.zeros(2, bool), (65, 8))


def test_scene_points_pair_up():
    # Pixels carry their image coordinates; features are the crops avg-pooled by 8, as the
    # release pools the H/4 decoder feature by 2. Paired cells must hold the same coordinates.
    batch = 16
    yy, xx = np.meshgrid(np.arange(64.0), np.arange(96.0), indexing="ij")
    image = np.broadcast_to(np.stack([yy, xx], -1), (batch, 64, 96, 2)).astype(np.float32)
    pair = _draw(jax.random.key(3), batch=batch, image_size=_IMAGE, crop_size=_CROP)
    assert 0 < int(pair.flips.sum()) < 2 * batch  # both flipped and unflipped views occur

    def pooled(offsets, flips):
        crops = oc.cut_crops(image, offsets, flips, _CROP)
        return crops.reshape(batch, 4, 8, 6, 8, 2).mean(axis=(2, 4))

    idx1, idx2, valid = _indices(pair, crop_size=_CROP, stride=_S)
    f1 = oc.gather_overlap(pooled(pair.offsets1, pair.flips[:, 0]), idx1)
    f2 = oc.gather_overlap(pooled(pair.offsets2, pair.flips[:, 1]), idx2)
    valid = np.asarray(valid)
    np.testing.assert_array_equal(np.asarray(f1)[valid], np.asarray(f2)[valid])
    # And the pairs are the whole overlap: its area over 8 x 8.
    extent = np.maximum(np.array(_CROP) - np.abs(pair.offsets2 - pair.offsets1), 0)
    np.testing.assert_array_equal(valid.sum((1, 2)), extent.prod(-1) // 64)
    # View 1's cell (r, c) of the un-flipped grid is the block at offsets1 + 8 (r, c).
    ul1 = np.asarray(oc.overlap_boxes(pair, _CROP)[0])
    b, r, c = np.argwhere(valid)[-1]
    centre = np.asarray(pair.offsets1[b]) + ul1[b] + 8 * np.array([r, c]) + 3.5
    np.testing.assert_allclose(np.asarray(f1[b, r, c]), centre)


def test_draw_statistics_and_fallback():
    batch = 512
    pair = _draw(jax.random.key(0), batch=batch, image_size=_IMAGE, crop_size=_CROP)
    o1, o2 = np.asarray(pair.offsets1), np.asarray(pair.offsets2)
    limit = np.array(_IMAGE) - np.array(_CROP)
    for o in (o1, o2):
        assert np.all((o >= 0) & (o <= limit))
    assert np.all((o2 - o1) % _S == 0)
    iou = np.asarray(oc.crop_iou(o1, o2, _CROP))
    assert np.all((iou >= 0.1) & (iou <= 1.0))
    assert bool(pair.accepted.all())  # 50 tries at this size: never a fallback in 512
    assert len(np.unique(o1[:, 1])) == limit[1] + 1  # crop 1 covers every x in 0..W-w
    assert 0.4 < float(pair.flips.mean()) < 0.6
    # Two tries and a narrow range: some images fall back to identical crops.
    few = _draw(
        jax.random.key(1),
        batch=batch,
        image_size=_IMAGE,
        crop_size=_CROP,
        iou_range=(0.5, 0.6),
        num_tries=2,
    )
    acc = np.asarray(few.accepted)
    assert 0 < acc.sum() < batch
    np.testing.assert_array_equal(np.asarray(few.offsets2)[~acc], np.asarray(few.offsets1)[~acc])
    iou = np.asarray(oc.crop_iou(few.offsets1, few.offsets2, _CROP))[acc]
    assert np.all((iou >= 0.5) & (iou <= 0.6))
    with pytest.raises(ValueError, match="multiple of stride"):
        oc.draw_crop_pairs(jax.random.key(0), 2, _IMAGE, (30, 48))
    with pytest.raises(ValueError, match="fit"):
        oc.draw_crop_pairs(jax.random.key(0), 2, _IMAGE, (72, 48))


# ------------------------------------------------------------------------------------------------
# Against the transcription: boxes from the same draws, overlap cut, loss


def _random_case(seed, batch=4, dim=8, num_classes=4, bank_len=40, iou_range=(0.1, 1.0)):
    rng = np.random.default_rng(seed)
    limit = np.array(_IMAGE) - np.array(_CROP)
    first = rng.integers(0, limit + 1, (batch, 2))
    tries = rng.integers(0, limit + 1, (batch, 50, 2))
    flips = rng.random((batch, 2)) < 0.5
    pair = _boxes(first, tries, flips, crop_size=_CROP, stride=_S, iou_range=iou_range)
    grid = (batch, 4, 6)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    net = {
        "feats1": unit(rng.normal(size=grid + (dim,))),
        "feats2": unit(rng.normal(size=grid + (dim,))),
        "labels1": rng.integers(0, num_classes, grid),
        "labels2": rng.integers(0, num_classes, grid),
        "conf1": rng.uniform(0.8, 1.0, grid),
        "conf2": rng.uniform(0.8, 1.0, grid),
    }
    bank = {
        "feats": unit(rng.normal(size=(bank_len, dim))),
        "labels": rng.integers(0, num_classes, bank_len),
        "valid": rng.random(bank_len) < 0.8,
    }
    return first, tries, flips, pair, net, bank


@pytest.mark.parametrize("seed, iou_range", [(0, (0.1, 1.0)), (1, (0.3, 0.5)), (2, (0.1, 1.0))])
def test_boxes_match_the_released_loop(seed, iou_range):
    first, tries, _, pair, _, _ = _random_case(seed, batch=32, iou_range=iou_range)
    ul1, br1, ul2, br2 = (np.asarray(x).tolist() for x in oc.overlap_boxes(pair, _CROP))
    offsets2, accepted = np.asarray(pair.offsets2).tolist(), np.asarray(pair.accepted).tolist()
    for b in range(first.shape[0]):
        x2, y2, k, r_ul1, r_br1, r_ul2, r_br2 = ref.pair_city_boxes(
            *_IMAGE, *_CROP, _S, iou_range, first[b, 1], first[b, 0], tries[b, :, ::-1]
        )
        assert offsets2[b] == [y2, x2]
        assert accepted[b] == (k < 50)
        assert [ul1[b], br1[b], ul2[b], br2[b]] == [r_ul1, r_br1, r_ul2, r_br2]


@functools.cache
def _loss_fn():
    return jax.jit(pipa_patch.directional_patch_loss)


def _jax_overlap_loss(pair, net, bank):
    idx1, idx2, valid = _indices(pair, crop_size=_CROP, stride=_S)
    g1 = {
        k: oc.gather_overlap(jnp.asarray(net[k + "1"]), idx1) for k in ("feats", "labels", "conf")
    }
    g2 = {
        k: oc.gather_overlap(jnp.asarray(net[k + "2"]), idx2) for k in ("feats", "labels", "conf")
    }
    total, parts = _loss_fn()(
        g1["feats"],
        g2["feats"],
        g1["labels"],
        g2["labels"],
        g1["conf"],
        g2["conf"],
        valid,
        bank["feats"],
        bank["labels"],
        bank["valid"],
    )
    return g1, g2, valid, total, parts


def _ref_overlap(pair, flips, net):
    ul1, br1, ul2, br2 = (np.asarray(x).T for x in oc.overlap_boxes(pair, _CROP))
    nchw = {k: np.moveaxis(net[k], -1, 1) for k in ("feats1", "feats2")}
    return ref.overlap_part(
        nchw["feats1"],
        nchw["feats2"],
        net["labels1"],
        net["labels2"],
        net["conf1"],
        net["conf2"],
        ul1,
        br1,
        ul2,
        br2,
        flips.T,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_the_transcription(seed):
    _, _, flips, pair, net, bank = _random_case(seed)
    g1, g2, valid, total, parts = _jax_overlap_loss(pair, net, bank)
    f1, f2, y1, y2, c1, c2 = _ref_overlap(pair, flips, net)
    v = np.asarray(valid)
    # The valid positions, row-major and image by image, are the released concatenation.
    np.testing.assert_allclose(np.asarray(g1["feats"])[v], f1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g2["feats"])[v], f2, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g1["labels"])[v], y1)
    np.testing.assert_array_equal(np.asarray(g2["labels"])[v], y2)
    np.testing.assert_allclose(np.asarray(g2["conf"])[v], c2, rtol=1e-6)
    rows = bank["valid"]
    loss1, loss2 = ref.patch_loss(f1, f2, y1, y2, c1, c2, bank["feats"][rows], bank["labels"][rows])
    assert loss1 > 0 and loss2 > 0  # both gates open somewhere
    np.testing.assert_allclose(float(parts["view1"]), loss1, rtol=1e-5)
    np.testing.assert_allclose(float(parts["view2"]), loss2, rtol=1e-5)
    np.testing.assert_allclose(float(total), loss1 + loss2, rtol=1e-5)
    # The release shifts by the first chunk of 8000 bank rows only; with chunks of 5 rows here,
    # the difference is only through the 1e-8 terms.
    c_loss1, c_loss2 = ref.patch_loss(
        f1, f2, y1, y2, c1, c2, bank["feats"][rows], bank["labels"][rows], chunk=5
    )
    np.testing.assert_allclose([c_loss1, c_loss2], [loss1, loss2], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Golden values by hand (D = 2, tau = 0.1)

# Position 0: o1 = (1, 0) label 0, o2 = (.6, .8) label 1, conf (0.5, 0.95): only L1 gated in.
# Position 1: o1 = o2 = (0, 1), labels 1, conf (0.95, 0.92): only L2 gated in.
# Position 2: padding with NaN features and both gates open: must change nothing.
_G_F1 = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 1.0]])
_G_F2 = np.array([[0.6, 0.8], [0.0, 1.0], [2.0, np.nan]])
_G_Y1, _G_Y2 = np.array([0, 1, 2]), np.array([1, 1, 2])
_G_C1, _G_C2 = np.array([0.5, 0.95, 0.5]), np.array([0.95, 0.92, 0.99])
_G_VALID = np.array([True, True, False])
# Bank: (1, 0) label 0, (0, 1) label 1, (.6, .8) label 2, and an unfilled NaN slot.
_G_BANK = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [np.nan, np.nan]])
_G_BANK_Y = np.array([0, 1, 2, 1])
_G_BANK_VALID = np.array([True, True, True, False])


def test_golden_values():
    eps = 1e-8
    # L1 at position 0: pos = .6 / .1 = 6; bank scores 10 (own label: in the max, not a
    # negative), 0, 6; m = 10: -log(e^-4 / (e^-4 + e^-10 + e^-4 + eps) + eps).
    l1 = -math.log(math.exp(-4) / (2 * math.exp(-4) + math.exp(-10) + eps) + eps)
    # L2 at position 1: anchor o2 = (0, 1) label 1, pos = 10; bank 0, 10 (own label), 8; m = 10.
    l2 = -math.log(1.0 / (1.0 + math.exp(-10) + math.exp(-2) + eps) + eps)
    total, parts = _loss_fn()(
        _G_F1, _G_F2, _G_Y1, _G_Y2, _G_C1, _G_C2, _G_VALID, _G_BANK, _G_BANK_Y, _G_BANK_VALID
    )
    np.testing.assert_allclose(float(parts["view1"]), l1, rtol=1e-6)
    np.testing.assert_allclose(float(parts["view2"]), l2, rtol=1e-6)
    np.testing.assert_allclose(float(total), l1 + l2, rtol=1e-6)
    assert abs(l1 - math.log(2)) < 3e-3  # two equal terms in the denominator
    # Padding is inert in the gradient too.
    grads = jax.grad(
        lambda a, b: _loss_fn()(
            a, b, _G_Y1, _G_Y2, _G_C1, _G_C2, _G_VALID, _G_BANK, _G_BANK_Y, _G_BANK_VALID
        )[0],
        argnums=(0, 1),
    )(jnp.asarray(_G_F1, jnp.float32), jnp.asarray(_G_F2, jnp.float32))
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0])[2], 0.0)


_one_side = jax.jit(pipa_patch.patch_contrast_one_side)


def test_released_eps_is_in_shifted_units():
    # The anchor opposes its target (pos = -10) and the only bank row shares its label
    # (score 10): no negative, so without the eps the loss would be -log 1 = 0. The release's
    # 1e-8 sits after the shift by m = 10: -log(e^-20 / (e^-20 + 1e-8) + 1e-8) = 1.77.
    loss = _one_side(
        np.array([[1.0, 0.0]]),
        np.array([[-1.0, 0.0]]),
        np.array([3]),
        np.array([0.1]),
        np.array([0.95]),
        np.array([True]),
        np.array([[1.0, 0.0]]),
        np.array([3]),
        np.array([True]),
    )
    e = math.exp(-20)
    np.testing.assert_allclose(float(loss), -math.log(e / (e + 1e-8) + 1e-8), rtol=1e-4)
    assert 1.7 < float(loss) < 1.8
    # No position passing the gate: 0 (the release's / (0 + 1e-12)).
    none = _one_side(
        np.array([[1.0, 0.0]]),
        np.array([[-1.0, 0.0]]),
        np.array([3]),
        np.array([0.96]),
        np.array([0.95]),
        np.array([True]),
        np.array([[1.0, 0.0]]),
        np.array([3]),
        np.array([True]),
    )
    assert float(none) == 0.0


# ------------------------------------------------------------------------------------------------
# Gradients (float64)


def test_gradient_finite_differences():
    # The release detaches the target view: view 1's gradient is that of L1 with view 2 held
    # fixed, view 2's that of L2 with view 1 held fixed. The differences perturb accordingly.
    _, _, _, pair, net, bank = _random_case(5, batch=2, bank_len=12)
    with jax.enable_x64(True):
        idx1, idx2, valid = _indices(pair, crop_size=_CROP, stride=_S)
        lab1 = oc.gather_overlap(jnp.asarray(net["labels1"]), idx1)
        lab2 = oc.gather_overlap(jnp.asarray(net["labels2"]), idx2)
        conf1 = oc.gather_overlap(jnp.asarray(net["conf1"], jnp.float64), idx1)
        conf2 = oc.gather_overlap(jnp.asarray(net["conf2"], jnp.float64), idx2)
        bank_feats = jnp.asarray(bank["feats"], jnp.float64)

        @jax.jit
        def parts(x1, x2, b):
            # Gathered inside, so the gradient reaches the views' feature maps.
            f1, f2 = oc.gather_overlap(x1, idx1), oc.gather_overlap(x2, idx2)
            total, sides = pipa_patch.directional_patch_loss(
                f1, f2, lab1, lab2, conf1, conf2, valid, b, bank["labels"], bank["valid"]
            )
            return total, sides["view1"], sides["view2"]

        x1 = jnp.asarray(net["feats1"], jnp.float64)
        x2 = jnp.asarray(net["feats2"], jnp.float64)
        g1, g2, gb = jax.jit(jax.grad(lambda *a: parts(*a)[0], argnums=(0, 1, 2)))(
            x1, x2, bank_feats
        )
        assert float(jnp.abs(g1).sum()) > 0 and float(jnp.abs(g2).sum()) > 0
        assert float(jnp.abs(gb).sum()) == 0.0  # the bank is detached
        # L1 alone gives no gradient to view 2 (its target), L2 none to view 1.
        g1_of_l2, g2_of_l1 = jax.grad(
            lambda a, b: parts(a, x2, bank_feats)[2] + parts(x1, b, bank_feats)[1], argnums=(0, 1)
        )(x1, x2)
        assert float(jnp.abs(g1_of_l2).sum()) == 0.0 and float(jnp.abs(g2_of_l1).sum()) == 0.0
        rng = np.random.default_rng(0)
        h = 1e-6
        for _ in range(2):
            d1, d2 = rng.normal(size=x1.shape), rng.normal(size=x2.shape)
            fd1 = parts(x1 + h * d1, x2, bank_feats)[1] - parts(x1 - h * d1, x2, bank_feats)[1]
            fd2 = parts(x1, x2 + h * d2, bank_feats)[2] - parts(x1, x2 - h * d2, bank_feats)[2]
            np.testing.assert_allclose(float(jnp.sum(g1 * d1)), float(fd1) / (2 * h), rtol=1e-6)
            np.testing.assert_allclose(float(jnp.sum(g2 * d2)), float(fd2) / (2 * h), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Pseudo labels, bank rows and the three-step memory


def test_pseudo_labels():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels, conf = pipa_patch.pseudo_labels(logits)
    np.testing.assert_array_equal(labels, [0, 2])
    np.testing.assert_allclose(
        conf, [math.exp(2) / (math.exp(2) + 2), 1 / (1 + 2 * math.exp(-5))], rtol=1e-6
    )
    g = jax.grad(lambda x: pipa_patch.pseudo_labels(x)[1].sum())(logits)
    assert float(jnp.abs(g).sum()) == 0.0


def test_bank_rows_and_three_step_memory():
    batch, grid, num = 2, (3, 4), 5
    ids = np.arange(batch * 12, dtype=np.float32).reshape((batch,) + grid)
    feats1 = np.stack([ids, ids], -1)
    feats2 = np.stack([ids + 100, ids], -1)
    rows, labels = pipa_patch.bank_rows(
        jax.random.key(0), feats1, feats2, ids.astype(int) % 3, (ids.astype(int) + 1) % 3, num
    )
    rows, labels = np.asarray(rows), np.asarray(labels)
    assert rows.shape == (2 * num, 2) and labels.shape == (2 * num,)
    assert len(set(rows[:num, 0])) == num and np.all(rows[:num, 0] < 100)  # view 1, distinct
    assert len(set(rows[num:, 0])) == num and np.all(rows[num:, 0] >= 100)  # view 2, distinct
    np.testing.assert_array_equal(labels[:num], rows[:num, 1].astype(int) % 3)
    np.testing.assert_array_equal(labels[num:], (rows[num:, 1].astype(int) + 1) % 3)
    g = jax.grad(
        lambda f: pipa_patch.bank_rows(
            jax.random.key(0), f, feats2, ids.astype(int), ids.astype(int), num
        )[0].sum()
    )(feats1)
    assert float(jnp.abs(g).sum()) == 0.0
    with pytest.raises(ValueError, match="num_per_view"):
        pipa_patch.bank_rows(jax.random.key(0), feats1, feats2, ids, ids, 25)

    # The release keeps the last three steps (step_save = 2), the current one included: a ring
    # buffer of 3 * 2 * num rows holds the same rows after every step.
    buf = ring_buffer.init_buffer(3 * 2 * num, 1)
    push = jax.jit(ring_buffer.push)
    feature_bank, label_bank, count = [], [], 0
    for step in range(6):
        new = np.arange(2 * num, dtype=np.float32)[:, None] + 1000 * step
        buf = push(buf, new, np.ones(2 * num, bool), labels=np.zeros(2 * num, int))
        feature_bank, label_bank, count, all_feats, _ = ref.update_bank(
            feature_bank, label_bank, count, new, np.zeros(2 * num, int)
        )
        kept = np.asarray(buf["feats"])[np.asarray(ring_buffer.valid_slots(buf))]
        np.testing.assert_array_equal(np.sort(kept[:, 0]), np.sort(all_feats[:, 0]))
        assert len(all_feats) == min(step + 1, 3) * 2 * num
