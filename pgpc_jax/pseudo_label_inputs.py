"""The input side of `python -m pgpc_jax.pseudo_label`: its options, the target and source-style
images (a folder or a built split), every check made before --out is created, and the network
input of each target image. The command itself (flags, the three passes, the summary) is
`pgpc_jax/pseudo_label.py`, whose module docstring describes the whole run.

`check_inputs` makes every check of the command but loading the weights and returns the `Plan`
of the run; a bad input raises `PseudoLabelError`, whose message names the flag or the file.
Nothing is written and nothing is decoded: image sizes come from the file headers, or from the
stored PNGs' headers of a split (`ImageSource.header`).

The network input of a target image (`network_input`), at its own size H x W (the label size):
1. [fixed shape] the image is read as RGB uint8 and resized to --resize (the project's bilinear
   uint8 resize, as `evaluate --resize`).
2. With --style-images or --style-dataset [reconstructed, the fifth seed's "target styled to the
   source"]: one source-style image per target image, drawn uniformly with replacement by
   `np.random.default_rng(seed)` in the order of the target images (sorted paths, or the
   split's order) among the style images (sorted paths, or the split's order) (`style_indices`),
   is resized the same way to the network input size; `uda.fourier.fda_source_to_target(target,
   style, beta, window)` gives the target its own phase and the style image's low-frequency
   amplitude, on raw [0, 255] pixels, not clipped (as FDA feeds its transfer unclipped to the
   network).
3. With --grayscale [reconstructed]: the luma 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, PIL's
   'L' weights, in float, not rounded) replicated to the three channels (`to_grayscale`).
4. The project's normalisation (ImageNet mean / std, `predict.normalize`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import shutil
import tempfile
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from data_pipelines import sources, transforms
from pgpc_jax import checkpointing, class_set, evaluation, predict
from pgpc_jax.config_checks import ConfigError
from pgpc_jax.uda import class_thresholds, fourier

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # the extensions `data_pipelines/folder.py` reads
IGNORE = 255
# Stored per pixel between the passes: a uint8 label and a float32 confidence.
STORED_BYTES_PER_PIXEL = 5
# ITU-R BT.601 luma, PIL's `convert('L')` weights.
LUMA = (0.299, 0.587, 0.114)
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
    try:  # a class set of the data (configs/folder.py) comes from the weights' run
        class_set.adopt_from_weights(config, options.weights)
        names, palette = class_set.names_and_colors(config)
    except (ConfigError, checkpointing.CheckpointError) as e:  # a class-set mismatch, a bad run
        raise PseudoLabelError(str(e)) from e
    num_classes = int(config.model.num_classes)
    if num_classes >= IGNORE:
        raise PseudoLabelError(
            f"model.num_classes={num_classes}: uint8 label PNGs hold at most {IGNORE} classes"
        )
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
