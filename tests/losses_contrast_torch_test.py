"""The released contrast path against PyTorch: from the four encoder stages to the loss value and
its gradient with respect to every stage, our `embed_features` + `labels_to_grid` +
`values_to_grid` + `cluda_loss` against the released `dacs.py` glue and CLUDA's
`contrastive_loss` written in torch (`tests/torch_pgpc_reference.py`), autograd included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pgpc_jax.losses import contrast as cl
from tests import torch_pgpc_reference as ref

# The MiT stage strides; channels kept small so the pair matrix is the only large array.
_STRIDES = (4, 8, 16, 32)
_THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # DAFormer's fdist_classes


def _inputs(seed, batch, crop, channels, grid_cells):
    """Stage features NHWC, labels [B, H, W] (255 included) and pixel weights [B, H, W]."""
    rng = np.random.default_rng(seed)
    height, width = crop
    feats = [
        rng.normal(size=(batch, height // s, width // s, c)) for s, c in zip(_STRIDES, channels)
    ]
    # Blocky labels (as segmentation maps are) so grid cells of one class meet each other.
    coarse = rng.integers(0, 19, size=(batch, grid_cells, grid_cells))
    coarse[rng.random(coarse.shape) < 0.1] = 255
    rows = np.arange(height) * grid_cells // height
    cols = np.arange(width) * grid_cells // width
    labels = coarse[:, rows][:, :, cols]
    weights = rng.uniform(0.0, 1.0, size=(batch, height, width))
    weights[:, :2] = 0.0  # the released pseudo weight zeroes the top rows
    return feats, labels, weights


def _torch_loss_and_grads(feats, labels, weights, grid, *, intended_order, dtype):
    stages = [torch.tensor(f.transpose(0, 3, 1, 2), dtype=dtype, requires_grad=True) for f in feats]
    emb, grid_labels, grid_weights = ref.released_contrast_inputs(
        stages,
        torch.tensor(labels[:, None]),
        None if weights is None else torch.tensor(weights, dtype=dtype),
        grid,
    )
    loss = ref.contrastive_loss(
        emb,
        grid_labels,
        fdist_classes=_THING_CLASSES,
        pseudo_weight=grid_weights,
        intended_order=intended_order,
    )
    loss.backward()
    return loss.item(), [s.grad.numpy().transpose(0, 2, 3, 1) for s in stages]


def _jax_loss_and_grads(feats, labels, weights, grid, *, order_quirk):
    def loss_fn(stages):
        emb = cl.embed_features(stages, grid)
        w = None if weights is None else cl.values_to_grid(jnp.asarray(weights), grid)
        return cl.cluda_loss(emb, cl.labels_to_grid(labels, grid), w, order_quirk=order_quirk)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))([jnp.asarray(f) for f in feats])
    return float(loss), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("quirk", [True, False])
def test_cluda_path_matches_torch_float64(batch, weighted, quirk):
    """Small shapes in float64: the value and every stage's gradient to ~1e-10."""
    feats, labels, weights = _inputs(batch * 10 + weighted, batch, (64, 48), (3, 4, 5, 6), 6)
    weights = weights if weighted else None
    grid = (9, 7)
    want, want_grads = _torch_loss_and_grads(
        feats, labels, weights, grid, intended_order=not quirk, dtype=torch.float64
    )
    with jax.enable_x64(True):
        got, got_grads = _jax_loss_and_grads(feats, labels, weights, grid, order_quirk=quirk)
    assert want < 0.0 or want > 0.0  # a non-trivial value
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for g, w in zip(got_grads, want_grads):
        assert np.abs(w).max() > 0.0
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-12 * np.abs(w).max())


def test_cluda_path_matches_torch_at_the_released_shape():
    """The released geometry in float32: a 512x512 crop (stages 128/64/32/16), two images, the
    65x65 grid (8450 pixels, the 8450^2 pair matrix), the quirk on as in the released code."""
    feats, labels, weights = _inputs(3, 2, (512, 512), (4, 4, 4, 4), 24)
    grid = (65, 65)
    want, want_grads = _torch_loss_and_grads(
        feats, labels, weights, grid, intended_order=False, dtype=torch.float32
    )
    got, got_grads = _jax_loss_and_grads(
        [f.astype(np.float32) for f in feats],
        labels,
        weights.astype(np.float32),
        grid,
        order_quirk=True,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * np.abs(w).max())


def test_torch_reference_quirk_differs_for_two_images():
    """The oracle itself: the released flattening and the intended one differ for B = 2 (so the
    quirk cases above test something), and agree for B = 1."""
    for batch in (1, 2):
        feats, labels, weights = _inputs(5, batch, (64, 48), (3, 4, 5, 6), 6)
        quirk, _ = _torch_loss_and_grads(
            feats, labels, weights, (9, 7), intended_order=False, dtype=torch.float64
        )
        plain, _ = _torch_loss_and_grads(
            feats, labels, weights, (9, 7), intended_order=True, dtype=torch.float64
        )
        if batch == 1:
            np.testing.assert_allclose(quirk, plain, rtol=1e-12)
        else:
            assert abs(quirk - plain) > 1e-3 * abs(plain)


@pytest.mark.parametrize(
    "positives, source_anchors, unreliable_negatives",
    [("prototype", True, True), ("prototype", False, True), ("pixel", True, False)],
)
def test_pgpc_matches_torch_reference(positives, source_anchors, unreliable_negatives):
    """`pgpc_loss` with samples large enough to take every eligible pixel equals the reference
    written anchor by anchor in torch: loss, gradient wrt the embeddings and new prototypes."""
    rng = np.random.default_rng(11)
    n, dim, classes = 48, 6, 4
    emb = rng.normal(size=(n, dim))
    labels = rng.integers(0, classes, size=n)
    labels[rng.random(n) < 0.1] = 255
    is_target = rng.random(n) < 0.6
    confidence = np.where(is_target, rng.uniform(0.9, 1.0, size=n), 1.0)
    valid = rng.random(n) < 0.9
    ruled_in = rng.integers(0, classes, size=(n, 2))
    proto_mean = rng.normal(size=(classes, dim)) * 0.1
    proto_seen = np.array([True, False, True, False])
    kw = dict(
        temperature=0.2,
        reliable_threshold=0.95,
        prototype_momentum=0.9,
        source_anchors=source_anchors,
        positives=positives,
        unreliable_negatives=unreliable_negatives,
    )

    emb_t = torch.tensor(emb, requires_grad=True)
    want, want_mean, want_seen = ref.pgpc_loss_all_pixels(
        emb_t,
        torch.tensor(labels),
        torch.tensor(confidence),
        torch.tensor(is_target),
        torch.tensor(valid),
        torch.tensor(ruled_in),
        torch.tensor(proto_mean),
        torch.tensor(proto_seen),
        **kw,
    )
    want.backward()

    def loss_fn(e):
        loss, new, _ = cl.pgpc_loss(
            jax.random.key(0),
            e,
            labels,
            confidence,
            is_target,
            valid,
            ruled_in,
            {"mean": jnp.asarray(proto_mean), "seen": jnp.asarray(proto_seen)},
            num_classes=classes,
            num_anchors=n,
            num_negatives=n,
            num_unreliable=n,
            **kw,
        )
        return loss, new

    with jax.enable_x64(True):
        (got, new), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(emb))
        got, grad = float(got), np.asarray(grad)
        new_mean, new_seen = np.asarray(new["mean"]), np.asarray(new["seen"])
    assert want.item() > 0.0
    np.testing.assert_allclose(got, want.item(), rtol=1e-10)
    np.testing.assert_allclose(grad, emb_t.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(new_mean, want_mean.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(new_seen, want_seen.numpy())
