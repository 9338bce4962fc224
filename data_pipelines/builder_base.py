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
sorted order, and `metadata.json` holds the per-split class pixel table and the build summary.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import image_io, transforms
from data_pipelines.labels import CLASSES, IGNORE_INDEX, count_class_pixels, map_label_ids


class LayoutError(FileNotFoundError):
    """The manual directory does not have the dataset's expected layout."""


class SizeMismatchError(ValueError):
    """An image and its label differ in size."""


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


def progress(items: list, label: str, stream=None, min_interval_s: float = 0.5) -> Iterator:
    """Yields `items`, printing `label done/total rate img/s ETA` to stderr, at most every 0.5 s."""
    stream = stream or sys.stderr
    total, start, last = len(items), time.time(), 0.0
    for i, item in enumerate(items):
        yield item
        now = time.time()
        if now - last >= min_interval_s or i + 1 == total:
            last = now
            rate = (i + 1) / max(now - start, 1e-9)
            eta = (total - i - 1) / rate
            bar = "#" * int(30 * (i + 1) / max(total, 1))
            stream.write(
                f"\r{label} [{bar:<30}] {i + 1}/{total} {rate:.1f} img/s ETA {_format_seconds(eta)}"
            )
            stream.flush()
    if total:
        stream.write("\n")


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

    def __init__(self, *, manual_dir: str | None = None, skip_corrupt: bool = False, **kwargs):
        self.manual_dir = manual_dir
        self.skip_corrupt = skip_corrupt
        self.summary: dict[str, dict[str, Any]] = {}
        self._class_pixels: dict[str, list[list[int]]] = {}
        super().__init__(**kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.CLASS_NAMES)

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

    def read_raw_label(self, path: str) -> np.ndarray:
        """Reads a label file as raw ids [H, W]."""
        return image_io.read_label(path)

    def map_label(self, raw: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
        """Raw ids -> (uint8 train ids [H, W], {unknown id: pixels})."""
        return map_label_ids(raw, self.ID_TO_TRAIN_ID, self.KNOWN_IDS)

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

    def _generate_examples(self, split: str, items: Iterable[Item]):
        items = list(items)
        stats = self._start_split(split)
        for item in progress(items, f"{self.name}/{split}"):
            if item.label is not None and not os.path.isfile(item.label):
                if not self.skip_corrupt:
                    raise LayoutError(f"no label for image {item.image}: expected {item.label}")
                stats["skipped_missing_label"].append(item.name)
                continue
            try:
                image = image_io.read_rgb(item.image)
                raw = None if item.label is None else self.read_raw_label(item.label)
            except image_io.CorruptImageError:
                if not self.skip_corrupt:
                    raise
                stats["skipped_corrupt"].append(item.name)
                continue
            if raw is not None and raw.shape[:2] != image.shape[:2]:
                message = (
                    f"image / label size mismatch: {item.image} is {image.shape[1]}x"
                    f"{image.shape[0]} but {item.label} is {raw.shape[1]}x{raw.shape[0]}"
                )
                if not self.skip_corrupt:
                    raise SizeMismatchError(message)
                stats["skipped_mismatch"].append(item.name)
                continue
            if raw is None:
                label, unknown = np.full(image.shape[:2], IGNORE_INDEX, np.uint8), {}
            else:
                label, unknown = self.map_label(raw)
            yield self.make_example(split, item.name, image, label, unknown, item.extra)
        self._finish_split(split)

    def _start_split(self, split: str) -> dict[str, Any]:
        self.summary[split] = stats = {
            "images": 0,
            "skipped_corrupt": [],
            "skipped_mismatch": [],
            "skipped_missing_label": [],
            "unknown_ids": {},
            "class_pixels": np.zeros(self.num_classes, np.int64),
        }
        self._class_pixels[split] = []
        return stats

    def make_example(
        self,
        split: str,
        name: str,
        image: np.ndarray,
        label: np.ndarray,
        unknown: dict[int, int],
        extra: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        """Counts, resizes and encodes one example.

        Args:
          split: split name (selects the train or val resize rule).
          name: file stem, unique within the split.
          image: uint8 [H, W, 3].
          label: uint8 [H, W] train ids at full resolution.
          unknown: {raw id: pixels} of ids the table does not know (already mapped to 255).
          extra: values of `EXTRA_FEATURES`.

        Returns:
          (key, feature dict) for TFDS.
        """
        stats = self.summary[split]
        pixels = count_class_pixels(label, self.num_classes)
        stats["images"] += 1
        stats["class_pixels"] += pixels
        for raw_id, count in unknown.items():
            stats["unknown_ids"][raw_id] = stats["unknown_ids"].get(raw_id, 0) + count
        self._class_pixels[split].append(pixels.tolist())
        config = self.builder_config
        if split in self.VAL_SPLITS:
            image, _ = transforms.rescale(image, None, getattr(config, "val_scale", None))
        else:
            image, label = transforms.rescale(image, label, getattr(config, "train_scale", None))
        example = {
            "image": image_io.encode_png(image),
            "label": image_io.encode_png(label),
            "class_pixels": pixels,
            "name": name,
            **extra,
        }
        return name, example

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
        }
        metadata["class_names"] = list(self.CLASS_NAMES)
