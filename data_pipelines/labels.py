"""The 19-class Cityscapes label space and the id maps of every dataset that feeds it.

Everything that names a class lives here, once: the class names, the Cityscapes colour palette,
the mIoU16 / mIoU13 evaluation subsets used for SYNTHIA, the thing classes of the ImageNet feature
distance, and the lookup tables that turn each dataset's raw label ids into the 19 train ids
(everything else becomes ``IGNORE_INDEX``). The ImageNet mean / std of the input normalisation
live here too, so that the data pipeline, the on-device augmentation and prediction share one
definition (numpy only: this module must not import JAX).

Sources: the Cityscapes table is `cityscapesscripts.helpers.labels` (a test checks it), used by
DAFormer `tools/convert_datasets/{cityscapes,gta}.py`; the SYNTHIA table is DAFormer
`tools/convert_datasets/synthia.py` (from SYNTHIA RAND-CITYSCAPES' README).
"""

from __future__ import annotations

import numpy as np

# The label that is neither trained on nor evaluated (mmseg `ignore_index`, Cityscapes trainId 255).
IGNORE_INDEX = 255

# ImageNet mean / std of DAFormer's `img_norm_cfg` (mean=[123.675, 116.28, 103.53],
# std=[58.395, 57.12, 57.375], to_rgb=True): in R, G, B order, on [0, 255] pixels.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CLASSES)

# RGB colour of each train id, the Cityscapes `labels.py` colours.
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

# SYNTHIA has no terrain (9), truck (14) or train (16): mIoU16 drops them (DAFormer README).
MIOU16_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))
# mIoU13 additionally drops wall, fence and pole (common practice for SYNTHIA→Cityscapes).
MIOU13_CLASSES = tuple(c for c in MIOU16_CLASSES if c not in (3, 4, 5))

# Thing classes of DAFormer's ImageNet feature distance: traffic light, traffic sign, person,
# rider, car, truck, bus, train, motorcycle, bicycle (`imnet_feature_dist_classes` of
# `_base_/uda/dacs_a999_fdthings.py`).
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# Cityscapes label id -> train id; GTA5 labels use the same ids (DAFormer gta.py).
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
# Ids that the Cityscapes table defines (0..33; -1 "license plate" never occurs in a PNG).
# Defined ids outside the map are void classes (ignored, not "unknown").
CITYSCAPES_KNOWN_IDS = tuple(range(34))

# SYNTHIA RAND-CITYSCAPES class id (first channel of GT/LABELS) -> train id, exactly DAFormer's
# synthia.py table, including the three entries for classes that never occur in the data.
SYNTHIA_ID_TO_TRAIN_ID = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,  # terrain: not present in SYNTHIA
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,  # truck: not present in SYNTHIA
    19: 15,
    20: 16,  # train: not present in SYNTHIA
    12: 17,
    11: 18,
}
# SYNTHIA ids 0..22 (void, ..., parking-slot 13, road-work 14, lanemarking 22) are defined.
SYNTHIA_KNOWN_IDS = tuple(range(23))


def make_lookup_table(id_to_train_id: dict[int, int], size: int = 65536) -> np.ndarray:
    """Builds a dense lookup table for `apply_lookup_table`.

    Args:
      id_to_train_id: raw id -> train id; every other id maps to `IGNORE_INDEX`.
      size: number of raw ids the table covers (65536 covers 16-bit labels).

    Returns:
      uint8 [size] table.
    """
    table = np.full((size,), IGNORE_INDEX, np.uint8)
    for raw_id, train_id in id_to_train_id.items():
        table[raw_id] = train_id
    return table


def map_label_ids(
    label: np.ndarray, id_to_train_id: dict[int, int], known_ids: tuple[int, ...] | None = None
) -> tuple[np.ndarray, dict[int, int]]:
    """Maps raw label ids to train ids and counts the ids the table does not know.

    Args:
      label: integer [H, W] raw ids (uint8 or uint16).
      id_to_train_id: raw id -> train id; others become `IGNORE_INDEX`.
      known_ids: ids the dataset defines (void classes included). Pixels with any other id are
        reported as unknown. None means only the keys of `id_to_train_id` are known.

    Returns:
      (train_ids uint8 [H, W], {unknown raw id: pixel count}).
    """
    label = np.asarray(label)
    table = make_lookup_table(id_to_train_id)
    mapped = table[label.astype(np.int64)]
    known = set(id_to_train_id) if known_ids is None else set(known_ids)
    ids, counts = np.unique(label, return_counts=True)
    unknown = {int(i): int(n) for i, n in zip(ids, counts, strict=True) if int(i) not in known}
    return mapped, unknown


def count_class_pixels(label: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts the pixels of each class (the RCS statistics of DAFormer's convert scripts).

    Args:
      label: uint8 [H, W] train ids; `IGNORE_INDEX` and ids >= num_classes are not counted.
      num_classes: length of the result.

    Returns:
      int64 [num_classes] pixel counts.
    """
    counts = np.bincount(np.asarray(label, np.int64).ravel(), minlength=256)
    return counts[:num_classes].astype(np.int64)


def generated_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct, well separated RGB colours for a class table that brings none.

    Greedy farthest-point choice on a 7-level RGB grid (342 colours): each class takes the grid
    colour farthest (Euclidean RGB) from black and from every colour chosen before it, ties going
    to the first in grid order. So no colour is black (the colour of ignored pixels in
    `colorize`), any two colours (and black) are at least 42 apart (179 for up to 8 classes, 127
    for up to 19), and a longer palette starts with a shorter one. [fixed shape] a project choice,
    not from DAFormer (whose datasets bring their palettes).

    Args:
      num_classes: 1..254 (the uint8 class indices below 255 = ignore).

    Returns:
      num_classes (r, g, b) triples of ints in 0..255.
    """
    if not 0 < num_classes <= 254:
        raise ValueError(f"num_classes must be in 1..254, got {num_classes}")
    levels = np.round(np.linspace(0, 255, 7)).astype(np.int64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    # Squared distance of every grid colour to the nearest colour taken so far (black first).
    nearest = (grid**2).sum(-1)
    chosen = []
    for _ in range(num_classes):
        pick = int(np.argmax(nearest))
        chosen.append(tuple(int(v) for v in grid[pick]))
        nearest = np.minimum(nearest, ((grid - grid[pick]) ** 2).sum(-1))
    return tuple(chosen)


def colorize(label: np.ndarray, palette=PALETTE) -> np.ndarray:
    """Paints train ids with the palette (ignored pixels black).

    Args:
      label: integer [H, W] train ids.
      palette: sequence of RGB triples indexed by train id.

    Returns:
      uint8 [H, W, 3] colour image.
    """
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[np.asarray(label, np.int64) & 255]
