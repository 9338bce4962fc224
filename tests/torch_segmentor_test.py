"""An exported checkpoint loads into the ORIGINAL PyTorch DAFormer and gives our logits.

The references are `tests/torch_mit.py` (NVlabs/SegFormer's MixVisionTransformer, copied by
DAFormer) and `tests/torch_segmentor.py` (mmseg's EncoderDecoder with `tests/torch_daformer_head.py`
as decode head), written from the original files with the original module names. Weights travel
JAX -> torch only through the converter under test, `pgpc_jax.convert.from_flax`:

* format 'daformer' (`model.backbone.*`, `model.decode_head.*`), with the `model.` prefix stripped
  as DAFormer's `tools/test.py` strips it, loads with `strict=True` into the whole segmentor, and
  its whole-image logits (stride-4 head logits upsampled bilinearly to the input) equal
  `pgpc_jax.evaluation.whole_inference`;
* format 'mit' (NVlabs `mit_b*.pth` keys) loads with `strict=True` into the MiT alone, and its
  four stage maps equal `Segmentor.encode`;
* the LayerNorm eps of each norm is the original's, checked on activations small enough for the
  eps to matter (at unit scale 1e-5 vs 1e-6 changes an output by ~1e-6 relative, invisibly).

The image is 1x3x75x101: non-square, not a multiple of 32, so every strided conv and the spatial
reductions round (stage maps 19x26, 10x13, 5x7, 3x4; reduced K/V maps 2x3).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_mit
import torch_segmentor
from flax import traverse_util

from configs import base, tiny
from pgpc_jax import convert, evaluation, torch_names
from pgpc_jax.models import segmentor
from pgpc_jax.models.mit import MIT_VARIANTS
from pgpc_jax.models.segmentor import Segmentor

IMAGE_SHAPE = (1, 3, 75, 101)  # NCHW
STAGE_SIZES = ((19, 26), (10, 13), (5, 7), (3, 4))
RTOL = 1e-5  # of the largest |value| of the compared tensor


def _model_cfg(name: str, layer_norm: str = "mmseg"):
    """Our `model` config group: configs/tiny.py for 'tiny', else the base one with that MiT."""
    cfg = tiny.get_config().model if name == "tiny" else base.get_config().model
    cfg.backbone = name
    cfg.layer_norm = layer_norm
    return cfg


@functools.cache
def _jax_model(name: str, layer_norm: str):
    """(model, jitted images -> (whole-image logits, encoder features)), built once per config."""
    model = segmentor.build_segmentor(_model_cfg(name, layer_norm))

    @jax.jit
    def run(variables, images):
        logits = evaluation.whole_inference(model, variables, images)
        return logits, model.apply(variables, images, method=Segmentor.encode)

    return model, run


def _random_variables(model: Segmentor, seed: int, backbone_scale: float = 1.0) -> dict:
    """Every variable redrawn (numpy): kernels at LeCun scale (activations stay O(1)), random
    biases, LayerNorm / BatchNorm affines away from 1 / 0, non-trivial BN running statistics.

    `backbone_scale` multiplies the encoder's biases and LayerNorm affines: the residual stream and
    every encoder LayerNorm input then have that scale, so at 1e-3 (variance 1e-6) the LN eps
    (1e-6 or 1e-5) changes the encoder outputs by tens of percent.
    """
    rng = np.random.default_rng(seed)
    template = segmentor.abstract_variables(model)
    out = {}
    for collection, tree in template.items():
        flat = {}
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            shape, name = leaf.shape, path[-1]
            if name == "kernel":  # Dense (in, out), Conv (kh, kw, in / groups, out)
                value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
            elif name == "bias":
                value = 0.1 * rng.standard_normal(shape)
            elif name == "scale":
                value = 0.5 + rng.random(shape)
            elif name == "mean":
                value = 0.3 * rng.standard_normal(shape)
            elif name == "var":
                value = 0.3 + 1.7 * rng.random(shape)
            elif name == "num_batches_tracked":
                value = np.asarray(rng.integers(1, 1000), leaf.dtype)
            else:
                raise AssertionError(f"unexpected variable {path}")
            if path[0] == "backbone" and name in ("bias", "scale"):
                value = value * backbone_scale
            flat[path] = np.asarray(value, leaf.dtype)
        out[collection] = traverse_util.unflatten_dict(flat)
    return out


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(IMAGE_SHAPE).astype(np.float32)


def _tensors(state) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _rel_err(out: np.ndarray, want: np.ndarray, what: str) -> float:
    """max |out - want| / max |want|, asserting the shapes agree."""
    assert out.shape == want.shape, f"{what}: shape {out.shape} vs {want.shape}"
    return float(np.max(np.abs(out - want)) / np.max(np.abs(want)))


# ------------------------------------------------------------------------------------------------
# The reference itself: the original's variants, names and eps values.


def test_variant_table_is_the_original():
    """Our MIT_VARIANTS b0..b5 and eps are the original mit_b* arguments."""
    for name, want in torch_mit.NVLABS_VARIANTS.items():
        got = MIT_VARIANTS[name]
        assert got.embed_dims == want["embed_dims"], name
        assert got.num_heads == want["num_heads"], name
        assert got.depths == want["depths"], name
        assert got.sr_ratios == want["sr_ratios"], name
        assert (got.mlp_ratio,) * 4 == want["mlp_ratios"], name
        assert got.block_eps == torch_mit.NVLABS_NORM_EPS, name
        assert got.embed_eps == 1e-5, name  # plain nn.LayerNorm in patch embeds and `sr` norms


def test_torch_mit_layer_norm_eps():
    m = torch_mit.mit("b0")
    eps = {k: v.eps for k, v in m.named_modules() if isinstance(v, torch.nn.LayerNorm)}
    assert eps["patch_embed1.norm"] == eps["patch_embed4.norm"] == 1e-5
    assert eps["block1.0.attn.norm"] == eps["block3.1.attn.norm"] == 1e-5
    assert "block4.0.attn.norm" not in eps  # sr_ratio 1: no reduction
    assert eps["block2.1.norm1"] == eps["block2.1.norm2"] == eps["norm4"] == 1e-6


def test_mit_b5_keys_and_shapes_equal_ours():
    """The original mit_b5's state dict (built on the meta device: no memory) has exactly the
    `backbone.*` keys and shapes of our b5 Segmentor, 1052 tensors, 81.44 M parameters."""
    with torch.device("meta"):
        ref = torch_mit.mit("b5")
    sd = ref.state_dict()
    for key in (
        "patch_embed1.proj.weight",
        "patch_embed4.norm.bias",
        "block1.2.attn.sr.weight",
        "block1.0.attn.norm.weight",
        "block3.39.attn.kv.weight",
        "block3.17.mlp.dwconv.dwconv.weight",
        "block4.2.mlp.fc2.bias",
        "norm4.weight",
    ):
        assert key in sd, key
    assert len(sd) == 1052
    assert tuple(sd["block3.17.attn.kv.weight"].shape) == (640, 320)
    assert tuple(sd["block2.0.mlp.dwconv.dwconv.weight"].shape) == (512, 1, 3, 3)
    n_params = sum(p.numel() for p in ref.parameters())
    assert 81.4e6 < n_params < 81.5e6

    model = segmentor.build_segmentor(_model_cfg("b5"))
    template = segmentor.abstract_variables(model)
    layout = torch_names.canonical_layout(template)
    got = {k[len("backbone.") :]: s for k, (_, _, s) in layout.items() if k.startswith("backbone.")}
    assert got == {k: tuple(v.shape) for k, v in sd.items()}
    assert segmentor.count_params(template["params"]["backbone"]) == n_params


# ------------------------------------------------------------------------------------------------
# Exported checkpoints in PyTorch.


@pytest.mark.parametrize("name", ["tiny", "b0"])
def test_daformer_export_loads_strictly_and_gives_our_logits(name):
    model, run = _jax_model(name, "mmseg")
    variables = _random_variables(model, seed=1)
    image = _image(seed=2)
    logits, features = run(variables, jnp.asarray(image.transpose(0, 2, 3, 1)))

    # The DAFormer checkpoint as DAFormer's tools/test.py reads it: `model.` stripped by mmcv's
    # unanchored re.sub; it must touch nothing but the prefix (no inner name contains 'model').
    exported = convert.from_flax(variables, "daformer")
    assert all(k.startswith("model.") for k in exported)
    state = torch_segmentor.revise_keys(exported)
    assert state.keys() == {k[len("model.") :] for k in exported}
    ref = torch_segmentor.torch_model_for(_model_cfg(name)).eval()
    ref.load_state_dict(_tensors(state), strict=True)
    with torch.no_grad():
        want = ref(torch.from_numpy(image)).numpy()
    assert want.shape == (1, 19, 75, 101)
    assert float(want.std()) > 0.1  # the logits depend on the image, not only on biases
    err = _rel_err(_nchw(logits), want, f"{name} logits")
    assert err <= RTOL, f"{name}: logits differ by {err:.2e} of max |logit|"

    # The NVlabs mit_b*.pth layout of the same encoder.
    mit_state = convert.from_flax(variables, "mit")
    backbone = torch_segmentor.torch_mit_for(_model_cfg(name)).eval()
    backbone.load_state_dict(_tensors(mit_state), strict=True)
    with torch.no_grad():
        stages = [f.numpy() for f in backbone(torch.from_numpy(image))]
    for i, (got, stage) in enumerate(zip(features, stages, strict=True)):
        assert stage.shape[2:] == STAGE_SIZES[i]
        err = _rel_err(_nchw(got), stage, f"{name} stage {i + 1}")
        assert err <= RTOL, f"{name} stage {i + 1}: differs by {err:.2e} of max |value|"


@pytest.mark.parametrize("layer_norm", ["mmseg", "hf"])
def test_layer_norm_eps_equals_the_reference(layer_norm):
    """At backbone scale 1e-3 (LN inputs of variance ~1e-6) our encoder equals the reference
    with the same eps convention, and a reference with the other block / stage eps differs."""
    model, run = _jax_model("tiny", layer_norm)
    variables = _random_variables(model, seed=3, backbone_scale=1e-3)
    image = 1e-3 * _image(seed=4)  # for the first patch embedding's LN input too
    _, features = run(variables, jnp.asarray(image.transpose(0, 2, 3, 1)))
    mit_state = _tensors(convert.from_flax(variables, "mit"))

    def stages_of(layer_norm_of_reference: str) -> list[np.ndarray]:
        backbone = torch_segmentor.torch_mit_for(_model_cfg("tiny", layer_norm_of_reference))
        backbone.eval().load_state_dict(mit_state, strict=True)
        with torch.no_grad():
            return [f.numpy() for f in backbone(torch.from_numpy(image))]

    other = {"mmseg": "hf", "hf": "mmseg"}[layer_norm]
    for i, (got, same, wrong) in enumerate(
        zip(features, stages_of(layer_norm), stages_of(other), strict=True)
    ):
        assert np.max(np.abs(same)) < 0.1  # the scale of the stage norm's affine (1e-3 x O(1))
        err = _rel_err(_nchw(got), same, f"stage {i + 1}")
        assert err <= RTOL, f"{layer_norm} stage {i + 1}: differs by {err:.2e}"
        assert _rel_err(_nchw(got), wrong, f"stage {i + 1}") > 1e-2  # the eps matters here
