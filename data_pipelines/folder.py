"""Any image folder + label folder as a TFDS dataset: how a user brings their own domain.

The class table (and an optional raw id -> class index map) comes from `classes.json`. Without an
`id_map`, label values are class indices directly and any value >= the number of classes (except
255) is counted as unknown and ignored. Labels are paired with images by relative path and stem; a
split without a `labels/` folder is unlabelled (e.g. the target domain's training images).

classes.json:
  {"classes": ["road", "sidewalk", ...],      # required, the class names in index order
   "palette": [[128, 64, 128], ...],          # optional
   "id_map": {"7": 0, "8": 1, ...}}           # optional, raw id -> class index
Use `"classes": "cityscapes"` (and optionally `"id_map": "cityscapes"`) for the 19-class space.
"""

from __future__ import annotations

import glob
import json
import os

from data_pipelines.builder_base import Item, SegmentationBuilder
from data_pipelines.labels import CITYSCAPES_ID_TO_TRAIN_ID, CLASSES, IGNORE_INDEX

LAYOUT = """\
  <manual_dir>/classes.json                      class names (+ optional palette, id_map)
  <manual_dir>/<split>/images/**/<name>.{png,jpg,jpeg}   split in train, val, test (any present)
  <manual_dir>/<split>/labels/**/<name>.png      optional; same relative path and stem"""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")


def read_class_table(path: str) -> tuple[tuple[str, ...], dict[int, int]]:
    """Reads classes.json into (class names, raw id -> class index)."""
    with open(path) as f:
        table = json.load(f)
    classes = table.get("classes")
    if classes == "cityscapes":
        classes = CLASSES
    if not classes or not isinstance(classes, (list, tuple)):
        raise ValueError(f'{path}: "classes" must be a non-empty list of names or "cityscapes"')
    id_map = table.get("id_map")
    if id_map == "cityscapes":
        id_map = CITYSCAPES_ID_TO_TRAIN_ID
    elif id_map is None:
        id_map = {i: i for i in range(len(classes))}
    else:
        id_map = {int(k): int(v) for k, v in id_map.items()}
    bad = {k: v for k, v in id_map.items() if not (0 <= v < len(classes) or v == IGNORE_INDEX)}
    if bad:
        raise ValueError(f"{path}: id_map targets outside 0..{len(classes) - 1} or 255: {bad}")
    return tuple(classes), id_map


class Folder(SegmentationBuilder, skip_registration=True):
    """A user's own image / label folders; the class table comes from classes.json."""

    LAYOUT = LAYOUT
    VAL_SPLITS = ("val", "test")

    def __init__(self, *, manual_dir: str | None = None, **kwargs):
        classes_json = os.path.join(manual_dir or "", "classes.json")
        if not os.path.isfile(classes_json):
            raise FileNotFoundError(
                f"folder: missing {classes_json}\nExpected layout of --manual_dir:\n{LAYOUT}"
            )
        self.CLASS_NAMES, self.ID_TO_TRAIN_ID = read_class_table(classes_json)
        # 255 is the ignore value itself, not an unknown id.
        self.KNOWN_IDS = (*self.ID_TO_TRAIN_ID, IGNORE_INDEX)
        super().__init__(manual_dir=manual_dir, **kwargs)

    def list_items(self, root: str) -> dict[str, list[Item]]:
        splits = {}
        for split in SPLITS:
            image_dir = os.path.join(root, split, "images")
            if not os.path.isdir(image_dir):
                continue
            label_dir = os.path.join(root, split, "labels")
            labelled = os.path.isdir(label_dir)
            items = []
            for image in sorted(glob.glob(os.path.join(image_dir, "**", "*"), recursive=True)):
                if not image.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                relative = os.path.splitext(os.path.relpath(image, image_dir))[0]
                label = os.path.join(label_dir, relative + ".png") if labelled else None
                items.append(Item(relative.replace(os.sep, "/"), image, label))
            splits[split] = items
        if not splits:
            self.require_dir(os.path.join(root, "train", "images"))
        return splits
