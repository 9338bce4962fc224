"""Cityscapes (Cordts et al. 2016) fine annotations as a TFDS dataset, train and val splits.

Reads `leftImg8bit` + `gtFine/*_gtFine_labelIds.png` and maps label ids to the 19 train ids with
the `cityscapesscripts` table (DAFormer uses the equivalent `*_labelTrainIds.png`). The
`daformer` config stores training images and labels at 1024×512 (DAFormer `Resize((1024, 512))`)
and validation images at the test scale 1024×512 with labels kept at 2048×1024.
"""

from __future__ import annotations

import glob
import os

from data_pipelines.builder_base import Item, ResizeConfig, SegmentationBuilder
from data_pipelines.labels import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_KNOWN_IDS

LAYOUT = """\
  <manual_dir>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  <manual_dir>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"""

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(SegmentationBuilder, skip_registration=True):
    """Cityscapes street scenes with fine labels, Cityscapes train ids."""

    LAYOUT = LAYOUT
    ID_TO_TRAIN_ID = CITYSCAPES_ID_TO_TRAIN_ID
    KNOWN_IDS = CITYSCAPES_KNOWN_IDS
    VAL_SPLITS = ("val",)
    BUILDER_CONFIGS = [
        ResizeConfig(name="full", description="Native 2048x1024."),
        ResizeConfig(
            name="daformer",
            description="DAFormer scale: train and val images 1024x512, val labels 2048x1024.",
            train_scale=(1024, 512),
            val_scale=(1024, 512),
        ),
    ]

    def list_items(self, root: str) -> dict[str, list[Item]]:
        splits = {}
        for split in ("train", "val"):
            image_dir = self.require_dir(os.path.join(root, "leftImg8bit", split))
            label_dir = self.require_dir(os.path.join(root, "gtFine", split))
            items = []
            for image in sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))):
                city = os.path.basename(os.path.dirname(image))
                stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
                label = os.path.join(label_dir, city, stem + LABEL_SUFFIX)
                items.append(Item(stem, image, label))
            splits[split] = items
        return splits
