"""Evaluate a checkpoint on a folder of images and train-id labels (`python -m pgpc_jax.evaluate`).

  python -m pgpc_jax.evaluate --config configs/gta2cs.py --weights daformer_gta.pth \
      --weights-format daformer --images cityscapes/leftImg8bit/val \
      --labels cityscapes/gtFine/val --image-suffix _leftImg8bit.png \
      --label-suffix _gtFine_labelTrainIds.png --resize 1024,512 --out eval_out/

Images are found recursively under --images; each is matched to the label
`<labels>/<same sub-folder>/<stem><label-suffix>`, where the stem is the file name without
--image-suffix (without its extension when the suffix is not given). Labels are train-id PNGs
(0..K-1, 255 ignored) at the images' original size, as Cityscapes `*_labelTrainIds.png`.

The protocol is DAFormer's (`pgpc_jax.evaluation`): the image is normalised, optionally resized
to --resize W,H (bilinear, in float), the logits are brought back to the label size, and the
dataset-accumulated mIoU is reported with the per-class table; `--mode slide` uses sliding
windows of the config's `eval.crop_size` / `eval.stride`. With --out, the metrics are written to
`<out>/metrics.json` and colour predictions of the first --num-visualizations images to
`<out>/predictions/`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from pgpc_jax import checkpointing, evaluation, predict
from pgpc_jax.cli import parse_flags
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.torch_names import ConversionError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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


def load_label(path: str) -> np.ndarray:
    """A train-id PNG as uint8 [H, W]; an error names a file that is not single-channel."""
    with Image.open(path) as im:
        label = np.asarray(im)
    if label.ndim != 2:
        raise EvaluateError(
            f"{path}: expected a single-channel train-id PNG, got shape {label.shape}"
        )
    return label


@functools.lru_cache(maxsize=4)
def _resizer(size_hw: tuple[int, int]):
    return jax.jit(lambda x: resize_bilinear(x, size_hw))


def iterate_batches(
    pairs: Sequence[tuple[str, str]], batch_size: int, resize: tuple[int, int] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {'image': float32 [B, h, w, 3] normalised (resized to `resize` (W, H) if given),
    'label': int32 [B, H, W] at the original size}."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        images, labels = [], []
        for image_path, label_path in chunk:
            image = predict.normalize(predict.load_image(image_path))[None]  # [1, H, W, 3]
            if resize is not None:
                image = np.asarray(_resizer((resize[1], resize[0]))(image))
            images.append(image[0])
            labels.append(load_label(label_path).astype(np.int32))
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


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing stays side-effect free."""
    config_flags.DEFINE_config_file(
        "config", None, "Config whose `model` and `eval` groups are used.", lock_config=True
    )
    flags.DEFINE_string(
        "weights", None, "Weights: a Flax weights directory or a PyTorch / HF checkpoint."
    )
    flags.DEFINE_enum(
        "weights-format", "flax", list(predict.WEIGHT_FORMATS), "Format of --weights."
    )
    flags.DEFINE_enum(
        "which", "model", ["model", "ema_model", "imnet_model"], "DAFormer sub-model."
    )
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or not FLAGS.weights or not FLAGS.images or not FLAGS.labels:
        raise app.UsageError(
            "usage: evaluate --config CONFIG --weights PATH --images DIR --labels DIR [--out DIR]"
        )
    config = FLAGS.config
    mode = FLAGS.mode or config.eval.mode
    num_vis = FLAGS["num-visualizations"].value
    if num_vis and not FLAGS.out:
        raise app.UsageError("--num-visualizations needs --out")
    try:
        pairs = find_pairs(
            FLAGS.images, FLAGS.labels, FLAGS["image-suffix"].value, FLAGS["label-suffix"].value
        )
        check_sizes(pairs)
        resize = predict.parse_size(FLAGS.resize)
        model, variables = predict.load_model(
            config.model, FLAGS.weights, FLAGS["weights-format"].value, FLAGS.which
        )
        start = time.time()
        metrics, table = evaluation.evaluate(
            model,
            variables,
            iterate_batches(pairs, FLAGS["batch-size"].value, resize),
            num_classes=config.model.num_classes,
            mode=mode,
            crop_size=tuple(config.eval.crop_size),
            stride=tuple(config.eval.stride),
            num_visualizations=num_vis,
            visualization_dir=os.path.join(FLAGS.out, "predictions") if FLAGS.out else None,
        )
    except (
        EvaluateError,
        predict.PredictError,
        ConversionError,
        checkpointing.CheckpointError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table)
    print(f"{len(pairs)} images, mode {mode}, {time.time() - start:.1f} s")
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        path = os.path.join(FLAGS.out, "metrics.json")
        info = dict(
            weights=FLAGS.weights,
            weights_format=FLAGS["weights-format"].value,
            images=FLAGS.images,
            labels=FLAGS.labels,
            num_images=len(pairs),
            mode=mode,
            resize=list(resize) if resize else None,
        )
        with open(path, "w") as f:
            f.write(metrics_json(metrics, table, **info) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
