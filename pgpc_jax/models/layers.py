"""Building blocks shared by the encoder and the heads, with PyTorch / mmcv numerics.

Everything here is NHWC. Each layer mirrors one reference behaviour exactly, because checkpoints
trained in PyTorch must compute the same function here:

* `resize_bilinear`: `torch.nn.functional.interpolate(mode='bilinear')` for both values of
  `align_corners`, up- and down-sampling, with no antialiasing (unlike `jax.image.resize`).
* `resize_nearest_legacy`: PyTorch's legacy `mode='nearest'` rule, src = floor(dst * in / out).
* `BatchNorm`: torch `BatchNorm2d` (biased variance to normalise, unbiased variance in the
  running estimate, `num_batches_tracked` kept so checkpoints round-trip bit for bit).
* `ConvModule`: mmcv's conv (no bias) + BN + ReLU, the unit of the DAFormer and SegFormer heads.
* `DropPath`: timm's per-sample stochastic depth.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# mmcv ConvModule: kaiming normal, fan_out, ReLU gain, bias 0 (ConvModule.init_weights).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch nn.Linear / nn.Conv2d default: kaiming uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@functools.lru_cache(maxsize=256)
def _interp_matrix(
    out_size: int, in_size: int, align_corners: bool, float64: bool = False
) -> np.ndarray:
    """Row-stochastic [out_size, in_size] matrix of 1-D linear interpolation weights.

    Follows ATen's `upsample_bilinear2d` source-index rule: with align_corners the corners map
    onto each other; without, src = (dst + 0.5) * in / out - 0.5, clamped below at 0.
    """
    # ATen does this arithmetic in the op's accumulation type (`area_pixel_compute_source_index`):
    # float32 for float32/bf16/fp16 inputs, float64 for float64 ones; so do we, so that the
    # weights are bit-identical to torch's.
    f = np.float64 if float64 else np.float32
    dst = np.arange(out_size, dtype=f)
    if align_corners:
        scale = f(in_size - 1) / f(out_size - 1) if out_size > 1 else f(0.0)
        src = dst * scale
    else:
        # `dst + 0.5` is a double in ATen, so this product is evaluated in float64, then rounded.
        scale = f(in_size) / f(out_size)
        src = np.maximum(f(np.float64(scale) * (dst.astype(np.float64) + 0.5) - 0.5), f(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(f)).astype(f)
    m = np.zeros((out_size, in_size), f)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


# Largest broadcast W-interpolation matrix (B * out_h * out_w * in_w elements) for which
# `resize_bilinear` uses batched products; larger resizes (whole-image logits at evaluation) use
# the plain two-matrix form, which needs no broadcast copy.
_BATCHED_RESIZE_MAX = 1 << 22


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """Bilinear resize of `x` [B, H, W, C] to `size` (h, w), as torch `interpolate` computes it.

    Implemented as two small matrix products, which is exact, differentiable and maps onto
    matrix units on accelerators (batched over the NHWC layout where the broadcast matrices are
    small, so that XLA:CPU transposes no feature map forward or backward). Returns `x` unchanged
    when the size already matches.
    """
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    if (out_h, out_w) == (in_h, in_w):
        return x
    float64 = x.dtype == jnp.float64
    mh = jnp.asarray(_interp_matrix(out_h, in_h, align_corners, float64), dtype=x.dtype)
    mw = jnp.asarray(_interp_matrix(out_w, in_w, align_corners, float64), dtype=x.dtype)
    precision = jax.lax.Precision.HIGHEST
    b, c = x.shape[0], x.shape[3]
    if b * out_h * out_w * in_w <= _BATCHED_RESIZE_MAX:
        # Batched matrix products over the NHWC layout as it is: the interpolation matrices
        # broadcast over the batch (and rows), so neither the forward nor the backward
        # transposes the feature map. The broadcasts are built from `x` so that they carry its
        # batch sharding.
        zero = jnp.zeros_like(x[:, :1, :1, :1])  # [B, 1, 1, 1]
        y = jnp.einsum(
            "boh,bhk->bok",
            mh + zero[:, :, :, 0],
            x.reshape(b, in_h, in_w * c),
            precision=precision,
        ).reshape(b, out_h, in_w, c)
        mw = jnp.broadcast_to(mw + zero, (b, out_h, out_w, in_w))
        return jnp.einsum("bopw,bowc->bopc", mw, y, precision=precision)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=precision)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=precision)


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    # ATen: scale = float(in) / out in float32, src = min(floorf(dst * scale), in - 1).
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1).astype(np.int32)


def resize_nearest_legacy(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """PyTorch's legacy `interpolate(mode='nearest')` on [B, H, W, ...]: src = floor(dst * in / out).

    This is the rule the released PGPC / CLUDA code uses to bring labels to the 65x65 grid; it
    differs from the half-pixel rule of `jax.image.resize(method='nearest')`.
    """
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    return x[:, _nearest_index(out_h, in_h)][:, :, _nearest_index(out_w, in_w)]


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last axis of an NHWC tensor.

    In training the statistics are those of the whole (global) batch: under `jax.jit` with a
    batch-sharded input, XLA reduces across devices, so this is cross-replica BN for free.
    The running variance is updated with the unbiased batch variance, as torch does.

    Attributes:
      momentum: torch convention (weight of the new batch statistic), 0.1 as in mmcv.
      epsilon: 1e-5 as torch's default.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )
        if train:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                n = int(np.prod([x.shape[a] for a in axes]))
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
                count.value = count.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        y = (x.astype(jnp.float32) - mean) * inv + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _shifted_sum(xp: jax.Array, kernel: jax.Array, dilation: int, out_hw) -> jax.Array:
    """sum_ij xp[:, i*d : i*d + h, j*d : j*d + w, :] * kernel[i, j]: a depthwise correlation of
    an already padded NHWC input with a [kh, kw, C] kernel, as one fused elementwise loop."""
    (h, w), d = out_hw, dilation
    out = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            term = xp[:, i * d : i * d + h, j * d : j * d + w, :] * kernel[i, j]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, padding, dilation: int) -> jax.Array:
    """Depthwise 2-D correlation (torch `conv2d(groups=C)`, stride 1) of NHWC `x` with a
    [kh, kw, C] kernel; `padding` ((top, bottom), (left, right)) of zeros, `dilation` of the taps.

    The forward is a sum of kh*kw shifted, channel-scaled copies of the padded input; the
    backward is written out (the input gradient is the same shifted sum of the padded output
    gradient with the flipped kernel, the kernel gradient kh*kw channel-wise reductions) because
    XLA:CPU's grouped convolution, and the autodiff of the shifted sum (one padded full-size
    buffer per tap, summed), are each several times slower than both.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    kh, kw = kernel.shape[:2]
    out_hw = (xp.shape[1] - dilation * (kh - 1), xp.shape[2] - dilation * (kw - 1))
    return _shifted_sum(xp, kernel, dilation, out_hw)


def _depthwise_fwd(x, kernel, padding, dilation):
    return depthwise_conv(x, kernel, padding, dilation), (x, kernel)


def _depthwise_bwd(padding, dilation, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    d = dilation
    # dx[s] = sum_i g[s + pad_lo - i*d] k[i]: pad g by (k-1)*d - pad_lo below and so that the
    # result has x's size (either pad may be negative, i.e. a crop), then correlate with the
    # flipped kernel.
    pads = []
    for axis, (lo, _) in ((1, padding[0]), (2, padding[1])):
        k = kh if axis == 1 else kw
        low = (k - 1) * d - lo
        pads.append((low, x.shape[axis] + (k - 1) * d - g.shape[axis] - low, 0))
    zero = jnp.zeros((), g.dtype)
    gp = jax.lax.pad(g, zero, ((0, 0, 0), *pads, (0, 0, 0)))
    dx = _shifted_sum(gp, kernel[::-1, ::-1], d, x.shape[1:3])
    # dk[i, j] = sum over batch and positions of xp[i*d + y, j*d + x] * g[y, x], accumulated in
    # float32 at least whatever the compute dtype. Written as g shifted into xp's frame (not as
    # slices of xp, which XLA would share with the forward and keep as kh*kw full-size buffers).
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    h, w = g.shape[1:3]
    big_h, big_w = xp.shape[1:3]

    def tap(i, j):
        shifted = jnp.pad(
            g, ((0, 0), (i * d, big_h - h - i * d), (j * d, big_w - w - j * d), (0, 0))
        )
        return jnp.sum(xp * shifted, axis=(0, 1, 2), dtype=acc)

    dk = jnp.stack([jnp.stack([tap(i, j) for j in range(kw)]) for i in range(kh)])
    return dx, dk.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
    """`nn.Conv` with `feature_group_count == features == in_channels` and stride 1 (same
    parameters, same result), computed by `depthwise_conv`.

    XLA:CPU's grouped convolution is ~10x slower than this on the DAFormer head's dilated
    depthwise 3x3s, and its kernel gradient (a dense C x C convolution of which only the
    diagonal is kept) slower still on the MiT's Mix-FFN; on GPU both fuse to memory-bound loops.
    """

    features: int
    kernel_size: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    kernel_dilation: int = 1
    feature_group_count: int = 1
    use_bias: bool = False
    kernel_init: Any = kaiming_fan_out
    bias_init: Any = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, 1, self.features), self.param_dtype
        )
        padding = tuple(tuple(int(p) for p in pair) for pair in self.padding)
        y = depthwise_conv(
            x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype), padding, self.kernel_dilation
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class PointwiseConv(nn.Module):
    """`nn.Conv` with a 1x1 kernel, stride 1 and no padding (same parameters: `kernel`
    [1, 1, C_in, C_out], optional `bias`), computed as the matrix product over channels it is.

    XLA:CPU runs a 1x1 convolution ~3x slower than the same product written as a dot, forward
    and backward; on accelerators both lower to the same matrix-unit kernel.
    """

    features: int
    use_bias: bool = True
    kernel_init: Any = kaiming_fan_out
    bias_init: Any = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype
        )
        y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class ConvModule(nn.Module):
    """mmcv ConvModule: Conv2d (no bias, since a norm follows) -> BatchNorm -> ReLU.

    Submodule names `conv` and `bn` are those of the PyTorch state dict. Padding is explicit and
    symmetric (`dilation * (kernel // 2)`), never 'SAME', so odd sizes sample the same grid.
    """

    features: int
    kernel_size: int = 1
    dilation: int = 1
    groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(
            use_bias=False,
            kernel_init=kaiming_fan_out,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )
        if self.kernel_size == 1 and self.groups == 1:
            x = PointwiseConv(self.features, **kw)(x)
        else:
            pad = self.dilation * (self.kernel_size // 2)
            depthwise = self.groups > 1 and self.groups == self.features == x.shape[-1]
            x = (DepthwiseConv if depthwise else nn.Conv)(
                self.features,
                (self.kernel_size, self.kernel_size),
                padding=((pad, pad), (pad, pad)),
                kernel_dilation=self.dilation,
                feature_group_count=self.groups,
                **kw,
            )(x)
        x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x, train)
        return nn.relu(x)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm `DropPath`): zero a sample's residual branch with
    probability `rate` and rescale the kept ones by 1 / (1 - rate)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))
