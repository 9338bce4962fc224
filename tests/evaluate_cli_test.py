"""Evaluation CLI: end to end on generated images with the tiny config, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from data_pipelines import pipeline
from pgpc_jax import checkpointing, evaluate, evaluation
from pgpc_jax.models.segmentor import build_segmentor, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset(root, sizes):
    """Cityscapes-like layout: images/<city>/<n>_leftImg8bit.png, labels/<city>/<n>_gt.png."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        for sub in ("images/city", "labels/city"):
            os.makedirs(root / sub, exist_ok=True)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 19, (h, w)).astype(np.uint8)
        label[: h // 4] = 255
        Image.fromarray(image).save(root / "images/city" / f"c_{i:02d}_leftImg8bit.png")
        Image.fromarray(label).save(root / "labels/city" / f"c_{i:02d}_gt.png")


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "pgpc_jax.evaluate", "--config", "configs/tiny.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        # The tests' persistent compilation cache: the in-process check then reuses its compile.
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
        },
        timeout=120,
    )


def test_cli_end_to_end(tmp_path):
    cfg = tiny.get_config().model.to_dict()
    model = build_segmentor(cfg)
    variables = init_variables(model, jax.random.key(0))
    weights = str(tmp_path / "weights")
    checkpointing.save_variables(weights, variables, cfg, {"classes": "cityscapes"})
    _dataset(tmp_path, [(48, 64)] * 3)
    args = [
        f"--weights={weights}",
        f"--images={tmp_path / 'images'}",
        f"--labels={tmp_path / 'labels'}",
        "--image-suffix=_leftImg8bit.png",
        "--label-suffix=_gt.png",
        "--resize=40,30",
        "--num-visualizations=2",
        f"--out={tmp_path / 'out'}",
    ]
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    assert "| traffic light |" in result.stdout and "3 images, mode whole" in result.stdout
    saved = json.loads(open(tmp_path / "out" / "metrics.json").read())
    assert saved["num_images"] == 3 and saved["resize"] == [40, 30]
    assert len(os.listdir(tmp_path / "out" / "predictions")) == 4

    # The same numbers in process: labels at 48x64, the network at 30x40.
    pairs = evaluate.find_pairs(
        str(tmp_path / "images"), str(tmp_path / "labels"), "_leftImg8bit.png", "_gt.png"
    )
    batches = list(evaluate.iterate_batches(pairs, 1, (40, 30)))
    assert batches[0]["image"].shape == (1, 30, 40, 3) and batches[0]["label"].shape == (1, 48, 64)
    metrics, _ = evaluation.evaluate(model, variables, batches, 19)
    assert saved["metrics"]["eval/num_pixels"] == 3 * 36 * 64
    for key, value in metrics.items():
        if np.isnan(value):
            assert saved["metrics"][key] is None, key
        else:
            assert saved["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_cli_ensemble_of_two_weights(tmp_path):
    """`--weights W1,W2`: the argmax of the mean of both models' softmax, the paths listed in
    metrics.json."""
    cfg = tiny.get_config().model.to_dict()
    model = build_segmentor(cfg)
    paths, variables = [], []
    for seed in (0, 1):
        v = init_variables(model, jax.random.key(seed))
        paths.append(str(tmp_path / f"weights{seed}"))
        checkpointing.save_variables(paths[-1], v, cfg, {"classes": "cityscapes"})
        variables.append(v)
    _dataset(tmp_path, [(24, 32)] * 2)
    result = _run(
        f"--weights={paths[0]},{paths[1]}",
        f"--images={tmp_path / 'images'}",
        f"--labels={tmp_path / 'labels'}",
        "--image-suffix=_leftImg8bit.png",
        "--label-suffix=_gt.png",
        f"--out={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stderr
    assert "2 images, mode whole, ensemble of 2 models" in result.stdout
    saved = json.loads(open(tmp_path / "out" / "metrics.json").read())
    assert saved["weights"] == paths
    pairs = evaluate.find_pairs(
        str(tmp_path / "images"), str(tmp_path / "labels"), "_leftImg8bit.png", "_gt.png"
    )
    metrics, _ = evaluation.evaluate(model, variables, evaluate.iterate_batches(pairs, 1), 19)
    assert saved["metrics"]["eval/num_pixels"] == 2 * 18 * 32
    assert saved["metrics"]["eval/miou"] == pytest.approx(metrics["eval/miou"], rel=1e-6)


def test_cli_reports_missing_label(tmp_path):
    _dataset(tmp_path, [(16, 16)] * 2)
    os.remove(tmp_path / "labels/city/c_01_gt.png")
    result = _run(
        "--weights=unused",
        f"--images={tmp_path / 'images'}",
        f"--labels={tmp_path / 'labels'}",
        "--image-suffix=_leftImg8bit.png",
        "--label-suffix=_gt.png",
    )
    assert result.returncode == 2
    assert "1 image(s) have no label file" in result.stderr
    assert "c_01_leftImg8bit.png" in result.stderr and "c_01_gt.png" in result.stderr


def test_size_mismatch_names_both_files(tmp_path):
    _dataset(tmp_path, [(16, 16), (16, 24)])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "labels/city/c_01_gt.png")
    pairs = evaluate.find_pairs(
        str(tmp_path / "images"), str(tmp_path / "labels"), "_leftImg8bit.png", "_gt.png"
    )
    assert [os.path.basename(p) for p, _ in pairs] == [
        "c_00_leftImg8bit.png",
        "c_01_leftImg8bit.png",
    ]
    with pytest.raises(evaluate.EvaluateError, match="c_01_leftImg8bit.png is 24x16 but .*c_01_gt"):
        evaluate.check_sizes(pairs)


def test_default_suffixes_match_by_stem(tmp_path):
    for d in ("images", "labels"):
        os.makedirs(tmp_path / d)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "labels" / "a.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    pairs = evaluate.find_pairs(str(tmp_path / "images"), str(tmp_path / "labels"))
    assert pairs == [(str(tmp_path / "images" / "a.jpg"), str(tmp_path / "labels" / "a.png"))]
    with pytest.raises(evaluate.EvaluateError, match=r"no \*\.jpg found"):
        evaluate.find_pairs(str(tmp_path / "labels"), str(tmp_path / "labels"), ".jpg")


def test_train_ids_become_cityscapes_label_ids():
    """The prediction files of --cityscapes-eval hold label ids: our table inverted equals
    cityscapesscripts' trainId2label."""
    from cityscapesscripts.helpers import labels as cs_labels

    train_ids = np.arange(19, dtype=np.uint8).reshape(1, 19)
    want = [[cs_labels.trainId2label[t].id for t in range(19)]]
    np.testing.assert_array_equal(evaluate.train_ids_to_label_ids(train_ids), want)


def test_cityscapes_eval_without_cityscapesscripts_is_one_line(monkeypatch):
    # None in sys.modules makes the import fail, as when the package is not installed.
    monkeypatch.setitem(sys.modules, "cityscapesscripts.evaluation", None)
    with pytest.raises(evaluate.EvaluateError, match="pip install cityscapesscripts") as e:
        evaluate.cityscapes_eval_module()
    assert "\n" not in str(e.value)


def test_cityscapes_names_and_missing_ground_truth(tmp_path):
    _dataset(tmp_path, [(8, 8)])  # images/city/c_00_leftImg8bit.png: not a Cityscapes name
    pairs = evaluate.find_pairs(
        str(tmp_path / "images"), str(tmp_path / "labels"), "_leftImg8bit.png", "_gt.png"
    )
    with pytest.raises(evaluate.EvaluateError, match="without a Cityscapes name"):
        evaluate.cityscapes_files(pairs, str(tmp_path / "images"), str(tmp_path), "out")
    image = tmp_path / "images" / "city" / "ulm_000001_000019_leftImg8bit.png"
    os.rename(tmp_path / "images/city/c_00_leftImg8bit.png", image)
    pairs = [(str(image), "unused")]
    with pytest.raises(
        evaluate.EvaluateError, match="(?s)1 ground truth file.*ulm_000001_000019_gt"
    ):
        evaluate.cityscapes_files(pairs, str(tmp_path / "images"), str(tmp_path / "gt"), "out")
    gt = tmp_path / "gt" / "city" / "ulm_000001_000019_gtFine_labelIds.png"
    os.makedirs(gt.parent)
    gt.write_bytes(b"")
    files = evaluate.cityscapes_files(pairs, str(tmp_path / "images"), str(tmp_path / "gt"), "out")
    assert files == [(str(gt), os.path.join("out", "city", "ulm_000001_000019_pred_labelIds.png"))]


def test_resized_inputs_are_the_validation_pipelines(tmp_path):
    """`--resize` gives the network exactly what a run's own evaluation gives it (the uint8
    image resized and rounded, then normalised, as DAFormer's test pipeline), so an exported
    run evaluates to the run's own mIoU."""
    _dataset(tmp_path, [(48, 64)] * 2)
    pairs = evaluate.find_pairs(
        str(tmp_path / "images"), str(tmp_path / "labels"), "_leftImg8bit.png", "_gt.png"
    )
    batches = list(evaluate.iterate_batches(pairs, 2, (40, 30)))
    source = [
        {"image": np.asarray(Image.open(i)), "label": np.asarray(Image.open(label))}
        for i, label in pairs
    ]
    (expected,) = list(pipeline.val_dataset(source, batch_size=2, scale=(40, 30)))
    np.testing.assert_array_equal(batches[0]["image"], expected["image"])
    np.testing.assert_array_equal(batches[0]["label"], expected["label"])
