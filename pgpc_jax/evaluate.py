"""Evaluate a checkpoint on a folder of images and train-id labels (`python -m pgpc_jax.evaluate`).

  python -m pgpc_jax.evaluate --config configs/gta2cs.py --weights daformer_gta.pth \
      --weights-format daformer --images cityscapes/leftImg8bit/val \
      --labels cityscapes/gtFine/val --image-suffix _leftImg8bit.png \
      --label-suffix _gtFine_labelTrainIds.png --resize 1024,512 --out eval_out/
  # A training run directly (its latest checkpoint; runs/gta2cs/best: the best one), with the
  # official Cityscapes evaluation next to ours
  python -m pgpc_jax.evaluate --config configs/gta2cs.py --weights runs/gta2cs \
      --images cityscapes/leftImg8bit/val --labels cityscapes/gtFine/val \
      --image-suffix _leftImg8bit.png --label-suffix _gtFine_labelTrainIds.png \
      --resize 1024,512 --cityscapes-eval --out eval_out/
  # An ensemble (FDA's multi-band evaluation): the mean of the models' softmax
  python -m pgpc_jax.evaluate --config configs/gta2cs.py \
      --weights runs/fda_b001 runs/fda_b005 runs/fda_b009 --images cityscapes/leftImg8bit/val \
      --labels cityscapes/gtFine/val --image-suffix _leftImg8bit.png \
      --label-suffix _gtFine_labelTrainIds.png --resize 1024,512 --out eval_out/

Images are found recursively under --images; each is matched to the label
`<labels>/<same sub-folder>/<stem><label-suffix>`, where the stem is the file name without
--image-suffix (without its extension when the suffix is not given). Labels are train-id PNGs
(0..K-1, 255 ignored) at the images' original size, as Cityscapes `*_labelTrainIds.png`. A
config on its own class set (`configs/folder.py`, classes='data') takes the class count, names
and colours from the trained run given as --weights (its config.json); weights trained on
another class set than the config's are one error line naming both.

The protocol is DAFormer's (`pgpc_jax.evaluation`): the image is normalised, optionally resized
to --resize W,H (bilinear, in float), the logits are brought back to the label size, and the
dataset-accumulated mIoU is reported with the per-class table; `--mode slide` uses sliding
windows of the config's `eval.crop_size` / `eval.stride`. Several --weights (after one --weights,
as a comma list or as repeated flags; the same --weights-format and --which for all, each
describing the config's model) are evaluated as an ensemble: the argmax of the mean of their
softmax outputs (`evaluation.ensemble_probabilities`; then the config's test-time class
reweighting, if any); metrics.json then lists them under `weights`. With --out, the metrics are written to
`<out>/metrics.json` and colour predictions of the first --num-visualizations images to
`<out>/predictions/`.

--cityscapes-eval also runs Cityscapes' own evaluation (cityscapesscripts
`evalPixelLevelSemanticLabeling`, as mmseg's `CityscapesDataset.evaluate` does for DAFormer): each
image's prediction at its label's size is written as Cityscapes label ids (not train ids) to
`<out>/cityscapes_results/<sub-folder>/<city>_<seq>_<frame>_pred_labelIds.png`, where the tool
finds it for `<city>_<seq>_<frame>_gtFine_labelIds.png`, and the tool's `evaluateImgLists` scores
them against the `*_gtFine_labelIds.png` files of --cityscapes-gt (default: --labels; Cityscapes
ships them next to the labelTrainIds that `createTrainIdLabelImgs` makes). Its mIoU is printed
next to ours and stored in metrics.json as `cityscapes/*`; its own result file is
`<out>/resultPixelLevelSemanticLabeling.json`. nIoU is computed when the `*_instanceIds.png`
files are there and numpy still has `np.in1d` (< 2.4), which the tool's instance code calls.
The label-id predictions come from a second forward pass over the images
(`evaluation.evaluate` keeps its predictions on device).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
import re
import sys
import time
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from data_pipelines import labels as label_table
from pgpc_jax import (
    checkpointing,
    class_set,
    evaluation,
    metrics_logging,
    predict,
    scores,
    weights,
)
from pgpc_jax.cli import parse_flags
from pgpc_jax.config_checks import ConfigError
from pgpc_jax.torch_names import ConversionError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CITYSCAPES_HINT = (
    "--cityscapes-eval needs cityscapesscripts, which is not installed: "
    "pip install cityscapesscripts==2.3.0"
)
CITYSCAPES_RESULTS = "cityscapes_results"
# `<city>_<seq>_<frame>` at the start of every Cityscapes file name.
_CITYSCAPES_FRAME = re.compile(r"^[^_]+_\d+_\d+(?=[_.])")


class EvaluateError(ValueError):
    """Bad evaluation input: unmatched or mismatched image / label files, an empty folder."""


def find_pairs(
    images_dir: str, labels_dir: str, image_suffix: str = "", label_suffix: str = ".png"
) -> list[tuple[str, str]]:
    """Match every image under `images_dir` to its label file; an error lists missing labels.

    Returns:
      Sorted [(image path, label path)].
    """
    if not os.path.isdir(images_dir):
        raise EvaluateError(f"--images={images_dir}: not a directory")
    pairs, missing = [], []
    for root, _, files in os.walk(images_dir):
        for name in sorted(files):
            if image_suffix:
                if not name.endswith(image_suffix):
                    continue
                stem = name[: -len(image_suffix)]
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                stem = os.path.splitext(name)[0]
            else:
                continue
            rel = os.path.relpath(root, images_dir)
            label = os.path.normpath(os.path.join(labels_dir, rel, stem + label_suffix))
            image = os.path.join(root, name)
            (pairs if os.path.isfile(label) else missing).append((image, label))
    if missing:
        listed = "\n".join(f"  {image} -> {label}" for image, label in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvaluateError(f"{len(missing)} image(s) have no label file:\n{listed}{more}")
    if not pairs:
        what = (
            f"*{image_suffix}" if image_suffix else "images (" + ", ".join(IMAGE_EXTENSIONS) + ")"
        )
        raise EvaluateError(f"--images={images_dir}: no {what} found")
    return sorted(pairs)


def check_sizes(pairs: Sequence[tuple[str, str]]) -> None:
    """Every label must have its image's size (read from the file headers, nothing decoded)."""
    for image, label in pairs:
        try:
            with Image.open(image) as im, Image.open(label) as lab:
                image_size, label_size = im.size, lab.size
        except Exception as e:
            raise EvaluateError(f"cannot read {image} / {label}: {type(e).__name__}: {e}") from e
        if image_size != label_size:
            raise EvaluateError(
                f"size mismatch: {image} is {image_size[0]}x{image_size[1]} but {label} is "
                f"{label_size[0]}x{label_size[1]} (labels must be at the image's original size)"
            )


def load_label(path: str, num_classes: int | None = None) -> np.ndarray:
    """A train-id PNG as uint8 [H, W]; an error names a file that is not single-channel or, given
    `num_classes` K, holds values other than 0..K-1 and 255 (they would silently leave the score:
    raw ids where class indices are expected)."""
    with Image.open(path) as im:
        label = np.asarray(im)
    if label.ndim != 2:
        raise EvaluateError(
            f"{path}: expected a single-channel train-id PNG, got shape {label.shape}"
        )
    if num_classes is not None:
        values = np.unique(label)
        outside = values[(values >= num_classes) & (values != label_table.IGNORE_INDEX)]
        if outside.size:
            shown = ", ".join(str(v) for v in outside[:8]) + (", ..." if outside.size > 8 else "")
            raise EvaluateError(
                f"{path}: label values {shown} are not classes of the model (0..{num_classes - 1}"
                ", 255 = ignore); --labels must hold train ids / class indices (a class file's "
                "raw ids: evaluate the build's mapped labels instead)"
            )
    return label


def iterate_batches(
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    resize: tuple[int, int] | None = None,
    num_classes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {'image': float32 [B, h, w, 3] normalised (resized to `resize` (W, H) if given,
    on the uint8 image as the trainer's validation pipeline does), 'label': int32 [B, H, W] at
    the original size}; labels are checked against `num_classes` (`load_label`)."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images, labels = [], []
        for image_path, label_path in chunk:
            images.append(predict.network_input(predict.load_image(image_path), resize))
            labels.append(load_label(label_path, num_classes).astype(np.int32))
        if len({x.shape for x in labels}) > 1:
            names = ", ".join(p for p, _ in chunk)
            raise EvaluateError(
                f"images of different sizes in one batch ({names}): use --batch-size 1"
            )
        yield {"image": np.stack(images), "label": np.stack(labels)}


def metrics_json(metrics: dict, table: str, **info) -> str:
    """Strict JSON of the run: NaN IoUs (classes absent from labels and predictions) as null."""
    clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    return json.dumps({**info, "metrics": clean, "table": table}, indent=2, allow_nan=False)


# ------------------------------------------------------------------------------------------------
# The official Cityscapes evaluation.


def cityscapes_eval_module():
    """cityscapesscripts' `evalPixelLevelSemanticLabeling`, or an EvaluateError saying how to
    install it (it is an optional dependency)."""
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling
    except ImportError as e:
        raise EvaluateError(CITYSCAPES_HINT) from e
    return evalPixelLevelSemanticLabeling


def cityscapes_files(
    pairs: Sequence[tuple[str, str]], images_dir: str, gt_dir: str, results_dir: str
) -> list[tuple[str, str]]:
    """For each (image, label) pair, its Cityscapes ground truth and the prediction to write.

    Returns:
      [(`<gt_dir>/<sub-folder>/<frame>_gtFine_labelIds.png`,
        `<results_dir>/<sub-folder>/<frame>_pred_labelIds.png`)] in the order of `pairs`, where
      <frame> is `<city>_<seq>_<frame>` of the image name. An error lists images whose name is
      not a Cityscapes name or whose ground truth is missing.
    """
    out, unnamed, missing = [], [], []
    for image, _ in pairs:
        match = _CITYSCAPES_FRAME.match(os.path.basename(image))
        if not match:
            unnamed.append(image)
            continue
        rel = os.path.relpath(os.path.dirname(image), images_dir)
        gt = os.path.normpath(os.path.join(gt_dir, rel, match.group(0) + "_gtFine_labelIds.png"))
        pred = os.path.join(results_dir, rel, match.group(0) + "_pred_labelIds.png")
        (out if os.path.isfile(gt) else missing).append((gt, os.path.normpath(pred)))
    if unnamed:
        raise EvaluateError(
            f"--cityscapes-eval: {len(unnamed)} image(s) without a Cityscapes name "
            f"(<city>_<seq>_<frame>_*), e.g. {unnamed[0]}"
        )
    if missing:
        listed = "\n".join(f"  {gt}" for gt, _ in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvaluateError(
            f"--cityscapes-eval: {len(missing)} ground truth file(s) missing under "
            f"--cityscapes-gt={gt_dir}:\n{listed}{more}"
        )
    return out


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """uint8 Cityscapes label ids [H, W] of train ids [H, W] (0..18), the inverse of
    `labels.CITYSCAPES_ID_TO_TRAIN_ID` (checked against cityscapesscripts' table by the tests)."""
    table = np.zeros(256, np.uint8)
    for label_id, train_id in label_table.CITYSCAPES_ID_TO_TRAIN_ID.items():
        table[train_id] = label_id
    return table[np.asarray(train_ids, np.int64)]


def write_label_id_predictions(
    model,
    variables,
    pairs: Sequence[tuple[str, str]],
    paths: Sequence[str],
    resize: tuple[int, int] | None,
    mode: str,
    crop_size: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
) -> None:
    """Predict each image of `pairs` as `evaluation.evaluate` does (same inference, logits at the
    label's size, argmax; a list of variable trees: their ensemble) and write it to the matching
    `paths` entry as Cityscapes label ids."""

    @functools.partial(jax.jit, static_argnames="label_size")
    def predict_ids(variables, images, label_size):
        if evaluation.is_ensemble(variables):
            logits = evaluation.ensemble_probabilities(
                model, variables, images, mode, crop_size, stride, num_classes, label_size
            )
        elif mode == "whole":
            logits = evaluation.whole_inference(model, variables, images, label_size)
        else:
            logits = evaluation.slide_inference(
                model, variables, images, crop_size, stride, num_classes, label_size
            )
        return jnp.argmax(logits, axis=-1)

    for batch, path in zip(iterate_batches(pairs, 1, resize), paths, strict=True):
        size = tuple(batch["label"].shape[1:3])
        train_ids = np.asarray(predict_ids(variables, batch["image"], size))[0]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(train_ids_to_label_ids(train_ids)).save(path)


def cityscapes_eval(gt_files: Sequence[str], results_dir: str, json_file: str) -> dict:
    """Run cityscapesscripts' own evaluation (`getPrediction` + `evaluateImgLists`) in-process.

    Args:
      gt_files: `*_gtFine_labelIds.png` ground-truth files.
      results_dir: the folder searched (recursively) for `<city>_<seq>_<frame>*.png` predictions.
      json_file: where the tool writes its result file.

    Returns:
      The tool's result dict ('averageScoreClasses' = its mIoU, 'classScores', ...).
    """
    cs_eval = cityscapes_eval_module()
    args = copy.copy(cs_eval.args)  # the tool's defaults; its module-level object stays as is
    args.predictionPath = os.path.abspath(results_dir)
    args.predictionWalk = None
    # nIoU needs the instance images (without them its numbers would be meaningless), and the
    # tool's instance code calls np.in1d, which numpy 2.4 removed.
    args.evalInstLevelScore = hasattr(np, "in1d") and all(
        os.path.isfile(gt.replace("labelIds", "instanceIds")) for gt in gt_files
    )
    args.evalPixelAccuracy = False
    args.JSONOutput = True
    args.exportFile = os.path.abspath(json_file)  # not the default next to the package
    args.quiet = True
    args.colorized, args.bold, args.nocol = False, "", ""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            predictions = [cs_eval.getPrediction(args, gt) for gt in gt_files]
            result = cs_eval.evaluateImgLists(predictions, list(gt_files), args)
    except SystemExit:  # the tool's printError prints 'ERROR: ...' and exits
        lines = printed.getvalue().strip().splitlines() or ["it stopped without a message"]
        raise EvaluateError(f"cityscapesscripts: {lines[-1]}") from None
    result["evalInstLevelScore"] = args.evalInstLevelScore
    return result


def cityscapes_metrics(result: dict, class_names: Sequence[str]) -> dict[str, float]:
    """The tool's numbers as metrics: 'cityscapes/miou', 'cityscapes/iou/<class>',
    'cityscapes/miou_categories' and, with instance images, 'cityscapes/niou'."""
    metrics = {"cityscapes/miou": float(result["averageScoreClasses"])}
    for name in class_names:
        key = scores.metric_name(name).replace("eval/", "cityscapes/")
        metrics[key] = float(result["classScores"][name])
    metrics["cityscapes/miou_categories"] = float(result["averageScoreCategories"])
    if result["evalInstLevelScore"]:
        metrics["cityscapes/niou"] = float(result["averageScoreInstClasses"])
    return metrics


def cityscapes_summary(metrics: Mapping[str, float], num_files: int) -> str:
    """One line: the tool's mIoU next to ours, its category mIoU and nIoU."""
    niou = metrics.get("cityscapes/niou")
    return (
        f"cityscapesscripts evalPixelLevelSemanticLabeling on {num_files} *_gtFine_labelIds.png: "
        f"mIoU {100 * metrics['cityscapes/miou']:.2f} (ours {100 * metrics['eval/miou']:.2f}), "
        f"categories mIoU {100 * metrics['cityscapes/miou_categories']:.2f}, "
        + (
            f"nIoU {100 * niou:.2f}"
            if niou is not None
            else "nIoU n/a (it needs *_instanceIds.png, and numpy < 2.4 for the tool's np.in1d)"
        )
    )


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing stays side-effect free."""
    config_flags.DEFINE_config_file(
        "config", None, "Config whose `model` and `eval` groups are used.", lock_config=True
    )
    weights.define_flags(multiple=True)
    flags.DEFINE_string("images", None, "Folder of images (searched recursively).")
    flags.DEFINE_string("labels", None, "Folder of train-id label PNGs, same sub-folders.")
    flags.DEFINE_string(
        "image-suffix",
        "",
        "End of the image file names removed to get the stem, e.g. "
        "_leftImg8bit.png; default: any image extension.",
    )
    flags.DEFINE_string(
        "label-suffix", ".png", "Label file = stem + this, e.g. _gtFine_labelTrainIds.png."
    )
    flags.DEFINE_string(
        "resize", None, "Resize images to W,H before inference (DAFormer on Cityscapes: 1024,512)."
    )
    flags.DEFINE_enum(
        "mode", None, list(evaluation.MODES), "Inference mode; default config.eval.mode."
    )
    flags.DEFINE_integer("batch-size", 1, "Images per forward pass (same-size images only).")
    flags.DEFINE_integer(
        "num-visualizations", 0, "Colour predictions of the first N images saved under --out."
    )
    flags.DEFINE_string("out", None, "Output directory for metrics.json (and predictions/).")
    flags.DEFINE_bool(
        "cityscapes-eval",
        False,
        "Also run Cityscapes' official evaluation (cityscapesscripts, optional dependency) on "
        "label-id predictions written to <out>/cityscapes_results/; needs --out.",
    )
    flags.DEFINE_string(
        "cityscapes-gt",
        None,
        "Folder of the *_gtFine_labelIds.png ground truth, same sub-folders as --images "
        "(default: --labels).",
    )


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:  # orbax logs every step of a checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths = weights.weights_paths(FLAGS.weights)
    if FLAGS.config is None or not paths or not FLAGS.images or not FLAGS.labels:
        raise app.UsageError(
            "usage: evaluate --config CONFIG --weights PATH [PATH ...] --images DIR --labels DIR "
            "[--out DIR]"
        )
    config = FLAGS.config
    mode = FLAGS.mode or config.eval.mode
    num_vis = FLAGS["num-visualizations"].value
    official = FLAGS["cityscapes-eval"].value
    if num_vis and not FLAGS.out:
        raise app.UsageError("--num-visualizations needs --out")
    if official and not FLAGS.out:
        raise app.UsageError("--cityscapes-eval needs --out (its predictions are written there)")
    try:
        pairs = find_pairs(
            FLAGS.images, FLAGS.labels, FLAGS["image-suffix"].value, FLAGS["label-suffix"].value
        )
        check_sizes(pairs)
        resize = predict.parse_size(FLAGS.resize)
        class_set.adopt_from_weights(config, paths)
        names, colors = class_set.names_and_colors(config)
        if official:  # every Cityscapes check before the model is loaded
            cityscapes_eval_module()
            if config.classes != "cityscapes" or config.model.num_classes != 19:
                raise EvaluateError(
                    "--cityscapes-eval needs the 19 Cityscapes classes (config.classes="
                    f"{config.classes!r}, model.num_classes={config.model.num_classes})"
                )
            results_dir = os.path.join(FLAGS.out, CITYSCAPES_RESULTS)
            gt_dir = FLAGS["cityscapes-gt"].value or FLAGS.labels
            files = cityscapes_files(pairs, FLAGS.images, gt_dir, results_dir)
        if len(paths) == 1:
            model, variables = weights.load_model(
                config.model, paths[0], FLAGS["weights-format"].value, FLAGS.which
            )
        else:  # an ensemble: a list of variable trees
            model, variables = weights.load_models(
                config.model, paths, FLAGS["weights-format"].value, FLAGS.which
            )
        start = time.time()
        crop_size, stride = tuple(config.eval.crop_size), tuple(config.eval.stride)
        metrics, table = evaluation.evaluate(
            model,
            variables,
            iterate_batches(pairs, FLAGS["batch-size"].value, resize, config.model.num_classes),
            num_classes=config.model.num_classes,
            mode=mode,
            crop_size=crop_size,
            stride=stride,
            num_visualizations=num_vis,
            visualization_dir=os.path.join(FLAGS.out, "predictions") if FLAGS.out else None,
            progress=metrics_logging.Progress("evaluating", len(pairs)),
            class_weights=evaluation.class_weights_of(config),
            class_names=names,
            class_colors=colors,
        )
        seconds = time.time() - start
        if official:
            gt_files, pred_files = zip(*files)
            write_label_id_predictions(
                model,
                variables,
                pairs,
                pred_files,
                resize,
                mode,
                crop_size,
                stride,
                config.model.num_classes,
            )
            json_file = os.path.join(FLAGS.out, "resultPixelLevelSemanticLabeling.json")
            result = cityscapes_eval(gt_files, results_dir, json_file)
            metrics.update(cityscapes_metrics(result, label_table.CLASSES))
    except (
        EvaluateError,
        ConfigError,
        predict.PredictError,
        ConversionError,
        checkpointing.CheckpointError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table)
    models = f", ensemble of {len(paths)} models" if len(paths) > 1 else ""
    print(f"{len(pairs)} images, mode {mode}{models}, {seconds:.1f} s")
    if official:
        print(cityscapes_summary(metrics, len(gt_files)))
        print(f"wrote {len(pred_files)} label-id predictions to {results_dir}")
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        path = os.path.join(FLAGS.out, "metrics.json")
        info = dict(
            # One path as before; an ensemble's paths as a list.
            weights=paths[0] if len(paths) == 1 else paths,
            weights_format=FLAGS["weights-format"].value,
            which=FLAGS.which,
            images=FLAGS.images,
            labels=FLAGS.labels,
            num_images=len(pairs),
            mode=mode,
            resize=list(resize) if resize else None,
        )
        if official:
            info["cityscapes_gt"] = gt_dir
        with open(path, "w") as f:
            f.write(metrics_json(metrics, table, **info) + "\n")
        print(f"wrote {path}")


def cli() -> None:
    """The `pgpc-evaluate` command (`python -m pgpc_jax.evaluate`)."""
    define_flags()
    app.run(main, flags_parser=lambda argv: parse_flags(weights.gather_weights_arguments(argv)))


if __name__ == "__main__":
    cli()
