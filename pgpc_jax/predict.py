"""Segment images with a trained model (CLI: `python -m pgpc_jax.predict`).

  python -m pgpc_jax.predict --config configs/gta2cs.py --weights daformer_gta.pth \
      --weights-format daformer --resize 1024,512 --out predictions/ frankfurt_000000_000294.png
  # A training run directly: its latest checkpoint (runs/gta2cs/best: the best one), the student
  # (--which ema_model: the EMA teacher)
  python -m pgpc_jax.predict --config configs/gta2cs.py --weights runs/gta2cs \
      --resize 1024,512 --out predictions/ frankfurt_000000_000294.png

A config on its own class set (`configs/folder.py`) takes the class count and colours from the
run given as --weights.

For each IMAGE it writes to --out:
  <stem>_trainids.png   uint8 train ids (0..K-1), as Cityscapes `*_labelTrainIds.png`
  <stem>_color.png      the prediction in the class colours (Cityscapes', or the run's own
                        for a class set of its data: `class_set.py`)
  <stem>_logits.npy     with --save-logits: float32 logits [H, W, K] at the image's size

Inference is DAFormer's (mmseg `whole` mode): RGB normalised by the ImageNet mean / std, the
image optionally resized to --resize W,H, one forward pass, stride-4 logits upsampled bilinearly
(align_corners False) to the network input size and then to the image size.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from data_pipelines import labels as label_table
from data_pipelines import transforms
from pgpc_jax import checkpointing, class_set, evaluation, weights
from pgpc_jax.cli import parse_flags
from pgpc_jax.config_checks import ConfigError
from pgpc_jax.models import segmentor
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.torch_names import ConversionError

# Loading weights lives in `weights.py`; these names stay here for `train.initial_variables`,
# `demo.py` and `config_checks.py`, which reach them through this module.
from pgpc_jax.weights import WEIGHT_FORMATS, load_model  # noqa: F401

# DAFormer / mmseg `img_norm_cfg` (RGB order after to_rgb=True), as float32 arrays.
MEAN = np.array(label_table.IMAGENET_MEAN, np.float32)
STD = np.array(label_table.IMAGENET_STD, np.float32)


class PredictError(ValueError):
    """Bad input to prediction: an unreadable image, a bad --resize."""


def load_image(path: str) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3], with an error naming the file if it is broken."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise PredictError(f"{path}: no such image") from e
    except Exception as e:
        raise PredictError(f"{path} is not a readable image ({type(e).__name__}: {e})") from e


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 normalised as DAFormer (the trainer's own normalisation,
    so a prediction sees what the run's evaluation saw)."""
    return transforms.normalize(image)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'W,H' -> (W, H)."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.split(","))
    except ValueError as e:
        raise PredictError(f"--resize={text!r}: expected W,H in pixels, e.g. 1024,512") from e
    if w <= 0 or h <= 0:
        raise PredictError(f"--resize={text!r}: sizes must be positive")
    return w, h


def make_predictor(model: segmentor.Segmentor, class_weights: Sequence[float] | None = None):
    """jit-compiled (variables, normalised image [h, w, 3], output size (H, W) or None) ->
    logits [H, W, K], bilinearly upsampled from the network's stride-4 output (mmseg's
    `rescale=True`; None: at the image's own size). With `class_weights` (`eval.class_reweight`),
    the softmax times the weights at the input size, then resized (SePiCo's day-night test)."""

    @functools.partial(jax.jit, static_argnums=2)
    def predict(variables, image, size):
        logits = segmentor.predict_logits(model, variables, image[None])  # at the input size
        if class_weights is not None:
            logits = evaluation.reweight_scores(logits, class_weights)
        return resize_bilinear(logits, size)[0]

    def run(variables, image, size=None):
        size = tuple(int(v) for v in (size or image.shape[:2]))
        return np.asarray(predict(variables, jnp.asarray(image), size), np.float32)

    return run


def network_input(image: np.ndarray, resize: tuple[int, int] | None = None) -> np.ndarray:
    """The normalised network input of a uint8 [H, W, 3] image: resized to `resize` (W, H)
    first, bilinearly on the uint8 image and rounded, as mmcv's cv2 `imresize` in DAFormer's
    test pipeline (and the trainer's validation pipeline) does."""
    if resize is not None:
        image = transforms.resize_image(image, resize[0], resize[1])
    return normalize(image)


def predict_files(
    model: segmentor.Segmentor,
    variables: Mapping,
    images: Sequence[str],
    out_dir: str,
    resize: tuple[int, int] | None = None,
    save_logits: bool = False,
    palette: Sequence[Sequence[int]] | None = None,
    class_weights: Sequence[float] | None = None,
) -> list[str]:
    """Segment each image file and write its outputs; returns the written paths. With
    `class_weights`, the predictions (and the saved scores) are the reweighted softmax."""
    if palette is None:
        palette = label_table.PALETTE
    for path in images:  # fail before any work on an image that cannot be read
        load_image(path)
    os.makedirs(out_dir, exist_ok=True)
    predict = make_predictor(
        model, None if class_weights is None else tuple(float(w) for w in class_weights)
    )
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    written, start = [], time.time()
    for i, path in enumerate(images, 1):
        image = load_image(path)
        logits = predict(variables, network_input(image, resize), image.shape[:2])
        train_ids = np.argmax(logits, axis=-1).astype(np.uint8)
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        Image.fromarray(train_ids).save(f"{stem}_trainids.png")
        Image.fromarray(lut[train_ids]).save(f"{stem}_color.png")
        written += [f"{stem}_trainids.png", f"{stem}_color.png"]
        if save_logits:
            np.save(f"{stem}_logits.npy", logits)
            written.append(f"{stem}_logits.npy")
        rate = i / (time.time() - start)
        eta = (len(images) - i) / rate
        print(f"[{i}/{len(images)}] {path} -> {stem}_*.png  ({rate:.2f} img/s, ETA {eta:.0f} s)")
    return written


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing stays side-effect free."""
    config_flags.DEFINE_config_file(
        "config", None, "Config whose `model` group describes the model.", lock_config=True
    )
    weights.define_flags()
    flags.DEFINE_string(
        "resize",
        None,
        "Resize images to W,H before inference (DAFormer's test scale for Cityscapes: 1024,512).",
    )
    flags.DEFINE_bool(
        "save-logits", False, "Also write float32 logits [H, W, K] at the image size as .npy."
    )
    flags.DEFINE_string("out", None, "Output directory.")


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:  # orbax logs every step of a checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    images = argv[1:]
    if FLAGS.config is None or not FLAGS.weights or not FLAGS.out or not images:
        raise app.UsageError("usage: predict --config CONFIG --weights PATH --out DIR IMAGE...")
    try:
        config = FLAGS.config
        class_set.adopt_from_weights(config, [FLAGS.weights])
        model, variables = weights.load_model(
            config.model, FLAGS.weights, FLAGS["weights-format"].value, FLAGS.which
        )
        predict_files(
            model,
            variables,
            images,
            FLAGS.out,
            parse_size(FLAGS.resize),
            FLAGS["save-logits"].value,
            palette=class_set.names_and_colors(config)[1],
            class_weights=evaluation.class_weights_of(config),
        )
    except (PredictError, ConfigError, ConversionError, checkpointing.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """The `pgpc-predict` command (`python -m pgpc_jax.predict`)."""
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
