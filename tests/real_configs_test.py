"""The benchmark configs as a user runs them, on data our own builder made from fixtures in the
exact on-disk layouts of GTA5, Cityscapes, SYNTHIA and Dark Zurich (`--resize daformer`).

Every real config's dataset and split names open and its crops fit. Each benchmark's PGPC config
then runs end to end through `python -m pgpc_jax.main`'s entry point with only the model size and
the step counts overridden: the real crops, scales, batch, rare-class sampling, feature distance
from an ImageNet-format (NVlabs `mit`) encoder file, contrast grid and evaluation scale; 2 steps,
evaluation, checkpoints, an export read back by PyTorch as DAFormer's tools/test.py reads it (same
logits), and a re-run that resumes from the workdir.
"""

import importlib
import json
import os

import data_fixtures as fx
import jax
import numpy as np
import pytest
import torch_segmentor

from data_pipelines import build
from pgpc_jax import convert, export, main, sharding, train
from pgpc_jax.models import segmentor

BENCHMARKS = ("gta2cs", "synthia2cs", "cs2darkzurich")
# `configs/<benchmark>.py:<method>`, as `--config` names them.
CONFIGS = [f"{b}:{m}" for b in BENCHMARKS for m in ("pgpc", "daformer", "source_only")]
# Fixture sizes with enough pixels per class for DAFormer's RCS (3000 pixels per class in an
# image) and the originals' aspect ratios; the builds resize them to each DAFormer scale.
SIZES = {"gta5": (220, 400), "cityscapes": (200, 400), "synthia": (238, 400)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    raw, out = tmp_path_factory.mktemp("downloads"), str(tmp_path_factory.mktemp("tfds"))
    fx.make_gta(str(raw / "gta"), count=3, height=SIZES["gta5"][0], width=SIZES["gta5"][1])
    fx.make_cityscapes(str(raw / "cityscapes"), *SIZES["cityscapes"])
    fx.make_synthia(str(raw / "synthia"), 3, *SIZES["synthia"])
    fx.make_dark_zurich(str(raw / "dark_zurich"))
    for name, folder in (
        ("gta5", "gta"),
        ("cityscapes", "cityscapes"),
        ("synthia", "synthia"),
        ("dark_zurich", "dark_zurich"),
    ):
        args = ["--dataset", name, "--manual_dir", str(raw / folder), "--data_dir", out]
        assert build.main([*args, "--resize", "daformer"]) == 0
    return out


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A tiny encoder in the layout of NVlabs' mit_b5.pth (what the real configs start from)."""
    model_cfg = importlib.import_module("configs.gta2cs").get_config().model
    model_cfg.backbone, model_cfg.head_embed_dim, model_cfg.head_channels = "tiny", 16, 16
    variables = segmentor.init_variables(segmentor.build_segmentor(model_cfg), jax.random.key(1))
    path = str(tmp_path_factory.mktemp("pretrained") / "mit_tiny.pth")
    convert.write_torch(path, convert.from_flax(variables, "mit"), None, legacy=False)
    return path


def _user_config(name, data_dir, imagenet_file):
    """The config as shipped (`name`: benchmark[:method]), with only the model size and the step
    counts made small."""
    benchmark, _, method = name.partition(":")
    module = importlib.import_module(f"configs.{benchmark}")
    config = module.get_config(method) if method else module.get_config()
    config.data.data_dir = data_dir
    config.init_from.path = imagenet_file
    config.model.backbone = "tiny"
    config.model.head_embed_dim = config.model.head_channels = 16
    config.num_train_steps = 2
    config.log_every_steps = config.checkpoint_every_steps = 1
    config.eval_every_steps = 2
    config.eval.num_visualizations = 1
    config.mesh.num_devices = 2  # the global batch of 2 over 2 of the 8 test devices
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_real_config_opens_its_datasets(name, data_dir, imagenet_file):
    config = _user_config(name, data_dir, imagenet_file)
    datasets = train._datasets(config, sharding.make_mesh(2))
    assert min(datasets["sizes"].values()) >= 2
    batch = datasets["source"][0]
    assert batch["image"].shape == (2, 512, 512, 3) and batch["label"].shape == (2, 512, 512)
    assert datasets["target"][0]["image"].shape == (2, 512, 512, 3)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_config_end_to_end(name, data_dir, imagenet_file, tmp_path, capsys):
    config = _user_config(name, data_dir, imagenet_file)
    workdir = str(tmp_path / name)
    assert main.run(config, workdir) == 0
    out = capsys.readouterr().out
    assert "evaluation at step 2" in out and "mIoU16" in out
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert {"eval/miou", "eval/miou16", "eval/miou13"} <= set(final)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert all(r["train/loss_fd"] is not None for r in rows if "train/loss" in r)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    assert os.listdir(os.path.join(workdir, "best")) == ["2"]
    assert os.listdir(os.path.join(workdir, "predictions", "step_000002"))

    # The trained run exported for DAFormer's tools/test.py gives our logits in PyTorch.
    export.export_run(workdir, "daformer", str(tmp_path / "run.pth"))
    error = torch_segmentor.run_export_error(str(tmp_path / "run.pth"), workdir, (1, 75, 101, 3))
    assert error < 1e-5, error

    # The same command again resumes from the workdir: the run is done, so it evaluates.
    assert main.run(config, workdir) == 0
    out = capsys.readouterr().out
    assert f"resumed from {os.path.realpath(workdir)} at step 2" in out
    again = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert again["eval/miou"] == pytest.approx(final["eval/miou"], abs=1e-6)


def test_sepico_day_night_config_end_to_end(data_dir, imagenet_file, tmp_path, capsys):
    """`configs/cs2darkzurich.py:sepico` on the Dark Zurich fixture: as shipped, the night images
    come with their paired day images (whole 1280x720, transformed alike) next to 640x640
    Cityscapes crops; then two steps of the day-night variant at a quarter of those sizes (the
    second with the contrastive terms) and an evaluation, through the command's entry point."""
    config = _user_config("cs2darkzurich:sepico", data_dir, imagenet_file)
    datasets = train._datasets(config, sharding.make_mesh(2))
    target = datasets["target"][0]
    assert target["image"].shape == target["day_image"].shape == (2, 720, 1280, 3)
    assert not np.array_equal(target["image"], target["day_image"])
    assert datasets["source"][0]["image"].shape == (2, 640, 640, 3)

    # A quarter of the sizes keeps the CPU run short; the wiring is the same.
    config.data.source.crop_size = config.eval.crop_size = (160, 160)
    config.data.target.scale = config.data.val.scale = (320, 180)
    config.data.target.crop_size = (180, 320)
    config.sepico.channels = 16
    config.sepico.start_step = 1
    workdir = str(tmp_path / "sepico")
    assert main.run(config, workdir) == 0
    assert "evaluation at step 2" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert train_rows[0]["train/loss_contrast_src"] == 0.0
    assert train_rows[1]["train/loss_contrast_src"] > 0.0
    assert all(np.isfinite(r["train/loss"]) for r in train_rows)
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert np.isfinite(final["eval/miou"])
