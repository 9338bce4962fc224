"""Layer numerics against PyTorch: resize rules, BatchNorm, DropPath."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgpc_jax.models.layers import BatchNorm, DropPath, resize_bilinear, resize_nearest_legacy


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "src,dst",
    [((13, 17), (52, 68)), ((128, 128), (65, 65)), ((7, 9), (13, 17)), ((30, 20), (11, 29))],
)
def test_resize_bilinear_matches_torch(src, dst, align_corners):
    x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
    ours = np.asarray(resize_bilinear(jnp.asarray(x), dst, align_corners))
    ref = F.interpolate(_nchw(x), size=dst, mode="bilinear", align_corners=align_corners)
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "src,dst", [((512, 512), (65, 65)), ((13, 17), (5, 40)), ((720, 1280), (65, 65))]
)
def test_resize_nearest_legacy_matches_torch(src, dst):
    labels = np.random.default_rng(1).integers(0, 255, size=(1, *src)).astype(np.float32)
    ours = np.asarray(resize_nearest_legacy(jnp.asarray(labels), dst))
    ref = F.interpolate(torch.from_numpy(labels)[:, None], size=dst, mode="nearest")[:, 0]
    np.testing.assert_array_equal(ours, ref.numpy())


def test_batchnorm_matches_torch_train_and_eval():
    rng = np.random.default_rng(2)
    x = rng.normal(2.0, 3.0, size=(4, 5, 6, 7)).astype(np.float32)
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    params = {
        "scale": rng.uniform(0.5, 1.5, 7).astype(np.float32),
        "bias": rng.normal(size=7).astype(np.float32),
    }
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    y_train, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])

    ref = torch.nn.BatchNorm2d(7)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(params["scale"]))
        ref.bias.copy_(torch.from_numpy(params["bias"]))
    ref.train()
    y_ref = ref(_nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(y_train), y_ref, atol=1e-5)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), ref.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), ref.running_var.numpy(), rtol=1e-6)
    assert int(stats["num_batches_tracked"]) == int(ref.num_batches_tracked) == 1

    ref.eval()
    y_eval = bn.apply({"params": params, "batch_stats": stats}, x, train=False)
    y_ref = ref(_nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(y_eval), y_ref, atol=1e-5)


def test_drop_path_drops_whole_samples_and_rescales():
    x = jnp.ones((4000, 3, 2))
    y = DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    per_sample = np.asarray(y).reshape(4000, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
    same = DropPath(0.25).apply({}, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
