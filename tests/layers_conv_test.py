"""The fast convolutions (`depthwise_conv`, `DepthwiseConv`, `PointwiseConv`) compute what XLA's
convolution computes, forward and backward, with the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.models.layers import DepthwiseConv, PointwiseConv, depthwise_conv

CASES = [  # (H, W, C, kernel, padding, dilation)
    (7, 9, 3, (3, 3), ((1, 1), (1, 1)), 1),  # the Mix-FFN's 3x3
    (10, 8, 4, (3, 3), ((6, 6), (6, 6)), 6),  # a DAFormer ASPP branch, dilation > size
    (12, 12, 3, (3, 3), ((3, 3), (3, 3)), 3),
    (6, 7, 2, (3, 3), ((0, 2), (1, 0)), 1),  # asymmetric padding
    (5, 5, 2, (2, 3), ((0, 0), (2, 1)), 2),  # even kernel, no padding on one axis
]


def _grouped(x, k, padding, dilation):
    return jax.lax.conv_general_dilated(
        x,
        k[:, :, None, :],
        (1, 1),
        padding,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


@pytest.mark.parametrize("h,w,c,kernel,padding,dilation", CASES)
def test_depthwise_conv_and_its_gradients_equal_grouped_conv_in_float64(
    h, w, c, kernel, padding, dilation
):
    with jax.enable_x64():
        rng = np.random.default_rng(h * w + c)
        x = jnp.asarray(rng.standard_normal((2, h, w, c)))
        k = jnp.asarray(rng.standard_normal((*kernel, c)))
        want, want_vjp = jax.vjp(lambda x, k: _grouped(x, k, padding, dilation), x, k)
        got, got_vjp = jax.vjp(lambda x, k: depthwise_conv(x, k, padding, dilation), x, k)
        assert got.shape == want.shape and got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        cotangent = jnp.asarray(rng.standard_normal(want.shape))
        for g, w_ in zip(got_vjp(cotangent), want_vjp(cotangent)):
            np.testing.assert_allclose(g, w_, rtol=1e-12, atol=1e-12)


def test_depthwise_kernel_gradient_accumulates_in_float32_under_bfloat16():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 4)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.bfloat16)
    pad = ((1, 1), (1, 1))
    _, vjp = jax.vjp(lambda x, k: depthwise_conv(x, k, pad, 1), x, k)
    g = jnp.ones((2, 32, 32, 4), jnp.bfloat16)
    dx, dk = vjp(g)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    x32 = x.astype(jnp.float32)
    _, vjp32 = jax.vjp(lambda x, k: depthwise_conv(x, k, pad, 1), x32, k.astype(jnp.float32))
    want = vjp32(g.astype(jnp.float32))[1]
    # A bf16 sum of 2048 terms would be off by percents; a float32 one rounds only at the end.
    np.testing.assert_allclose(dk.astype(jnp.float32), want, rtol=1e-2)


@pytest.mark.parametrize("use_bias", [False, True])
def test_depthwise_module_equals_grouped_nn_conv_with_the_same_parameters(use_bias):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 11, 6)), jnp.float32)
    kw = dict(padding=((2, 2), (2, 2)), kernel_dilation=2, feature_group_count=6, use_bias=use_bias)
    ours = DepthwiseConv(6, (3, 3), **kw)
    ref = nn.Conv(6, (3, 3), **kw)
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), atol=1e-5)


@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_conv_equals_a_1x1_nn_conv_with_the_same_parameters(use_bias):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 7, 12)), jnp.float32)
    ref = nn.Conv(8, (1, 1), use_bias=use_bias)
    ours = PointwiseConv(8, use_bias=use_bias)
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )

    def loss(module, v):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), atol=1e-5)
    got, want = (
        jax.grad(lambda v: loss(ours, v))(variables),
        jax.grad(lambda v: loss(ref, v))(variables),
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), got, want)
