"""A minimal PyTorch re-implementation of the ORIGINAL Mix Transformer (MiT) encoder, for parity tests.

Written from NVlabs/SegFormer `mmseg/models/backbones/mix_transformer.py`, of which lhoyer/DAFormer
`mmseg/models/backbones/mix_transformer.py` is a copy (reformatted, `BaseModule` base class,
`init_cfg`/`pretrained` plumbing; the same modules and forward). timm and mmcv are not
dependencies: `DropPath` is re-written with timm's semantics and weight initialisation is left to
the caller (tests load converted weights). Class and attribute names are the original ones, so
`state_dict()` keys are exactly the NVlabs `mit_b*.pth` keys and DAFormer's `backbone.*` keys
(`patch_embed1.proj.weight`, `block3.17.attn.kv.weight`, `block1.0.mlp.dwconv.dwconv.bias`,
`norm4.weight`, ...).

Mirrored per class (original file above):
* `OverlapPatchEmbed`: Conv2d(k, stride, padding k // 2), tokens, then a plain `nn.LayerNorm`
  (eps 1e-5: it ignores the model's norm_layer);
* `Attention`: q / kv Linears with `qkv_bias`, spatial reduction `sr` Conv2d(k = s = sr_ratio,
  no padding) + plain `nn.LayerNorm` `norm` (eps 1e-5) when sr_ratio > 1, kv split as
  (2, heads, head_dim) so the first C outputs are keys, softmax(q k^T * head_dim^-0.5), proj;
* `DWConv`: 3x3 depthwise Conv2d with bias on the token map (`dwconv.dwconv`);
* `Mlp`: fc1 -> DWConv -> exact GELU -> fc2 (dropout after act and after fc2);
* `Block`: pre-norm, x + drop_path(attn(norm1 x)), x + drop_path(mlp(norm2 x)), where norm1 and
  norm2 are the model's norm_layer (`partial(nn.LayerNorm, eps=1e-6)` in every `mit_b*`);
* `MixVisionTransformer`: patch_embed1..4 (7/4 then 3/2), block1..4, norm1..4 (norm_layer),
  stochastic depth linear in the block index over all stages; returns the four stage maps NCHW.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# The `mit_b*` subclasses at the bottom of the original file: every one passes patch_size=4
# (unused), mlp_ratios [4, 4, 4, 4], qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
# sr_ratios [8, 4, 2, 1] and num_heads [1, 2, 5, 8]; they differ in widths and depths.
NVLABS_VARIANTS: dict[str, dict] = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
for _v in NVLABS_VARIANTS.values():
    _v.update(num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1))
del _v

# `norm_layer` of every mit_b*: the eps of the block norms (norm1/norm2) and stage norms (normN).
NVLABS_NORM_EPS = 1e-6


class DropPath(nn.Module):
    """timm `DropPath`: per-sample stochastic depth, survivors scaled by 1 / keep_prob; the
    identity in eval mode or at rate 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over tokens and channels.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class DWConv(nn.Module):
    """3x3 depthwise conv (with bias) applied to tokens [B, N, C] viewed as the map [B, C, H, W]."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, stride=1, padding=1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        b, n, c = x.shape
        y = x.transpose(1, 2).reshape(b, c, H, W)
        return self.dwconv(y).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Mix-FFN: the depthwise conv sits between fc1 and the activation (the original order)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()  # torch's default: the exact erf form
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        x = self.drop(self.act(self.dwconv(self.fc1(x), H, W)))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Efficient self-attention: keys and values come from the map reduced by `sr`."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
    ):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not a multiple of num_heads {num_heads}"
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            # A plain nn.LayerNorm (eps 1e-5), not the model's norm_layer.
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        b, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, n, heads, head_dim).permute(0, 2, 1, 3)  # [B, heads, N, d]
        if self.sr_ratio > 1:
            reduced = self.sr(x.permute(0, 2, 1).reshape(b, c, H, W))
            src = self.norm(reduced.reshape(b, c, -1).permute(0, 2, 1))
        else:
            src = x
        # [2, B, heads, N', d]: the Linear's first C outputs are the keys, the next C the values.
        kv = self.kv(src).reshape(b, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block with the model's `norm_eps` in norm1 / norm2."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        sr_ratio: int = 1,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
            sr_ratio=sr_ratio,
        )
        # As the original: an Identity (no module state either way) when the rate is 0.
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:  # noqa: N803
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (padding k // 2), flattened to tokens, then LN."""

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim=768):
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2
        )
        # A plain nn.LayerNorm (eps 1e-5): the original does not pass norm_layer here.
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class MixVisionTransformer(nn.Module):
    """The MiT encoder: `forward(x [B, 3, H, W]) -> [f1 .. f4]`, [B, Ci, H/2^(i+1), W/2^(i+1)]
    with the sizes the strided convs round to.

    Args:
      embed_dims, num_heads, mlp_ratios, depths, sr_ratios: per-stage shape (four entries each).
      qkv_bias: bias of q and kv (True in every mit_b*; the original's own default is False).
      norm_eps: eps of norm_layer, the block and stage LayerNorms (1e-6 in every mit_b*).
      drop_rate, attn_drop_rate, drop_path_rate: as the original (0, 0, 0.1 in DAFormer).
    """

    def __init__(
        self,
        embed_dims=(64, 128, 320, 512),
        num_heads=(1, 2, 5, 8),
        mlp_ratios=(4, 4, 4, 4),
        depths=(3, 6, 40, 3),
        sr_ratios=(8, 4, 2, 1),
        qkv_bias: bool = True,
        norm_eps: float = NVLABS_NORM_EPS,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        self.depths = list(depths)
        # On the CPU explicitly, so that the model can be built on the meta device too.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        cur, cin = 0, in_chans
        for i in range(4):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            # Registration order as the original (patch_embed1..4 first, then blockN + normN):
            # only the order of state_dict() keys depends on it.
            self.add_module(
                f"patch_embed{i + 1}", OverlapPatchEmbed(patch, stride, cin, embed_dims[i])
            )
            cin = embed_dims[i]
        for i in range(4):
            blocks = nn.ModuleList(
                Block(
                    embed_dims[i],
                    num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[cur + j],
                    norm_eps=norm_eps,
                    sr_ratio=sr_ratios[i],
                )
                for j in range(depths[i])
            )
            self.add_module(f"block{i + 1}", blocks)
            self.add_module(f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=norm_eps))
            cur += depths[i]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # tokens -> NCHW map
            outs.append(x)
        return outs


def mit(name: str, **kwargs) -> MixVisionTransformer:
    """The original `mit_<name>` (b0..b5) class as a MixVisionTransformer; kwargs override."""
    return MixVisionTransformer(**{**NVLABS_VARIANTS[name], **kwargs})
