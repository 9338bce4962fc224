"""The class set of a run (`pgpc_jax/class_set.py`): taken from the data for `classes='data'`,
checked against the model and between the datasets at start-up (one line naming both sides,
nothing written), adopted from a run by the commands that read its weights; mIoU16 / mIoU13
only for the Cityscapes classes."""

import json
import os
import types

import numpy as np
import pytest

from configs import folder as folder_config
from configs import gta2cs
from data_pipelines import build, folder_example, labels
from pgpc_jax import class_set, main, scores
from pgpc_jax.config_checks import ConfigError

NAMES = tuple(folder_example.GROUPS)
COLORS = folder_example.COLORS


def _split(names, palette=None, dataset="folder/mine"):
    return types.SimpleNamespace(
        class_names=tuple(names), palette=palette, builder_dir=f"/data/{dataset}/1.0.0"
    )


def _config(classes="data", num_classes=0):
    config = folder_config.get_config("daformer,cpu")
    config.classes, config.model.num_classes = classes, num_classes
    return config


def test_the_class_set_comes_from_the_data():
    config = _config()
    splits = dict(source=_split(NAMES, COLORS), target=_split(NAMES), val=_split(NAMES))
    class_set.resolve(config, splits)
    assert config.model.num_classes == 5
    assert class_set.names_and_colors(config) == (NAMES, COLORS)
    # No colours in the build: generated ones, one per class, none black.
    config = _config()
    class_set.resolve(config, dict(source=_split(NAMES), val=_split(NAMES)))
    colors = class_set.names_and_colors(config)[1]
    assert len(set(colors)) == 5 and (0, 0, 0) not in colors


def test_model_and_data_that_disagree_stop_naming_both():
    splits = dict(source=_split(NAMES), val=_split(NAMES))
    with pytest.raises(ConfigError) as e:
        class_set.resolve(_config(num_classes=19), splits)
    assert str(e.value).startswith("model.num_classes=19 but data.source.dataset='folder/mine' ")
    assert "has 5 classes (ground, structure" in str(e.value)
    assert "--config.model.num_classes=5" in str(e.value)
    # The 19-class label space on a 5-class build.
    with pytest.raises(ConfigError, match="classes='cityscapes' but data.source.dataset="):
        class_set.resolve(_config("cityscapes", 19), splits)
    # Two domains built with different class files.
    other = dict(source=_split(NAMES), val=_split(NAMES[::-1], dataset="folder/theirs"))
    with pytest.raises(ConfigError, match="but data.val.dataset='folder/theirs' has 5 classes"):
        class_set.resolve(_config(), other)
    # Two names that become one metric key.
    twins = ("left lane", "left_lane", "sky")
    with pytest.raises(ConfigError, match=r"the class names \['left lane', 'left_lane'\]"):
        class_set.resolve(_config(), dict(source=_split(twins), val=_split(twins)))
    # A class index of the config outside the class set.
    config = _config()
    config.uda.fd_lambda, config.uda.fd_classes = 0.005, (3, 6)
    with pytest.raises(ConfigError, match=r"uda.fd_classes=\(3, 6\) names classes \[6\]"):
        class_set.resolve(config, splits)


def test_cityscapes_configs_are_unchanged():
    config = gta2cs.get_config("daformer")
    class_set.resolve(config, dict(source=_split(labels.CLASSES), val=_split(labels.CLASSES)))
    assert config.model.num_classes == 19 and config.class_names == ()
    assert class_set.names_and_colors(config) == (labels.CLASSES, labels.PALETTE)


def test_mean_ious_of_subsets_only_for_cityscapes():
    cm = np.diag(np.arange(1, 20))
    cityscapes = scores.metrics_from_confusion(cm, labels.CLASSES)
    assert {"eval/miou16", "eval/miou13"} <= set(cityscapes)
    own = scores.metrics_from_confusion(cm, [f"c{i}" for i in range(19)])
    assert "eval/miou16" not in own and "eval/iou/c18" in own
    assert scores.iou_table(own, [f"c{i}" for i in range(19)]).count("mIoU") == 1


def _fake_run(path, names, colors, num_classes):
    os.makedirs(os.path.join(path, "checkpoints"))
    config = {"classes": "data", "class_names": names, "class_colors": colors}
    config["model"] = {"num_classes": num_classes}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_commands_adopt_the_class_set_of_the_run(tmp_path):
    run = _fake_run(tmp_path / "run", list(NAMES), [list(c) for c in COLORS], 5)
    config = _config()
    class_set.adopt_from_weights(config, [run])
    assert config.model.num_classes == 5
    assert class_set.names_and_colors(config) == (NAMES, COLORS)
    with pytest.raises(ConfigError, match="config.json names 5 classes .* but the config 19"):
        class_set.adopt_from_weights(gta2cs.get_config("daformer"), [run])
    # classes='data' and weights that carry no class set (a .pth): say what to give.
    with pytest.raises(ConfigError, match="give the run directory"):
        class_set.adopt_from_weights(_config(), [str(tmp_path / "model.pth")])


def test_training_with_the_wrong_class_count_writes_nothing(tmp_path, capsys):
    """Through the command's entry point: a 19-class model on a 5-class folder build is one
    line naming both, exit 2, no run directory."""
    folder_example.write_example_pair(str(tmp_path / "raw"), 2, 1, (64, 32))
    raw = tmp_path / "raw"
    assert (
        build.main(
            [
                "--dataset",
                "folder",
                "--source",
                str(raw / "source"),
                "--target",
                str(raw / "target"),
                "--target_val",
                str(raw / "target_val"),
                "--classes",
                str(raw / "classes.json"),
                "--name",
                "mine",
                "--data_dir",
                str(tmp_path / "data"),
            ]  # fmt: skip
        )
        == 0
    )
    config = _config(num_classes=19)
    config.data.folder = "mine"
    config.data.data_dir = str(tmp_path / "data")
    config.mesh.num_devices = 2  # the global batch of 2 over 2 of the 8 test devices
    capsys.readouterr()
    assert main.run(config, str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.num_classes=19 but ")
    assert "'folder/mine' has 5 classes" in err[0]
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_labels_outside_the_class_set(tmp_path):
    """Raw ids where class indices are expected would silently leave the score."""
    from PIL import Image

    from pgpc_jax import evaluate

    path = str(tmp_path / "label.png")
    Image.fromarray(np.array([[0, 4, 255], [7, 11, 2]], np.uint8)).save(path)
    assert evaluate.load_label(path, 12).shape == (2, 3)
    with pytest.raises(evaluate.EvaluateError, match="label values 7, 11 are not classes of"):
        evaluate.load_label(path, 5)


def test_converting_for_a_class_set_of_the_data_needs_its_names(tmp_path):
    """`convert to-flax --config configs/folder.py` (classes='data') would write weights that name
    no classes: one line asking for them, nothing written."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgpc_jax.convert",
            "to-flax",
            "--config",
            "configs/folder.py:daformer,cpu",
            "--src",
            str(tmp_path / "x.pth"),
            "--format",
            "daformer",
            "--out",
            str(tmp_path / "out"),
        ],  # fmt: skip
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "classes='data' and names no classes" in result.stderr
    assert not (tmp_path / "out").exists()
