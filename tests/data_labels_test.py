"""Tests of the label tables: Cityscapes against cityscapesscripts, SYNTHIA as DAFormer, subsets."""

import ast
import pathlib

import numpy as np
from cityscapesscripts.helpers import labels as cs_labels

from data_pipelines import labels


def test_cityscapes_table_matches_cityscapesscripts():
    table = labels.make_lookup_table(labels.CITYSCAPES_ID_TO_TRAIN_ID)
    for entry in cs_labels.labels:
        if entry.id < 0:
            continue  # license plate: -1, never in a label PNG
        expected = 255 if entry.trainId in (255, -1) else entry.trainId
        assert table[entry.id] == expected, entry.name
    assert set(table[34:]) == {255}


def test_class_names_and_palette_match_cityscapesscripts():
    by_train_id = {e.trainId: e for e in cs_labels.labels if 0 <= e.trainId < 19}
    assert labels.CLASSES == tuple(by_train_id[i].name for i in range(19))
    assert labels.PALETTE == tuple(tuple(by_train_id[i].color) for i in range(19))


def test_synthia_table_is_daformers():
    expected = {
        'road': 3, 'sidewalk': 4, 'building': 2, 'wall': 21, 'fence': 5, 'pole': 7,
        'traffic light': 15, 'traffic sign': 9, 'vegetation': 6, 'sky': 1, 'person': 10,
        'rider': 17, 'car': 8, 'bus': 19, 'motorcycle': 12, 'bicycle': 11,
    }  # fmt: skip
    table = labels.make_lookup_table(labels.SYNTHIA_ID_TO_TRAIN_ID)
    for name, synthia_id in expected.items():
        assert table[synthia_id] == labels.CLASSES.index(name), name
    # Void, parking-slot, road-work and lanemarking are ignored.
    assert [table[i] for i in (0, 13, 14, 22)] == [255] * 4
    # DAFormer's table also lists terrain / truck / train, which never occur in the data.
    assert (table[16], table[18], table[20]) == (9, 14, 16)


def test_miou_subsets():
    assert len(labels.MIOU16_CLASSES) == 16 and len(labels.MIOU13_CLASSES) == 13
    assert set(range(19)) - set(labels.MIOU16_CLASSES) == {9, 14, 16}
    assert set(labels.MIOU16_CLASSES) - set(labels.MIOU13_CLASSES) == {3, 4, 5}


def test_map_label_ids_counts_unknown_ids_only():
    raw = np.array([[7, 0, 4, 200], [200, 26, 33, 99]], np.uint8)
    mapped, unknown = labels.map_label_ids(
        raw, labels.CITYSCAPES_ID_TO_TRAIN_ID, labels.CITYSCAPES_KNOWN_IDS
    )
    np.testing.assert_array_equal(mapped, [[0, 255, 255, 255], [255, 13, 18, 255]])
    assert unknown == {200: 2, 99: 1}  # void ids 0 and 4 are known, not unknown


def test_count_class_pixels_skips_ignore():
    label = np.array([[0, 0, 255], [18, 3, 255]], np.uint8)
    counts = labels.count_class_pixels(label)
    assert counts.shape == (19,) and counts.sum() == 4
    assert (counts[0], counts[3], counts[18]) == (2, 1, 1)


# Names and numbers that `labels.py` defines once (the thing classes, the ImageNet mean / std
# and the ignore index); no other module may define them again. MEAN_RGB / STD_RGB are the names
# the data transforms used to have.
_SHARED_NAMES = {
    "THING_CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEAN_RGB",
    "STD_RGB",
}
_SHARED_FLOATS = set(labels.IMAGENET_MEAN) | set(labels.IMAGENET_STD)
_REPO = pathlib.Path(__file__).resolve().parents[1]


def _redefinitions(source: str) -> list[str]:
    """What a module's source defines again: module-level assignments of the shared names, the
    ImageNet mean / std numbers anywhere, and a literal 255 default of an `ignore_index`."""
    tree = ast.parse(source)
    found = []
    for stmt in tree.body:
        targets = []
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            targets = [stmt.target]
        for target in targets:
            for node in ast.walk(target):
                if isinstance(node, ast.Name) and node.id in _SHARED_NAMES:
                    found.append(f"line {stmt.lineno}: assigns {node.id}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) is float:
            if node.value in _SHARED_FLOATS:
                found.append(f"line {node.lineno}: the ImageNet mean / std value {node.value}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg == "ignore_index" and isinstance(default, ast.Constant):
                    found.append(
                        f"line {default.lineno}: ignore_index defaults to {default.value!r}"
                    )
    return sorted(found, key=lambda text: int(text.split()[1].rstrip(":")))  # by line


def test_redefinition_check_finds_each_kind():
    source = """
THING_CLASSES = (6, 7)
MEAN_RGB: tuple = (123.675, 1.0, 2.0)
def loss(x, ignore_index=255): ...
def other(x, *, ignore_index: int = IGNORE_INDEX): ...
"""
    assert _redefinitions(source) == [
        "line 2: assigns THING_CLASSES",
        "line 3: assigns MEAN_RGB",
        "line 3: the ImageNet mean / std value 123.675",
        "line 4: ignore_index defaults to 255",
    ]


def test_shared_constants_are_defined_only_in_labels():
    files = [
        path
        for folder in ("pgpc_jax", "data_pipelines", "configs")
        for path in sorted((_REPO / folder).rglob("*.py"))
        if path != _REPO / "data_pipelines" / "labels.py"
    ]
    assert len(files) > 20  # the walk found the packages
    offences = {
        str(path.relative_to(_REPO)): found
        for path in files
        if (found := _redefinitions(path.read_text()))
    }
    assert not offences, f"import these from data_pipelines/labels.py instead: {offences}"


def test_imagenet_normalisation_is_daformers():
    # DAFormer `img_norm_cfg`: mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375] (RGB).
    assert labels.IMAGENET_MEAN == (123.675, 116.28, 103.53)
    assert labels.IMAGENET_STD == (58.395, 57.12, 57.375)
    assert labels.THING_CLASSES == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    assert all(
        labels.CLASSES[c]
        in (
            "traffic light",
            "traffic sign",
            "person",
            "rider",
            "car",
            "truck",
            "bus",
            "train",
            "motorcycle",
            "bicycle",
        )
        for c in labels.THING_CLASSES
    )
