"""Mix Transformer (MiT) encoder of SegFormer, as NVlabs/SegFormer and DAFormer define it.

Module and parameter names mirror the PyTorch state dict of the NVlabs release
(`patch_embed1.proj`, `block3.17.attn.kv`, `norm4`, ...; a list index `.17` becomes `_17`), so the
weight converter is a mechanical rename. Numerics follow the reference exactly:

* overlapping patch embeddings, Conv 7/4/3 then 3/2/1 with explicit symmetric padding;
* efficient self-attention: keys and values from a sequence reduced by a stride-`sr` conv + LN;
  `kv` is one Dense of 2C outputs (first C are keys, next C values), as in the checkpoint;
* Mix-FFN: fc1 -> 3x3 depthwise conv -> exact (erf) GELU -> fc2;
* LayerNorm eps 1e-6 in blocks and stage norms, 1e-5 in patch-embed and reduction norms
  (HF transformers uses 1e-5 everywhere: `MiTConfig.block_eps` switches to it for parity);
* stochastic depth increasing linearly over all blocks of all stages.

All tensors are NHWC; tokens are the row-major flattening of the map, as torch's
`flatten(2).transpose(1, 2)` of NCHW.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgpc_jax.models.layers import DepthwiseConv, DropPath

Dtype = Any

# NVlabs `_init_weights`: Linear trunc-normal(0.02), Conv normal(0, sqrt(2 / fan_out)).
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class MiTConfig:
    """Shape of a Mix Transformer. The NVlabs variants are in `MIT_VARIANTS`."""

    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    depths: tuple[int, ...] = (3, 6, 40, 3)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    # LayerNorm eps of the block norms (norm1/norm2) and stage norms (normN). 1e-6 in NVlabs /
    # mmseg / DAFormer; HF transformers uses 1e-5.
    block_eps: float = 1e-6
    # LayerNorm eps of the patch-embed and spatial-reduction norms (plain nn.LayerNorm).
    embed_eps: float = 1e-5


MIT_VARIANTS: dict[str, MiTConfig] = {
    "b0": MiTConfig(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": MiTConfig(depths=(2, 2, 2, 2)),
    "b2": MiTConfig(depths=(3, 4, 6, 3)),
    "b3": MiTConfig(depths=(3, 4, 18, 3)),
    "b4": MiTConfig(depths=(3, 8, 27, 3)),
    "b5": MiTConfig(depths=(3, 6, 40, 3)),
    # Not a published variant: small enough for CPU tests and the embedded default run.
    "tiny": MiTConfig(embed_dims=(16, 32, 64, 96), num_heads=(1, 2, 2, 4), depths=(1, 1, 2, 1)),
}


def layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """torch nn.LayerNorm numerics: two-pass variance (flax's default fast variance is less exact)."""
    return nn.LayerNorm(
        eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    return nn.Dense(
        features, kernel_init=_dense_init, dtype=dtype, param_dtype=param_dtype, name=name
    )


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm. [B, H, W, Cin] -> [B, h, w, C]."""

    features: int
    patch_size: int
    stride: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.patch_size // 2
        x = nn.Conv(
            self.features,
            (self.patch_size, self.patch_size),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            kernel_init=_conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)
        return layer_norm(self.eps, "norm", self.dtype, self.param_dtype)(x)


class Attention(nn.Module):
    """Efficient self-attention with spatial reduction. [B, H, W, C] -> [B, H*W, C]."""

    num_heads: int
    sr_ratio: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        head_dim = c // self.num_heads
        tokens = x.reshape(b, h * w, c)
        q = _dense(c, "q", self.dtype, self.param_dtype)(tokens)
        if self.sr_ratio > 1:
            r = self.sr_ratio
            kv_in = nn.Conv(
                c,
                (r, r),
                strides=r,
                padding="VALID",
                kernel_init=_conv_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="sr",
            )(x)
            kv_in = kv_in.reshape(b, -1, c)
            kv_in = layer_norm(self.eps, "norm", self.dtype, self.param_dtype)(kv_in)
        else:
            kv_in = tokens
        kv = _dense(2 * c, "kv", self.dtype, self.param_dtype)(kv_in)
        k, v = kv[..., :c], kv[..., c:]
        q = q.reshape(b, h * w, self.num_heads, head_dim)
        k = k.reshape(b, -1, self.num_heads, head_dim)
        v = v.reshape(b, -1, self.num_heads, head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim**-0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, h * w, c)
        return _dense(c, "proj", self.dtype, self.param_dtype)(out)


class DWConv(nn.Module):
    """3x3 depthwise conv with bias on the token map (`mlp.dwconv.dwconv` in the checkpoint),
    as `layers.DepthwiseConv` (the same parameters as a grouped `nn.Conv`, computed faster)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        return DepthwiseConv(
            c,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=c,
            use_bias=True,
            kernel_init=_conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dwconv",
        )(x)


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 -> exact GELU -> fc2, on [B, H, W, C]."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        y = _dense(self.hidden, "fc1", self.dtype, self.param_dtype)(x)
        y = DWConv(self.dtype, self.param_dtype, name="dwconv")(y)
        y = nn.gelu(y, approximate=False)  # torch nn.GELU is the erf form
        return _dense(c, "fc2", self.dtype, self.param_dtype)(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(norm1 x)); x + DropPath(mlp(norm2 x))."""

    num_heads: int
    sr_ratio: int
    mlp_ratio: int
    drop_path: float
    block_eps: float
    embed_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = DropPath(self.drop_path)
        y = layer_norm(self.block_eps, "norm1", **kw)(x)
        y = Attention(self.num_heads, self.sr_ratio, self.embed_eps, name="attn", **kw)(y)
        x = x + drop(y.reshape(b, h, w, c), deterministic=not train)
        y = layer_norm(self.block_eps, "norm2", **kw)(x)
        y = MixFFN(c * self.mlp_ratio, name="mlp", **kw)(y)
        return x + drop(y, deterministic=not train)


class MixVisionTransformer(nn.Module):
    """The MiT encoder. Returns the four stage features, strides 4, 8, 16, 32.

    `__call__(x [B, H, W, 3], train) -> [f1 [B, H/4, W/4, C1], ..., f4 [B, H/32, W/32, C4]]`
    (sizes rounded as the strided convs round them, for any H and W).
    """

    config: MiTConfig = MiTConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Recompute each block's activations in the backward pass (`jax.checkpoint`), keeping only
    # the block's input: the same parameters and values, less memory, ~1 more forward of compute.
    remat_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """`train` switches stochastic depth on (the encoder has no BatchNorm)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths))
        x = x.astype(self.dtype)
        features, k = [], 0
        for i, (dim, depth) in enumerate(zip(cfg.embed_dims, cfg.depths), start=1):
            patch, stride = (7, 4) if i == 1 else (3, 2)
            x = OverlapPatchEmbed(dim, patch, stride, cfg.embed_eps, name=f"patch_embed{i}", **kw)(
                x
            )
            # `train` (argument 2, counting the module) is a Python bool: static under remat.
            block = nn.remat(Block, static_argnums=(2,)) if self.remat_blocks else Block
            for j in range(depth):
                x = block(
                    num_heads=cfg.num_heads[i - 1],
                    sr_ratio=cfg.sr_ratios[i - 1],
                    mlp_ratio=cfg.mlp_ratio,
                    drop_path=float(rates[k]),
                    block_eps=cfg.block_eps,
                    embed_eps=cfg.embed_eps,
                    name=f"block{i}_{j}",
                    **kw,
                )(x, train)
                k += 1
            x = layer_norm(cfg.block_eps, f"norm{i}", **kw)(x)
            features.append(x)
        return features
