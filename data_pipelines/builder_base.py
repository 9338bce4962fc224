"""The shared TFDS builder of every segmentation dataset: PNG bytes in, ArrayRecord out, no TF.

A dataset module lists its (image, label) file pairs per split; this base reads them, maps the raw
label ids to train ids, counts the pixels of each class at full resolution (DAFormer's
`sample_class_stats.json`, needed by rare-class sampling), optionally resizes to the training
scale, and yields PNG bytes encoded with PIL (TFDS then never imports TensorFlow).

Every example has the features
  image        PNG, uint8 [H, W, 3]
  label        PNG, uint8 [H', W', 1] train ids, 255 = ignore (all 255 for unlabelled images);
               training splits share the image size, validation splits keep full resolution
  class_pixels int64 [num_classes], counted on the full-resolution label
  name         the file stem, e.g. `aachen_000000_000019`
plus the dataset's own `EXTRA_FEATURES`. Shuffling is disabled, so record i is the i-th file in
sorted order, and `metadata.json` holds
  class_names  the class names in index order
  palette      one [r, g, b] per class (`CLASS_PALETTE`; Cityscapes' for the 19-class datasets)
  class_pixels {split: int64 [N, num_classes] as nested lists}
  summary      {split: images, skipped files, unknown ids, class pixels, labelled}
where `labelled` is True when any image of the split had a label file.

Raw ids outside `KNOWN_IDS` are counted and become 255 for the downloaded datasets (their void
ids); a builder that sets `STRICT_IDS` (the `folder` datasets) refuses them instead, with an
`UnknownIdError` naming the label file, the values and their pixel counts.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import image_io, transforms
from data_pipelines.labels import (
    CLASSES,
    IGNORE_INDEX,
    PALETTE,
    count_class_pixels,
    generated_palette,
    map_label_ids,
)


class LayoutError(FileNotFoundError):
    """The manual directory does not have the dataset's expected layout."""


class SizeMismatchError(ValueError):
    """An image and its label differ in size."""


class UnknownIdError(ValueError):
    """A label holds values outside the class set of a builder with `STRICT_IDS`."""


@dataclasses.dataclass(eq=False)
class ResizeConfig(tfds.core.BuilderConfig):
    """Build-time resize (mmseg keep-ratio `Resize`), part of the config so re-runs stay idempotent.

    Attributes:
      train_scale: (a, b) keep-ratio bound for training images and labels, None = native size.
      val_scale: (a, b) bound for validation images; validation labels always stay full size.
    """

    train_scale: tuple[int, int] | None = None
    val_scale: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Item:
    """One example to build: its files (a None label means unlabelled) and extra features."""

    name: str
    image: str
    label: str | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def resize_config(scale: tuple[int, int] | None, name: str | None = None) -> ResizeConfig:
    """The config for `--resize WxH` (both train and val images fit W×H) or None (native size)."""
    if scale is None:
        return ResizeConfig(name=name or "full", description="Native resolution.")
    return ResizeConfig(
        name=name or f"{scale[0]}x{scale[1]}",
        description=f"Images resized keep-ratio into {scale[0]}x{scale[1]}.",
        train_scale=scale,
        val_scale=scale,
    )


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress(items: Iterable, label: str, total: int | None = None, stream=None) -> Iterator:
    """Yields `items`, printing `label [bar] done/total rate img/s ETA` to stderr (every 0.5 s)."""
    stream = stream or sys.stderr
    total = len(items) if total is None else total
    start, last = time.time(), 0.0
    for i, item in enumerate(items):
        yield item
        now = time.time()
        if now - last >= 0.5 or i + 1 == total:
            last = now
            rate = (i + 1) / max(now - start, 1e-9)
            eta = max(total - i - 1, 0) / rate
            bar = "#" * int(30 * (i + 1) / max(total, 1))
            stream.write(
                f"\r{label} [{bar:<30}] {i + 1}/{total} {rate:.1f} img/s ETA {_format_seconds(eta)}"
            )
            stream.flush()
    if total:
        stream.write("\n")


def encode_example(
    image: np.ndarray,
    label: np.ndarray,
    num_classes: int,
    scale: tuple[int, int] | None,
    resize_label: bool,
) -> tuple[dict[str, Any], np.ndarray]:
    """Counts class pixels at full resolution, resizes and PNG-encodes one example.

    Args:
      image: uint8 [H, W, 3].
      label: uint8 [H, W] train ids at full resolution.
      num_classes: length of the class pixel vector.
      scale: keep-ratio resize bound (w, h), or None.
      resize_label: False keeps the label at full resolution (validation splits).

    Returns:
      ({'image': PNG bytes, 'label': PNG bytes, 'class_pixels': int64 [C]}, class pixels).
    """
    pixels = count_class_pixels(label, num_classes)
    image, resized = transforms.rescale(image, label if resize_label else None, scale)
    label = resized if resize_label else label
    encoded = {
        "image": image_io.encode_png(image),
        "label": image_io.encode_png(label),
        "class_pixels": pixels,
    }
    return encoded, pixels


class ItemReader:
    """Reads, checks, maps and encodes one `Item`: picklable, so build workers can run it.

    Returns a dict with `error` = None or (kind, message), kind in corrupt / mismatch /
    missing_label / label_format / unknown_ids, and otherwise `example` (the encoded features),
    `pixels`, `unknown` and `labelled`. Errors are returned, not raised, so that a worker process
    hands them back as plain data and the parent raises them in file order.

    `strict_ids` None counts the ids outside `known_ids` (they become 255); a string makes them an
    `unknown_ids` error, the string ending its message (which values are valid, how to map others).
    """

    def __init__(
        self,
        read_label,
        id_to_train_id,
        known_ids,
        num_classes,
        scale,
        resize_label,
        strict_ids: str | None = None,
    ):
        self.read_label, self.id_to_train_id, self.known_ids = read_label, id_to_train_id, known_ids
        self.num_classes, self.scale, self.resize_label = num_classes, scale, resize_label
        self.strict_ids = strict_ids

    def __call__(self, item: Item) -> dict[str, Any]:
        if item.label is not None and not os.path.isfile(item.label):
            return {
                "error": (
                    "missing_label",
                    f"no label for image {item.image}: expected {item.label}",
                )
            }
        try:
            image = image_io.read_rgb(item.image)
            raw = None if item.label is None else self.read_label(item.label)
        except image_io.CorruptImageError as e:
            return {"error": ("corrupt", str(e))}
        except image_io.LabelFormatError as e:
            return {"error": ("label_format", str(e))}
        if raw is not None and raw.shape[:2] != image.shape[:2]:
            message = (
                f"image / label size mismatch: {item.image} is {image.shape[1]}x"
                f"{image.shape[0]} but {item.label} is {raw.shape[1]}x{raw.shape[0]}"
            )
            return {"error": ("mismatch", message)}
        if raw is None:
            label, unknown = np.full(image.shape[:2], IGNORE_INDEX, np.uint8), {}
        else:
            label, unknown = map_label_ids(raw, self.id_to_train_id, self.known_ids)
            if unknown and self.strict_ids is not None:
                return {
                    "error": (
                        "unknown_ids",
                        _unknown_ids_message(item.label, unknown, self.strict_ids),
                    )
                }
        example, pixels = encode_example(
            image, label, self.num_classes, self.scale, self.resize_label
        )
        return {
            "error": None,
            "example": example,
            "pixels": pixels,
            "unknown": unknown,
            "labelled": raw is not None,
        }


def _unknown_ids_message(path: str, unknown: dict[int, int], rule: str) -> str:
    """One line: the label file, its values outside the class set with pixel counts, the rule."""
    values = sorted(unknown)
    shown = ", ".join(f"{v} ({unknown[v]} pixels)" for v in values[:10])
    if len(values) > 10:
        shown += f", ... ({len(values) - 10} more values)"
    return f"label {path} has values outside the class set: {shown}; {rule}"


_ERRORS = {
    "corrupt": image_io.CorruptImageError,
    "mismatch": SizeMismatchError,
    "label_format": image_io.LabelFormatError,
    "unknown_ids": UnknownIdError,
}
# What `--skip_corrupt` skips: single bad files. A colour label is a wrong dataset, and a value
# outside a folder dataset's class set a wrong class file: both always raised.
SKIPPABLE = ("corrupt", "mismatch", "missing_label")


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder. Subclasses set the class attributes and implement `list_items`."""

    VERSION = tfds.core.Version("1.0.0")
    # Expected on-disk layout, printed when a folder is missing.
    LAYOUT = ""
    # Raw id -> train id, and every id the dataset defines (others are counted as unknown).
    ID_TO_TRAIN_ID: dict[int, int] = {}
    KNOWN_IDS: tuple[int, ...] | None = None
    # Splits evaluated at full label resolution (only their images are resized).
    VAL_SPLITS: tuple[str, ...] = ("val",)
    EXTRA_FEATURES: dict[str, tfds.features.FeatureConnector] = {}
    CLASS_NAMES: tuple[str, ...] = CLASSES
    # One RGB colour per class, stored in metadata.json (generated when its length differs).
    CLASS_PALETTE: tuple[tuple[int, int, int], ...] = PALETTE
    # None: ids outside KNOWN_IDS are counted and ignored; a string: they fail the build, and the
    # string (which values are valid, how to map others) ends the error message.
    STRICT_IDS: str | None = None

    # Reads a label file as raw ids [H, W] (a plain function, so build workers can pickle it).
    READ_LABEL = staticmethod(image_io.read_label)

    def __init__(
        self,
        *,
        manual_dir: str | None = None,
        skip_corrupt: bool = False,
        num_workers: int = 0,
        **kwargs,
    ):
        self.manual_dir = manual_dir
        self.skip_corrupt = skip_corrupt
        self.num_workers = num_workers
        self.summary: dict[str, dict[str, Any]] = {}
        self._class_pixels: dict[str, list[list[int]]] = {}
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.CLASS_NAMES)

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """`CLASS_PALETTE`, or `generated_palette` where it does not have one colour per class."""
        if len(self.CLASS_PALETTE) == self.num_classes:
            return tuple(tuple(int(v) for v in colour) for colour in self.CLASS_PALETTE)
        return generated_palette(self.num_classes)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "class_pixels": tfds.features.Tensor(shape=(self.num_classes,), dtype=np.int64),
            "name": tfds.features.Text(),
            **self.EXTRA_FEATURES,
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().splitlines()[0],
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    # ---- Subclass hooks ----------------------------------------------------------------------
    def list_items(self, root: str) -> dict[str, list[Item]]:
        """Returns {split: items sorted by name}; raises LayoutError for a missing folder."""
        raise NotImplementedError

    # ---- Helpers for subclasses --------------------------------------------------------------
    def require_dir(self, path: str) -> str:
        """Returns `path` if it is a directory, else raises LayoutError with the expected layout."""
        if not os.path.isdir(path):
            raise LayoutError(
                f"{self.name}: missing folder {path}\nExpected layout of --manual_dir:\n{self.LAYOUT}"
            )
        return path

    def checked_items(self) -> dict[str, list[Item]]:
        """`list_items` of the manual directory; raises LayoutError for an empty split."""
        root = os.fspath(self.manual_dir or "")
        if not os.path.isdir(root):
            raise LayoutError(
                f"{self.name}: --manual_dir {root!r} is not a directory\n"
                f"Expected layout of --manual_dir:\n{self.LAYOUT}"
            )
        splits = self.list_items(root)
        for split, items in splits.items():
            if not items:
                raise LayoutError(
                    f"{self.name}: no images found for split {split!r} under {root}\n"
                    f"Expected layout of --manual_dir:\n{self.LAYOUT}"
                )
        return splits

    # ---- TFDS plumbing -----------------------------------------------------------------------
    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Files are read from `self.manual_dir`, in their original layout.
        splits = self.checked_items()
        return {split: self._generate_examples(split, items) for split, items in splits.items()}

    def _scale(self, split: str) -> tuple[int, int] | None:
        key = "val_scale" if split in self.VAL_SPLITS else "train_scale"
        return getattr(self.builder_config, key, None)

    def _generate_examples(self, split: str, items: Iterable[Item]):
        items = list(items)
        stats = self._start_split(split)
        reader = ItemReader(
            self.READ_LABEL,
            self.ID_TO_TRAIN_ID,
            self.KNOWN_IDS,
            self.num_classes,
            self._scale(split),
            split not in self.VAL_SPLITS,
            self.STRICT_IDS,
        )
        pool = None
        if self.num_workers > 1:
            # Spawned, not forked: safe whatever threads the parent runs.
            pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
            results = pool.imap(reader, items, chunksize=4)
        else:
            results = map(reader, items)
        try:
            for item, result in progress(zip(items, results), f"{self.name}/{split}", len(items)):
                if result["error"] is not None:
                    kind, message = result["error"]
                    if not self.skip_corrupt or kind not in SKIPPABLE:
                        raise _ERRORS.get(kind, LayoutError)(message)
                    stats[f"skipped_{kind}"].append(item.name)
                    continue
                self._record(split, result["pixels"], result["unknown"], result["labelled"])
                yield item.name, {**result["example"], "name": item.name, **item.extra}
        finally:
            if pool is not None:
                pool.terminate()
        self._finish_split(split)

    def _start_split(self, split: str) -> dict[str, Any]:
        self.summary[split] = stats = {
            "images": 0,
            "skipped_corrupt": [],
            "skipped_mismatch": [],
            "skipped_missing_label": [],
            "unknown_ids": {},
            "class_pixels": np.zeros(self.num_classes, np.int64),
            "labelled": False,
        }
        self._class_pixels[split] = []
        return stats

    def make_example(
        self, split: str, name: str, image: np.ndarray, label: np.ndarray
    ) -> tuple[str, dict[str, Any]]:
        """Counts, resizes and encodes an example given as arrays (generated datasets).

        Args:
          split: split name (selects the train or val resize rule).
          name: unique name within the split, also the key.
          image: uint8 [H, W, 3].
          label: uint8 [H, W] train ids at full resolution.

        Returns:
          (key, feature dict) for TFDS.
        """
        example, pixels = encode_example(
            image, label, self.num_classes, self._scale(split), split not in self.VAL_SPLITS
        )
        self._record(split, pixels, {})
        return name, {**example, "name": name}

    def _record(
        self, split: str, pixels: np.ndarray, unknown: dict[int, int], labelled: bool = True
    ) -> None:
        stats = self.summary[split]
        stats["images"] += 1
        stats["labelled"] = stats["labelled"] or labelled
        stats["class_pixels"] += pixels
        for raw_id, count in unknown.items():
            stats["unknown_ids"][raw_id] = stats["unknown_ids"].get(raw_id, 0) + count
        self._class_pixels[split].append(pixels.tolist())

    def _finish_split(self, split: str) -> None:
        stats = self.summary[split]
        metadata = self.info.metadata
        metadata.setdefault("class_pixels", {})[split] = self._class_pixels[split]
        metadata.setdefault("summary", {})[split] = {
            "images": stats["images"],
            "skipped_corrupt": stats["skipped_corrupt"],
            "skipped_mismatch": stats["skipped_mismatch"],
            "skipped_missing_label": stats["skipped_missing_label"],
            "unknown_ids": {str(k): v for k, v in sorted(stats["unknown_ids"].items())},
            "class_pixels": stats["class_pixels"].tolist(),
            "labelled": stats["labelled"],
        }
        metadata["class_names"] = list(self.CLASS_NAMES)
        metadata["palette"] = [list(colour) for colour in self.palette]
