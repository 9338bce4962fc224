"""Pseudo-labels of target images from one model or an ensemble (`python -m pgpc_jax.pseudo_label`).

  # FDA's multi-band pseudo-labels: the three FDA models, the released 66 % / 0.9 rule
  python -m pgpc_jax.pseudo_label --config configs/gta2cs.py \\
      --weights runs/fda_b001 runs/fda_b005 runs/fda_b009 \\
      --images cityscapes/leftImg8bit/train --resize 1024,512 --out pseudo/round1
  # The target split of a built dataset (what the trainer reads) instead of a folder
  python -m pgpc_jax.pseudo_label --config configs/synthetic.py \\
      --weights runs/fda_b001 runs/fda_b005 runs/fda_b009 \\
      --dataset synthetic_shift/default --split target_train --data_dir data \\
      --resize 256,128 --out pseudo/embedded
  # Target images styled to the source first (FDA, beta 0.01), on grayscale inputs
  python -m pgpc_jax.pseudo_label --config configs/gta2cs.py --weights runs/fda_b001 \\
      --images cityscapes/leftImg8bit/train --resize 1024,512 \\
      --style-images gta/images --style-beta 0.01 --style-window numpy --grayscale \\
      --quantile 0.66 --cap 0.9 --seed 0 --out pseudo/styled
  # The same with the styles from a built split: --style-dataset gta5/daformer --style-split train
  # The output as a training split (TFDS `folder/<name>`, read as `folder/round1` by a config)
  python -m data_pipelines.build --dataset folder --manual_dir pseudo/round1 --name round1 \\
      --data_dir ~/tfds

Flags: --config CONFIG (its `model`, `classes` and `eval` groups, and `data.data_dir`),
--weights W1 [W2 ...] (also `--weights W1,W2` or repeated --weights; one --weights-format and
--which for all, as `evaluate`), the target images as exactly one of
  --images DIR (searched recursively for .png / .jpg / .jpeg) or
  --dataset NAME --split SPLIT [--data_dir DIR] (a built dataset, e.g. `synthetic_shift/default`
  split `target_train`, read as the trainer reads it, `data_pipelines/sources.py`; --data_dir
  defaults to the config's `data.data_dir`; the split's labels, if it has any, are not read:
  the pseudo-labels come from the models only),
--out DIR (absent or empty), --resize W,H (the network input size; default: each image's own
size, which must then be the same for every image), --mode whole|slide (default
config.eval.mode), the source-style images as at most one of --style-images DIR or
--style-dataset NAME --style-split SPLIT (same --data_dir), --style-beta (0.01), --style-window
numpy|torch (numpy), --grayscale, --quantile (0.66), --cap (0.9), --seed (0), --symlink-images
(--images only), --tmp-dir DIR (default: the system's temp folder).

It writes to --out:
  train/images/<rel path>      the target images, copied (with --symlink-images: symbolic links);
                               from --dataset, `<index>.png`: the split's stored PNG of example
                               <index>, the index zero-padded to 5 digits (more from 100000
                               images on), in the split's order
  train/labels/<rel stem>.png  uint8 train ids, 255 where the pixel is ignored
  classes.json                 the config's class table, as `data_pipelines/folder.py` reads it
  pseudo_label_summary.json    thresholds, predicted and kept pixels and shares per class, the
                               ignored share, the models and every option (from --dataset also
                               `record_names`: the split's example name of each written image)
and prints the per-class table. The images are copied by default so that the output is a
self-contained dataset: the folder builder, an archive or another machine reads it whatever
happens to the original folder; --symlink-images saves the disk space instead. Progress with rate
and ETA goes to stderr. Bad input (a missing or empty folder, images of different sizes without
--resize, a dataset that is not built or a split it lacks (the message lists what is built and
which splits there are), weights that do not load, a non-empty --out, ...) is one `error: ...`
line naming the flag or file, exit status 2, and nothing written: every check is made before
--out is created (image sizes come from the file headers, or the stored PNGs' headers of a
split), and images are decoded in the first pass, which writes only to the temporary folder.

Per target image (at its own size H x W, the label size):
1. [fixed shape] the image is read as RGB uint8 and resized to --resize (the project's bilinear
   uint8 resize, as `evaluate --resize`).
2. With --style-images or --style-dataset [reconstructed, the fifth seed's "target styled to the
   source"]: one source-style image per target image, drawn uniformly with replacement by
   `np.random.default_rng(seed)` in the order of the target images (sorted paths, or the
   split's order) among the style images (sorted paths, or the split's order), is resized the same
   way to the network input size; `uda.fourier.fda_source_to_target(target, style, beta,
   window)` gives the target its own phase and the style image's low-frequency amplitude, on
   raw [0, 255] pixels, not clipped (as FDA feeds its transfer unclipped to the network).
3. With --grayscale [reconstructed]: the luma 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, PIL's
   'L' weights, in float, not rounded) replicated to the three channels.
4. The project's normalisation (ImageNet mean / std), then the mean of the models' softmax
   outputs with weights 1/N (`evaluation.ensemble_probabilities`: softmax at the network's
   output size, mean, then resized to H x W, the order of FDA's `getSudoLabel_multi.py`; the
   release weights its three models 0.3333, 0.3333, 0.3334 and resizes with align_corners=True
   to 512 x 1024 [reconstructed: 1/N, the project's resize, the image's own size]). No test-time
   class reweighting: the confidences stay probabilities.
5. The argmax (first maximum on ties) is the label, the maximum the confidence (float32).

Per class c over ALL images [released, `getSudoLabel_multi.py`, `uda/class_thresholds.py`]:
threshold_c is the value at index round(quantile * n_c) (numpy's half-to-even rounding; clamped
to n_c - 1) of the ascending confidences of the n_c pixels labelled c, 0 for a class no pixel is
labelled with, and min(threshold_c, cap); a pixel becomes 255 where its confidence is strictly
below its class's threshold (float64 comparison as released, `class_thresholds.apply_thresholds`).

Memory and disk: the thresholds are exact (the same values as `class_thresholds.class_thresholds`
over all confidences, which the tests check) without holding every confidence in memory. The
first pass stores each image's labels (uint8) and confidences (float32) in a temporary folder,
5 bytes a pixel at the label size (Cityscapes train at 2048 x 1024: 2975 images, 31 GB; checked
against the free space before anything runs), and counts per class a histogram of 2^16 equal
confidence bins (C x 65536 int64: 10 MB for 19 classes). The bin of each class's order statistic
follows from the counts; a second pass collects only the confidences of that bin (the binning of
float32 values by a power of two is exact, so the order is kept) and takes the exact value; a
class whose bin starts at or above the cap is capped without it. That pass holds one bin's
confidences per class: a few thousand values for real softmax outputs, all of a class's pixels
only when they share one bin (e.g. a constant confidence). The third pass writes the labels.
The temporary folder is removed at the end, on errors too.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from data_pipelines import sources, transforms
from pgpc_jax import checkpointing, convert, evaluation, metrics_logging, predict, weights
from pgpc_jax.cli import parse_flags
from pgpc_jax.torch_names import ConversionError
from pgpc_jax.uda import class_thresholds, fourier

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # the extensions `data_pipelines/folder.py` reads
IGNORE = 255
# Confidence bins of the first pass: a power of two, so float32 values are binned exactly.
NUM_BINS = 1 << 16
# Stored per pixel between the passes: a uint8 label and a float32 confidence.
STORED_BYTES_PER_PIXEL = 5
# ITU-R BT.601 luma, PIL's `convert('L')` weights.
LUMA = (0.299, 0.587, 0.114)
SUMMARY_FILE = "pseudo_label_summary.json"
# Digits of the zero-padded index that names the images of a --dataset split (at least).
INDEX_DIGITS = 5


class PseudoLabelError(ValueError):
    """Bad input to the pseudo-label command; the message names the flag or the file."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The command's options (the flags, parsed)."""

    out: str
    weights: tuple[str, ...]
    images: str | None = None
    dataset: str | None = None
    split: str | None = None
    data_dir: str | None = None  # None: config.data.data_dir
    weights_format: str = "flax"
    which: str = "model"
    resize: tuple[int, int] | None = None  # (W, H) of the network input
    mode: str | None = None  # None: config.eval.mode
    style_images: str | None = None
    style_dataset: str | None = None
    style_split: str | None = None
    style_beta: float = 0.01
    style_window: str = "numpy"
    grayscale: bool = False
    quantile: float = class_thresholds.FRACTION
    cap: float = class_thresholds.CAP
    seed: int = 0
    symlink_images: bool = False
    tmp_dir: str | None = None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """The images of a folder (--images, --style-images) or of a built split (--dataset /
    --split, --style-dataset / --style-split), in a fixed order.

    A split's images are read as the trainer reads them (`sources.SegmentationSource`, labels not
    decoded); their stored PNG bytes and header sizes come from the split's raw records where the
    source has them (`_records`, as `data_pipelines/dark_zurich.py` reads its text fields), so
    nothing is decoded before the first pass.
    """

    names: tuple[str, ...]  # folder: sorted relative paths; split: `<zero-padded index>.png`
    folder: str | None = None
    split: Sequence[Mapping] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, i: int) -> str:
        """How an error names image `i`: its path, or `<split source>[i]`."""
        if self.folder is not None:
            return os.path.join(self.folder, self.names[i])
        return f"{self.split!r}[{i}]"

    def _records(self) -> Sequence[Mapping] | None:
        """The split's raw records (encoded PNGs), or None."""
        return getattr(self.split, "_records", None)  # sources.SegmentationSource has them

    def read(self, i: int) -> np.ndarray:
        """Image `i` as RGB uint8 [H, W, 3]."""
        if self.folder is not None:
            return predict.load_image(os.path.join(self.folder, self.names[i]))
        return np.asarray(self.split[i]["image"], np.uint8)

    def header(self, i: int) -> tuple[tuple[int, int], str | None]:
        """((H, W), the split's example name; None for a folder) of image `i`, from the file's
        or the stored PNG's header (one read of the record; nothing decoded where the source
        allows); an unreadable image raises PseudoLabelError naming it."""
        if self.folder is not None:
            return image_size(os.path.join(self.folder, self.names[i])), None
        records = self._records()
        if records is None:
            example = self.split[i]
            return tuple(np.shape(example["image"])[:2]), _text(example["name"])
        record = records[i]
        try:
            with Image.open(io.BytesIO(record["image"])) as im:
                width, height = im.size
        except Exception as e:
            raise PseudoLabelError(
                f"{self.describe(i)} is not a readable image ({type(e).__name__}: {e})"
            ) from e
        return (height, width), _text(record["name"])

    def write(self, i: int, path: str, symlink: bool = False) -> None:
        """Image `i` into `path`: the file copied (or linked), or the split's stored PNG."""
        if self.folder is not None:
            source = os.path.join(self.folder, self.names[i])
            if symlink:
                os.symlink(os.path.abspath(source), path)
            else:
                shutil.copyfile(source, path)
            return
        records = self._records()
        stored = records[i]["image"] if records is not None else None
        if isinstance(stored, bytes) and stored[:8] == b"\x89PNG\r\n\x1a\n":
            with open(path, "wb") as f:
                f.write(stored)
        else:
            Image.fromarray(self.read(i)).save(path)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `check_inputs` found: everything the passes need except the models."""

    options: Options
    images: tuple[str, ...]  # the written names: paths relative to --images, or `<index>.png`
    sizes: tuple[tuple[int, int], ...]  # (H, W) of each image, the label size
    styles: tuple[str, ...]  # names of the style images (`target.names` alike); () without
    style_choice: np.ndarray  # int [N] index into `styles` per image; empty without styling
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mode: str
    crop_size: tuple[int, int]
    stride: tuple[int, int]
    num_classes: int
    target: ImageSource
    style: ImageSource | None  # None without styling
    data_dir: str | None  # where --dataset / --style-dataset were read; None without them
    record_names: tuple[str, ...]  # --dataset: each image's example name in the split; ()


# ------------------------------------------------------------------------------------------------
# Checks, all before anything is written.


def find_images(folder: str, flag: str) -> list[str]:
    """Image files under `folder` (recursively), as sorted relative paths; an error names `flag`."""
    if not os.path.isdir(folder):
        raise PseudoLabelError(f"{flag}={folder}: not a directory")
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    if not found:
        raise PseudoLabelError(
            f"{flag}={folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under it"
        )
    return sorted(found)


def label_name(rel: str) -> str:
    """`<rel stem>.png`: the label file of the image at relative path `rel`."""
    return os.path.splitext(rel)[0] + ".png"


def image_size(path: str) -> tuple[int, int]:
    """(H, W) from the file header (nothing decoded); an error names an unreadable file."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as e:
        raise PseudoLabelError(f"{path} is not a readable image ({type(e).__name__}: {e})") from e
    return height, width


def check_out_dir(out: str, images_dir: str | None) -> None:
    """--out must be absent or an empty folder, and not inside --images (when given)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PseudoLabelError(f"--out={out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        raise PseudoLabelError(f"--out={out}: not empty (give a new or an empty folder)")
    if images_dir is None:
        return
    real_out, real_images = os.path.realpath(out), os.path.realpath(images_dir)
    if real_out == real_images or real_out.startswith(real_images + os.sep):
        raise PseudoLabelError(f"--out={out}: inside --images={images_dir}")


def style_indices(num_images: int, num_styles: int, seed: int) -> np.ndarray:
    """The style image of each target image: uniform with replacement, `default_rng(seed)`.

    Returns:
      int64 [num_images] indices in [0, num_styles).
    """
    return np.random.default_rng(seed).integers(0, num_styles, size=num_images)


def open_split_images(
    data_dir: str, dataset: str, split: str, flags: tuple[str, str]
) -> ImageSource:
    """The images of a built split (labels not read); errors name `flags` (dataset, split)."""
    dataset_flag, split_flag = flags
    try:
        source = sources.open_split(data_dir, dataset, split, with_label=False)
    except sources.DatasetNotBuiltError as e:
        raise PseudoLabelError(f"{dataset_flag}={dataset}: {e}") from e
    except sources.UnknownSplitError as e:
        raise PseudoLabelError(f"{split_flag}={split}: {e}") from e
    if not len(source):
        raise PseudoLabelError(f"{split_flag}={split}: {dataset} has no images in this split")
    width = max(INDEX_DIGITS, len(str(len(source) - 1)))
    return ImageSource(tuple(f"{i:0{width}d}.png" for i in range(len(source))), split=source)


def data_dir_of(options: Options, config) -> str:
    """--data_dir, else the config's `data.data_dir`."""
    if options.data_dir is not None:
        return options.data_dir
    data = config.get("data")
    if data is None or not data.get("data_dir"):
        raise PseudoLabelError("--data_dir: not given and the config has no data.data_dir")
    return str(data.data_dir)


def target_images(options: Options, config) -> ImageSource:
    """The target images of --images or --dataset / --split (exactly one of them)."""
    if (options.images is None) == (options.dataset is None):
        given = "both given" if options.images is not None else "neither given"
        raise PseudoLabelError(
            f"give the target images as exactly one of --images DIR and --dataset NAME --split "
            f"SPLIT ({given})"
        )
    if options.dataset is None:
        if options.split is not None:
            raise PseudoLabelError(f"--split={options.split}: needs --dataset (not --images)")
        rels = find_images(options.images, "--images")
        by_label: dict[str, str] = {}
        for rel in rels:
            other = by_label.setdefault(label_name(rel), rel)
            if other != rel:
                raise PseudoLabelError(
                    f"--images: {other} and {rel} would share the label file {label_name(rel)}"
                )
        return ImageSource(tuple(rels), folder=options.images)
    if options.split is None:
        raise PseudoLabelError(f"--dataset={options.dataset}: give the split too (--split SPLIT)")
    if options.symlink_images:
        raise PseudoLabelError(
            "--symlink-images: the images of --dataset are stored in its records, not as files; "
            "they are written as PNG files (leave --symlink-images out)"
        )
    return open_split_images(
        data_dir_of(options, config), options.dataset, options.split, ("--dataset", "--split")
    )


def style_images(options: Options, config) -> ImageSource | None:
    """The source-style images of --style-images or --style-dataset / --style-split; None
    without styling."""
    if options.style_images is not None and options.style_dataset is not None:
        raise PseudoLabelError(
            "give the style images as at most one of --style-images DIR and --style-dataset "
            "NAME --style-split SPLIT (both given)"
        )
    if options.style_dataset is None:
        if options.style_split is not None:
            raise PseudoLabelError(f"--style-split={options.style_split}: needs --style-dataset")
        if options.style_images is None:
            return None
        return ImageSource(
            tuple(find_images(options.style_images, "--style-images")), folder=options.style_images
        )
    if options.style_split is None:
        raise PseudoLabelError(
            f"--style-dataset={options.style_dataset}: give the split too (--style-split SPLIT)"
        )
    return open_split_images(
        data_dir_of(options, config),
        options.style_dataset,
        options.style_split,
        ("--style-dataset", "--style-split"),
    )


def check_inputs(options: Options, config) -> Plan:
    """Every check of the command but loading the weights; raises PseudoLabelError.

    Args:
      options: the parsed flags.
      config: the config (`model.num_classes`, `classes`, `eval`; `data.data_dir` when a
        dataset is read without --data_dir).

    Returns:
      The plan of the run.
    """
    if options.data_dir is not None and options.dataset is None and options.style_dataset is None:
        raise PseudoLabelError(f"--data_dir={options.data_dir}: needs --dataset or --style-dataset")
    target = target_images(options, config)
    flag = "--images" if target.folder is not None else "--dataset"
    rels = target.names
    headers = [target.header(i) for i in range(len(target))]
    sizes = tuple(size for size, _ in headers)
    if options.resize is None and len(set(sizes)) > 1:
        i = next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise PseudoLabelError(
            f"{flag}: {rels[0]} is {sizes[0][1]}x{sizes[0][0]} but {rels[i]} is "
            f"{sizes[i][1]}x{sizes[i][0]}: give --resize W,H for images of different sizes"
        )
    style = style_images(options, config)
    choice = np.zeros((0,), np.int64)
    if style is not None:
        if options.style_window not in fourier.WINDOWS:
            raise PseudoLabelError(
                f"--style-window={options.style_window!r}: expected one of {fourier.WINDOWS}"
            )
        if not 0.0 <= options.style_beta <= 0.5:
            raise PseudoLabelError(f"--style-beta={options.style_beta}: expected 0 <= beta <= 0.5")
        choice = style_indices(len(rels), len(style), options.seed)
        for i in sorted(set(choice.tolist())):  # the headers of the drawn ones only
            style.header(i)
    if not 0.0 <= options.quantile <= 1.0:
        raise PseudoLabelError(f"--quantile={options.quantile}: expected 0 <= quantile <= 1")
    if not 0.0 < options.cap <= 1.0:
        raise PseudoLabelError(f"--cap={options.cap}: expected 0 < cap <= 1")
    mode = options.mode or config.eval.mode
    if mode not in evaluation.MODES:
        raise PseudoLabelError(f"--mode={mode!r}: expected one of {evaluation.MODES}")
    num_classes = int(config.model.num_classes)
    if num_classes >= IGNORE:
        raise PseudoLabelError(
            f"model.num_classes={num_classes}: uint8 label PNGs hold at most {IGNORE} classes"
        )
    try:
        names, palette = convert.class_table(config.classes)
    except ConversionError as e:
        raise PseudoLabelError(f"config.classes: {e}") from e
    if len(names) != num_classes:
        raise PseudoLabelError(
            f"config.classes={config.classes!r} has {len(names)} classes but "
            f"model.num_classes={num_classes}"
        )
    check_out_dir(options.out, options.images)
    tmp = options.tmp_dir or tempfile.gettempdir()
    if not os.path.isdir(tmp):
        raise PseudoLabelError(f"--tmp-dir={tmp}: not a directory")
    needed = STORED_BYTES_PER_PIXEL * sum(h * w for h, w in sizes)
    free = shutil.disk_usage(tmp).free
    if needed > free:
        raise PseudoLabelError(
            f"--tmp-dir={tmp}: {needed / 1e9:.1f} GB needed for the labels and confidences "
            f"between the passes, {free / 1e9:.1f} GB free"
        )
    return Plan(
        options=options,
        images=tuple(rels),
        sizes=sizes,
        styles=style.names if style is not None else (),
        style_choice=choice,
        class_names=tuple(names),
        palette=tuple(tuple(int(v) for v in c) for c in palette),
        mode=mode,
        crop_size=tuple(int(v) for v in config.eval.crop_size),
        stride=tuple(int(v) for v in config.eval.stride),
        num_classes=num_classes,
        target=target,
        style=style,
        data_dir=(
            data_dir_of(options, config)
            if options.dataset is not None or options.style_dataset is not None
            else None
        ),
        record_names=tuple(name for _, name in headers) if target.split is not None else (),
    )


# ------------------------------------------------------------------------------------------------
# The network input.


@functools.partial(jax.jit, static_argnames=("beta", "window"))
def _fda(target: jax.Array, style: jax.Array, beta: float, window: str) -> jax.Array:
    return fourier.fda_source_to_target(target, style, beta, window)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: the BT.601 luma of an RGB image [H, W, 3], in every channel."""
    luma = np.asarray(image, np.float32) @ np.asarray(LUMA, np.float32)
    return np.repeat(luma[..., None], 3, axis=-1)


def network_input(
    image: np.ndarray,
    resize: tuple[int, int] | None = None,
    style: np.ndarray | None = None,
    beta: float = 0.01,
    window: str = "numpy",
    grayscale: bool = False,
) -> np.ndarray:
    """The normalised network input of a target image (steps 1-4 of the module docstring).

    Args:
      image: uint8 [H, W, 3] RGB target image.
      resize: (W, H) of the network input; None keeps the image's size.
      style: uint8 [h, w, 3] RGB source-style image, any size (resized to the network input
        size); None: no styling.
      beta, window: FDA's window (`uda.fourier.fda_source_to_target`).
      grayscale: replace the image by its luma in every channel.

    Returns:
      float32 [H', W', 3] normalised as the project's inputs.
    """
    if resize is not None:
        image = transforms.resize_image(image, resize[0], resize[1])
    pixels = image
    if style is not None:
        height, width = image.shape[:2]
        style = transforms.resize_image(style, width, height)
        styled = _fda(
            jnp.asarray(image, jnp.float32)[None],
            jnp.asarray(style, jnp.float32)[None],
            beta=float(beta),
            window=window,
        )
        pixels = np.asarray(styled[0], np.float32)
    if grayscale:
        pixels = to_grayscale(pixels)
    return predict.normalize(pixels)


# ------------------------------------------------------------------------------------------------
# Predictions and thresholds.


def make_labeller(
    model,
    mode: str = "whole",
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    num_classes: int | None = None,
) -> Callable:
    """jit (variables list, image float32 [H', W', 3], label_size (H, W)) -> (labels uint8
    [H, W], confidences float32 [H, W]): the argmax and the max of the models' mean softmax."""

    @functools.partial(jax.jit, static_argnames="label_size")
    def label(variables_list, image, label_size):
        probs = evaluation.ensemble_probabilities(
            model,
            variables_list,
            image[None],
            mode,
            tuple(crop_size),
            tuple(stride),
            num_classes,
            label_size,
        )[0]
        return jnp.argmax(probs, axis=-1).astype(jnp.uint8), jnp.max(probs, axis=-1)

    def run(variables_list, image, label_size):
        labels, conf = label(tuple(variables_list), jnp.asarray(image), tuple(label_size))
        return np.asarray(labels), np.asarray(conf, np.float32)

    return run


def confidence_bins(confidences: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """int64 bin of each float32 confidence in `num_bins` equal bins of [0, 1] (1 in the last).

    With a power-of-two `num_bins` the product is exact, so the bins keep the values' order.
    """
    scaled = np.asarray(confidences, np.float32) * np.float32(num_bins)
    return np.clip(scaled.astype(np.int64), 0, num_bins - 1)


def class_histogram(
    labels: np.ndarray, confidences: np.ndarray, num_classes: int, num_bins: int = NUM_BINS
) -> np.ndarray:
    """int64 [C, num_bins] counts of the confidences per predicted class (labels outside [0, C)
    are not counted)."""
    labels = np.asarray(labels, np.int64).ravel()
    counted = (labels >= 0) & (labels < num_classes)
    flat = labels[counted] * num_bins + confidence_bins(np.ravel(confidences)[counted], num_bins)
    return np.bincount(flat, minlength=num_classes * num_bins).reshape(num_classes, num_bins)


def exact_thresholds(
    histogram: np.ndarray,
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    *,
    quantile: float = class_thresholds.FRACTION,
    cap: float = class_thresholds.CAP,
    absent: float = class_thresholds.ABSENT,
) -> np.ndarray:
    """FDA's per-class thresholds, exact, from the histogram and one more pass over the data.

    Args:
      histogram: int [C, K] `class_histogram` counts summed over the dataset (K a power of two).
      chunks: returns a fresh iterable of the same (labels, float32 confidences) pairs that
        made the histogram; read once, and only when a threshold lies below the cap.
      quantile, cap, absent: as `class_thresholds.class_thresholds_from_chunks` (its fraction).

    Returns:
      float64 [C]: equal to `class_thresholds.class_thresholds` over all the chunks.
    """
    histogram = np.asarray(histogram, np.int64)
    num_classes, num_bins = histogram.shape
    counts = histogram.sum(axis=1)
    present = counts > 0
    index = class_thresholds.order_index(np.maximum(counts, 1), quantile)
    cumulative = np.cumsum(histogram, axis=1)
    bins = np.argmax(cumulative > index[:, None], axis=1)  # the bin of the order statistic
    before = np.where(bins > 0, cumulative[np.arange(num_classes), bins - 1], 0)
    rank = index - before  # its rank inside that bin
    # A bin starting at or above the cap holds a value that is capped whatever it is.
    need = present & (bins / num_bins < cap)
    thresholds = np.where(present, float(cap), float(absent))
    if need.any():
        parts: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        for labels, conf in chunks():
            labels = np.asarray(labels, np.int64).ravel()
            conf = np.asarray(conf, np.float32).ravel()
            in_range = (labels >= 0) & (labels < num_classes)
            safe = np.where(in_range, labels, 0)
            keep = in_range & need[safe] & (confidence_bins(conf, num_bins) == bins[safe])
            kept_labels, kept_conf = labels[keep], conf[keep]
            for c in np.unique(kept_labels):
                parts[c].append(kept_conf[kept_labels == c])
        for c in np.flatnonzero(need):
            values = np.concatenate(parts[c]) if parts[c] else np.zeros((0,), np.float32)
            if values.size <= rank[c]:
                raise ValueError(f"class {c}: the chunks do not match the histogram")
            thresholds[c] = np.partition(values, rank[c])[rank[c]]
    return np.where(thresholds > cap, float(cap), thresholds)


# ------------------------------------------------------------------------------------------------
# The command.


def load_models(options: Options, config):
    """(model, [variables]) of every --weights; an error names the path that does not load."""
    try:
        return weights.load_models(
            config.model, list(options.weights), options.weights_format, options.which
        )
    except (ConversionError, checkpointing.CheckpointError) as e:
        raise PseudoLabelError(str(e)) from e


def _stored(tmp: str, i: int) -> tuple[str, str]:
    return os.path.join(tmp, f"{i:07d}_labels.npy"), os.path.join(tmp, f"{i:07d}_conf.npy")


def _read_stored(
    tmp: str, n: int, progress: metrics_logging.Progress | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(n):
        labels_path, conf_path = _stored(tmp, i)
        yield np.load(labels_path), np.load(conf_path)
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()


def predict_all(plan: Plan, model, variables_list: Sequence[Mapping], tmp: str) -> np.ndarray:
    """First pass: each image's labels and confidences stored in `tmp`; returns the summed
    `class_histogram` int64 [C, NUM_BINS]."""
    o = plan.options
    labeller = make_labeller(model, plan.mode, plan.crop_size, plan.stride, plan.num_classes)
    histogram = np.zeros((plan.num_classes, NUM_BINS), np.int64)
    progress = metrics_logging.Progress("pseudo-labelling", len(plan.images))
    for i, size in enumerate(plan.sizes):
        image = plan.target.read(i)
        style = plan.style.read(int(plan.style_choice[i])) if plan.style is not None else None
        x = network_input(image, o.resize, style, o.style_beta, o.style_window, o.grayscale)
        labels, conf = labeller(variables_list, x, size)
        labels_path, conf_path = _stored(tmp, i)
        np.save(labels_path, labels)
        np.save(conf_path, conf)
        histogram += class_histogram(labels, conf, plan.num_classes)
        progress.update()
    progress.close()
    return histogram


def write_outputs(plan: Plan, thresholds: np.ndarray, tmp: str) -> np.ndarray:
    """Third pass: images, label PNGs and classes.json under --out; returns the int64 [256]
    counts of the written label values."""
    o = plan.options
    counts = np.zeros((256,), np.int64)
    progress = metrics_logging.Progress("writing labels", len(plan.images))
    stored = _read_stored(tmp, len(plan.images))
    for i, (rel, (labels, conf)) in enumerate(zip(plan.images, stored, strict=True)):
        image_out = os.path.join(o.out, "train", "images", rel)
        label_out = os.path.join(o.out, "train", "labels", label_name(rel))
        os.makedirs(os.path.dirname(image_out), exist_ok=True)
        os.makedirs(os.path.dirname(label_out), exist_ok=True)
        plan.target.write(i, image_out, o.symlink_images)
        pseudo = class_thresholds.apply_thresholds(labels, conf, thresholds, IGNORE)
        pseudo = np.asarray(pseudo).astype(np.uint8)
        Image.fromarray(pseudo).save(label_out)
        counts += np.bincount(pseudo.ravel(), minlength=256)
        progress.update()
    progress.close()
    table = {"classes": list(plan.class_names), "palette": [list(c) for c in plan.palette]}
    with open(os.path.join(o.out, "classes.json"), "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    return counts


def summarize(
    plan: Plan, thresholds: np.ndarray, histogram: np.ndarray, written: np.ndarray
) -> dict:
    """The summary written to pseudo_label_summary.json.

    Per class (by name): `thresholds`, `predicted_pixels` (labelled c before the thresholds),
    `kept_pixels` (labelled c in the PNGs), `kept_share` (kept / predicted; null for a class
    never predicted) and `class_share` (kept / all pixels); `ignored_share` is the share of 255;
    from --dataset, `record_names` {written image name: the split's example name}.
    """
    o = plan.options
    predicted = histogram.sum(axis=1)
    kept = written[: plan.num_classes]
    total = int(written.sum())
    names = plan.class_names
    return {
        "num_images": len(plan.images),
        "num_pixels": total,
        "ignored_pixels": int(written[IGNORE]),
        "ignored_share": float(written[IGNORE] / total),
        "thresholds": {n: float(t) for n, t in zip(names, thresholds, strict=True)},
        "predicted_pixels": {n: int(p) for n, p in zip(names, predicted, strict=True)},
        "kept_pixels": {n: int(k) for n, k in zip(names, kept, strict=True)},
        "kept_share": {
            n: (float(k / p) if p else None) for n, k, p in zip(names, kept, predicted, strict=True)
        },
        "class_share": {n: float(k / total) for n, k in zip(names, kept, strict=True)},
        "models": list(o.weights),
        "options": {
            **dataclasses.asdict(o),
            "data_dir": plan.data_dir,
            "mode": plan.mode,
            "image_files": "symlinked" if o.symlink_images else "copied",
            "thresholds": "exact",
            "model_weights": "1/N",
        },
        **(
            {"record_names": dict(zip(plan.images, plan.record_names))} if plan.record_names else {}
        ),
    }


def summary_table(summary: Mapping) -> str:
    """A markdown table: per class the threshold and the shares (in %), then the ignored share."""
    rows = []
    total = summary["num_pixels"]
    for name, threshold in summary["thresholds"].items():
        predicted = summary["predicted_pixels"][name]
        kept_share = summary["kept_share"][name]
        rows.append(
            (
                name,
                f"{threshold:.4f}",
                f"{100 * predicted / total:.2f}",
                "n/a" if kept_share is None else f"{100 * kept_share:.2f}",
                f"{100 * summary['class_share'][name]:.2f}",
            )
        )
    rows.append(("**ignored (255)**", "", "", "", f"{100 * summary['ignored_share']:.2f}"))
    head = ("class", "threshold", "predicted %", "kept % of class", "share %")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pseudo_label(plan: Plan, model, variables_list: Sequence[Mapping]) -> dict:
    """The three passes (module docstring) and the summary file; returns the summary."""
    o = plan.options
    needed = STORED_BYTES_PER_PIXEL * sum(h * w for h, w in plan.sizes)
    with tempfile.TemporaryDirectory(prefix="pgpc_pseudo_label_", dir=o.tmp_dir) as tmp:
        print(
            f"{len(plan.images)} images, {len(variables_list)} model(s); labels and confidences "
            f"between the passes: {needed / 1e6:.1f} MB in {tmp}",
            file=sys.stderr,
        )
        histogram = predict_all(plan, model, variables_list, tmp)
        thresholds = exact_thresholds(
            histogram,
            lambda: _read_stored(
                tmp, len(plan.images), metrics_logging.Progress("thresholds", len(plan.images))
            ),
            quantile=o.quantile,
            cap=o.cap,
        )
        written = write_outputs(plan, thresholds, tmp)
    summary = summarize(plan, thresholds, histogram, written)
    with open(os.path.join(o.out, SUMMARY_FILE), "w") as f:
        f.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing stays side-effect free."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config whose `model`, `classes` and `eval` groups are used.",
        lock_config=True,
    )
    weights.define_flags(multiple=True)
    flags.DEFINE_string(
        "images", None, "Folder of target images (searched recursively); or --dataset / --split."
    )
    flags.DEFINE_string(
        "dataset",
        None,
        "Built dataset whose split holds the target images (e.g. synthetic_shift/default), "
        "instead of --images; its labels are not read.",
    )
    flags.DEFINE_string("split", None, "Split of --dataset (e.g. target_train).")
    flags.DEFINE_string(
        "data_dir",
        None,
        "Where --dataset / --style-dataset are built; default config.data.data_dir.",
    )
    flags.DEFINE_string("out", None, "Output folder (absent or empty).")
    flags.DEFINE_string(
        "resize",
        None,
        "Network input size W,H (DAFormer on Cityscapes: 1024,512); labels keep "
        "each image's own size. Needed when the images' sizes differ.",
    )
    flags.DEFINE_enum(
        "mode", None, list(evaluation.MODES), "Inference mode; default config.eval.mode."
    )
    flags.DEFINE_string(
        "style-images",
        None,
        "Folder of source-style images: each target image takes the "
        "low-frequency amplitude of one of them (FDA) before the models see it.",
    )
    flags.DEFINE_string(
        "style-dataset",
        None,
        "Built dataset whose split holds the source-style images (e.g. synthetic_shift/default), "
        "instead of --style-images.",
    )
    flags.DEFINE_string("style-split", None, "Split of --style-dataset (e.g. source_train).")
    flags.DEFINE_float("style-beta", 0.01, "FDA's beta (window half-size floor(min(H, W)*beta)).")
    flags.DEFINE_enum(
        "style-window", "numpy", list(fourier.WINDOWS), "FDA's window convention (uda/fourier.py)."
    )
    flags.DEFINE_bool("grayscale", False, "Feed the models the luma in all three channels.")
    flags.DEFINE_float(
        "quantile",
        class_thresholds.FRACTION,
        "Per-class threshold: the value at this share of "
        "the class's ascending confidences (FDA: 0.66).",
    )
    flags.DEFINE_float("cap", class_thresholds.CAP, "Upper bound of every threshold (FDA: 0.9).")
    flags.DEFINE_integer("seed", 0, "Seed of the style image drawn for each target image.")
    flags.DEFINE_bool(
        "symlink-images", False, "Link the target images into --out instead of copying them."
    )
    flags.DEFINE_string(
        "tmp-dir",
        None,
        "Where the labels and confidences wait between the passes (5 bytes a "
        "pixel); default: the system's temporary folder.",
    )


def options_from_flags() -> Options:
    """The flags as Options (a bad --resize raises predict.PredictError)."""
    style_given = FLAGS["style-beta"].present or FLAGS["style-window"].present
    if style_given and not (FLAGS["style-images"].value or FLAGS["style-dataset"].value):
        raise PseudoLabelError(
            "--style-beta / --style-window need --style-images or --style-dataset"
        )
    return Options(
        images=FLAGS.images,
        dataset=FLAGS.dataset,
        split=FLAGS.split,
        data_dir=FLAGS.data_dir,
        out=FLAGS.out,
        weights=tuple(weights.weights_paths(FLAGS.weights)),
        weights_format=FLAGS["weights-format"].value,
        which=FLAGS.which,
        resize=predict.parse_size(FLAGS.resize),
        mode=FLAGS.mode,
        style_images=FLAGS["style-images"].value,
        style_dataset=FLAGS["style-dataset"].value,
        style_split=FLAGS["style-split"].value,
        style_beta=FLAGS["style-beta"].value,
        style_window=FLAGS["style-window"].value,
        grayscale=FLAGS.grayscale,
        quantile=FLAGS.quantile,
        cap=FLAGS.cap,
        seed=FLAGS.seed,
        symlink_images=FLAGS["symlink-images"].value,
        tmp_dir=FLAGS["tmp-dir"].value,
    )


def execute(options: Options, config) -> int:
    """The command after its flags: checks, models, the three passes, the printed table.

    Returns:
      The exit status: 0, or 2 after one `error: ...` line on stderr (nothing written).
    """
    try:
        plan = check_inputs(options, config)
        model, variables_list = load_models(options, config)
        summary = pseudo_label(plan, model, variables_list)
    except (PseudoLabelError, predict.PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    print(
        f"{summary['num_images']} images, {len(options.weights)} model(s): "
        f"{100 * summary['ignored_share']:.2f} % of the pixels ignored; wrote {options.out}"
    )
    return 0


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:  # orbax logs every step of a checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or not FLAGS.weights or not FLAGS.out:
        raise app.UsageError(
            "usage: pseudo_label --config CONFIG --weights W1 [W2 ...] (--images DIR | --dataset "
            "NAME --split SPLIT [--data_dir DIR]) --out DIR"
        )
    try:
        options = options_from_flags()
    except (PseudoLabelError, predict.PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    status = execute(options, FLAGS.config)
    if status:
        sys.exit(status)


def cli() -> None:
    """The `pgpc-pseudo-label` command (`python -m pgpc_jax.pseudo_label`)."""
    define_flags()
    app.run(main, flags_parser=lambda argv: parse_flags(weights.gather_weights_arguments(argv)))


if __name__ == "__main__":
    cli()
