"""Prediction CLI: outputs, DAFormer inference numerics, weight formats, bad input."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configs import tiny
from pgpc_jax import checkpointing, convert, predict, weights
from pgpc_jax.models.segmentor import build_segmentor, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A Flax weights directory of the tiny config's model with random weights."""
    cfg = tiny.get_config().model.to_dict()
    model = build_segmentor(cfg)
    variables = init_variables(model, jax.random.key(0))
    path = str(tmp_path_factory.mktemp("weights") / "tiny")
    checkpointing.save_variables(path, variables, cfg, {"classes": "cityscapes"})
    return path, cfg, model, variables


def _image(path, h, w, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_outputs_follow_daformer_inference(tiny_weights, tmp_path):
    path, cfg, model, _ = tiny_weights
    rgb = _image(tmp_path / "a.png", 75, 101)
    model, variables = predict.load_model(cfg, path, "flax")
    written = predict.predict_files(
        model, variables, [str(tmp_path / "a.png")], str(tmp_path / "out"), save_logits=True
    )
    assert len(written) == 3
    logits = np.load(tmp_path / "out" / "a_logits.npy")
    assert logits.shape == (75, 101, 19) and logits.dtype == np.float32
    # Independent check: stride-4 logits, upsampled by torch as mmseg does.
    x = ((rgb.astype(np.float32) - predict.MEAN) / predict.STD)[None]
    low = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])(variables, x)
    ref = (
        F.interpolate(
            torch.from_numpy(np.array(low).transpose(0, 3, 1, 2)),
            size=(75, 101),
            mode="bilinear",
            align_corners=False,
        )[0]
        .numpy()
        .transpose(1, 2, 0)
    )
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)
    ids = np.asarray(Image.open(tmp_path / "out" / "a_trainids.png"))
    np.testing.assert_array_equal(ids, logits.argmax(-1))
    color = np.asarray(Image.open(tmp_path / "out" / "a_color.png"))
    palette = np.asarray(convert.class_table("cityscapes")[1], np.uint8)
    np.testing.assert_array_equal(color, palette[ids])


def test_resize_runs_the_network_at_the_given_scale(tiny_weights, tmp_path):
    path, cfg, _, _ = tiny_weights
    _image(tmp_path / "b.png", 64, 96, seed=1)
    model, variables = predict.load_model(cfg, path, "flax")
    out = str(tmp_path / "out")
    predict.predict_files(
        model, variables, [str(tmp_path / "b.png")], out, resize=(48, 32), save_logits=True
    )
    resized = np.load(os.path.join(out, "b_logits.npy"))
    predict.predict_files(model, variables, [str(tmp_path / "b.png")], out, save_logits=True)
    full = np.load(os.path.join(out, "b_logits.npy"))
    assert resized.shape == full.shape == (64, 96, 19)
    assert not np.allclose(resized, full)
    with pytest.raises(predict.PredictError, match="--resize='1024x512': expected W,H"):
        predict.parse_size("1024x512")


def test_bad_inputs_are_named(tiny_weights, tmp_path):
    path, cfg, model, variables = tiny_weights
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _image(tmp_path / "ok.png", 32, 32)
    with pytest.raises(predict.PredictError, match="broken.png is not a readable image"):
        predict.predict_files(
            model,
            variables,
            [str(tmp_path / "ok.png"), str(tmp_path / "broken.png")],
            str(tmp_path / "out"),
        )
    assert not (tmp_path / "out").exists()  # nothing written before the check
    other = dict(cfg, num_classes=7, layer_norm="hf")
    with pytest.raises(
        weights.WeightsError,
        match="model.num_classes: weights 19 vs config 7, model.layer_norm: weights 'mmseg' vs "
        "config 'hf'",
    ):
        weights.load_model(other, path, "flax")
    # Neither a weights directory nor a run: both are named. A WeightsError is a CheckpointError,
    # which every CLI (and main.py, for init_from) reports as one line.
    with pytest.raises(
        checkpointing.CheckpointError,
        match="is not a pgpc_jax weights directory .* nor a training run directory",
    ):
        predict.load_model(cfg, str(tmp_path), "flax")


def test_cli_with_a_daformer_checkpoint(tiny_weights, tmp_path):
    path, _, _, variables = tiny_weights
    state = convert.from_flax(variables, "daformer")
    torch.save(
        {"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}},
        tmp_path / "latest.pth",
    )
    _image(tmp_path / "c.png", 40, 56)
    cmd = [
        sys.executable,
        "-m",
        "pgpc_jax.predict",
        "--config=configs/tiny.py",
        f"--weights={tmp_path / 'latest.pth'}",
        "--weights-format=daformer",
        "--save-logits",
        f"--out={tmp_path / 'out'}",
        str(tmp_path / "c.png"),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[1/1]" in r.stdout and "img/s" in r.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["c_color.png", "c_logits.npy", "c_trainids.png"]
    r = subprocess.run(
        cmd[:-1] + [str(tmp_path / "missing.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "missing.png: no such image" in r.stderr
