"""Number-for-number parity of our Flax DAFormer head with the ORIGINAL PyTorch DAFormer head.

The reference is `tests/torch_daformer_head.py`, a minimal torch re-implementation of
lhoyer/DAFormer's `DAFormerHead` (sepaspp config) and of the mmcv bricks it uses, with the
original module names, so its `state_dict()` keys are DAFormer's `decode_head.*` keys. Weights
travel torch -> Flax only through `pgpc_jax.torch_names` (the converter under test too).

Covered: key set and shapes, parameter count, eval-mode outputs (running BN statistics),
train-mode outputs and running-statistic updates (unbiased variance, momentum 0.1,
num_batches_tracked), dilation / zero-padding semantics of the separable ASPP branches on maps
smaller than the dilation, bilinear resizes of non-halving sizes, and Dropout2d semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_daformer_head as ref

from pgpc_jax import torch_names
from pgpc_jax.models.heads import DAFormerHead, DepthwiseSeparableConvModule
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.models.mit import MIT_VARIANTS
from pgpc_jax.models.segmentor import Segmentor, abstract_variables, count_params

IN_CHANNELS = (64, 128, 320, 512)
NUM_CLASSES = 19
CHANNELS = 256
# Stride-4 .. stride-32 maps of a 52x68 image through MiT's overlapping patch embeddings:
# 13x17, then ceil halvings 7x9, 4x5, 2x3 (not clean halvings).
STAGE_SIZES = ((13, 17), (7, 9), (4, 5), (2, 3))
# mmcv BN: torch defaults eps 1e-5, momentum 0.1.
N_KEYS = 58
N_PARAMS = 3_712_275


def _close(out: np.ndarray, want: np.ndarray, what: str, rtol: float = 1e-5, atol: float = 1e-6):
    assert out.shape == want.shape, f"{what}: shape {out.shape} vs {want.shape}"
    err = float(np.max(np.abs(out - want)))
    scale = float(np.max(np.abs(want)))
    assert err <= rtol * scale + atol, f"{what}: max|diff| {err:.3e} vs max|ref| {scale:.3e}"
    return err, scale


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights at He scale (activations stay O(1)), random biases, and non-trivial BN
    affine parameters and running statistics (num_batches_tracked too)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        elif isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(0.3 + 1.7 * torch.rand(c, generator=g))
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))


def _state(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _wrap(tree: dict, name: str) -> dict:
    return {c: {name: v} for c, v in tree.items()}


def _flax_from_torch(module: torch.nn.Module, template: dict, name: str) -> dict:
    """torch state dict -> canonical `<name>.*` keys -> Flax variables of the submodule `name`."""
    wrapped = _wrap(template, name)
    state = _state(module, name + ".")
    assert torch_names.check_against(state, wrapped, "torch reference") == []
    variables = torch_names.canonical_to_variables(state, wrapped)
    return {c: jax.tree.map(jnp.asarray, v[name]) for c, v in variables.items()}


def _features(batch: int, sizes, channels, seed: int):
    rng = np.random.default_rng(seed)
    nchw = [
        rng.standard_normal((batch, c, h, w)).astype(np.float32)
        for c, (h, w) in zip(channels, sizes, strict=True)
    ]
    return [torch.from_numpy(x) for x in nchw], [jnp.asarray(x.transpose(0, 2, 3, 1)) for x in nchw]


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _head_template(head: DAFormerHead, feats) -> dict:
    shapes = [jax.ShapeDtypeStruct(f.shape, f.dtype) for f in feats]
    return jax.eval_shape(
        lambda k, fs: head.init({"params": k}, fs, train=False), jax.random.key(0), shapes
    )


# ------------------------------------------------------------------------------------------------
# Names, shapes, parameter count.


def test_torch_reference_matches_the_original_key_list():
    """The reference has DAFormer's 58 decode_head keys (num_batches_tracked included)."""
    sd = ref.DAFormerHead().state_dict()
    assert len(sd) == N_KEYS
    for key in (
        "embed_layers.0.proj.weight",
        "embed_layers.3.proj.bias",
        "fuse_layer.aspp_modules.0.conv.weight",
        "fuse_layer.aspp_modules.0.bn.num_batches_tracked",
        "fuse_layer.aspp_modules.1.depthwise_conv.conv.weight",
        "fuse_layer.aspp_modules.1.depthwise_conv.bn.running_var",
        "fuse_layer.aspp_modules.3.pointwise_conv.bn.running_mean",
        "fuse_layer.bottleneck.conv.weight",
        "fuse_layer.bottleneck.bn.weight",
        "conv_seg.weight",
        "conv_seg.bias",
    ):
        assert key in sd, key
    # mmcv bias='auto': no conv bias before BN; the depthwise conv has groups=in_channels.
    assert not any(k.endswith("conv.bias") and k != "conv_seg.bias" for k in sd)
    assert tuple(sd["fuse_layer.aspp_modules.2.depthwise_conv.conv.weight"].shape) == (
        1024,
        1,
        3,
        3,
    )
    assert tuple(sd["fuse_layer.bottleneck.conv.weight"].shape) == (256, 1024, 3, 3)


def test_key_set_and_shapes_equal_torch():
    head = DAFormerHead(NUM_CLASSES, embed_dim=256, channels=CHANNELS)
    _, feats = _features(1, STAGE_SIZES, IN_CHANNELS, seed=0)
    layout = torch_names.canonical_layout(_wrap(_head_template(head, feats), "decode_head"))
    sd = ref.DAFormerHead(IN_CHANNELS, channels=CHANNELS, num_classes=NUM_CLASSES).state_dict()
    want = {f"decode_head.{k}": tuple(v.shape) for k, v in sd.items()}
    got = {k: shape for k, (_, _, shape) in layout.items()}
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    assert got == want


def test_segmentor_decode_head_keys_equal_torch():
    """Through the full model (MiT-b1 has the b5 widths [64, 128, 320, 512]) and a non-square
    image: the canonical `decode_head.*` keys of the Segmentor are exactly the original's."""
    model = Segmentor(backbone=MIT_VARIANTS["b1"], head="daformer", num_classes=NUM_CLASSES)
    template = abstract_variables(model, image_size=(52, 68))
    layout = torch_names.canonical_layout(template)
    got = {k: s for k, (_, _, s) in layout.items() if k.startswith("decode_head.")}
    sd = ref.DAFormerHead(IN_CHANNELS, channels=CHANNELS, num_classes=NUM_CLASSES).state_dict()
    assert got == {f"decode_head.{k}": tuple(v.shape) for k, v in sd.items()}
    assert count_params(template["params"]["decode_head"]) == N_PARAMS


def test_parameter_count_equals_torch():
    head = DAFormerHead(NUM_CLASSES, embed_dim=256, channels=CHANNELS)
    _, feats = _features(1, STAGE_SIZES, IN_CHANNELS, seed=0)
    template = _head_template(head, feats)
    torch_head = ref.DAFormerHead(IN_CHANNELS, channels=CHANNELS, num_classes=NUM_CLASSES)
    n_torch = sum(p.numel() for p in torch_head.parameters())
    assert n_torch == N_PARAMS
    assert count_params(template["params"]) == n_torch
    n_buffers = sum(b.numel() for b in torch_head.buffers())
    assert count_params(template["batch_stats"]) == n_buffers


# ------------------------------------------------------------------------------------------------
# Forward parity.


def _torch_and_flax_heads(dropout: float, seed: int):
    torch_head = ref.DAFormerHead(
        IN_CHANNELS, channels=CHANNELS, num_classes=NUM_CLASSES, dropout_ratio=dropout
    )
    _randomize(torch_head, seed)
    head = DAFormerHead(NUM_CLASSES, embed_dim=256, channels=CHANNELS, dropout_rate=dropout)
    return torch_head, head


@pytest.mark.parametrize(
    "sizes",
    [
        STAGE_SIZES,
        ((3, 5), (2, 3), (1, 2), (1, 1)),  # every map smaller than every dilation
    ],
    ids=["13x17", "3x5"],
)
def test_eval_outputs_equal_torch(sizes):
    torch_head, head = _torch_and_flax_heads(dropout=0.1, seed=1)
    torch_head.eval()
    x_t, x_j = _features(2, sizes, IN_CHANNELS, seed=2)
    variables = _flax_from_torch(torch_head, _head_template(head, x_j), "decode_head")
    # The conversion is lossless both ways.
    back = torch_names.variables_to_canonical(_wrap(variables, "decode_head"))
    want = _state(torch_head, "decode_head.")
    assert set(back) == set(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)

    with torch.no_grad():
        expected = torch_head(x_t).numpy()
    out = _nchw(head.apply(variables, x_j, train=False))
    assert expected.shape == (2, NUM_CLASSES, *sizes[0])
    assert float(expected.std()) > 0.1  # the logits are not dominated by the classifier bias
    _close(out, expected, "eval logits")


def test_train_outputs_and_running_stats_equal_torch():
    """Batch-statistics BN with dropout off: outputs, and after one forward the running mean /
    var (momentum 0.1, unbiased variance) and num_batches_tracked (+1) of every BN."""
    torch_head, head = _torch_and_flax_heads(dropout=0.1, seed=3)
    torch_head.dropout.p = 0.0
    x_t, x_j = _features(2, STAGE_SIZES, IN_CHANNELS, seed=4)
    variables = _flax_from_torch(torch_head, _head_template(head, x_j), "decode_head")
    before = _state(torch_head, "decode_head.")

    torch_head.train()
    with torch.no_grad():
        expected = torch_head(x_t).numpy()
    after = _state(torch_head, "decode_head.")

    flax_head = DAFormerHead(NUM_CLASSES, embed_dim=256, channels=CHANNELS, dropout_rate=0.0)
    out, updates = flax_head.apply(variables, x_j, train=True, mutable=["batch_stats"])
    _close(_nchw(out), expected, "train logits")

    got = torch_names.variables_to_canonical(
        _wrap({"params": variables["params"], "batch_stats": updates["batch_stats"]}, "decode_head")
    )
    assert set(got) == set(after)
    n_bn = 0
    for k in after:
        if k.endswith("num_batches_tracked"):
            n_bn += 1
            assert int(got[k]) == int(after[k]) == int(before[k]) + 1, k
        elif k.endswith(("running_mean", "running_var")):
            assert not np.allclose(after[k], before[k]), k  # the update is not a no-op
            _close(got[k], after[k], k)
        else:
            np.testing.assert_array_equal(got[k], after[k], err_msg=k)  # params untouched
    assert n_bn == 1 + 2 * 3 + 1  # aspp 1x1, 3 x (depthwise, pointwise), bottleneck


# ------------------------------------------------------------------------------------------------
# Dilation and padding semantics of the separable ASPP branches.


@pytest.mark.parametrize("dilation", [6, 12, 18])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (13, 17), (8, 41)])
@pytest.mark.parametrize("train", [False, True])
def test_dilated_separable_branch_equals_torch(dilation, size, train):
    """DepthwiseSeparableConvModule(3x3, dilation d, zero padding d) on maps smaller than d
    (every off-centre tap in the padding) and larger (some taps inside)."""
    cin, cout = 24, 16
    torch_mod = ref.DepthwiseSeparableConvModule(
        cin, cout, 3, dilation=dilation, padding=dilation, norm_cfg=ref.NORM_CFG
    )
    _randomize(torch_mod, seed=dilation)
    flax_mod = DepthwiseSeparableConvModule(cout, dilation)
    x = np.random.default_rng(dilation + size[1]).standard_normal((4, cin, *size), np.float32)
    x_j = jnp.asarray(x.transpose(0, 2, 3, 1))
    template = jax.eval_shape(
        lambda k: flax_mod.init({"params": k}, x_j, train=False), jax.random.key(0)
    )
    variables = _flax_from_torch(torch_mod, template, "branch")
    torch_mod.train(train)  # train: batch statistics (batch 4: even 1x1 maps give 4 values)
    with torch.no_grad():
        expected = torch_mod(torch.from_numpy(x)).numpy()
    if train:
        out, updates = flax_mod.apply(variables, x_j, train=True, mutable=["batch_stats"])
    else:
        out = flax_mod.apply(variables, x_j, train=False)
    assert expected.shape == (4, cout, *size)
    _close(_nchw(out), expected, f"d={dilation} size={size}")
    if train:  # running statistics after one step (unbiased variance over 4 * h * w values)
        got = torch_names.variables_to_canonical(_wrap(updates, "branch"))
        for k, v in _state(torch_mod, "branch.").items():
            if k.endswith(("running_mean", "running_var")):
                _close(got[k], v, k)
            elif k.endswith("num_batches_tracked"):
                assert int(got[k]) == int(v), k


def test_dilation_and_padding_are_not_trivially_satisfied():
    """Guard for the test above: the off-centre taps of the dilated 3x3 kernel reach real pixels
    on 8x41 for every d (so that case pins dilation = padding = d down), and only padding on 1x1."""
    x = torch.randn(1, 4, 8, 41)
    w = torch.randn(4, 1, 3, 3)
    centre = torch.zeros_like(w)
    centre[:, :, 1, 1] = w[:, :, 1, 1]
    for d in (6, 12, 18):
        full = F.conv2d(x, w, padding=d, dilation=d, groups=4)
        assert not torch.allclose(full, F.conv2d(x, centre, padding=d, dilation=d, groups=4))
        for padding, dilation in [(d, 1), (d - 1, d), (d + 1, d), (d, d - 1)]:
            other = F.conv2d(x, w, padding=padding, dilation=dilation, groups=4)
            assert other.shape != full.shape or not torch.allclose(other, full)
        tiny = x[:, :, :1, :1]
        torch.testing.assert_close(
            F.conv2d(tiny, w, padding=d, dilation=d, groups=4),
            F.conv2d(tiny, centre, padding=d, dilation=d, groups=4),
        )


# ------------------------------------------------------------------------------------------------
# Bilinear resize of the stage maps (align_corners=False).


@pytest.mark.parametrize("src", STAGE_SIZES[1:] + ((13, 17), (20, 31)))
def test_resize_bilinear_equals_interpolate(src):
    x = np.random.default_rng(src[0] * 100 + src[1]).standard_normal((2, 5, *src), np.float32)
    want = F.interpolate(torch.from_numpy(x), size=(13, 17), mode="bilinear", align_corners=False)
    got = resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (13, 17), align_corners=False)
    _close(_nchw(got), want.numpy(), f"resize {src} -> (13, 17)")


# ------------------------------------------------------------------------------------------------
# Dropout2d.


def test_dropout2d_drops_whole_channels_per_sample():
    """Train mode: the map fed to conv_seg is, per (sample, channel), either all zero or the
    fused map scaled by 1 / (1 - p) (torch Dropout2d), and it is what the classifier sees."""
    p = 0.5
    head = DAFormerHead(NUM_CLASSES, embed_dim=64, channels=64, dropout_rate=p)
    _, x_j = _features(4, STAGE_SIZES, IN_CHANNELS, seed=5)
    variables = head.init({"params": jax.random.key(1)}, x_j, train=False)

    def run(seed: int):
        (logits, state) = head.apply(
            variables,
            x_j,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=True,
            rngs={"dropout": jax.random.key(seed)},
        )
        inter = state["intermediates"]
        fused = np.asarray(inter["fuse_layer"]["__call__"][0])
        dropped = np.asarray(inter["Dropout2d_0"]["__call__"][0])
        return np.asarray(logits), fused, dropped

    logits, fused, dropped = run(0)
    assert fused.shape == dropped.shape == (4, 13, 17, 64)
    live = np.abs(fused).max(axis=(1, 2)) > 0  # (sample, channel) with a nonzero fused map
    assert live.mean() > 0.5
    zero = np.all(dropped == 0, axis=(1, 2))
    scaled = np.all(np.abs(dropped - fused / (1 - p)) <= 1e-6 * (1 + np.abs(fused)), axis=(1, 2))
    assert np.all(zero | scaled), "some channel is neither dropped whole nor scaled by 1/(1-p)"
    kept = scaled & live
    dropped_whole = zero & live
    assert 0.3 < dropped_whole.sum() / live.sum() < 0.7  # p = 0.5 over ~256 live channels
    # Per sample, not one mask for the whole batch.
    assert not np.all(dropped_whole[0] == dropped_whole[1])
    assert kept.any()

    # The classifier consumes exactly the dropped map.
    w = variables["params"]["conv_seg"]["kernel"][0, 0]
    b = variables["params"]["conv_seg"]["bias"]
    manual = np.einsum("bhwc,ck->bhwk", dropped, np.asarray(w)) + np.asarray(b)
    _close(logits, manual, "conv_seg(dropout(fused))", rtol=1e-5, atol=1e-5)

    # A different dropout key gives a different mask; eval mode is the identity.
    _, _, dropped2 = run(1)
    assert not np.array_equal(np.all(dropped2 == 0, axis=(1, 2)), zero)
    eval_logits = head.apply(variables, x_j, train=False)
    eval_manual = head.apply(
        variables, x_j, train=False, capture_intermediates=True, mutable=["intermediates"]
    )[1]["intermediates"]
    fused_eval = np.asarray(eval_manual["fuse_layer"]["__call__"][0])
    np.testing.assert_array_equal(np.asarray(eval_manual["Dropout2d_0"]["__call__"][0]), fused_eval)
    _close(
        np.asarray(eval_logits),
        np.einsum("bhwc,ck->bhwk", fused_eval, np.asarray(w)) + np.asarray(b),
        "eval: conv_seg(fused)",
        atol=1e-5,
    )


def test_torch_dropout2d_reference_semantics():
    """What the original's nn.Dropout2d does on [N, C, H, W]: whole channels per sample."""
    torch.manual_seed(0)
    drop = torch.nn.Dropout2d(0.5).train()
    x = torch.rand(4, 64, 13, 17) + 0.5
    y = drop(x)
    zero = (y == 0).all(dim=(2, 3))
    scaled = torch.isclose(y, 2 * x).all(dim=(2, 3))
    assert bool((zero | scaled).all())
    assert not bool((zero[0] == zero[1]).all())
