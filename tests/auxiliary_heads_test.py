"""A method's auxiliary heads in conversion, loading and export.

Their torch names are `auxiliary_head.<name>.<module path>.<leaf>` (mmseg's `auxiliary_head.*`,
one level per head). Exports carry the segmentor alone unless asked to keep them (daformer,
flax); a model with auxiliary heads reads them where the file has them, fails in one line naming
a missing one (or keeps its initialisation when asked), and a model without them ignores a
file's auxiliary heads with one note.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from configs import tiny
from pgpc_jax import checkpointing, convert, export, weights
from pgpc_jax.models.segmentor import abstract_variables, build_segmentor, init_variables
from pgpc_jax.torch_names import ConversionError, canonical_layout, canonical_to_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Projection(nn.Module):
    """An auxiliary head at test size: 1x1 conv + BatchNorm on the last encoder stage."""

    @nn.compact
    def __call__(self, features, train):
        x = nn.Conv(8, (1, 1))(features[-1])
        return nn.BatchNorm(use_running_average=not train)(x)


HEADS = {"proj": _Projection()}
PROJ_KEYS = {
    "auxiliary_head.proj.Conv.0.weight": (8, 96, 1, 1),  # tiny MiT: stage 4 has 96 channels
    "auxiliary_head.proj.Conv.0.bias": (8,),
    "auxiliary_head.proj.BatchNorm.0.weight": (8,),
    "auxiliary_head.proj.BatchNorm.0.bias": (8,),
    "auxiliary_head.proj.BatchNorm.0.running_mean": (8,),
    "auxiliary_head.proj.BatchNorm.0.running_var": (8,),
}


def _cfg(head="daformer"):
    cfg = tiny.get_config().model
    cfg.head = head
    cfg.head_embed_dim = cfg.head_channels = 16
    return cfg.to_dict()


def _random_variables(model_cfg, heads=HEADS, seed=0):
    """Variables of the model (with `heads`) with random values, BN statistics included."""
    template = abstract_variables(build_segmentor(model_cfg, heads))
    rng = np.random.default_rng(seed)
    state = {
        key: rng.normal(size=shape).astype(np.float32)
        for key, (_, _, shape) in canonical_layout(template).items()
    }
    return canonical_to_variables(state, template)


def _flat(variables):
    return {
        (c, *path): v
        for c, tree in variables.items()
        for path, v in traverse_util.flatten_dict(dict(tree)).items()
    }


def _assert_same(got, want):
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


def _write(path, state):
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return str(path)


def _segmentor(variables):
    return convert.without_auxiliary(variables)


def test_torch_names_of_an_auxiliary_head():
    layout = canonical_layout(abstract_variables(build_segmentor(_cfg(), HEADS)))
    aux = {k: shape for k, (_, _, shape) in layout.items() if k.startswith("auxiliary_head.")}
    assert aux == PROJ_KEYS
    assert layout["auxiliary_head.proj.Conv.0.weight"][:2] == (
        "params",
        ("auxiliary_head", "proj", "Conv_0", "kernel"),
    )
    assert layout["auxiliary_head.proj.BatchNorm.0.running_var"][:2] == (
        "batch_stats",
        ("auxiliary_head", "proj", "BatchNorm_0", "var"),
    )


@pytest.mark.parametrize("bare", [False, True], ids=["daformer", "mmseg_encoder_decoder"])
def test_keep_round_trips_bit_exact_and_drop_is_the_default(tmp_path, bare):
    variables = _random_variables(_cfg())
    kept = convert.from_flax(variables, "daformer", "keep")
    assert {k[len("model.") :] for k in kept if ".auxiliary_head." in f".{k}"} == set(PROJ_KEYS)
    default = convert.from_flax(variables, "daformer")
    assert not any("auxiliary_head" in k for k in default)
    assert sorted(default) == sorted(k for k in kept if "auxiliary_head" not in k)
    if bare:  # an mmseg EncoderDecoder state dict: backbone., decode_head., auxiliary_head.
        kept = {k[len("model.") :]: v for k, v in kept.items()}
    path = tmp_path / "kept.pth"
    convert.write_torch(str(path), kept, {"CLASSES": ("road",)}, legacy=False)
    back, left = convert.to_flax(str(path), "daformer", _cfg(), auxiliary_heads=HEADS)
    assert left == []
    _assert_same(back, variables)


def test_formats_without_auxiliary_heads_refuse_keep_and_drop_them(tmp_path):
    variables = _random_variables(_cfg("segformer"))
    for fmt in ("mit", "mmseg", "hf"):
        with pytest.raises(ConversionError, match=f"--format {fmt} .*cannot hold") as e:
            convert.from_flax(variables, fmt, "keep")
        assert "\n" not in str(e.value)
    with pytest.raises(ConversionError, match="--auxiliary_heads='both'"):
        convert.from_flax(variables, "daformer", "both")
    assert set(convert.from_flax(variables, "mit")) == set(
        convert.from_flax(_segmentor(variables), "mit")
    )
    # HF: the segmentor alone, a folder that transformers loads with no key missing or left over.
    hf_state = convert.from_flax(variables, "hf")
    assert not any("auxiliary" in k for k in hf_state)
    classes, _ = convert.class_table("cityscapes")
    convert.write_hf(str(tmp_path / "hf"), hf_state, _cfg("segformer"), classes)
    back, left = convert.to_flax(str(tmp_path / "hf"), "hf", _cfg("segformer"))
    assert left == []
    _assert_same(back, _segmentor(variables))
    from transformers import SegformerForSemanticSegmentation

    _, info = SegformerForSemanticSegmentation.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_a_missing_auxiliary_head_is_one_line_or_keeps_its_initialisation(tmp_path):
    variables = _random_variables(_cfg())
    path = _write(tmp_path / "plain.pth", convert.from_flax(variables, "daformer"))
    with pytest.raises(ConversionError) as e:
        convert.to_flax(path, "daformer", _cfg(), auxiliary_heads=HEADS)
    message = str(e.value)
    assert "\n" not in message
    assert "has no auxiliary head 'proj' (no auxiliary_head.proj.* key)" in message
    assert "missing_auxiliary='init'" in message
    with pytest.raises(ConversionError, match="has no auxiliary head 'proj'"):
        weights.load_model(_cfg(), path, "daformer", auxiliary_heads=HEADS)

    notes = []
    back, left = convert.to_flax(
        path, "daformer", _cfg(), auxiliary_heads=HEADS, missing_auxiliary="init", note=notes.append
    )
    assert left == [] and notes == [
        f"{path} has no auxiliary head 'proj': it keeps its initialisation"
    ]
    model = build_segmentor(_cfg(), HEADS)
    initial = jax.tree.map(np.asarray, init_variables(model, jax.random.key(0)))
    want = _segmentor(variables)
    for collection in want:
        want[collection]["auxiliary_head"] = initial[collection]["auxiliary_head"]
    _assert_same(back, want)


def test_auxiliary_heads_the_model_lacks_are_ignored_with_one_note(tmp_path, capsys):
    variables = _random_variables(_cfg())
    path = _write(tmp_path / "sepico.pth", convert.from_flax(variables, "daformer", "keep"))
    model, back = weights.load_model(_cfg(), path, "daformer")
    assert not model.auxiliary_heads
    _assert_same(back, _segmentor(variables))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {path}: ignored its auxiliary head 'proj' (6 tensors), which the model does not "
        "have: the segmentor alone is read"
    ]


def test_weights_directory_reads_kept_heads_and_ignores_them_for_the_plain_model(tmp_path, capsys):
    variables = _random_variables(_cfg())
    path = _write(tmp_path / "sepico.pth", convert.from_flax(variables, "daformer", "keep"))
    # `convert to-flax --auxiliary_heads=keep`: the file's heads, without a model that has them.
    kept, _ = convert.to_flax(path, "daformer", _cfg(), extra_auxiliary="keep", note=print)
    _assert_same(kept, variables)
    directory = str(tmp_path / "weights")
    checkpointing.save_variables(directory, kept, _cfg(), {"classes": "cityscapes"})
    capsys.readouterr()
    model, back = weights.load_model(_cfg(), directory, auxiliary_heads=HEADS)
    assert [name for name, _ in model.auxiliary_heads] == ["proj"]
    _assert_same(back, variables)
    assert "note:" not in capsys.readouterr().err
    _, plain = weights.load_model(_cfg(), directory)
    _assert_same(plain, _segmentor(variables))
    assert capsys.readouterr().err.count("note:") == 1
    # A directory without the head (the default export) loads into the model only with 'init'.
    checkpointing.save_variables(directory, _segmentor(variables), _cfg(), {})
    with pytest.raises(ConversionError, match="has no auxiliary head 'proj'"):
        weights.load_model(_cfg(), directory, auxiliary_heads=HEADS)
    _, back = weights.load_model(_cfg(), directory, auxiliary_heads=HEADS, missing_auxiliary="init")
    assert set(back["params"]["auxiliary_head"]) == {"proj"}


def test_export_refuses_keep_for_hf_and_mit_before_reading_the_run(tmp_path):
    for fmt in ("hf", "mit"):
        with pytest.raises(ConversionError, match=f"--auxiliary_heads=keep: --format {fmt}"):
            export.export_run(
                str(tmp_path / "no_run"), fmt, str(tmp_path / "out"), auxiliary_heads="keep"
            )
    assert convert.auxiliary_note(_random_variables(_cfg()), "daformer", "drop") == [
        "note: left out the auxiliary head 'proj', as the originals evaluate without them; "
        "--auxiliary_heads=keep keeps them"
    ]
    assert convert.auxiliary_note(_random_variables(_cfg()), "daformer", "keep") == []


def test_cli_to_torch_keeps_heads_only_when_asked(tmp_path):
    variables = _random_variables(_cfg())
    directory = str(tmp_path / "weights")
    checkpointing.save_variables(directory, variables, _cfg(), {"classes": "cityscapes"})
    out = tmp_path / "kept.pth"
    run = [sys.executable, "-m", "pgpc_jax.convert", "to-torch", f"--src={directory}"]
    r = subprocess.run(
        [*run, "--format=daformer", "--auxiliary_heads=keep", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    state = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    want = convert.from_flax(variables, "daformer", "keep")
    assert sorted(state) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)


def test_auxiliary_outputs_are_the_full_forwards_entries_without_the_decode_head():
    # A forward that needs an auxiliary head only (SePiCo's target contrast, mmseg's mode='aux')
    # gives the same features, head output, random draws and head BatchNorm statistics.
    model = build_segmentor(tiny.get_config().model, HEADS)
    variables = init_variables(model, jax.random.key(0))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    kwargs = dict(train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    full, full_stats = jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, images)
    aux, aux_stats = jax.jit(
        lambda v, x: model.apply(v, x, method=model.auxiliary_outputs, **kwargs)
    )(variables, images)
    assert sorted(aux) == ["features", "proj"]
    np.testing.assert_allclose(aux["proj"], full["proj"], rtol=1e-6, atol=1e-6)
    for a, b in zip(aux["features"], full["features"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(aux_stats["batch_stats"]["auxiliary_head"]),
        jax.tree.leaves(full_stats["batch_stats"]["auxiliary_head"]),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # The projection head's statistics moved (train=True): the comparison is not of constants.
    moved = jax.tree.leaves(aux_stats["batch_stats"]["auxiliary_head"])
    initial = jax.tree.leaves(variables["batch_stats"]["auxiliary_head"])
    assert any(not np.array_equal(a, b) for a, b in zip(moved, initial))
