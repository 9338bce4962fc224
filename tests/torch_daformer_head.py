"""A minimal PyTorch re-implementation of the ORIGINAL DAFormer decode head, for parity tests.

Written from lhoyer/DAFormer (`mmseg/models/decode_heads/daformer_head.py`, `aspp_head.py`,
`sep_aspp_head.py`, `segformer_head.py` (MLP), `decode_head.py` (conv_seg, Dropout2d, cls_seg)) and
the config `configs/_base_/models/daformer_sepaspp_mitb5.py` on top of `daformer_conv1_mitb5.py`.
mmcv 1.3.x is not a dependency: `ConvModule` and `DepthwiseSeparableConvModule` are re-written
here with mmcv's semantics (bias='auto' -> no conv bias when a norm follows; order conv -> norm ->
act; BN registered under the name 'bn'; ReLU; the depthwise and pointwise halves each take the
module's norm_cfg / act_cfg, mmcv's 'default'). Module and attribute names are the original ones,
so `state_dict()` keys are exactly DAFormer's `decode_head.*` keys (without the prefix).

Only what DAFormer's sepaspp configuration exercises is implemented: MLP embeddings, the
separable-ASPP fusion without image pool or context layer, BN + ReLU, align_corners=False.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None):
    """mmseg.ops.resize without the align_corners warning: F.interpolate."""
    return F.interpolate(input, size, scale_factor, mode, align_corners)


def build_norm_layer(cfg: dict, num_features: int) -> tuple[str, nn.Module]:
    """mmcv build_norm_layer for type 'BN' (the only type DAFormer uses): ('bn', BatchNorm2d)."""
    cfg = dict(cfg)
    kind = cfg.pop("type")
    requires_grad = cfg.pop("requires_grad", True)
    if kind not in ("BN", "BN2d"):
        raise NotImplementedError(kind)
    cfg.setdefault("eps", 1e-5)
    layer = nn.BatchNorm2d(num_features, **cfg)
    for p in layer.parameters():
        p.requires_grad = requires_grad
    return "bn", layer


def build_activation_layer(cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind != "ReLU":
        raise NotImplementedError(kind)
    return nn.ReLU(**cfg)


class ConvModule(nn.Module):
    """mmcv ConvModule (conv_cfg=None, zeros padding, no spectral norm, order conv/norm/act)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias="auto",
        conv_cfg=None,
        norm_cfg=None,
        act_cfg=dict(type="ReLU"),  # noqa: B006 (mmcv's signature)
        inplace=True,
        order=("conv", "norm", "act"),
    ):
        super().__init__()
        assert conv_cfg is None, "only the default Conv2d is re-implemented"
        assert norm_cfg is None or isinstance(norm_cfg, dict)
        assert act_cfg is None or isinstance(act_cfg, dict)
        assert tuple(order) == ("conv", "norm", "act")
        self.order = order
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        if bias == "auto":
            bias = not self.with_norm
        self.with_bias = bias
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        if self.with_norm:
            self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
            self.add_module(self.norm_name, norm)
        else:
            self.norm_name = None
        if self.with_activation:
            cfg = dict(act_cfg)
            cfg.setdefault("inplace", inplace)
            self.activate = build_activation_layer(cfg)

    @property
    def norm(self):
        return getattr(self, self.norm_name) if self.norm_name else None

    def forward(self, x, activate=True, norm=True):
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
        return x


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv DepthwiseSeparableConvModule: depthwise ConvModule (groups=in_channels), then a
    pointwise 1x1 ConvModule; the dw/pw norm and act default to the module's own."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        norm_cfg=None,
        act_cfg=dict(type="ReLU"),  # noqa: B006 (mmcv's signature)
        dw_norm_cfg="default",
        dw_act_cfg="default",
        pw_norm_cfg="default",
        pw_act_cfg="default",
        **kwargs,
    ):
        super().__init__()
        assert "groups" not in kwargs
        dw_norm_cfg = norm_cfg if dw_norm_cfg == "default" else dw_norm_cfg
        dw_act_cfg = act_cfg if dw_act_cfg == "default" else dw_act_cfg
        pw_norm_cfg = norm_cfg if pw_norm_cfg == "default" else pw_norm_cfg
        pw_act_cfg = act_cfg if pw_act_cfg == "default" else pw_act_cfg
        self.depthwise_conv = ConvModule(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            norm_cfg=dw_norm_cfg,
            act_cfg=dw_act_cfg,
            **kwargs,
        )
        self.pointwise_conv = ConvModule(
            in_channels, out_channels, 1, norm_cfg=pw_norm_cfg, act_cfg=pw_act_cfg, **kwargs
        )

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class MLP(nn.Module):
    """segformer_head.MLP: flatten to tokens, then one Linear. Returns [N, HW, E]."""

    def __init__(self, input_dim=2048, embed_dim=768):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2).contiguous()
        return self.proj(x)


class ASPPModule(nn.ModuleList):
    """aspp_head.ASPPModule: one ConvModule per dilation (1x1 for dilation 1, else 3x3 with
    padding = dilation)."""

    def __init__(self, dilations, in_channels, channels, conv_cfg, norm_cfg, act_cfg):
        super().__init__()
        self.dilations = dilations
        self.in_channels = in_channels
        self.channels = channels
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        for dilation in dilations:
            self.append(
                ConvModule(
                    in_channels,
                    channels,
                    1 if dilation == 1 else 3,
                    dilation=dilation,
                    padding=0 if dilation == 1 else dilation,
                    conv_cfg=conv_cfg,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg,
                )
            )

    def forward(self, x):
        return [module(x) for module in self]


class DepthwiseSeparableASPPModule(ASPPModule):
    """sep_aspp_head.DepthwiseSeparableASPPModule: dilated branches become separable convs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for i, dilation in enumerate(self.dilations):
            if dilation > 1:
                self[i] = DepthwiseSeparableConvModule(
                    self.in_channels,
                    self.channels,
                    3,
                    dilation=dilation,
                    padding=dilation,
                    norm_cfg=self.norm_cfg,
                    act_cfg=self.act_cfg,
                )


class ASPPWrapper(nn.Module):
    """daformer_head.ASPPWrapper (pool and context_cfg supported only as DAFormer uses them)."""

    def __init__(
        self,
        in_channels,
        channels,
        sep,
        dilations,
        pool,
        norm_cfg,
        act_cfg,
        align_corners,
        context_cfg=None,
    ):
        super().__init__()
        assert isinstance(dilations, (list, tuple))
        assert context_cfg is None, "DAFormer's sepaspp config has no context layer"
        self.dilations = dilations
        self.align_corners = align_corners
        if pool:
            self.image_pool = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                ConvModule(in_channels, channels, 1, norm_cfg=norm_cfg, act_cfg=act_cfg),
            )
        else:
            self.image_pool = None
        self.context_layer = None
        aspp = DepthwiseSeparableASPPModule if sep else ASPPModule
        self.aspp_modules = aspp(
            dilations=dilations,
            in_channels=in_channels,
            channels=channels,
            norm_cfg=norm_cfg,
            conv_cfg=None,
            act_cfg=act_cfg,
        )
        self.bottleneck = ConvModule(
            (len(dilations) + int(pool)) * channels,
            channels,
            kernel_size=3,
            padding=1,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
        )

    def forward(self, x):
        outs = []
        if self.image_pool is not None:
            outs.append(
                resize(
                    self.image_pool(x),
                    size=x.size()[2:],
                    mode="bilinear",
                    align_corners=self.align_corners,
                )
            )
        outs.extend(self.aspp_modules(x))
        return self.bottleneck(torch.cat(outs, dim=1))


def build_layer(in_channels, out_channels, type, **kwargs):  # noqa: A002 (original signature)
    if type == "mlp":  # norm_cfg / act_cfg of the embed cfg are ignored, as in the original
        return MLP(input_dim=in_channels, embed_dim=out_channels)
    if type == "conv":
        return ConvModule(
            in_channels=in_channels,
            out_channels=out_channels,
            padding=kwargs["kernel_size"] // 2,
            **kwargs,
        )
    if type == "aspp":
        return ASPPWrapper(in_channels=in_channels, channels=out_channels, **kwargs)
    raise NotImplementedError(type)


NORM_CFG = dict(type="BN", requires_grad=True)


def sepaspp_decoder_params() -> dict:
    """decoder_params of configs/_base_/models/daformer_sepaspp_mitb5.py (merged with its base
    daformer_conv1_mitb5.py; `_delete_=True` replaces the conv1 fusion_cfg)."""
    return dict(
        embed_dims=256,
        embed_cfg=dict(type="mlp", act_cfg=None, norm_cfg=None),
        embed_neck_cfg=dict(type="mlp", act_cfg=None, norm_cfg=None),
        fusion_cfg=dict(
            type="aspp",
            sep=True,
            dilations=(1, 6, 12, 18),
            pool=False,
            act_cfg=dict(type="ReLU"),
            norm_cfg=NORM_CFG,
        ),
    )


class DAFormerHead(nn.Module):
    """daformer_head.DAFormerHead with the parts of BaseDecodeHead that forward uses
    (conv_seg, Dropout2d(dropout_ratio), cls_seg; input_transform='multiple_select')."""

    def __init__(
        self,
        in_channels=(64, 128, 320, 512),
        in_index=(0, 1, 2, 3),
        channels=256,
        num_classes=19,
        dropout_ratio=0.1,
        norm_cfg=NORM_CFG,
        align_corners=False,
        decoder_params=None,
    ):
        super().__init__()
        assert len(in_channels) == len(in_index)
        self.in_channels = list(in_channels)
        self.in_index = list(in_index)
        self.channels = channels
        self.num_classes = num_classes
        self.norm_cfg = norm_cfg
        self.align_corners = align_corners
        # BaseDecodeHead.__init__ builds conv_seg and the dropout first (its CrossEntropyLoss
        # module holds no parameters or buffers, so it is left out).
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        assert not self.align_corners
        decoder_params = copy.deepcopy(decoder_params or sepaspp_decoder_params())
        embed_dims = decoder_params["embed_dims"]
        if isinstance(embed_dims, int):
            embed_dims = [embed_dims] * len(self.in_index)
        embed_cfg = decoder_params["embed_cfg"]
        embed_neck_cfg = decoder_params["embed_neck_cfg"]
        if embed_neck_cfg == "same_as_embed_cfg":
            embed_neck_cfg = embed_cfg
        fusion_cfg = decoder_params["fusion_cfg"]
        for cfg in (embed_cfg, embed_neck_cfg, fusion_cfg):
            if cfg is not None and "aspp" in cfg["type"]:
                cfg["align_corners"] = self.align_corners

        embed = {}
        for i, cin, edim in zip(self.in_index, self.in_channels, embed_dims, strict=True):
            cfg = embed_neck_cfg if i == self.in_index[-1] else embed_cfg
            embed[str(i)] = build_layer(cin, edim, **cfg)
        self.embed_layers = nn.ModuleDict(embed)
        self.fuse_layer = build_layer(sum(embed_dims), self.channels, **fusion_cfg)

    def cls_seg(self, feat):
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)

    def forward(self, inputs):
        x = inputs
        n = x[-1].shape[0]
        os_size = x[0].size()[2:]
        c = {}
        for i in self.in_index:
            c[i] = self.embed_layers[str(i)](x[i])
            if c[i].dim() == 3:
                c[i] = c[i].permute(0, 2, 1).contiguous().reshape(n, -1, *x[i].shape[2:])
            if c[i].size()[2:] != os_size:
                c[i] = resize(c[i], size=os_size, mode="bilinear", align_corners=False)
        x = self.fuse_layer(torch.cat(list(c.values()), dim=1))
        return self.cls_seg(x)
