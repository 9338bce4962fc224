"""The pseudo-label command (`pgpc_jax/pseudo_label.py`, its inputs in
`pgpc_jax/pseudo_label_inputs.py`) and the ensemble evaluation: the command end to end on
generated images with two tiny models (PNG ids, ignore, summary, classes.json, a folder build of
the output, the thresholds as `uda/class_thresholds.py` computes them over all confidences), the
ensemble as the mean of the models' softmax, the styled and grayscale inputs, the `--weights W1
W2` argument forms, bad input as one `error:` line, and a built split (`--dataset` / `--split`,
`--style-dataset` / `--style-split`) as the input, on the tiny embedded build. The exact
thresholds from the histogram are tested in `tests/uda_class_thresholds_test.py`."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny_run import build_tiny_data

from configs import tiny
from data_pipelines import build, folder, sources, transforms
from pgpc_jax import checkpointing, evaluation, predict, pseudo_label, scores, weights
from pgpc_jax import pseudo_label_inputs as inputs
from pgpc_jax.models import segmentor
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.uda import class_thresholds, fourier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (24, 32)  # (H, W) of the generated target images


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two Flax weights directories of the tiny config's model (different random weights)."""
    cfg = tiny.get_config().model.to_dict()
    model = segmentor.build_segmentor(cfg)
    root = tmp_path_factory.mktemp("weights")
    paths, variables = [], []
    init = jax.jit(lambda key: segmentor.init_variables(model, key))  # one compile for both
    for seed in (0, 1):
        v = init(jax.random.key(seed))
        path = str(root / f"m{seed}")
        checkpointing.save_variables(path, v, cfg, {"classes": "cityscapes"})
        paths.append(path)
        variables.append(v)
    return paths, model, variables


def _images(root, names=("city/a.png", "city/b.png", "other/c.png"), size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Smooth blobs plus noise: the models' predictions vary over the image.
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(base).resize(size[::-1], Image.BILINEAR), np.int32)
        image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(path)
        out[name] = image
    return out


def _env():
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
    }


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "pgpc_jax.pseudo_label", "--config", "configs/tiny.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )


def test_command_end_to_end(two_models, tmp_path):
    paths, model, variables = two_models
    images = _images(tmp_path / "target")
    out = tmp_path / "out"
    # `--weights W1 W2`: two paths after one flag.
    result = _run("--weights", *paths, f"--images={tmp_path / 'target'}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "pseudo-labelling 3/3 images" in result.stderr and "images/s" in result.stderr
    assert "| **ignored (255)**" in result.stdout and "2 model(s)" in result.stdout

    summary = json.loads((out / pseudo_label.SUMMARY_FILE).read_text())
    assert summary["models"] == paths and summary["num_images"] == 3
    assert summary["num_pixels"] == 3 * SIZE[0] * SIZE[1]
    names = list(summary["thresholds"])
    assert len(names) == 19 and names[0] == "road"
    counts = np.zeros(256, np.int64)
    for name, image in images.items():
        copied = np.asarray(Image.open(out / "train" / "images" / name))
        np.testing.assert_array_equal(copied, image)  # a copy, not a link
        assert not os.path.islink(out / "train" / "images" / name)
        label = np.asarray(Image.open(out / "train" / "labels" / name))
        assert label.dtype == np.uint8 and label.shape == SIZE
        assert set(np.unique(label)) <= set(range(19)) | {255}
        counts += np.bincount(label.ravel(), minlength=256)
    assert counts[255] > 0 and counts[:19].sum() > 0
    assert summary["ignored_pixels"] == counts[255]
    assert summary["ignored_share"] == pytest.approx(counts[255] / counts.sum())
    for c, name in enumerate(names):
        assert summary["kept_pixels"][name] == counts[c], name
        predicted = summary["predicted_pixels"][name]
        if predicted == 0:  # an absent class: threshold 0, no share
            assert summary["thresholds"][name] == 0.0 and summary["kept_share"][name] is None
        else:
            assert summary["kept_share"][name] == pytest.approx(counts[c] / predicted)
            # At least the pixels from the 66 % index up are kept.
            assert counts[c] >= predicted - class_thresholds.order_index(predicted)
    assert sum(summary["predicted_pixels"].values()) == counts.sum()

    # The same labels in process: the mean softmax of both models, the released rule.
    labeller = pseudo_label.make_labeller(model)
    predicted = [
        labeller(variables, predict.normalize(images[name]), SIZE) for name in sorted(images)
    ]
    labels, conf = (np.stack(x) for x in zip(*predicted))
    want = class_thresholds.class_thresholds(labels, conf, 19)
    np.testing.assert_array_equal(list(summary["thresholds"].values()), want)
    pseudo = np.asarray(class_thresholds.apply_thresholds(labels, conf, want))
    for i, name in enumerate(sorted(images)):
        written = np.asarray(Image.open(out / "train" / "labels" / name))
        np.testing.assert_array_equal(written, pseudo[i])

    # classes.json as the folder builder reads it, and the output builds as a training split.
    names_read, _, id_map = folder.read_class_table(str(out / "classes.json"))
    assert list(names_read) == names and id_map == {i: i for i in range(19)}
    status = build.main(
        ["--dataset", "folder", "--manual_dir", str(out), "--data_dir", str(tmp_path / "tfds"),
         "--name", "pseudo"]
    )  # fmt: skip
    assert status == 0
    split = sources.open_split(str(tmp_path / "tfds"), "folder/pseudo", "train")
    assert len(split) == 3
    built = sorted(np.bincount(split[i]["label"].ravel(), minlength=256)[255] for i in range(3))
    assert sum(built) == counts[255]


def test_ensemble_is_the_mean_of_the_models_softmax(two_models):
    _, model, variables = two_models
    rng = np.random.default_rng(2)
    images = predict.normalize(rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8))
    labels = rng.integers(0, 19, (2, 20, 28)).astype(np.int32)  # labels larger than the input

    @jax.jit
    def softmax(v, x):  # one model's softmax at the input size, as mmseg's encode_decode
        return jax.nn.softmax(segmentor.predict_logits(model, v, x), axis=-1)

    probs = [np.asarray(softmax(v, images)) for v in variables]
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # two different models
    mean = np.asarray(resize_bilinear(jnp.asarray((probs[0] + probs[1]) / 2), (20, 28)))
    # evaluate(): the ensemble's confusion matrix is that of the mean's argmax.
    batch = [{"image": images, "label": labels}]
    metrics, _ = evaluation.evaluate(model, list(variables), batch, 19)
    cm = scores.confusion_matrix(jnp.asarray(mean.argmax(-1)), jnp.asarray(labels), 19)
    want = scores.metrics_from_confusion(np.asarray(cm, np.int64))
    want["eval/num_pixels"] = float(labels.size)
    assert metrics.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_equal(metrics[key], value)
    # The labeller: argmax and max of the same mean.
    lab, conf = pseudo_label.make_labeller(model)(variables, images[0], (20, 28))
    np.testing.assert_array_equal(lab, mean[0].argmax(-1))
    np.testing.assert_allclose(conf, mean[0].max(-1), rtol=1e-6)


def test_styling_and_grayscale_inputs():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    style = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    style[..., 0] //= 4  # a darker red channel: another mean (the amplitude at frequency 0)
    plain = predict.normalize(target)
    np.testing.assert_array_equal(inputs.network_input(target), plain)
    # A style image equal to the target leaves it unchanged.
    same = inputs.network_input(target, style=target, beta=0.1, window="numpy")
    np.testing.assert_allclose(same, plain, atol=2e-4)
    # Another one: the target's phase, the style's low frequencies (resized to the target).
    styled = inputs.network_input(target, style=style, beta=0.1, window="numpy")
    assert np.abs(styled - plain).max() > 0.1
    resized = transforms.resize_image(style, 30, 20)
    raw = fourier.fda_source_to_target(
        jnp.asarray(target, jnp.float32)[None], jnp.asarray(resized, jnp.float32)[None], 0.1
    )
    np.testing.assert_allclose(styled, predict.normalize(np.asarray(raw[0])), atol=1e-5)
    pixels = styled * predict.STD + predict.MEAN
    np.testing.assert_allclose(pixels.mean((0, 1)), resized.mean((0, 1)), atol=1e-2)
    # Grayscale: the BT.601 luma in every channel (after the styling, before normalising).
    gray = inputs.network_input(target, grayscale=True) * predict.STD + predict.MEAN
    luma = target.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    for channel in range(3):
        np.testing.assert_allclose(gray[..., channel], luma, atol=1e-3)
    both = inputs.network_input(target, style=style, beta=0.1, grayscale=True)
    np.testing.assert_allclose(
        both * predict.STD + predict.MEAN, inputs.to_grayscale(pixels), atol=1e-3
    )
    # --resize first: the style is brought to the network input size.
    small = inputs.network_input(target, (15, 10), style=style, beta=0.1)
    assert small.shape == (10, 15, 3)
    # The draw of style images is the seed's.
    a = inputs.style_indices(50, 7, seed=0)
    np.testing.assert_array_equal(a, inputs.style_indices(50, 7, seed=0))
    assert a.min() >= 0 and a.max() < 7 and not np.array_equal(a, inputs.style_indices(50, 7, 1))


def test_weights_argument_forms():
    gather = weights.gather_weights_arguments
    argv = ["prog", "--weights", "a", "b", "--images", "d", "--weights=c", "e", "--out=o"]
    assert gather(argv) == [
        "prog", "--weights", "a", "--weights=b", "--images", "d", "--weights=c", "--weights=e",
        "--out=o",
    ]  # fmt: skip
    assert gather(["prog", "--weights=a", "--", "b"]) == ["prog", "--weights=a", "--", "b"]
    assert weights.weights_paths(["a,b", "c", ""]) == ["a", "b", "c"]
    assert weights.weights_paths("a") == ["a"] and weights.weights_paths(None) == []


def _options(tmp_path, **kw):
    base = dict(images=str(tmp_path / "target"), out=str(tmp_path / "out"), weights=("w",))
    return inputs.Options(**{**base, **kw})


def _fails(capsys, options, message):
    """`execute` exits with 2 after one `error:` line matching `message`."""
    assert pseudo_label.execute(options, tiny.get_config()) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(message, lines[0]), lines[0]


def test_bad_input_is_one_error_line_and_nothing_is_written(two_models, tmp_path, capsys):
    paths, _, _ = two_models
    _fails(capsys, _options(tmp_path), r"--images=.*target: not a directory")
    os.makedirs(tmp_path / "target")
    (tmp_path / "target" / "notes.txt").write_text("not an image")
    _fails(capsys, _options(tmp_path), "--images=.*: no images")
    _images(tmp_path / "target", ("a.png",))
    _images(tmp_path / "target", ("b.png",), size=(24, 40))
    _fails(capsys, _options(tmp_path), "a.png is 32x24 but b.png is 40x24: give --resize")
    plan = inputs.check_inputs(_options(tmp_path, resize=(32, 24)), tiny.get_config())
    assert plan.images == ("a.png", "b.png") and plan.sizes == ((24, 32), (24, 40))
    _images(tmp_path / "target", ("a.jpg",))
    _fails(capsys, _options(tmp_path, resize=(32, 24)), "share the label file a.png")
    os.remove(tmp_path / "target" / "a.jpg")
    nope = str(tmp_path / "nope")
    _fails(
        capsys,
        _options(tmp_path, resize=(32, 24), style_images=nope),
        "--style-images=.*nope: not a directory",
    )
    _fails(capsys, _options(tmp_path, resize=(32, 24), quantile=1.5), "--quantile=1.5")
    # Weights that do not load: the path is named (after the first one loaded).
    missing = str(tmp_path / "missing_weights")
    _fails(capsys, _options(tmp_path, resize=(32, 24), weights=(paths[0], missing)), missing)
    _fails(
        capsys,
        _options(tmp_path, resize=(32, 24), out=str(tmp_path / "target" / "o")),
        "inside --images",
    )
    assert sorted(os.listdir(tmp_path)) == ["target"]  # no --out anywhere
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "x").write_text("")
    _fails(capsys, _options(tmp_path, resize=(32, 24)), "--out=.*out: not empty")
    assert os.listdir(tmp_path / "out") == ["x"]


def test_writing_pass_with_linked_images(tmp_path):
    """The third pass on stored predictions: links, the 255 rule, classes.json; no model."""
    _images(tmp_path / "target", ("x/a.jpg", "b.png"))
    options = _options(tmp_path, symlink_images=True)
    plan = inputs.check_inputs(options, tiny.get_config())
    assert plan.images == ("b.png", os.path.join("x", "a.jpg"))
    rng = np.random.default_rng(4)
    stored = tmp_path / "stored"
    os.makedirs(stored)
    labels = rng.integers(0, 3, (2, *SIZE)).astype(np.uint8)
    conf = rng.random((2, *SIZE)).astype(np.float32)
    for i in range(2):
        np.save(stored / f"{i:07d}_labels.npy", labels[i])
        np.save(stored / f"{i:07d}_conf.npy", conf[i])
    thresholds = np.array([0.5, 0.0, 0.9] + [0.0] * 16)
    counts = pseudo_label.write_outputs(plan, thresholds, str(stored))
    out = tmp_path / "out" / "train"
    for i, rel in enumerate(plan.images):
        image = out / "images" / rel
        assert os.path.islink(image)
        assert os.readlink(image) == os.path.abspath(tmp_path / "target" / rel)
        label = np.asarray(Image.open(out / "labels" / inputs.label_name(rel)))
        drop = conf[i].astype(np.float64) < thresholds[labels[i]]
        np.testing.assert_array_equal(label, np.where(drop, 255, labels[i]))
    assert os.path.isfile(out / "labels" / "x" / "a.png")
    assert counts.sum() == 2 * SIZE[0] * SIZE[1] and counts[1] == (labels == 1).sum()
    assert folder.read_class_table(str(tmp_path / "out" / "classes.json"))[0][2] == "building"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The `tiny` build of the embedded dataset (12 target and 12 source train images, 64x128)."""
    return build_tiny_data(tmp_path_factory.mktemp("data"))


def test_a_built_split_as_input(two_models, tiny_data, tmp_path):
    """--dataset / --split with --style-dataset / --style-split: the split's stored images under
    index names, pseudo-labels (the split's own labels unread), the same network inputs and
    style draws as --images / --style-images on the same images written as files."""
    paths, _, _ = two_models
    config = tiny.get_config()
    target = sources.open_split(tiny_data, "synthetic_shift/tiny", "target_train")
    style = sources.open_split(tiny_data, "synthetic_shift/tiny", "source_train")
    common = dict(weights=(paths[1],), style_beta=0.1, grayscale=True, seed=3)
    from_split = inputs.Options(
        dataset="synthetic_shift/tiny", split="target_train", data_dir=tiny_data,
        style_dataset="synthetic_shift/tiny", style_split="source_train",
        out=str(tmp_path / "from_split"), **common,
    )  # fmt: skip
    assert pseudo_label.execute(from_split, config) == 0

    names = [f"{i:05d}.png" for i in range(12)]
    out = tmp_path / "from_split" / "train"
    assert sorted(os.listdir(out / "images")) == names
    assert sorted(os.listdir(out / "labels")) == names
    ignored = 0
    for i, name in enumerate(names):
        image = np.asarray(Image.open(out / "images" / name))
        np.testing.assert_array_equal(image, target[i]["image"])
        label = np.asarray(Image.open(out / "labels" / name))
        assert label.shape == (64, 128) and set(np.unique(label)) <= set(range(19)) | {255}
        assert not np.array_equal(label, target[i]["label"])  # not the split's own labels
        ignored += int((label == 255).sum())
    # The split's stored PNG itself, byte for byte (the raw records sources.py reads).
    assert (out / "images" / names[5]).read_bytes() == target._records[5]["image"]
    summary = json.loads((tmp_path / "from_split" / pseudo_label.SUMMARY_FILE).read_text())
    assert summary["ignored_pixels"] == ignored > 0 and summary["num_images"] == 12
    assert summary["record_names"] == {n: f"target_train_{i:05d}" for i, n in enumerate(names)}
    assert summary["options"]["dataset"] == "synthetic_shift/tiny"
    assert summary["options"]["style_split"] == "source_train"
    assert summary["options"]["data_dir"] == tiny_data

    # The same images as folders: the same inputs to the passes, image by image.
    for split, folder_name in ((target, "target"), (style, "style")):
        os.makedirs(tmp_path / folder_name)
        for i in range(len(split)):
            Image.fromarray(split[i]["image"]).save(tmp_path / folder_name / f"{i:05d}.png")
    from_files = inputs.Options(
        images=str(tmp_path / "target"), style_images=str(tmp_path / "style"),
        out=str(tmp_path / "from_files"), **common,
    )  # fmt: skip
    a = inputs.check_inputs(dataclasses.replace(from_split, out=str(tmp_path / "o")), config)
    b = inputs.check_inputs(from_files, config)
    assert a.images == b.images == tuple(names) and a.sizes == b.sizes == ((64, 128),) * 12
    np.testing.assert_array_equal(a.style_choice, b.style_choice)
    assert len(set(a.style_choice.tolist())) > 1 and b.record_names == ()
    for i in range(12):
        np.testing.assert_array_equal(a.target.read(i), b.target.read(i))
        j = int(a.style_choice[i])
        np.testing.assert_array_equal(a.style.read(j), b.style.read(j))
    # The output builds as a training split of the same images.
    args = ["--dataset", "folder", "--manual_dir", str(tmp_path / "from_split"), "--name", "pl"]
    assert build.main([*args, "--data_dir", str(tmp_path / "tfds")]) == 0
    built = sources.open_split(str(tmp_path / "tfds"), "folder/pl", "train")
    np.testing.assert_array_equal(built[11]["image"], target[11]["image"])
    np.testing.assert_array_equal(
        built[11]["label"], np.asarray(Image.open(out / "labels" / names[11]))
    )


def test_bad_dataset_input_is_one_error_line_and_nothing_is_written(tiny_data, tmp_path, capsys):
    split = dict(dataset="synthetic_shift/tiny", split="target_train", data_dir=tiny_data)
    config = tiny.get_config()

    def fails(message, **kw):
        options = inputs.Options(out=str(tmp_path / "out"), weights=("w",), **kw)
        assert pseudo_label.execute(options, config) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: ")
        assert re.search(message, lines[0]), lines[0]

    fails(r"exactly one of --images DIR and --dataset .*\(neither given\)")
    fails(r"exactly one of .*\(both given\)", images=str(tmp_path), **split)
    fails(
        r"--dataset=synthetic_shift/nope: no built dataset .* built there: synthetic_shift/tiny",
        **{**split, "dataset": "synthetic_shift/nope"},
    )
    fails(
        r"--split=nope: .* has splits \['source_train', 'source_val', 'target_train', "
        r"'target_val'\], not 'nope'",
        **{**split, "split": "nope"},
    )
    fails(r"--dataset=synthetic_shift/tiny: give the split too", **{**split, "split": None})
    fails(r"--split=target_train: needs --dataset", images=str(tmp_path), split="target_train")
    fails(r"--data_dir=.*: needs --dataset or --style-dataset", images=str(tmp_path), data_dir="d")
    fails(r"--symlink-images: the images of --dataset are stored", symlink_images=True, **split)
    fails(r"--style-split=source_train: needs --style-dataset", style_split="source_train", **split)
    fails(r"--style-dataset=synthetic_shift/tiny: give the split too",
          style_dataset="synthetic_shift/tiny", **split)  # fmt: skip
    fails(r"--style-split=nope: .* has splits", style_dataset="synthetic_shift/tiny",
          style_split="nope", **split)  # fmt: skip
    fails(r"at most one of --style-images DIR and --style-dataset", style_images=str(tmp_path),
          style_dataset="synthetic_shift/tiny", style_split="source_train", **split)  # fmt: skip
    # --data_dir defaults to the config's data.data_dir.
    config.data.data_dir = str(tmp_path / "elsewhere")
    fails(r"--dataset=synthetic_shift/tiny: no built dataset .*elsewhere does not exist",
          dataset="synthetic_shift/tiny", split="target_train")  # fmt: skip
    config.data.data_dir = tiny_data
    # Past every check on the inputs: the weights that do not load, still nothing written.
    fails(r"w is not a pgpc_jax weights directory", dataset="synthetic_shift/tiny",
          split="target_train")  # fmt: skip
    assert not os.path.exists(tmp_path / "out")
