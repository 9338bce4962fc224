"""Decode heads (the SegFormer all-MLP head, the DAFormer head) and SePiCo's projection head.

Both take the four encoder features (NHWC, strides 4..32) and return logits at the stride-4
resolution. Submodule names follow the mmseg / DAFormer PyTorch state dicts (a list index `.2`
becomes `_2`), so the converter maps them mechanically:

* `SegFormerHead`: `linear_c.{i}.proj`, `linear_fuse.{conv,bn}`, `linear_pred`. The fused channels
  are concatenated as [c4, c3, c2, c1], the order of NVlabs/SegFormer and HF transformers (whose
  checkpoints we load); DAFormer's copy of this head concatenates [c1..c4] instead.
* `DAFormerHead` (DAFormer `daformer_head.py` with `daformer_sepaspp_mitb5.py`): per-level linear
  embeddings to `embed_dim`, bilinear resize to the stride-4 size, concatenation [c1, c2, c3, c4],
  depthwise-separable ASPP (dilations 1, 6, 12, 18; the dilation-1 branch is a plain 1x1
  ConvModule), a 3x3 bottleneck ConvModule, channel dropout 0.1 and a 1x1 classifier `conv_seg`.
* `ProjectionHead` (SePiCo `proj_head.py: ProjHead` as configured for MiT): an auxiliary head
  that maps the encoder features to unit-norm pixel embeddings; `convs.{0,1}.{conv,bn}`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgpc_jax.models.layers import ConvModule, PointwiseConv, resize_bilinear, torch_default_kernel

Dtype = Any


def _torch_default_bias(fan_in: int):
    """torch Linear / Conv2d default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class MLP(nn.Module):
    """Linear embedding of a feature map (mmseg `MLP`: flatten, Linear): [B, H, W, Cin] -> [B, H, W, E]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(
            self.features,
            kernel_init=torch_default_kernel,
            bias_init=_torch_default_bias(x.shape[-1]),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)


class Dropout2d(nn.Module):
    """torch `nn.Dropout2d` on NHWC: drops whole channels per sample."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        return nn.Dropout(self.rate, broadcast_dims=(1, 2))(x, deterministic=deterministic)


def _embed_levels(features: Sequence[jax.Array], embed_dim: int, prefix: str, kw: dict) -> list:
    """Per-level Linear embedding (`<prefix>_<i>`), each resized bilinearly to the stride-4 size."""
    size = features[0].shape[1:3]
    return [
        resize_bilinear(MLP(embed_dim, name=f"{prefix}_{i}", **kw)(f), size)
        for i, f in enumerate(features)
    ]


def _classifier(num_classes: int, name: str, dtype: Dtype, param_dtype: Dtype) -> PointwiseConv:
    # mmseg BaseDecodeHead init_cfg: conv_seg ~ N(0, 0.01), bias 0.
    return PointwiseConv(
        num_classes,
        kernel_init=nn.initializers.normal(0.01),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class SegFormerHead(nn.Module):
    """SegFormer all-MLP decoder. features -> logits [B, H/4, W/4, num_classes]."""

    num_classes: int
    embed_dim: int = 256
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], train: bool = False, dropout: bool | None = None
    ) -> jax.Array:
        """`train`: BatchNorm on batch statistics; `dropout` (default: `train`): channel dropout."""
        dropout = train if dropout is None else dropout
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embedded = _embed_levels(features, self.embed_dim, "linear_c", kw)
        x = jnp.concatenate(embedded[::-1], axis=-1)  # [c4, c3, c2, c1] as NVlabs / HF
        x = ConvModule(self.embed_dim, 1, name="linear_fuse", **kw)(x, train)
        x = Dropout2d(self.dropout_rate)(x, deterministic=not dropout)
        return _classifier(self.num_classes, "linear_pred", **kw)(x)


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv DepthwiseSeparableConvModule: depthwise 3x3 ConvModule, then pointwise 1x1 ConvModule,
    each with BN + ReLU (mmcv's 'default' dw/pw norm and act are the module's own)."""

    features: int
    dilation: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ConvModule(c, 3, self.dilation, groups=c, name="depthwise_conv", **kw)(x, train)
        return ConvModule(self.features, 1, name="pointwise_conv", **kw)(x, train)


class ASPPWrapper(nn.Module):
    """DAFormer's context fusion: separable ASPP branches, concatenated, then a 3x3 bottleneck.

    No image-pool branch and no context layer (`pool=False`, `context_cfg=None` in DAFormer).
    """

    features: int
    dilations: Sequence[int] = (1, 6, 12, 18)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        branches = []
        for i, d in enumerate(self.dilations):
            name = f"aspp_modules_{i}"
            if d == 1:  # ASPPModule: 1x1 conv, padding 0
                branches.append(ConvModule(self.features, 1, name=name, **kw)(x, train))
            else:  # DepthwiseSeparableASPPModule replaces the dilated branches
                branches.append(
                    DepthwiseSeparableConvModule(self.features, d, name=name, **kw)(x, train)
                )
        x = jnp.concatenate(branches, axis=-1)
        return ConvModule(self.features, 3, name="bottleneck", **kw)(x, train)


class DAFormerHead(nn.Module):
    """DAFormer decoder. features -> logits [B, H/4, W/4, num_classes]."""

    num_classes: int
    embed_dim: int = 256
    channels: int = 256
    dilations: Sequence[int] = (1, 6, 12, 18)
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], train: bool = False, dropout: bool | None = None
    ) -> jax.Array:
        """`train`: BatchNorm on batch statistics; `dropout` (default: `train`): channel dropout."""
        dropout = train if dropout is None else dropout
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embedded = _embed_levels(features, self.embed_dim, "embed_layers", kw)
        x = jnp.concatenate(embedded, axis=-1)  # [c1, c2, c3, c4] as DAFormer
        x = ASPPWrapper(self.channels, tuple(self.dilations), name="fuse_layer", **kw)(x, train)
        x = Dropout2d(self.dropout_rate)(x, deterministic=not dropout)
        return _classifier(self.num_classes, "conv_seg", **kw)(x)


class ProjectionHead(nn.Module):
    """SePiCo's projection head on the encoder features: features -> [B, H/4, W/4, channels].

    As SePiCo's `ProjHead` with `input_transform='resize_concat'`, `in_index=[0, 1, 2, 3]`,
    `num_convs=2`, `kernel_size=1` (its MiT configuration): the four stages resized bilinearly to
    the first stage's size and concatenated (C_in = sum of the stage widths, 1024 for MiT-b5),
    then two mmcv ConvModules (1x1 conv without bias, BatchNorm, ReLU), C_in -> C_in // 4 ->
    `channels`, then L2 normalisation over channels (`F.normalize`, eps 1e-12). The configured
    channel dropout is never applied in SePiCo's forward, so there is none here. Being
    ReLU-activated, the embeddings are non-negative.

    Called as an auxiliary head, `head(features, train)`; its torch names are
    `convs.{0,1}.conv.weight` and `convs.{0,1}.bn.*`, SePiCo's own.

    Attributes:
      channels: embedding width (512 in every released SePiCo experiment).
      mid_channels: width of the first ConvModule; None for C_in // (number of stages), SePiCo's
        `mid_channels = in_channels // len(in_index)`.
      align_corners: of the bilinear resize (False, as SePiCo's config).
      epsilon: floor of the L2 norm (`F.normalize`'s 1e-12).
    """

    channels: int = 512
    mid_channels: int | None = None
    align_corners: bool = False
    epsilon: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
        """features: the encoder stages [B, H/s, W/s, C_s]; `train`: BatchNorm on batch statistics.

        Returns float32 [B, H/4, W/4, channels] of unit L2 norm per pixel.
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        size = features[0].shape[1:3]
        x = jnp.concatenate(
            [resize_bilinear(f, size, self.align_corners) for f in features], axis=-1
        )
        mid = self.mid_channels or x.shape[-1] // len(features)
        x = ConvModule(mid, 1, name="convs_0", **kw)(x, train)
        x = ConvModule(self.channels, 1, name="convs_1", **kw)(x, train)
        return l2_normalize(x.astype(jnp.float32), self.epsilon)


def l2_normalize(x: jax.Array, epsilon: float = 1e-12) -> jax.Array:
    """`torch.nn.functional.normalize(x, p=2, dim=-1)`: x / max(||x||_2, epsilon).

    The floor is taken on the squared norm, so that an all-zero vector (a pixel whose ReLU
    outputs are all 0) has the finite gradient 1 / epsilon that torch gives it, where
    `sqrt` at 0 would give NaN.
    """
    squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, epsilon * epsilon))
