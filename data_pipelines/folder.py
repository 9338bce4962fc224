"""Any image folder + label folder as a TFDS dataset: how a user brings their own domain.

Two ways to give the folders, both building one dataset `folder/<name>` (`<name>_<W>x<H>` with
`--resize WxH`):

- One `--manual_dir` with `classes.json` and `train/`, `val/`, `test/` (any present), each with
  `images/` and an optional `labels/`; a split without `labels/` is unlabelled. Splits `train`,
  `val`, `test`.
- A domain pair, `--source DIR --target DIR [--target_val DIR] --classes FILE`: splits
  `source_train` (`DIR/images/**` + `DIR/labels/**`), `target_train` (unlabelled: only images
  are read, from `DIR/images/**`, or without an `images/` folder every image under DIR outside
  a top-level `labels/`), and `target_val` (laid out like the source; a validation split, so
  its labels keep their full resolution).

Labels are paired with images by relative path and stem (`images/a/b.jpg` -> `labels/a/b.png`).

The class file is JSON in one of these shapes (all give names, colours or none, raw id map):
  ["road", "sky", ...]                                     names; label value i is class i
  {"classes": [...] or "cityscapes",                       names (or "names": [...])
   "palette": [[r, g, b], ...],                            optional (or "colors" / "colours")
   "ids": [7, 23, ...],                                    optional raw id of each class
   "id_map": {"7": 0, "40": 255, ...} or "cityscapes"}     optional raw id -> class index or 255
  [{"name": "road", "id": 7, "color": [128, 64, 128]}, ...] "id", "color" / "colour" optional,
                                                           given for every class or for none
Without ids or an id map, label values are class indices. "ids" and "id_map" may be combined
(the map then adds raw ids, e.g. ones to ignore). `"classes": "cityscapes"` is the 19-class space
with the Cityscapes palette; `"id_map": "cityscapes"` maps Cityscapes label ids to it and ignores
the void ids 0..33 it does not map. Names are distinct non-empty strings, at most 254 (uint8
labels, 255 = ignore); colours [r, g, b] with ints 0..255, one per class; ids distinct ints
0..254. Other keys are refused (a misspelt "pallete" would otherwise be dropped unseen).
Without colours the palette is `labels.generated_palette` [fixed shape].

A label value outside the class set (not a class index, or not in the id map; 255 is always
ignore) fails the build with an `UnknownIdError` naming the file, the values and their pixel
counts [fixed shape]: the downloaded datasets count such ids instead, but a user's class file
that misses a value is a mistake to fix, not noise to drop.
"""

from __future__ import annotations

import glob
import json
import os
from typing import NamedTuple

from data_pipelines.builder_base import Item, LayoutError, SegmentationBuilder
from data_pipelines.labels import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_KNOWN_IDS,
    CLASSES,
    IGNORE_INDEX,
    PALETTE,
    generated_palette,
)

LAYOUT = """\
  <manual_dir>/classes.json                      class names (+ optional colours, ids / id_map)
  <manual_dir>/<split>/images/**/<name>.{png,jpg,jpeg}   split in train, val, test (any present)
  <manual_dir>/<split>/labels/**/<name>.png      optional; same relative path and stem"""

PAIR_LAYOUT = """\
  --source DIR      DIR/images/**/<name>.{png,jpg,jpeg} and DIR/labels/**/<name>.png (same
                    relative path and stem) -> split source_train
  --target DIR      DIR/images/**/<name>.{png,jpg,jpeg}, or without images/ every image under
                    DIR; labels are not read -> split target_train
  --target_val DIR  optional, laid out like --source -> split target_val (full-size labels)
  --classes FILE    the class file: names (+ optional colours, ids / id_map)"""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
# The pair's splits and the option that names each folder.
PAIR_SPLITS = {"source_train": "--source", "target_train": "--target", "target_val": "--target_val"}
MAX_CLASSES = 254  # uint8 labels with 255 = ignore

# The accepted shapes of the class file, quoted in every error about it.
EXPECTED_TABLE = (
    'expected a list of names ["road", ...], a list of class objects {"name": ..., optional '
    '"id": raw id, optional "color": [r, g, b]}, or an object {"classes" or "names": ["name", '
    '...] or "cityscapes", optional "palette" / "colors" / "colours": [[r, g, b], ...], optional '
    '"ids": [raw id of each class], optional "id_map": {"raw id": class index or 255, ...} or '
    '"cityscapes"}'
)
_TABLE_KEYS = ("classes", "names", "palette", "colors", "colours", "ids", "id_map")
_CLASS_KEYS = ("name", "id", "color", "colour")


class ClassTableError(ValueError):
    """The class file is not valid JSON or does not have one of the accepted shapes."""


class ClassTable(NamedTuple):
    """A parsed class file.

    Attributes:
      names: class names in index order.
      palette: one (r, g, b) per class, or None when the file gives none.
      id_map: raw label id -> class index or 255 (the identity on 0..K-1 without ids / id_map).
    """

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] | None
    id_map: dict[int, int]


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


def _is_int(value, low: int, high: int) -> bool:
    """A JSON integer (not a boolean) in low..high."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_names(names, key: str) -> tuple[str, ...]:
    if names == "cityscapes":
        return CLASSES
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        raise ValueError(
            f'"{key}" must be a non-empty list of names (strings) or "cityscapes", got '
            + json.dumps(names)
        )
    return _distinct_names(names)


def _distinct_names(names: list[str]) -> tuple[str, ...]:
    if "" in names:
        raise ValueError(f"class names must be non-empty, class {names.index('')} is empty")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class names must be distinct, repeated: {json.dumps(repeated)}")
    if len(names) > MAX_CLASSES:
        raise ValueError(
            f"{len(names)} classes, at most {MAX_CLASSES} fit uint8 labels (255 is ignore)"
        )
    return tuple(names)


def _check_colours(colours, num_classes: int, what: str) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(colours, list) or len(colours) != num_classes:
        got = f"{len(colours)} colours" if isinstance(colours, list) else _json_type(colours)
        raise ValueError(f"{what} must hold one [r, g, b] per class ({num_classes}), got {got}")
    for i, colour in enumerate(colours):
        if not (
            isinstance(colour, list)
            and len(colour) == 3
            and all(_is_int(v, 0, 255) for v in colour)
        ):
            raise ValueError(
                f"{what}: the colour of class {i} must be [r, g, b] with integers 0..255, got "
                + json.dumps(colour)
            )
    return tuple(tuple(colour) for colour in colours)


def _check_ids(ids, num_classes: int, what: str) -> dict[int, int]:
    if not isinstance(ids, list) or len(ids) != num_classes:
        got = f"{len(ids)} ids" if isinstance(ids, list) else _json_type(ids)
        raise ValueError(f"{what} must hold one raw id per class ({num_classes}), got {got}")
    for i, raw in enumerate(ids):
        if not _is_int(raw, 0, IGNORE_INDEX - 1):
            raise ValueError(
                f"{what}: the id of class {i} must be an integer 0..254 (255 is ignore), got "
                + json.dumps(raw)
            )
    repeated = sorted({raw for raw in ids if ids.count(raw) > 1})
    if repeated:
        raise ValueError(f"{what} must be distinct, repeated: {json.dumps(repeated)}")
    return {raw: i for i, raw in enumerate(ids)}


def _check_id_map(id_map, num_classes: int) -> dict[int, int]:
    if id_map == "cityscapes":
        # The Cityscapes id space: the void ids 0..33 that the map leaves out are ignored.
        return {**{i: IGNORE_INDEX for i in CITYSCAPES_KNOWN_IDS}, **CITYSCAPES_ID_TO_TRAIN_ID}
    if not isinstance(id_map, dict):
        raise ValueError(f'"id_map" must be an object or "cityscapes", got {_json_type(id_map)}')
    bad_keys = [k for k in id_map if (raw := _as_int(k)) is None or not 0 <= raw < 65536]
    if bad_keys:
        raise ValueError(f'"id_map" keys must be integer raw ids, got {json.dumps(bad_keys)}')
    bad = {
        k: v
        for k, v in id_map.items()
        if (t := _as_int(v)) is None or not (0 <= t < num_classes or t == IGNORE_INDEX)
    }
    if bad:
        raise ValueError(
            f'"id_map" targets must be integers in 0..{num_classes - 1} or 255, got '
            + json.dumps(bad)
        )
    return {_as_int(k): _as_int(v) for k, v in id_map.items()}


def _one_of(table: dict, keys: tuple[str, ...]) -> str | None:
    """The one key of `keys` that `table` has, None for none; ValueError for several."""
    given = [k for k in keys if k in table]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(json.dumps(k) for k in given)} given together: use one")
    return given[0] if given else None


def _parse_object(table: dict) -> ClassTable:
    unknown = [k for k in table if k not in _TABLE_KEYS]
    if unknown:
        raise ValueError(f"unknown keys {json.dumps(unknown)}")
    names_key = _one_of(table, ("classes", "names"))
    if names_key is None:
        raise ValueError('no "classes" or "names" key')
    names = _check_names(table[names_key], names_key)
    colour_key = _one_of(table, ("palette", "colors", "colours"))
    if colour_key is not None:
        palette = _check_colours(table[colour_key], len(names), f'"{colour_key}"')
    else:
        palette = PALETTE if names is CLASSES else None
    id_map = _check_ids(table["ids"], len(names), '"ids"') if "ids" in table else None
    if "id_map" in table:
        extra = _check_id_map(table["id_map"], len(names))
        both = sorted(set(extra) & set(id_map or {}))
        if both:
            raise ValueError(f'"id_map" maps raw ids that "ids" gives already: {both}')
        id_map = {**(id_map or {}), **extra}
    if id_map is None:
        id_map = {i: i for i in range(len(names))}
    return ClassTable(names, palette, id_map)


def _parse_list(table: list) -> ClassTable:
    if not table:
        raise ValueError("the class list is empty")
    if all(isinstance(entry, str) for entry in table):
        names = _distinct_names(table)
        return ClassTable(names, None, {i: i for i in range(len(names))})
    if not all(isinstance(entry, dict) for entry in table):
        kinds = sorted({_json_type(entry) for entry in table})
        raise ValueError(
            f"a class list holds names (strings) or class objects, not both or others; got "
            f"{', '.join(kinds)}"
        )
    fields = {"name": [], "id": [], "color": []}
    for i, entry in enumerate(table):
        unknown = [k for k in entry if k not in _CLASS_KEYS]
        if unknown:
            raise ValueError(
                f'class {i} has unknown keys {json.dumps(unknown)}; a class object has "name", '
                'optional "id" and "color" (or "colour")'
            )
        if not isinstance(entry.get("name"), str):
            raise ValueError(f'class {i} has no "name" string: {json.dumps(entry)}')
        fields["name"].append(entry["name"])
        if "id" in entry:
            fields["id"].append(entry["id"])
        colour_key = _one_of(entry, ("color", "colour"))
        if colour_key is not None:
            fields["color"].append(entry[colour_key])
    names = _distinct_names(fields["name"])
    for key in ("id", "color"):
        if 0 < len(fields[key]) < len(names):
            raise ValueError(
                f'"{key}" is given for {len(fields[key])} of {len(names)} classes: give it for '
                "every class or for none"
            )
    palette = _check_colours(fields["color"], len(names), '"color"') if fields["color"] else None
    if fields["id"]:
        id_map = _check_ids(fields["id"], len(names), '"id"')
    else:
        id_map = {i: i for i in range(len(names))}
    return ClassTable(names, palette, id_map)


def parse_class_table(table) -> ClassTable:
    """Parsed class-file JSON -> (names, palette or None, raw id -> class index).

    Raises:
      ValueError: not one of the shapes in the module docstring; the message says what is wrong.
    """
    if isinstance(table, dict):
        return _parse_object(table)
    if isinstance(table, list):
        return _parse_list(table)
    raise ValueError(f"the file holds {_json_type(table)}, not a list or an object")


def read_class_table(path: str) -> ClassTable:
    """Reads a class file into (names, palette or None, raw id -> class index).

    Raises:
      ClassTableError: not JSON, or not a shape in the module docstring; one line that starts
        with the path and ends with the accepted shapes (`EXPECTED_TABLE`).
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


def _id_ranges(ids) -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> '0..3, 7, 9..10'."""
    ids, parts = sorted(ids), []
    start = previous = ids[0]
    for raw in [*ids[1:], None]:
        if raw is not None and raw == previous + 1:
            previous = raw
            continue
        parts.append(str(start) if start == previous else f"{start}..{previous}")
        start = previous = raw
    return ", ".join(parts)


def id_rule(path: str, table: ClassTable) -> str:
    """The end of the error for a label value outside the class set: which values `path` allows
    and how to map the others."""
    count = len(table.names)
    if table.id_map == {i: i for i in range(count)}:
        allowed = f"so a label value is a class index 0..{count - 1} or 255 (ignore)"
    else:
        allowed = f"and its raw ids are {_id_ranges(table.id_map)} (and 255: ignore)"
    return (
        f"{path} has {count} classes, {allowed}; map other values to a class index or to 255 in "
        'the class file\'s "id_map": {"<value>": <class index or 255>, ...}'
    )


def pair_usage(
    manual_dir: str | None,
    source: str | None,
    target: str | None,
    target_val: str | None,
    classes: str | None,
) -> str | None:
    """What is wrong with this combination of the folder options, or None when it is valid."""
    pair = {"--source": source, "--target": target, "--classes": classes}
    if manual_dir is not None and source is not None:
        return (
            "--manual_dir and --source are exclusive: give a --manual_dir (classes.json, train/, "
            "val/, test/) or a pair --source DIR --target DIR --classes FILE"
        )
    if any(v is not None for v in (*pair.values(), target_val)):
        missing = [flag for flag, value in pair.items() if value is None]
        if missing:
            return (
                f"--source, --target and --classes go together (--target_val is optional): "
                f"missing {', '.join(missing)}"
            )
        return None
    if manual_dir is None:
        return "folder needs --manual_dir DIR, or --source DIR --target DIR --classes FILE"
    return None


def _images(image_dir: str, skip: str | None = None) -> list[tuple[str, str]]:
    """(name, path) of every image under `image_dir` in sorted path order, the name being the
    relative path without extension; `skip` is a top-level folder left out. LayoutError when two
    images share a name."""
    found, names = [], {}
    for path in sorted(glob.glob(os.path.join(image_dir, "**", "*"), recursive=True)):
        relative = os.path.relpath(path, image_dir)
        if not path.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
            continue
        if skip is not None and relative.split(os.sep)[0] == skip:
            continue
        name = os.path.splitext(relative)[0].replace(os.sep, "/")
        if name in names:
            raise LayoutError(
                f"folder: two images named {name!r}: {names[name]} and {path}; an image's name "
                "(relative path without extension) must be unique"
            )
        names[name] = path
        found.append((name, path))
    return found


def _labelled(image_dir: str, label_dir: str | None) -> list[Item]:
    """Items of `image_dir`, paired with `label_dir/<name>.png` (None: unlabelled)."""
    return [
        Item(name, path, None if label_dir is None else os.path.join(label_dir, name + ".png"))
        for name, path in _images(image_dir)
    ]


class Folder(SegmentationBuilder, skip_registration=True):
    """A user's own image / label folders; the class table comes from the class file."""

    LAYOUT = LAYOUT
    VAL_SPLITS = ("val", "test", "target_val")

    def __init__(
        self,
        *,
        manual_dir: str | None = None,
        source: str | None = None,
        target: str | None = None,
        target_val: str | None = None,
        classes: str | None = None,
        **kwargs,
    ):
        problem = pair_usage(manual_dir, source, target, target_val, classes)
        if problem is not None:
            raise ValueError(problem)
        self.pair = None
        if source is not None:
            self.pair = {"source_train": source, "target_train": target}
            if target_val is not None:
                self.pair["target_val"] = target_val
            classes_json = classes
        else:
            classes_json = os.path.join(manual_dir, "classes.json")
            if not os.path.isfile(classes_json):
                raise FileNotFoundError(
                    f"folder: missing {classes_json}\nExpected layout of --manual_dir:\n{LAYOUT}"
                )
        table = read_class_table(classes_json)
        self.CLASS_NAMES, self.ID_TO_TRAIN_ID = table.names, table.id_map
        self.CLASS_PALETTE = table.palette or generated_palette(len(table.names))
        # 255 is the ignore value itself, not an unknown id.
        self.KNOWN_IDS = (*self.ID_TO_TRAIN_ID, IGNORE_INDEX)
        self.STRICT_IDS = id_rule(classes_json, table)
        super().__init__(manual_dir=manual_dir, **kwargs)

    def list_items(self, root: str) -> dict[str, list[Item]]:
        splits = {}
        for split in SPLITS:
            image_dir = os.path.join(root, split, "images")
            if not os.path.isdir(image_dir):
                continue
            label_dir = os.path.join(root, split, "labels")
            splits[split] = _labelled(image_dir, label_dir if os.path.isdir(label_dir) else None)
        if not splits:
            self.require_dir(os.path.join(root, "train", "images"))
        return splits

    def checked_items(self) -> dict[str, list[Item]]:
        """The items of each split; LayoutError (with the expected layout) for a missing folder
        or an empty split."""
        if self.pair is None:
            return super().checked_items()
        splits = {}
        for split, root in self.pair.items():
            flag = PAIR_SPLITS[split]
            self._pair_dir(root, flag)
            image_dir = os.path.join(root, "images")
            if split == "target_train":
                if os.path.isdir(image_dir):
                    items = [Item(name, path, None) for name, path in _images(image_dir)]
                else:
                    image_dir = root
                    items = [Item(name, path, None) for name, path in _images(root, "labels")]
            else:
                label_dir = self._pair_dir(os.path.join(root, "labels"), flag)
                items = _labelled(self._pair_dir(image_dir, flag), label_dir)
            if not items:
                raise LayoutError(
                    f"folder: no images (.png, .jpg, .jpeg) for split {split!r} under {image_dir} "
                    f"({flag})\nExpected layout of a folder pair:\n{PAIR_LAYOUT}"
                )
            splits[split] = items
        return splits

    def _pair_dir(self, path: str, flag: str) -> str:
        """`path` if it is a directory, else LayoutError naming it and the pair's layout."""
        if not os.path.isdir(path):
            raise LayoutError(
                f"folder: missing folder {path} ({flag})\n"
                f"Expected layout of a folder pair:\n{PAIR_LAYOUT}"
            )
        return path
