"""Dark Zurich (Sakaridis et al. 2019) as a TFDS dataset: unlabelled night / twilight / day
training images with their day-night correspondence, and the labelled night val split.

Layout as the Dark_Zurich_train_anon + Dark_Zurich_val_anon archives merged into one folder (the
layout SePiCo's `configs/_base_/datasets/uda_cityscapes_to_dark_zurich_*.py` and
`mmseg/models/uda/sepico_dark.py` read). A correspondence CSV row is
`train/night/<seq>/<name>,train/day/<seq>/<name>` (names without `_rgb_anon.png`); the night
examples carry the matching day image's name in `corresp_day` ('' when none). Val labels are
`*_gt_labelIds.png` mapped with the Cityscapes table. The `daformer` config resizes keep-ratio into
1280×720 (SePiCo's Dark Zurich scale, 1920×1080 → 1280×720), val labels stay 1920×1080.
"""

from __future__ import annotations

import csv
import glob
import os

import tensorflow_datasets as tfds

from data_pipelines.builder_base import Item, ResizeConfig, SegmentationBuilder
from data_pipelines.labels import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_KNOWN_IDS

LAYOUT = """\
  <manual_dir>/rgb_anon/train/{night,twilight,day}/<seq>/<seq>_frame_<n>_rgb_anon.png
  <manual_dir>/corresp/train/night/<seq>.csv     rows: train/night/<seq>/<name>,train/day/<seq>/<name>
  <manual_dir>/rgb_anon/val/night/<seq>/<name>_rgb_anon.png
  <manual_dir>/gt/val/night/<seq>/<name>_gt_labelIds.png"""

IMAGE_SUFFIX = "_rgb_anon.png"
LABEL_SUFFIX = "_gt_labelIds.png"


def read_correspondences(corresp_dir: str) -> dict[str, str]:
    """Reads every CSV under `corresp_dir` into {night key: day key}.

    Args:
      corresp_dir: `<root>/corresp/train/night`.

    Returns:
      {'train/night/<seq>/<name>': 'train/day/<seq>/<name>'}.
    """
    pairs = {}
    for path in sorted(glob.glob(os.path.join(corresp_dir, "**", "*.csv"), recursive=True)):
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2:
                    continue
                night, day = row[0].strip(), row[1].strip()
                if pairs.get(night, day) != day:
                    raise ValueError(f"{path}: {night} has two day correspondences")
                pairs[night] = day
    return pairs


class DarkZurich(SegmentationBuilder, skip_registration=True):
    """Dark Zurich night-time driving (train unlabelled, val labelled), Cityscapes train ids."""

    LAYOUT = LAYOUT
    ID_TO_TRAIN_ID = CITYSCAPES_ID_TO_TRAIN_ID
    KNOWN_IDS = CITYSCAPES_KNOWN_IDS
    VAL_SPLITS = ("val",)
    EXTRA_FEATURES = {"corresp_day": tfds.features.Text()}
    BUILDER_CONFIGS = [
        ResizeConfig(name="full", description="Native 1920x1080."),
        ResizeConfig(
            name="daformer",
            description="Keep-ratio into 1280x720 (train and val images), val labels 1920x1080.",
            train_scale=(1280, 720),
            val_scale=(1280, 720),
        ),
    ]

    def list_items(self, root: str) -> dict[str, list[Item]]:
        corresp_dir = os.path.join(root, "corresp", "train", "night")
        pairs = read_correspondences(self.require_dir(corresp_dir))
        splits = {}
        for condition in ("night", "twilight", "day"):
            image_dir = self.require_dir(os.path.join(root, "rgb_anon", "train", condition))
            items = []
            for image in sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))):
                seq = os.path.basename(os.path.dirname(image))
                stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
                day = pairs.get(f"train/{condition}/{seq}/{stem}", "")
                items.append(Item(stem, image, None, {"corresp_day": day}))
            splits[f"train_{condition}"] = items
        image_dir = self.require_dir(os.path.join(root, "rgb_anon", "val", "night"))
        label_dir = self.require_dir(os.path.join(root, "gt", "val", "night"))
        items = []
        for image in sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))):
            seq = os.path.basename(os.path.dirname(image))
            stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
            label = os.path.join(label_dir, seq, stem + LABEL_SUFFIX)
            items.append(Item(stem, image, label, {"corresp_day": ""}))
        splits["val"] = items
        return splits
