"""Checkpoint conversion: bit-exact round trips for every format, key naming, every error path."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from configs import base, tiny
from pgpc_jax import convert
from pgpc_jax.models.segmentor import abstract_variables, build_segmentor
from pgpc_jax.torch_names import (
    ConversionError,
    canonical_layout,
    hf_to_canonical,
    mit_from_canonical,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_cfg(head="daformer"):
    cfg = tiny.get_config().model
    cfg.head = head
    return cfg.to_dict()


def _random_state(model_cfg, seed=0):
    """Canonical state dict of the model with random values (BN buffers included)."""
    layout = canonical_layout(abstract_variables(build_segmentor(model_cfg)))
    rng = np.random.default_rng(seed)
    out = {}
    for key, (_, _, shape) in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.asarray(rng.integers(0, 10_000), np.int64)
        else:
            out[key] = rng.normal(size=shape).astype(np.float32)
    return out


def _hf_model():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from pgpc_jax.models.mit import MIT_VARIANTS

    mit = MIT_VARIANTS["tiny"]
    torch.manual_seed(0)
    config = SegformerConfig(
        hidden_sizes=list(mit.embed_dims),
        depths=list(mit.depths),
        num_attention_heads=list(mit.num_heads),
        decoder_hidden_size=32,
        num_labels=19,
    )
    return SegformerForSemanticSegmentation(config)


def _mit2mmseg(mit):
    """mmseg's tools/model_converters/mit2mmseg.py rules, written out independently."""
    out = {}
    for k, v in mit.items():
        stage = int(k.split(".")[0][-1])
        if k.startswith("patch_embed"):
            out[
                k.replace(f"patch_embed{stage}", f"layers.{stage - 1}.0").replace(
                    "proj.", "projection."
                )
            ] = v
        elif k.startswith("norm"):
            out[k.replace(f"norm{stage}", f"layers.{stage - 1}.2")] = v
        else:
            nk = k.replace(f"block{stage}", f"layers.{stage - 1}.1")
            if ".attn.kv." in k:
                continue
            if ".attn.q." in k:
                out[nk.replace("q.", "attn.in_proj_")] = np.concatenate(
                    [v, mit[k.replace("q.", "kv.")]]
                )
            elif ".attn.proj." in k:
                out[nk.replace("proj.", "attn.out_proj.")] = v
            elif ".mlp." in k:
                if k.endswith(("fc1.weight", "fc2.weight")):
                    v = v.reshape(*v.shape, 1, 1)
                nk = nk.replace("mlp.", "ffn.layers.").replace("fc1.", "0.")
                out[nk.replace("dwconv.dwconv.", "1.").replace("fc2.", "4.")] = v
            else:
                out[nk] = v
    return out


def _assert_bit_exact(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_nvlabs_key_names_of_mit_b5():
    """The NVlabs layout of mit_b5.pth: 1052 encoder tensors (+ the 2 `head.*` we drop)."""
    layout = canonical_layout(abstract_variables(build_segmentor(base.get_model_config())))
    mit = {k[len("backbone.") :]: s for k, (_, _, s) in layout.items() if k.startswith("backbone.")}
    assert len(mit) == 1052
    assert mit["patch_embed1.proj.weight"] == (64, 3, 7, 7)
    assert mit["patch_embed4.norm.bias"] == (512,)
    assert mit["block1.0.attn.kv.weight"] == (128, 64)
    assert mit["block1.2.attn.sr.weight"] == (64, 64, 8, 8)
    assert mit["block3.39.mlp.dwconv.dwconv.weight"] == (1280, 1, 3, 3)
    assert mit["block4.2.mlp.fc2.weight"] == (512, 2048)
    assert "block4.0.attn.sr.weight" not in mit and "block3.40.norm1.weight" not in mit
    head = [k for k in layout if k.startswith("decode_head.")]
    assert len(head) == 58
    assert layout["decode_head.fuse_layer.bottleneck.conv.weight"][2] == (256, 1024, 3, 3)
    assert layout["decode_head.fuse_layer.aspp_modules.3.depthwise_conv.conv.weight"][2] == (
        1024,
        1,
        3,
        3,
    )


def test_mit_round_trip_drops_imagenet_head(tmp_path):
    canonical = hf_to_canonical({k: v.numpy() for k, v in _hf_model().state_dict().items()})
    original = mit_from_canonical(canonical)
    file = tmp_path / "mit_tiny.pth"
    torch.save(
        {
            **{k: torch.from_numpy(v) for k, v in original.items()},
            "head.weight": torch.zeros(1000, 96),
            "head.bias": torch.zeros(1000),
        },
        file,
    )
    variables, left = convert.to_flax(str(file), "mit", _tiny_cfg())
    assert left and all(k.startswith("decode_head.") for k in left)
    _assert_bit_exact(convert.from_flax(variables, "mit"), original)


def test_mmseg_round_trip_matches_mit2mmseg(tmp_path):
    mit = mit_from_canonical(_random_state(_tiny_cfg()))
    original = _mit2mmseg(mit)
    assert convert.from_flax({}, "mmseg") == {}
    file = tmp_path / "mit_tiny_mmseg.pth"
    torch.save(
        {"meta": {}, "state_dict": {k: torch.from_numpy(v) for k, v in original.items()}}, file
    )
    variables, _ = convert.to_flax(str(file), "mmseg", _tiny_cfg())
    _assert_bit_exact(convert.from_flax(variables, "mmseg"), original)
    _assert_bit_exact(convert.from_flax(variables, "mit"), mit)


@pytest.mark.parametrize("source", ["save_pretrained", "state_dict"])
def test_hf_round_trip(tmp_path, source):
    model = _hf_model()
    if source == "save_pretrained":  # legacy names, safetensors, as on the hub
        model.save_pretrained(tmp_path / "hf")
        src = str(tmp_path / "hf")
    else:  # transformers-5 in-memory names
        src = str(tmp_path / "hf.bin")
        torch.save(model.state_dict(), src)
    original = convert.read_state(src)
    variables, left = convert.to_flax(src, "hf", _tiny_cfg("segformer"))
    assert left == []
    exported = convert.from_flax(variables, "hf")
    if source == "save_pretrained":
        _assert_bit_exact(exported, original)
    else:  # same tensors under the legacy names
        legacy = {k: v for k, v in convert.read_state(str(tmp_path / "hf.bin")).items()}
        assert len(exported) == len(legacy)
        assert all(
            np.array_equal(
                exported[k.replace("decode_head.linear_projections", "decode_head.linear_c")], v
            )
            for k, v in legacy.items()
            if k.startswith("decode_head.linear_projections")
        )


def test_daformer_round_trip_each_submodel(tmp_path):
    cfg = _tiny_cfg()
    subs = {
        name: _random_state(cfg, seed)
        for seed, name in enumerate(["model", "ema_model", "imnet_model"])
    }
    state = {f"{name}.{k}": torch.from_numpy(v) for name, sd in subs.items() for k, v in sd.items()}
    file = tmp_path / "latest.pth"
    torch.save({"meta": {"CLASSES": ("road",), "iter": 40000}, "state_dict": state}, file)
    for name, sd in subs.items():
        variables, left = convert.to_flax(str(file), "daformer", cfg, which=name)
        assert left == []
        _assert_bit_exact(
            convert.from_flax(variables, "daformer"), {f"model.{k}": v for k, v in sd.items()}
        )


def test_export_daformer_file_loads_as_the_original_test_script_does(tmp_path):
    cfg = _tiny_cfg()
    state = _random_state(cfg)
    variables = convert.canonical_to_variables(state, abstract_variables(build_segmentor(cfg)))
    classes, palette = convert.class_table("cityscapes")
    for legacy in (False, True):
        path = tmp_path / f"out_{legacy}.pth"
        exported = convert.from_flax(variables, "daformer")
        convert.write_torch(
            str(path), exported, {"CLASSES": tuple(classes), "PALETTE": palette}, legacy
        )
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["meta"]["CLASSES"][0] == "road" and len(ckpt["meta"]["PALETTE"]) == 19
        # DAFormer tools/test.py strips `model.` with an unanchored regex before loading.
        import re

        revised = {re.sub("model.", "", k, count=1): v for k, v in ckpt["state_dict"].items()}
        _assert_bit_exact({k: v.numpy() for k, v in revised.items()}, state)


# ------------------------------------------------------------------------------------------------
# Errors: each names the offending keys and says what was expected; nothing is written.


def _write(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return str(path)


def test_missing_keys_are_listed_with_a_count(tmp_path):
    state = _random_state(_tiny_cfg())
    dropped = [k for k in state if k.startswith("backbone.block2_")] or [
        k for k in state if k.startswith("backbone.block2.")
    ]
    for k in dropped:
        del state[k]
    with pytest.raises(
        ConversionError, match=rf"missing keys {len(dropped)}: backbone\.block2\.0\."
    ):
        convert.to_flax(_write(tmp_path, state), "daformer", _tiny_cfg())


def test_unexpected_keys_are_listed(tmp_path):
    state = _random_state(_tiny_cfg())
    state["backbone.block9.0.attn.q.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(
        ConversionError, match=r"unexpected keys 1: backbone\.block9\.0\.attn\.q\.weight"
    ):
        convert.to_flax(_write(tmp_path, state), "daformer", _tiny_cfg())


def test_shape_mismatch_names_both_shapes(tmp_path):
    b0 = base.get_model_config()
    b0.backbone = "b0"
    state = _random_state(b0.to_dict())
    with pytest.raises(
        ConversionError,
        match=r"(?s)unexpected keys 56: .*shape mismatches 169: backbone\.block1\.0\.attn\.kv\.bias: checkpoint \(64,\) vs model \(32,\)",
    ):
        convert.to_flax(_write(tmp_path, state), "daformer", _tiny_cfg())


def test_not_a_checkpoint_and_unknown_format(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="notes.txt is not a PyTorch checkpoint"):
        convert.to_flax(str(text), "mit", _tiny_cfg())
    with pytest.raises(
        ConversionError,
        match=r"--format='onnx': expected one of \['daformer', 'hf', 'mit', 'mmseg', 'sepico'\]",
    ):
        convert.to_flax(str(text), "onnx", _tiny_cfg())
    with pytest.raises(ConversionError, match="no such file"):
        convert.to_flax(str(tmp_path / "absent.pth"), "mit", _tiny_cfg())
    torch.save({"state_dict": {"a": torch.zeros(2)}, "meta": {}}, tmp_path / "x.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="holds a list, not a state dict"):
        convert.to_flax(str(tmp_path / "list.pth"), "mit", _tiny_cfg())


def test_wrong_submodel_and_wrong_format_are_explained(tmp_path):
    state = {f"model.{k}": v for k, v in _random_state(_tiny_cfg()).items()}
    path = _write(tmp_path, state)
    with pytest.raises(ConversionError, match=r"holds \['model'\], not 'ema_model'"):
        convert.to_flax(path, "daformer", _tiny_cfg(), which="ema_model")
    with pytest.raises(ConversionError, match="is not an mmseg MiT key"):
        convert.to_flax(path, "mmseg", _tiny_cfg())
    variables = convert.canonical_to_variables(
        _random_state(_tiny_cfg()), abstract_variables(build_segmentor(_tiny_cfg()))
    )
    with pytest.raises(
        ConversionError, match="HF SegFormer has no DAFormer head; export it with --format daformer"
    ):
        convert.from_flax(variables, "hf")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pgpc_jax.convert", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_round_trip_and_failure_writes_nothing(tmp_path):
    state = _random_state(_tiny_cfg())
    src = _write(tmp_path, {f"model.{k}": v for k, v in state.items()})
    out_dir, out_pth = tmp_path / "flax", tmp_path / "back.pth"
    r = _cli(
        "to-flax",
        f"--src={src}",
        "--format=daformer",
        "--config=configs/tiny.py",
        f"--out={out_dir}",
    )
    assert r.returncode == 0, r.stderr
    r = _cli(
        "to-torch",
        f"--src={out_dir}",
        "--format=daformer",
        f"--out={out_pth}",
        "--legacy_serialization",
    )
    assert r.returncode == 0, r.stderr
    back = torch.load(out_pth, map_location="cpu", weights_only=True)
    _assert_bit_exact({k[len("model.") :]: v.numpy() for k, v in back["state_dict"].items()}, state)

    del state["decode_head.conv_seg.bias"]
    bad = _write(tmp_path, state, "bad.pth")
    r = _cli(
        "to-flax",
        f"--src={bad}",
        "--format=daformer",
        "--config=configs/tiny.py",
        f"--out={tmp_path / 'never'}",
    )
    assert r.returncode == 2
    assert "missing keys 1: decode_head.conv_seg.bias" in r.stderr
    assert not (tmp_path / "never").exists()
    r = _cli(
        "to-flax",
        f"--src={src}",
        "--format=daformer",
        "--config=configs/tiny.py",
        "--config.model.backbon=b0",
        f"--out={tmp_path / 'never'}",
    )
    assert r.returncode != 0 and "backbon" in r.stderr
    assert not (tmp_path / "never").exists()
