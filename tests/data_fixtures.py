"""Writers of tiny datasets in the exact on-disk layouts of the originals, for the data tests.

Each writer puts a few small images under `root` as the original download has them and returns
what it wrote (raw label arrays, names), so tests can check the build pixel by pixel. Label rows
start with a fixed run of ids whose train ids are known (`KNOWN_ROW` / `SYNTHIA_KNOWN_ROW`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

# Cityscapes / GTA label ids and the train ids they must become (void ids 0, 4 and 9 -> 255).
KNOWN_ROW = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 0, 4, 9]
KNOWN_ROW_TRAIN_IDS = list(range(19)) + [255, 255, 255]
# SYNTHIA class ids (first channel) and their train ids (void 0, parking 13, lanemarking 22 -> 255).
SYNTHIA_KNOWN_ROW = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11, 0, 13, 22]
SYNTHIA_KNOWN_ROW_TRAIN_IDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18] + [255] * 3
IGNORE = 255


def write_png(path: str, array: np.ndarray) -> None:
    """Writes uint8 [H, W] or [H, W, 3] with PIL."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def write_png16(path: str, array: np.ndarray) -> None:
    """Writes uint16 [H, W, 3] as a 16-bit RGB PNG (PIL cannot), cycling all five PNG row filters
    so that decoding must undo each of them with the 6-byte pixel stride."""
    array = np.asarray(array, ">u2")
    height, width, channels = array.shape
    raw = array.reshape(height, -1).view(np.uint8).reshape(height, -1).astype(np.int32)
    stride = 2 * channels
    rows, previous = [], np.zeros(raw.shape[1], np.int32)
    for y in range(height):
        row, kind = raw[y], y % 5
        left = np.concatenate([np.zeros(stride, np.int32), row[:-stride]])
        up_left = np.concatenate([np.zeros(stride, np.int32), previous[:-stride]])
        if kind == 0:
            predictor = np.zeros_like(row)
        elif kind == 1:
            predictor = left
        elif kind == 2:
            predictor = previous
        elif kind == 3:
            predictor = (left + previous) // 2
        else:
            estimate = left + previous - up_left
            da, db, dc = abs(estimate - left), abs(estimate - previous), abs(estimate - up_left)
            predictor = np.where(
                (da <= db) & (da <= dc), left, np.where(db <= dc, previous, up_left)
            )
        rows.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        previous = row

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def cityscapes_style_label(rng, height: int, width: int, ids=None) -> np.ndarray:
    """Random Cityscapes ids with `KNOWN_ROW` at the start of row 0."""
    ids = KNOWN_ROW if ids is None else ids
    label = rng.choice(np.array(ids, np.uint8), size=(height, width))
    label[0, : len(KNOWN_ROW)] = KNOWN_ROW
    return label


def make_gta(root: str, count: int = 3, height: int = 24, width: int = 40, seed: int = 0) -> dict:
    """`images/00001.png`, `labels/00001.png` (Cityscapes ids, palette-free 8-bit)."""
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(1, count + 1):
        name = f"{i:05d}"
        write_png(os.path.join(root, "images", name + ".png"), random_image(rng, height, width))
        labels[name] = cityscapes_style_label(rng, height, width)
        write_png(os.path.join(root, "labels", name + ".png"), labels[name])
    return labels


def make_cityscapes(root: str, height: int = 24, width: int = 48, seed: int = 0) -> dict:
    """`leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png` + gtFine labelIds."""
    rng = np.random.default_rng(seed)
    layout = {
        "train": [
            ("aachen", "000000", "000019"),
            ("aachen", "000001", "000019"),
            ("bremen", "000002", "000019"),
        ],
        "val": [("frankfurt", "000000", "000294"), ("lindau", "000001", "000019")],
    }
    labels = {}
    for split, frames in layout.items():
        for city, seq, frame in frames:
            stem = f"{city}_{seq}_{frame}"
            image_path = os.path.join(root, "leftImg8bit", split, city, stem + "_leftImg8bit.png")
            write_png(image_path, random_image(rng, height, width))
            labels[(split, stem)] = cityscapes_style_label(rng, height, width)
            label_path = os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png")
            write_png(label_path, labels[(split, stem)])
    return labels


def make_synthia(
    root: str, count: int = 2, height: int = 19, width: int = 38, seed: int = 0
) -> dict:
    """`RGB/0000000.png` and 16-bit `GT/LABELS/0000000.png` (class id in the first channel, an
    instance id > 255 in the second)."""
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(count):
        name = f"{i:07d}"
        write_png(os.path.join(root, "RGB", name + ".png"), random_image(rng, height, width))
        class_ids = rng.choice(np.array(SYNTHIA_KNOWN_ROW, np.uint16), size=(height, width))
        class_ids[0, : len(SYNTHIA_KNOWN_ROW)] = SYNTHIA_KNOWN_ROW
        instance = rng.integers(0, 2000, (height, width)).astype(np.uint16)
        gt = np.stack([class_ids, instance, np.zeros_like(instance)], -1)
        write_png16(os.path.join(root, "GT", "LABELS", name + ".png"), gt)
        labels[name] = class_ids
    return labels


def make_dark_zurich(root: str, height: int = 18, width: int = 32, seed: int = 0) -> dict:
    """Dark Zurich: `rgb_anon/train/{night,twilight,day}/<seq>/...`, corresp CSV, labelled val."""
    rng = np.random.default_rng(seed)
    written = {"night": [], "twilight": [], "day": [], "val": {}}
    for condition, seq, frames in (
        ("night", "GOPR0356", ["000001", "000002"]),
        ("twilight", "GOPR0351", ["000010"]),
        ("day", "GOPR0350", ["000100", "000101"]),
    ):
        for frame in frames:
            stem = f"{seq}_frame_{frame}"
            path = os.path.join(root, "rgb_anon", "train", condition, seq, stem + "_rgb_anon.png")
            write_png(path, random_image(rng, height, width))
            written[condition].append(stem)
    corresp = os.path.join(root, "corresp", "train", "night", "GOPR0356.csv")
    os.makedirs(os.path.dirname(corresp), exist_ok=True)
    with open(corresp, "w") as f:
        f.write(
            "train/night/GOPR0356/GOPR0356_frame_000001,train/day/GOPR0350/GOPR0350_frame_000100\n"
        )
        f.write(
            "train/night/GOPR0356/GOPR0356_frame_000002,train/day/GOPR0350/GOPR0350_frame_000101\n"
        )
    for seq, frame in (("GOPR0356", "000321"), ("GOPR0364", "000001")):
        stem = f"{seq}_frame_{frame}"
        write_png(
            os.path.join(root, "rgb_anon", "val", "night", seq, stem + "_rgb_anon.png"),
            random_image(rng, height, width),
        )
        label = cityscapes_style_label(rng, height, width)
        write_png(os.path.join(root, "gt", "val", "night", seq, stem + "_gt_labelIds.png"), label)
        written["val"][stem] = label
    return written


def make_folder(root: str, seed: int = 0, ids=(10, 20, 30, 40)) -> dict:
    """A user's domain: 3 classes with an id map (10, 20, 30 -> 0, 1, 2 and 40 -> 255), labelled
    train with the raw `ids`, unlabelled val images."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classes.json"), "w") as f:
        id_map = {"10": 0, "20": 1, "30": 2, "40": 255}
        json.dump({"classes": ["ground", "object", "sky"], "id_map": id_map}, f)
    labels = {}
    for name in ("a/one", "a/two", "b/three"):
        write_png(os.path.join(root, "train", "images", name + ".jpg"), random_image(rng, 16, 20))
        labels[name] = rng.choice(np.array(ids, np.uint8), size=(16, 20))
        write_png(os.path.join(root, "train", "labels", name + ".png"), labels[name])
    write_png(os.path.join(root, "val", "images", "x.png"), random_image(rng, 16, 20))
    return labels


# The first class names of `make_folder_pair` (more classes are `class_<i>`).
PAIR_CLASS_NAMES = ("ground", "wall", "tree", "sky", "car")


@dataclasses.dataclass(frozen=True)
class FolderPair:
    """What `make_folder_pair` wrote.

    Attributes:
      source, target, target_val: the three folders; classes: the class file.
      class_names: the class names; palette: the colours the class file gives.
      labels: {"source_train" / "target_val": {name: uint8 [H, W] class indices, 255 ignore}},
        each in the build's record order.
      target_names: target_train's names in the build's record order.
    """

    source: str
    target: str
    target_val: str
    classes: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    labels: dict[str, dict[str, np.ndarray]]
    target_names: list[str]

    def build_args(self, data_dir: str, name: str = "pair", *extra: str) -> list[str]:
        """`data_pipelines.build.main` arguments that build this pair as `folder/<name>`."""
        return ['--dataset', 'folder', '--source', self.source, '--target', self.target,
                '--target_val', self.target_val, '--classes', self.classes, '--name', name,
                '--data_dir', data_dir, *extra]  # fmt: skip


def _scene(rng, num_classes: int, height: int, width: int, first: int) -> np.ndarray:
    """Class indices in 4x4 blocks, row 0's blocks starting first, first + 1, ... (mod K)."""
    rows, cols = -(-height // 4), -(-width // 4)
    blocks = rng.integers(0, num_classes, (rows, cols))
    blocks[0] = (first + np.arange(cols)) % num_classes
    return np.kron(blocks, np.ones((4, 4), np.int64))[:height, :width].astype(np.uint8)


def _styled(rng, label: np.ndarray, palette: np.ndarray, target: bool) -> np.ndarray:
    """An image whose colour follows the label: the class colour (grey where ignored) + noise;
    the target style is darker and tinted (a domain shift a model can bridge)."""
    colours = np.full((256, 3), 128.0)
    colours[: len(palette)] = palette
    image = colours[label] + rng.normal(0, 12, label.shape + (3,))
    if target:
        image = image * np.array([0.5, 0.6, 0.8]) + np.array([60.0, 30.0, 10.0])
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_folder_pair(
    root: str,
    num_classes: int = 5,
    height: int = 16,
    width: int = 24,
    num_source: int = 4,
    num_target: int = 4,
    num_val: int = 2,
    seed: int = 0,
    class_file=None,
    target_images_folder: bool = True,
) -> FolderPair:
    """A source / target domain pair in the `--source / --target / --target_val` layout.

    `root/source/images/**` + `labels/**` (some names in a subfolder, one image a .jpg; labels
    are class indices in 4x4 blocks, row 0 cycling through the classes, a few 255 pixels),
    `root/target/images/**` (or the images straight under `root/target` with
    `target_images_folder=False`; names nested one and two folders deep; no labels),
    `root/target_val/images` + `labels`, and the class file
    `root/classes.json` ({"classes": names, "palette": colours} unless `class_file` gives the
    JSON value to write). Images are the class colour plus noise, the target's darker and tinted.

    Args:
      root: folder to write into.
      num_classes: 1..254 classes.
      height, width: image size.
      num_source, num_target, num_val: images per folder.
      seed: seed of the labels and noise.
      class_file: JSON value written as the class file instead of the default.
      target_images_folder: put the target images in `target/images/` (else in `target/`).

    Returns:
      A `FolderPair` naming the folders and holding what was written.
    """
    rng = np.random.default_rng(seed)
    names = tuple(PAIR_CLASS_NAMES[:num_classes]) + tuple(
        f"class_{i}" for i in range(len(PAIR_CLASS_NAMES), num_classes)
    )
    palette = tuple(
        ((i + 1) * 37 % 256, (i + 1) * 91 % 256, (i + 1) * 53 % 256) for i in range(num_classes)
    )
    colours = np.array(palette, np.float64)
    os.makedirs(root, exist_ok=True)
    classes = os.path.join(root, "classes.json")
    with open(classes, "w") as f:
        json.dump(
            {"classes": list(names), "palette": palette} if class_file is None else class_file, f
        )
    labels = {"source_train": {}, "target_val": {}}
    written = {}
    for split, folder, prefix, count in (
        ("source_train", "source", "src", num_source),
        ("target_val", "target_val", "val", num_val),
    ):
        for i in range(count):
            name = f"{prefix}_{i:03d}" if i % 2 == 0 else f"b/{prefix}_{i:03d}"
            label = _scene(rng, num_classes, height, width, first=i * 3)
            if split == "source_train":
                label[-1, :3] = IGNORE
            ext = ".jpg" if (split, i) == ("source_train", 1) else ".png"
            image_path = os.path.join(root, folder, "images", name + ext)
            write_png(image_path, _styled(rng, label, colours, split == "target_val"))
            write_png(os.path.join(root, folder, "labels", name + ".png"), label)
            written[(split, image_path)] = (name, label)
    for (split, _), (name, label) in sorted(written.items()):
        labels[split][name] = label
    target = os.path.join(root, "target")
    image_root = os.path.join(target, "images") if target_images_folder else target
    paths = {}
    for i in range(num_target):
        name = ("", "sub/", "sub/deeper/")[i % 3] + f"tgt_{i:03d}"
        label = _scene(rng, num_classes, height, width, first=i)
        paths[os.path.join(image_root, name + ".png")] = name
        write_png(os.path.join(image_root, name + ".png"), _styled(rng, label, colours, True))
    return FolderPair(
        source=os.path.join(root, "source"),
        target=target,
        target_val=os.path.join(root, "target_val"),
        classes=classes,
        class_names=names,
        palette=palette,
        labels=labels,
        target_names=[paths[p] for p in sorted(paths)],
    )


# Cityscapes label ids of the classes with instances (cityscapesscripts `hasInstances`): person,
# rider, car, truck, bus, caravan, trailer, train, motorcycle, bicycle.
CITYSCAPES_INSTANCE_CLASS_IDS = (24, 25, 26, 27, 28, 29, 30, 31, 32, 33)


def add_cityscapes_derived(root: str, labels: dict) -> None:
    """Next to each `*_gtFine_labelIds.png` that `make_cityscapes` wrote: the
    `*_gtFine_labelTrainIds.png` that Cityscapes' createTrainIdLabelImgs makes (train ids, 255
    void) and a `*_gtFine_instanceIds.png` in Cityscapes' encoding (the label id for classes
    without instances, label id * 1000 + instance number for the others; here a new instance every
    8 columns).

    Args:
      root: the folder given to `make_cityscapes`.
      labels: what it returned, {(split, stem): label ids uint8 [H, W]}.
    """
    from data_pipelines import labels as label_table

    for (split, stem), ids in labels.items():
        folder = os.path.join(root, "gtFine", split, stem.split("_")[0])
        train_ids, _ = label_table.map_label_ids(ids, label_table.CITYSCAPES_ID_TO_TRAIN_ID)
        write_png(os.path.join(folder, stem + "_gtFine_labelTrainIds.png"), train_ids)
        column = np.broadcast_to(np.arange(ids.shape[1]) // 8, ids.shape)
        things = np.isin(ids, CITYSCAPES_INSTANCE_CLASS_IDS)
        instances = np.where(things, ids.astype(np.uint16) * 1000 + column, ids)
        path = os.path.join(folder, stem + "_gtFine_instanceIds.png")
        Image.fromarray(instances.astype(np.uint16)).save(path)  # 16-bit, as Cityscapes ships


def run_build(capsys, *args) -> tuple[int, str, str]:
    """`python -m data_pipelines.build ARGS` in this process: (exit status, stdout, stderr)."""
    from data_pipelines import build

    status = build.main([*args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """The `error:` lines of a command's stderr."""
    return [line for line in err.splitlines() if line.startswith("error:")]
