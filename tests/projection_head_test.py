"""SePiCo's projection head: shapes and names as an auxiliary head, parity with PyTorch.

The PyTorch side is a transcription of the structure of SePiCo's `ProjHead` as its MiT
configuration builds it (`resize_concat` of the four stages, two mmcv ConvModules with a 1x1
conv without bias, BatchNorm and ReLU, then `F.normalize` over channels); its module names are
the released ones, so its `state_dict` is loaded into the Flax head through the converter's
naming rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import tiny
from pgpc_jax.models.heads import ProjectionHead, l2_normalize
from pgpc_jax.models.segmentor import abstract_variables, build_segmentor
from pgpc_jax.torch_names import canonical_layout, canonical_to_variables, variables_to_canonical

STAGES = (16, 32, 64, 96)  # the tiny MiT's stage widths
SIZES = ((13, 11), (7, 6), (4, 3), (2, 2))  # strides 4..32 of a 52x44 image (odd sizes)


class TorchConvModule(torch.nn.Module):
    """mmcv ConvModule with norm_cfg=BN: conv (bias='auto' is off under a norm), bn, ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout)  # mmcv's BN: eps 1e-5, momentum 0.1

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TorchProjHead(torch.nn.Module):
    """ProjHead(num_convs=2, kernel_size=1, input_transform='resize_concat', in_index=[0..3])."""

    def __init__(self, in_channels, channels):
        super().__init__()
        total = sum(in_channels)
        mid = total // len(in_channels)
        self.convs = torch.nn.Sequential(
            TorchConvModule(total, mid), TorchConvModule(mid, channels)
        )

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = torch.cat(
            [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats],
            dim=1,
        )
        return F.normalize(self.convs(x), p=2, dim=1)


def _randomised(module, seed):
    """Random weights and BatchNorm statistics (positive variances) in a torch module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return module


def _features(seed, batch=2):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(batch, h, w, c)).astype(np.float32) for (h, w), c in zip(SIZES, STAGES)
    ]


def _nchw(features):
    return [torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2))) for f in features]


def _tiny_cfg():
    cfg = tiny.get_config().model
    cfg.head_embed_dim = cfg.head_channels = 16
    return cfg.to_dict()


def _random_variables(model, seed=0):
    """Random variables of a model without compiling its initialiser (positive variances)."""
    template = abstract_variables(model)
    rng = np.random.default_rng(seed)
    state = {}
    for key, (_, _, shape) in canonical_layout(template).items():
        value = rng.normal(size=shape).astype(np.float32)
        state[key] = np.abs(value) + 0.5 if key.endswith("running_var") else value
    return canonical_to_variables(state, template)


def test_as_auxiliary_head_of_the_segmentor_unit_norm_embeddings_and_names():
    model = build_segmentor(_tiny_cfg(), {"projection": ProjectionHead()})
    variables = _random_variables(model)
    images = jax.random.normal(jax.random.key(1), (2, 52, 44, 3))
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    z = np.asarray(out["projection"])
    assert z.shape == (2, 13, 11, 512) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-6)
    assert (z >= 0).all()  # ReLU before the normalisation
    # mmseg's names under auxiliary_head.<name>: SePiCo's convs.{0,1}.{conv,bn}.
    layout = canonical_layout(variables)
    aux = {k: v[2] for k, v in layout.items() if k.startswith("auxiliary_head.")}
    mid, total = sum(STAGES) // 4, sum(STAGES)
    assert aux == {
        "auxiliary_head.projection.convs.0.conv.weight": (mid, total, 1, 1),
        "auxiliary_head.projection.convs.1.conv.weight": (512, mid, 1, 1),
        **{
            f"auxiliary_head.projection.convs.{i}.bn.{leaf}": shape
            for i, width in ((0, mid), (1, 512))
            for leaf, shape in (
                ("weight", (width,)),
                ("bias", (width,)),
                ("running_mean", (width,)),
                ("running_var", (width,)),
                ("num_batches_tracked", ()),
            )
        },
    }
    assert layout["auxiliary_head.projection.convs.1.bn.running_var"][:2] == (
        "batch_stats",
        ("auxiliary_head", "projection", "convs_1", "bn", "var"),
    )


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_a_pytorch_transcription_of_projhead(train):
    torch_head = _randomised(TorchProjHead(STAGES, 24), seed=0)
    head = ProjectionHead(channels=24)
    features = _features(seed=1)
    template = jax.eval_shape(lambda: head.init(jax.random.key(0), features, False))
    state = {k: v.numpy().copy() for k, v in torch_head.state_dict().items()}
    # The head's own variables carry SePiCo's names: convs.0.conv.weight, convs.0.bn.running_mean...
    assert set(canonical_layout(template)) == set(state)
    variables = canonical_to_variables(state, template)

    torch_head.train(train)
    want = torch_head(_nchw(features)).detach().numpy().transpose(0, 2, 3, 1)
    got, updated = head.apply(variables, features, train, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    if train:  # running statistics updated as torch updates them (unbiased variance, momentum 0.1)
        after = variables_to_canonical({"batch_stats": updated["batch_stats"]})
        for key, value in torch_head.state_dict().items():
            if "running_" in key or "num_batches" in key:
                np.testing.assert_allclose(after[key], value.numpy(), rtol=1e-5, err_msg=key)


def test_bfloat16_compute_gives_float32_unit_embeddings():
    head = ProjectionHead(channels=16, dtype=jnp.bfloat16)
    features = _features(seed=2)
    variables = head.init(jax.random.key(0), features, False)
    z = head.apply(variables, features, False)
    assert z.dtype == jnp.float32 and z.shape == (2, *SIZES[0], 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, atol=1e-6)


def test_l2_normalize_value_and_gradient_match_torch_also_at_a_zero_vector():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    x[1] = 0.0  # a pixel whose ReLU outputs are all zero
    w = rng.normal(size=(4, 6)).astype(np.float32)

    xt = torch.from_numpy(x).requires_grad_(True)
    yt = F.normalize(xt, p=2, dim=-1)
    (yt * torch.from_numpy(w)).sum().backward()

    y = l2_normalize(jnp.asarray(x))
    grad = jax.grad(lambda v: jnp.sum(l2_normalize(v) * w))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad)[1], w[1] / 1e-12, rtol=1e-5)
