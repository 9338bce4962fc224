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


# The accepted shape of classes.json, quoted in every error about it.
EXPECTED_TABLE = (
    'expected {"classes": ["name", ...] or "cityscapes", optional "palette": [[r, g, b], ...], '
    'optional "id_map": {"raw id": class index or 255, ...} or "cityscapes"}'
)


class ClassTableError(ValueError):
    """classes.json is not valid JSON or does not have the expected shape."""


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    for kind, name in ((bool, "a boolean"), (int | float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return {dict: "an object", list: "a list"}.get(type(value), "null")


def _as_int(value) -> int | None:
    """An integer given as a JSON number or a string of digits (as `int()` took them), else None.

    Booleans and fractional numbers are refused: `int()` would silently turn 1.5 into 1.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def parse_class_table(table) -> tuple[tuple[str, ...], dict[int, int]]:
    """Parsed classes.json -> (class names, raw id -> class index); ValueError says what is wrong."""
    if not isinstance(table, dict):
        raise ValueError(f"the file holds {_json_type(table)}, not an object")
    if "classes" not in table:
        raise ValueError('no "classes" key')
    classes = CLASSES if table["classes"] == "cityscapes" else table["classes"]
    if not (
        isinstance(classes, list | tuple) and classes and all(isinstance(c, str) for c in classes)
    ):
        raise ValueError(
            '"classes" must be a non-empty list of names (strings) or "cityscapes", got '
            + json.dumps(classes)
        )
    id_map = table.get("id_map")
    if id_map == "cityscapes":
        id_map = CITYSCAPES_ID_TO_TRAIN_ID
    elif id_map is None:
        id_map = {i: i for i in range(len(classes))}
    elif not isinstance(id_map, dict):
        raise ValueError(f'"id_map" must be an object or "cityscapes", got {_json_type(id_map)}')
    bad_keys = [k for k in id_map if _as_int(k) is None]
    if bad_keys:
        raise ValueError(f'"id_map" keys must be integer raw ids, got {json.dumps(bad_keys)}')
    targets = {_as_int(k): _as_int(v) for k, v in id_map.items()}
    bad = {
        k: v
        for k, v in id_map.items()
        if (t := _as_int(v)) is None or not (0 <= t < len(classes) or t == IGNORE_INDEX)
    }
    if bad:
        raise ValueError(
            f'"id_map" targets must be integers in 0..{len(classes) - 1} or 255, got '
            + json.dumps(bad)
        )
    return tuple(classes), targets


def read_class_table(path: str) -> tuple[tuple[str, ...], dict[int, int]]:
    """Reads classes.json into (class names, raw id -> class index).

    Raises:
      ClassTableError: not JSON, or not the shape in the module docstring; the message starts with
        the path and ends with the expected shape.
    """
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        return parse_class_table(table)
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    except UnicodeDecodeError:  # a ValueError too, so caught before the shape errors below
        problem = "not valid JSON (not UTF-8 text)"
    except ValueError as e:
        problem = str(e)
    except OSError as e:
        problem = f"cannot read it ({e.strerror})"
    raise ClassTableError(f"{path}: {problem}; {EXPECTED_TABLE}")


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
