"""SePiCo's checkpoint layout (`--format sepico`), both ways.

SePiCo trains an `EncoderDecoderProjector` (backbone, decode_head, and its projection head as
the one `auxiliary_head`) inside its `SePiCo` UDA module, whose `model` (student) and
`ema_model` (teacher) are the two networks of a training checkpoint; it builds no ImageNet copy.
mmcv's checkpoint hook saves `{'meta', 'state_dict', 'optimizer'}`, so the state dict's keys are
`model.backbone.*`, `model.decode_head.*` and the head's `model.auxiliary_head.convs.{0,1}.*`
(`ProjHead.convs` is an `nn.Sequential` of two mmcv ConvModules, each a `conv` without bias and
a `bn`), and the same under `ema_model.`. Here that head is the auxiliary head `projection`.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch_segmentor
from flax import traverse_util
from projection_head_test import TorchProjHead

from configs import tiny
from data_pipelines import labels
from pgpc_jax import checkpointing, convert, weights
from pgpc_jax.models.heads import ProjectionHead
from pgpc_jax.models.segmentor import abstract_variables, build_segmentor
from pgpc_jax.torch_names import (
    SEPICO_HEAD,
    ConversionError,
    canonical_layout,
    canonical_to_variables,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = {SEPICO_HEAD: ProjectionHead()}
# SePiCo's names of its projection head's tensors (under model. / ema_model.).
RELEASED_HEAD_KEYS = (
    "auxiliary_head.convs.0.conv.weight",
    "auxiliary_head.convs.0.bn.weight",
    "auxiliary_head.convs.0.bn.bias",
    "auxiliary_head.convs.0.bn.running_mean",
    "auxiliary_head.convs.0.bn.running_var",
    "auxiliary_head.convs.0.bn.num_batches_tracked",
    "auxiliary_head.convs.1.conv.weight",
    "auxiliary_head.convs.1.bn.weight",
    "auxiliary_head.convs.1.bn.bias",
    "auxiliary_head.convs.1.bn.running_mean",
    "auxiliary_head.convs.1.bn.running_var",
    "auxiliary_head.convs.1.bn.num_batches_tracked",
)
STAGES = (16, 32, 64, 96)  # the tiny MiT: the head reads 208 channels, 52 in the middle


def _cfg():
    return tiny.get_config().model.to_dict()


def _head_shapes(out=512):
    total = sum(STAGES)
    mid = total // 4
    shapes = {}
    for i, (cin, cout) in enumerate(((total, mid), (mid, out))):
        shapes[f"auxiliary_head.convs.{i}.conv.weight"] = (cout, cin, 1, 1)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"auxiliary_head.convs.{i}.bn.{leaf}"] = (cout,)
        shapes[f"auxiliary_head.convs.{i}.bn.num_batches_tracked"] = ()
    assert sorted(shapes) == sorted(RELEASED_HEAD_KEYS)
    return shapes


def _random_variables(heads=HEADS, seed=0):
    template = abstract_variables(build_segmentor(_cfg(), heads))
    rng = np.random.default_rng(seed)
    state = {}
    for key, (_, _, shape) in canonical_layout(template).items():
        value = rng.normal(size=shape).astype(np.float32)
        state[key] = np.abs(value) + 0.5 if key.endswith("running_var") else value
    return canonical_to_variables(state, template)


def _flat(variables):
    return {
        (c, *path): np.asarray(v)
        for c, tree in variables.items()
        for path, v in traverse_util.flatten_dict(dict(tree)).items()
    }


def _assert_same(got, want):
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def _released_state_dict(seed, with_head=True):
    """A SePiCo training checkpoint's state dict at test size, in SePiCo's key names: the
    segmentor's from the original DAFormer modules, the head's written out above."""
    g = torch.Generator().manual_seed(seed)
    names = dict(torch_segmentor.torch_model_for(_cfg()).state_dict())
    if with_head:
        names.update({k: torch.empty(s) for k, s in _head_shapes().items()})
    state = {}
    for prefix in ("model.", "ema_model."):
        for key, like in names.items():
            if key.endswith("num_batches_tracked"):
                value = torch.randint(1, 1000, (), generator=g, dtype=torch.int64)
            elif key.endswith("running_var"):
                value = torch.rand(like.shape, generator=g) + 0.5
            else:
                value = torch.randn(like.shape, generator=g)
            state[prefix + key] = value
    return state


def _save_as_mmcv(path, state_dict):
    """As mmcv's CheckpointHook saves a training checkpoint."""
    meta = {"CLASSES": tuple(labels.CLASSES), "PALETTE": [list(c) for c in labels.PALETTE]}
    meta.update(iter=40000, mmseg_version="0.16.0", config="model = dict(...)")
    optimizer = {"state": {}, "param_groups": [{"lr": 6e-05, "weight_decay": 0.01}]}
    torch.save({"meta": meta, "state_dict": state_dict, "optimizer": optimizer}, path)
    return str(path)


def test_round_trip_flax_sepico_flax_is_bit_exact_and_loads_into_sepicos_modules(tmp_path):
    variables = _random_variables()
    state = convert.from_flax(variables, "sepico", "keep")
    assert all(k.startswith("model.") for k in state)
    head = {k[len("model.") :] for k in state if k.startswith("model.auxiliary_head.")}
    assert head == set(RELEASED_HEAD_KEYS)
    # The segmentor's keys are DAFormer's; 'drop' writes only those, and None is sepico's keep.
    dropped = convert.from_flax(variables, "sepico", "drop")
    assert dropped.keys() == convert.from_flax(variables, "daformer").keys()
    assert convert.from_flax(variables, "sepico", None).keys() == state.keys()

    path = tmp_path / "sepico.pth"
    convert.write_torch(str(path), state, {"CLASSES": tuple(labels.CLASSES)}, legacy=False)
    back, left = convert.to_flax(str(path), "sepico", _cfg(), auxiliary_heads=HEADS)
    assert left == []
    _assert_same(back, variables)

    # SePiCo's tools/test.py key revision, loaded strictly into the original segmentor with
    # the projection head as its `auxiliary_head`: the same embeddings.
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    reference = torch_segmentor.torch_model_for(_cfg())
    reference.auxiliary_head = TorchProjHead(STAGES, 512)
    reference.load_state_dict(torch_segmentor.revise_keys(saved), strict=True)
    reference.eval()
    image = np.random.default_rng(1).normal(size=(1, 3, 44, 52)).astype(np.float32)
    with torch.no_grad():
        want = reference.auxiliary_head(reference.backbone(torch.from_numpy(image))).numpy()
    model = build_segmentor(_cfg(), HEADS)
    got = jax.jit(lambda v, x: model.apply(v, x)[SEPICO_HEAD])(back, image.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=2e-6)


def test_released_key_names_load_into_the_right_places(tmp_path, capsys):
    state = _released_state_dict(seed=0)
    path = _save_as_mmcv(tmp_path / "sepico_distcl_gta2city_daformer.pth", state)
    for which in ("model", "ema_model"):
        variables, left = convert.to_flax(path, "sepico", _cfg(), which, auxiliary_heads=HEADS)
        assert left == []
        p, s = which + ".", variables["batch_stats"]
        proj = variables["params"]["auxiliary_head"]["projection"]
        stats = s["auxiliary_head"]["projection"]

        def torch_value(key, p=p):
            return state[p + key].numpy()

        np.testing.assert_array_equal(  # OIHW -> HWIO
            proj["convs_0"]["conv"]["kernel"],
            torch_value("auxiliary_head.convs.0.conv.weight").transpose(2, 3, 1, 0),
        )
        np.testing.assert_array_equal(
            proj["convs_1"]["bn"]["scale"], torch_value("auxiliary_head.convs.1.bn.weight")
        )
        np.testing.assert_array_equal(
            stats["convs_1"]["bn"]["var"], torch_value("auxiliary_head.convs.1.bn.running_var")
        )
        np.testing.assert_array_equal(
            stats["convs_0"]["bn"]["mean"], torch_value("auxiliary_head.convs.0.bn.running_mean")
        )
        count = stats["convs_0"]["bn"]["num_batches_tracked"]
        assert count.dtype == np.int32
        assert count == torch_value("auxiliary_head.convs.0.bn.num_batches_tracked")
        np.testing.assert_array_equal(
            variables["params"]["backbone"]["patch_embed1"]["proj"]["kernel"],
            torch_value("backbone.patch_embed1.proj.weight").transpose(2, 3, 1, 0),
        )
        np.testing.assert_array_equal(
            variables["params"]["decode_head"]["conv_seg"]["bias"],
            torch_value("decode_head.conv_seg.bias"),
        )
    with pytest.raises(
        ConversionError,
        match=r"this SePiCo checkpoint holds \[.ema_model., .model.\], not .imnet_model.",
    ):
        convert.to_flax(path, "sepico", _cfg(), "imnet_model", auxiliary_heads=HEADS)

    # Evaluation builds the segmentor alone: the head is left out with one note.
    capsys.readouterr()
    model, plain = weights.load_model(_cfg(), path, "sepico")
    assert not model.auxiliary_heads
    assert "auxiliary_head" not in plain["params"]
    np.testing.assert_array_equal(
        plain["params"]["decode_head"]["conv_seg"]["bias"],
        state["model.decode_head.conv_seg.bias"].numpy(),
    )
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [
        f"note: {path}: ignored its auxiliary head 'projection' (12 tensors), which the model "
        "does not have: the segmentor alone is read"
    ]
    # Read as a DAFormer checkpoint by a model that wants the head: say which format fits.
    with pytest.raises(ConversionError) as e:
        convert.to_flax(path, "daformer", _cfg(), auxiliary_heads=HEADS)
    assert "\n" not in str(e.value)
    assert str(e.value).endswith(
        "its auxiliary_head.convs.* keys are SePiCo's projection head: read it with --format sepico"
    )


def test_a_checkpoint_without_the_head(tmp_path, capsys):
    state = _released_state_dict(seed=1, with_head=False)
    path = _save_as_mmcv(tmp_path / "no_head.pth", state)
    # A caller that needs the head (SePiCo training, auxiliary_heads requested): one line.
    with pytest.raises(ConversionError) as e:
        convert.to_flax(path, "sepico", _cfg(), auxiliary_heads=HEADS)
    assert str(e.value) == (
        f"{path} has no SePiCo projection head (no auxiliary_head.* key): use a SePiCo checkpoint "
        "that holds it, or start the head from its initialisation (missing_auxiliary='init')"
    )
    with pytest.raises(ConversionError, match="has no SePiCo projection head"):
        weights.load_model(_cfg(), path, "sepico", auxiliary_heads=HEADS)

    # Evaluation / prediction: the segmentor alone, with one note.
    capsys.readouterr()
    model, variables = weights.load_model(_cfg(), path, "sepico", "ema_model")
    assert not model.auxiliary_heads
    np.testing.assert_array_equal(
        variables["params"]["decode_head"]["conv_seg"]["kernel"][0, 0],
        state["ema_model.decode_head.conv_seg.weight"].numpy()[:, :, 0, 0].T,
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        f"note: {path} has no SePiCo projection head (no auxiliary_head.* key): the segmentor "
        "alone is read"
    ]
    # Asked to, the head starts from its initialisation (one note).
    notes = []
    variables, _ = convert.to_flax(
        path,
        "sepico",
        _cfg(),
        auxiliary_heads=HEADS,
        missing_auxiliary="init",
        note=notes.append,
    )
    assert notes == [f"{path} has no auxiliary head 'projection': it keeps its initialisation"]
    assert set(variables["params"]["auxiliary_head"]) == {"projection"}


def test_sepico_layout_holds_the_projection_head_only():
    heads = {SEPICO_HEAD: ProjectionHead(channels=8), "other": ProjectionHead(channels=4)}
    variables = _random_variables(heads)
    with pytest.raises(ConversionError, match=r"also have \['other'\]: use --format daformer"):
        convert.from_flax(variables, "sepico", "keep")
    assert not any("auxiliary_head" in k for k in convert.from_flax(variables, "sepico", "drop"))
    with pytest.raises(ConversionError, match="--auxiliary_heads=keep: --format hf"):
        convert.from_flax(variables, "hf", "keep")


def _cli(*args):
    r = subprocess.run(
        [sys.executable, "-m", "pgpc_jax.convert", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return r


def test_cli_keeps_the_projection_head_by_default_both_ways(tmp_path):
    variables = _random_variables()
    directory = str(tmp_path / "weights")
    checkpointing.save_variables(directory, variables, _cfg(), {"classes": "cityscapes"})
    out = tmp_path / "sepico.pth"
    r = _cli("to-torch", f"--src={directory}", "--format=sepico", f"--out={out}")
    assert "note:" not in r.stdout + r.stderr
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["meta"]["CLASSES"] == tuple(labels.CLASSES)
    want = convert.from_flax(variables, "sepico", "keep")
    assert sorted(saved["state_dict"]) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(saved["state_dict"][key].numpy(), value, err_msg=key)

    back = str(tmp_path / "back")
    r = _cli(
        "to-flax", f"--src={out}", "--format=sepico", "--config=configs/tiny.py", f"--out={back}"
    )
    assert "kept its auxiliary head 'projection' (12 tensors) beside the segmentor" in r.stderr
    _, loaded = weights.load_model(_cfg(), back, auxiliary_heads=HEADS)
    _assert_same(loaded, variables)


def test_training_from_a_sepico_checkpoint_continues_its_head(tmp_path):
    """`init_from.format='sepico'`: the run starts from the file's projection head (not a fresh
    one); a file without the head stops with the one line above."""
    from pgpc_jax import train

    config = tiny.get_config()
    config.init_from.format = "sepico"
    model = build_segmentor(_cfg(), HEADS)
    with_head = _save_as_mmcv(tmp_path / "with.pth", _released_state_dict(seed=2))
    config.init_from.path = with_head
    variables = train.initial_variables(config, model)
    expected, _ = convert.to_flax(with_head, "sepico", _cfg(), auxiliary_heads=HEADS)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    no_head = _save_as_mmcv(tmp_path / "without.pth", _released_state_dict(seed=2, with_head=False))
    config.init_from.path = no_head
    with pytest.raises(ConversionError, match="has no SePiCo projection head"):
        train.initial_variables(config, model)
