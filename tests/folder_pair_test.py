"""The folder domain pair (--source / --target / --target_val / --classes): one dataset with three
splits, the class-file shapes, generated palettes, and label values outside the class set."""

import json
import os
import shutil
import types

import data_fixtures as fx
import numpy as np
import pytest

from data_pipelines import build, folder, labels, sources
from data_pipelines.folder import EXPECTED_TABLE


def test_pair_builds_one_dataset_with_three_splits(tmp_path, capsys):
    pair = fx.make_folder_pair(str(tmp_path / "pair"))
    # The target's labels are never read: not even a colour label, which would fail the build.
    fx.write_png(os.path.join(pair.target, "labels", "tgt_000.png"), np.full((16, 24, 3), 9))
    out = str(tmp_path / "out")
    status, stdout, _ = fx.run_build(capsys, *pair.build_args(out, "mine", "--resize", "12x8"))
    assert status == 0
    built = sources.dataset_dir(out, "folder/mine_12x8")
    assert sources.split_counts(built) == {"source_train": 4, "target_train": 4, "target_val": 2}

    source = sources.open_split(out, "folder/mine_12x8", "source_train")
    assert source.class_names == pair.class_names
    for i, (name, full) in enumerate(pair.labels["source_train"].items()):
        example = source[i]
        assert example["name"] == name and example["image"].shape == (8, 12, 3)
        np.testing.assert_array_equal(example["label"], full[::2, ::2])  # nearest, factor 2
        np.testing.assert_array_equal(example["class_pixels"], labels.count_class_pixels(full, 5))
    assert source.class_pixels.sum(0).min() > 0  # every class is present

    target = sources.open_split(out, "folder/mine_12x8", "target_train")
    assert [target[i]["name"] for i in range(4)] == pair.target_names
    assert pair.target_names == ["sub/deeper/tgt_002", "sub/tgt_001", "tgt_000", "tgt_003"]
    for i in range(4):
        assert set(np.unique(target[i]["label"])) == {255} and target[i]["class_pixels"].sum() == 0

    val = sources.open_split(out, "folder/mine_12x8", "target_val")
    for i, (name, full) in enumerate(pair.labels["target_val"].items()):
        assert val[i]["name"] == name and val[i]["image"].shape == (8, 12, 3)
        np.testing.assert_array_equal(val[i]["label"], full)  # validation: full resolution

    meta = sources.read_metadata(built)
    assert meta["class_names"] == list(pair.class_names)
    assert meta["palette"] == [list(c) for c in pair.palette]
    assert {s: meta["summary"][s]["labelled"] for s in meta["summary"]} == {
        "source_train": True,
        "target_train": False,
        "target_val": True,
    }
    assert "  target_train: 4 images\n    no labels\n" in stdout
    assert (
        "  source_train: 4 images\n    classes seen (5/5): ground, wall, tree, sky, car\n" in stdout
    )

    status, stdout, _ = fx.run_build(capsys, *pair.build_args(out, "mine", "--resize", "12x8"))
    assert status == 0 and "already built" in stdout and "no labels" in stdout

    # The same name with a corrected class file is not silently the old build.
    renamed = {"names": ["ground", "wall", "tree", "sky", "vehicle"]}
    with open(pair.classes, "w") as f:
        json.dump(renamed, f)
    status, _, err = fx.run_build(capsys, *pair.build_args(out, "mine", "--resize", "12x8"))
    assert status == 2 and len(fx.error_lines(err)) == 1
    assert "was built with another class file" in err and "'vehicle'" in err


def _folder(pair, tmp_path, **options):
    return folder.Folder(
        source=pair.source,
        target=pair.target,
        classes=pair.classes,
        config=build.folder_config("x", None),
        data_dir=str(tmp_path / "out"),
        **options,
    )


def test_target_without_images_folder_takes_every_image_under_it(tmp_path):
    pair = fx.make_folder_pair(str(tmp_path / "pair"), num_target=3, target_images_folder=False)
    # A top-level labels/ folder of the target is left out.
    fx.write_png(os.path.join(pair.target, "labels", "tgt_000.png"), np.zeros((16, 24), np.uint8))
    items = _folder(pair, tmp_path).checked_items()
    assert list(items) == ["source_train", "target_train"]  # no --target_val, no target_val
    assert [item.name for item in items["target_train"]] == pair.target_names
    assert set(pair.target_names) == {"tgt_000", "sub/tgt_001", "sub/deeper/tgt_002"}
    assert all(item.label is None for item in items["target_train"])
    source = items["source_train"]
    assert [item.name for item in source] == list(pair.labels["source_train"])
    assert source[0].image.endswith("b/src_001.jpg") and source[0].label.endswith("b/src_001.png")
    assert not os.path.exists(tmp_path / "out")


NAMES = ["road", "wall", "sky"]
COLOURS = [[128, 64, 128], [102, 102, 156], [70, 130, 180]]
IDENTITY = {0: 0, 1: 1, 2: 2}
RAW = {7: 0, 12: 1, 23: 2}


@pytest.mark.parametrize(
    "table, palette, id_map",
    [
        (NAMES, None, IDENTITY),
        ({"classes": NAMES}, None, IDENTITY),
        ({"names": NAMES, "ids": [7, 12, 23]}, None, RAW),
        ({"names": NAMES, "colors": COLOURS}, COLOURS, IDENTITY),
        ({"classes": NAMES, "colours": COLOURS, "ids": [7, 12, 23]}, COLOURS, RAW),
        ({"classes": NAMES, "palette": COLOURS, "id_map": {"7": 0, "12": 1, "23": 2}}, COLOURS,
         RAW),
        ({"names": NAMES, "ids": [7, 12, 23], "id_map": {"0": 255}}, None, {**RAW, 0: 255}),
        ([{"name": n} for n in NAMES], None, IDENTITY),
        ([{"name": n, "colour": c} for n, c in zip(NAMES, COLOURS)], COLOURS, IDENTITY),
        ([{"name": n, "id": i, "color": c} for n, i, c in zip(NAMES, RAW, COLOURS)], COLOURS,
         RAW),
    ],
)  # fmt: skip
def test_class_file_shapes(tmp_path, table, palette, id_map):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(table))
    got = folder.read_class_table(str(path))
    assert got.names == tuple(NAMES) and got.id_map == id_map
    assert got.palette == (None if palette is None else tuple(tuple(c) for c in palette))


def test_cityscapes_class_table_has_the_cityscapes_palette_and_void_ids():
    got = folder.parse_class_table({"classes": "cityscapes", "id_map": "cityscapes"})
    assert got.names == labels.CLASSES and got.palette == labels.PALETTE
    assert set(got.id_map) == set(range(34)) and got.id_map[26] == 13 and got.id_map[0] == 255


@pytest.mark.parametrize(
    "text, problem",
    [
        ('"road"', "the file holds a string, not a list or an object"),
        ("[]", "the class list is empty"),
        ('["road", 3]', "a class list holds names (strings) or class objects, not both or others; "
                        "got a number, a string"),
        ('["road", "road"]', 'class names must be distinct, repeated: ["road"]'),
        ('["road", ""]', "class names must be non-empty, class 1 is empty"),
        (json.dumps([f"c{i}" for i in range(255)]),
         "255 classes, at most 254 fit uint8 labels (255 is ignore)"),
        ('{"palette": [[1, 2, 3]]}', 'no "classes" or "names" key'),
        ('{"classes": ["a"], "names": ["a"]}', '"classes" and "names" given together: use one'),
        ('{"names": ["a"], "pallete": [[1, 2, 3]]}', 'unknown keys ["pallete"]'),
        ('{"names": ["a", "b"], "colors": [[1, 2, 3]]}',
         '"colors" must hold one [r, g, b] per class (2), got 1 colours'),
        ('{"names": ["a", "b"], "colors": [[1, 2, 3], [1, 2, 256]]}',
         '"colors": the colour of class 1 must be [r, g, b] with integers 0..255, got [1, 2, 256]'),
        ('{"names": ["a", "b"], "palette": [[1, 2, 3], [1, 2]]}',
         '"palette": the colour of class 1 must be [r, g, b] with integers 0..255, got [1, 2]'),
        ('{"names": ["a", "b"], "ids": [7]}', '"ids" must hold one raw id per class (2), got 1 ids'),
        ('{"names": ["a", "b"], "ids": [7, 7]}', '"ids" must be distinct, repeated: [7]'),
        ('{"names": ["a", "b"], "ids": [7, 255]}',
         '"ids": the id of class 1 must be an integer 0..254 (255 is ignore), got 255'),
        ('{"names": ["a", "b"], "ids": [7, 8], "id_map": {"8": 255}}',
         '"id_map" maps raw ids that "ids" gives already: [8]'),
        ('[{"name": "a", "id": 7}, {"name": "b"}]',
         '"id" is given for 1 of 2 classes: give it for every class or for none'),
        ('[{"name": "a", "colr": [1, 2, 3]}]', 'class 0 has unknown keys ["colr"]; a class object '
                                               'has "name", optional "id" and "color" (or "colour")'),
        ('[{"id": 3}]', 'class 0 has no "name" string: {"id": 3}'),
        ('[{"name": "a", "color": [1, 2, 3], "colour": [1, 2, 3]}]',
         '"color" and "colour" given together: use one'),
    ],
)  # fmt: skip
def test_bad_class_file_is_one_line(tmp_path, text, problem):
    path = tmp_path / "classes.json"
    path.write_text(text)
    with pytest.raises(folder.ClassTableError) as raised:
        folder.read_class_table(str(path))
    assert str(raised.value) == f"{path}: {problem}; {EXPECTED_TABLE}"
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("count, spacing", [(1, 441), (8, 179), (19, 127), (254, 42)])
def test_generated_palette_is_distinct_separated_and_never_black(count, spacing):
    palette = labels.generated_palette(count)
    assert len(palette) == count and len(set(palette)) == count and (0, 0, 0) not in palette
    assert all(isinstance(v, int) and 0 <= v <= 255 for colour in palette for v in colour)
    assert palette == labels.generated_palette(254)[:count]  # a longer palette extends it
    points = np.array([(0, 0, 0), *palette], np.float64)  # black too: it marks ignored pixels
    gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + 1e9 * np.eye(count + 1)
    assert gaps.min() >= spacing
    with pytest.raises(ValueError, match="1..254"):
        labels.generated_palette(255)


def test_class_file_without_colours_gets_the_generated_palette(tmp_path):
    pair = fx.make_folder_pair(str(tmp_path / "pair"), class_file=list(fx.PAIR_CLASS_NAMES))
    assert _folder(pair, tmp_path).palette == labels.generated_palette(5)
    with open(pair.classes, "w") as f:
        json.dump({"classes": "cityscapes"}, f)
    assert _folder(pair, tmp_path).palette == labels.PALETTE


def test_label_value_outside_the_class_set_fails_the_build(tmp_path, capsys):
    pair = fx.make_folder_pair(str(tmp_path / "pair"))
    name, label = next(iter(pair.labels["source_train"].items()))
    label = label.copy()
    label[2, :5], label[3, :2] = 9, 7
    path = os.path.join(pair.source, "labels", name + ".png")
    fx.write_png(path, label)
    out = tmp_path / "out"
    status, _, err = fx.run_build(capsys, *pair.build_args(str(out), "mine", "--skip_corrupt"))
    assert status == 2 and "Traceback" not in err
    assert fx.error_lines(err) == [
        f"error: label {path} has values outside the class set: 7 (2 pixels), 9 (5 pixels); "
        f"{pair.classes} has 5 classes, so a label value is a class index 0..4 or 255 (ignore); "
        'map other values to a class index or to 255 in the class file\'s "id_map": '
        '{"<value>": <class index or 255>, ...}'
    ]
    assert not os.path.exists(out)  # the build had started (TFDS folders): all removed


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--source", "S", "--target", "T"),
         "--source, --target and --classes go together (--target_val is optional): missing "
         "--classes"),
        (("--source", "S", "--classes", "C"),
         "--source, --target and --classes go together (--target_val is optional): missing "
         "--target"),
        (("--target_val", "V"),
         "--source, --target and --classes go together (--target_val is optional): missing "
         "--source, --target, --classes"),
        (("--manual_dir", "M", "--source", "S", "--target", "T", "--classes", "C"),
         "--manual_dir and --source are exclusive: give a --manual_dir (classes.json, train/, "
         "val/, test/) or a pair --source DIR --target DIR --classes FILE"),
        ((), "folder needs --manual_dir DIR, or --source DIR --target DIR --classes FILE"),
    ],
)  # fmt: skip
def test_pair_options_go_together(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    status, _, err = fx.run_build(capsys, "--dataset", "folder", *flags, "--data_dir", str(out))
    assert status == 2 and fx.error_lines(err) == [f"error: {message}"]
    assert not os.path.exists(out)


def test_pair_options_are_for_folder_only(tmp_path, capsys):
    status, _, err = fx.run_build(capsys, "--dataset", "gta5", "--manual_dir", "gta", "--source", "S",
                          "--data_dir", str(tmp_path / "out"))  # fmt: skip
    assert status == 2 and fx.error_lines(err) == [
        "error: --source, --target, --target_val and --classes are for --dataset folder"
    ]


@pytest.mark.parametrize(
    "damage, flag, problem",
    [
        ("source/labels", "--source", "missing folder {root}/source/labels"),
        ("target", "--target", "missing folder {root}/target"),
        ("target/images/*", "--target",
         "no images (.png, .jpg, .jpeg) for split 'target_train' under {root}/target/images"),
        ("target_val/images", "--target_val", "missing folder {root}/target_val/images"),
    ],
)  # fmt: skip
def test_bad_pair_folder_names_it_and_the_layout(tmp_path, capsys, damage, flag, problem):
    root = tmp_path / "pair"
    pair = fx.make_folder_pair(str(root), num_target=1)
    gone = root / damage.removesuffix("/*")
    shutil.rmtree(gone)
    if damage.endswith("*"):
        gone.mkdir()  # the folder stays, empty
    out = tmp_path / "out"
    status, _, err = fx.run_build(capsys, *pair.build_args(str(out)))
    assert status == 2
    assert fx.error_lines(err) == [f"error: folder: {problem.format(root=root)} ({flag})"]
    assert "Expected layout of a folder pair:" in err and "--target DIR" in err
    assert not os.path.exists(out)


def test_missing_class_file_is_one_line(tmp_path, capsys):
    pair = fx.make_folder_pair(str(tmp_path / "pair"))
    os.remove(pair.classes)
    status, _, err = fx.run_build(capsys, *pair.build_args(str(tmp_path / "out")))
    assert status == 2 and fx.error_lines(err) == [
        f"error: {pair.classes}: cannot read it (No such file or directory); {EXPECTED_TABLE}"
    ]


def test_summary_without_labelled_key_is_unchanged():
    builder = types.SimpleNamespace(
        name="folder", builder_config=types.SimpleNamespace(name="old"), data_dir="/d"
    )
    stats = {"images": 2, "class_pixels": [0, 0], "unknown_ids": {}}
    metadata = {"class_names": ["a", "b"], "summary": {"val": stats}}
    assert build.format_summary(builder, metadata, None).splitlines()[1:] == [
        "  val: 2 images",
        "    classes seen (0/2): -",
        "    unmapped ids: 0 pixels",
    ]
    metadata["summary"]["val"] = {**stats, "labelled": False}
    assert build.format_summary(builder, metadata, None).splitlines()[1:] == [
        "  val: 2 images",
        "    no labels",
    ]
