"""The build CLI: summary, idempotent re-runs, and every bad-input path with its message."""

import json
import os

import data_fixtures as fx
import numpy as np
import pytest

from data_pipelines import build, image_io, sources
from data_pipelines.folder import EXPECTED_TABLE


def _folders(root):
    """Every folder under `root` (relative paths), `root` itself as '.', or None if it is absent."""
    if not os.path.exists(root):
        return None
    return {os.path.relpath(d, root) for d, _, _ in os.walk(root)}


def _gta_args(tmp_path, *extra):
    return ('--dataset', 'gta5', '--manual_dir', str(tmp_path / 'gta'),
            '--data_dir', str(tmp_path / 'out'), *extra)  # fmt: skip


def test_summary_progress_and_idempotent_rerun(tmp_path, capsys):
    raw = fx.make_gta(str(tmp_path / "gta"))
    raw_label = raw["00002"].copy()
    raw_label[5, :7] = 200  # an id outside the Cityscapes table
    fx.write_png(str(tmp_path / "gta" / "labels" / "00002.png"), raw_label)
    status, out, err = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 0
    assert "gta5/train" in err and "3/3" in err and "img/s" in err and "ETA" in err
    assert "train: 3 images" in out
    assert "classes seen (19/19)" in out
    assert "unmapped ids: 7 pixels (id 200: 7) -> 255" in out
    split = sources.open_split(str(tmp_path / "out"), "gta5/full", "train")
    assert list(split[1]["label"][5, :7]) == [255] * 7
    records = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs)
    mtimes = [os.path.getmtime(p) for p in records]
    status, out, _ = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 0 and "already built" in out and "train: 3 images" in out
    assert [os.path.getmtime(p) for p in records] == mtimes


def test_corrupt_image_names_the_file(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    bad = tmp_path / "gta" / "images" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    status, _, err = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 2
    assert fx.error_lines(err) == [f"error: cannot decode image {bad}: {_decode_error(bad)}"]
    assert "--skip_corrupt" in err
    # The build created --data_dir, so nothing at all may remain (not even empty folders).
    assert not os.path.exists(tmp_path / "out")


def _decode_error(path):
    try:
        image_io.read_rgb(path)
    except image_io.CorruptImageError as e:
        return str(e).split(": ", 1)[1]
    raise AssertionError(f"{path} decodes")


def test_failed_build_keeps_what_existed_before(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    # Another config of the same dataset, another dataset, and TFDS's downloads folder.
    for folder in ("gta5/daformer/1.0.0", "gta5/.config", "cityscapes/full", "downloads"):
        os.makedirs(tmp_path / "out" / folder)
    (tmp_path / "out" / "gta5" / "daformer" / "1.0.0" / "dataset_info.json").write_text("{}")
    before = _folders(tmp_path / "out")
    fx.write_png(str(tmp_path / "gta" / "labels" / "00003.png"), np.zeros((20, 40), np.uint8))
    status, _, err = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 2 and len(fx.error_lines(err)) == 1 and "size mismatch" in err
    assert _folders(tmp_path / "out") == before
    assert (tmp_path / "out" / "gta5" / "daformer" / "1.0.0" / "dataset_info.json").exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupted_or_crashed_build_removes_its_folders(tmp_path, capsys, monkeypatch, failure):
    fx.make_gta(str(tmp_path / "gta"))
    os.makedirs(tmp_path / "out")
    read_rgb, calls = image_io.read_rgb, []

    def fail_on_the_second_image(path):
        calls.append(path)
        if len(calls) == 2:
            raise failure("stopped mid-build")
        return read_rgb(path)

    monkeypatch.setattr(image_io, "read_rgb", fail_on_the_second_image)
    if failure is KeyboardInterrupt:
        status, _, err = fx.run_build(capsys, *_gta_args(tmp_path))
        assert status == 130 and "interrupted" in err and "Traceback" not in err
    else:  # a bug, not bad input: the traceback is kept, the partial build is not
        with pytest.raises(RuntimeError, match="stopped mid-build"):
            build.main(list(_gta_args(tmp_path)))
    assert len(calls) == 2  # it stopped inside the build, after TFDS created its folders
    assert _folders(tmp_path / "out") == {"."}


def _write_folder(tmp_path, classes_json: str | bytes, ids=(10, 20, 30, 40)) -> str:
    fx.make_folder(str(tmp_path / "mine"), ids=ids)
    path = tmp_path / "mine" / "classes.json"
    if isinstance(classes_json, bytes):
        path.write_bytes(classes_json)
    else:
        path.write_text(classes_json)
    return str(path)


@pytest.mark.parametrize(
    "classes_json, problem",
    [
        ("not json", "not valid JSON (Expecting value at line 1 column 1)"),
        (b"\xff\xfe\x00", "not valid JSON (not UTF-8 text)"),
        ("3", "the file holds a number, not a list or an object"),
        ('["road", "road"]', 'class names must be distinct, repeated: ["road"]'),
        ('{"label_names": ["road", "sky"]}', 'unknown keys ["label_names"]'),
        ('{"palette": [[1, 2, 3]]}', 'no "classes" or "names" key'),
        ('{"classes": []}', '"classes" must be a non-empty list of names (strings) or '
                            '"cityscapes", got []'),
        ('{"classes": ["road", 3]}', '"classes" must be a non-empty list of names (strings) or '
                                     '"cityscapes", got ["road", 3]'),
        ('{"classes": "city"}', '"classes" must be a non-empty list of names (strings) or '
                                '"cityscapes", got "city"'),
        ('{"classes": ["road", "sky"], "id_map": [7, 8]}',
         '"id_map" must be an object or "cityscapes", got a list'),
        ('{"classes": ["road", "sky"], "id_map": {"seven": 0}}',
         '"id_map" keys must be integer raw ids, got ["seven"]'),
        ('{"classes": ["road", "sky"], "id_map": {"7": 0, "8": 2}}',
         '"id_map" targets must be integers in 0..1 or 255, got {"8": 2}'),
        ('{"classes": ["road", "sky"], "id_map": {"7": 0.5}}',
         '"id_map" targets must be integers in 0..1 or 255, got {"7": 0.5}'),
    ],
)  # fmt: skip
def test_bad_class_table_is_one_error_line(tmp_path, capsys, classes_json, problem):
    path = _write_folder(tmp_path, classes_json)
    status, out, err = fx.run_build(capsys, "--dataset", "folder", "--manual_dir", str(tmp_path / "mine"),
                            "--data_dir", str(tmp_path / "out"))  # fmt: skip
    assert status == 2 and out == ""
    assert fx.error_lines(err) == [f"error: {path}: {problem}; {EXPECTED_TABLE}"]
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "table, seen",
    [
        ({"classes": "cityscapes", "id_map": "cityscapes"}, "(1/19): traffic sign"),  # id 20
        ({"classes": ["ground", "object", "sky"], "palette": [[0, 0, 0], [9, 9, 9], [5, 5, 5]],
          "id_map": {"10": 0, "20": "1", "30": 2.0}}, "(3/3): ground, object, sky"),
    ],
)  # fmt: skip
def test_accepted_class_tables_still_build(tmp_path, capsys, table, seen):
    _write_folder(tmp_path, json.dumps(table), ids=(10, 20, 30))  # 10, 30: Cityscapes void ids
    status, out, _ = fx.run_build(capsys, "--dataset", "folder", "--manual_dir", str(tmp_path / "mine"),
                          "--data_dir", str(tmp_path / "out"), "--name", "mine")  # fmt: skip
    assert status == 0 and f"train: 3 images\n    classes seen {seen}\n" in out


def test_unmapped_label_id_fails_the_folder_build(tmp_path, capsys):
    raw = fx.make_folder(str(tmp_path / "mine"), ids=(10, 20, 30, 40, 50))
    status, _, err = fx.run_build(capsys, "--dataset", "folder", "--manual_dir", str(tmp_path / "mine"),
                          "--data_dir", str(tmp_path / "out"))  # fmt: skip
    assert status == 2 and "Traceback" not in err
    label, classes = tmp_path / "mine" / "train" / "labels" / "a" / "one.png", tmp_path / "mine"
    assert fx.error_lines(err) == [
        f"error: label {label} has values outside the class set: 50 "
        f"({(raw['a/one'] == 50).sum()} pixels); {classes / 'classes.json'} has 3 classes, and "
        "its raw ids are 10, 20, 30, 40 (and 255: ignore); map other values to a class index or "
        'to 255 in the class file\'s "id_map": {"<value>": <class index or 255>, ...}'
    ]
    assert not os.path.exists(tmp_path / "out")


def test_colour_label_is_rejected_even_with_skip_corrupt_and_workers(tmp_path, capsys):
    raw = fx.make_gta(str(tmp_path / "gta"))
    colour = np.stack([raw["00002"]] * 3, -1)
    colour[3, 5] = (128, 64, 128)  # road's Cityscapes colour
    label = tmp_path / "gta" / "labels" / "00002.png"
    fx.write_png(str(label), colour)
    args = _gta_args(tmp_path, "--skip_corrupt", "--num_workers", "2")
    status, _, err = fx.run_build(capsys, *args)
    assert status == 2
    assert fx.error_lines(err) == [
        f"error: label {label} is a colour image (RGB, e.g. (128, 64, 128) at x=5, y=3): "
        "a label must be a single-channel (grey) or palette PNG of ids"
    ]
    assert "--skip_corrupt" not in err  # not a corrupt file: skipping would not help
    assert not os.path.exists(tmp_path / "out")


def test_grey_ids_in_every_rgb_channel_are_accepted(tmp_path, capsys):
    raw = fx.make_gta(str(tmp_path / "gta"))
    fx.write_png(str(tmp_path / "gta" / "labels" / "00002.png"), np.stack([raw["00002"]] * 3, -1))
    status, _, _ = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 0
    built = sources.open_split(str(tmp_path / "out"), "gta5/full", "train")
    assert list(built[1]["label"][0, : len(fx.KNOWN_ROW)]) == fx.KNOWN_ROW_TRAIN_IDS


@pytest.mark.parametrize(
    "args, message",
    [
        (("--dataset", "gta5", "--manual_dir", "gta", "--resize", "big"),
         "--resize 'big': expected full, daformer or WxH (e.g. 1280x720)"),
        (("--dataset", "folder", "--manual_dir", "mine", "--resize", "daformer"),
         "--resize 'daformer': expected full or WxH (e.g. 1280x720)"),
        (("--dataset", "synthetic_shift", "--size", "64"),
         "--size '64': expected WxH (e.g. 1280x720)"),
        (("--dataset", "synthetic_shift", "--config", "huge"),
         "--config 'huge': expected one of default, mild, tiny"),
    ],
)  # fmt: skip
def test_bad_option_values_are_one_error_line(tmp_path, capsys, args, message):
    status, _, err = fx.run_build(capsys, *args, "--data_dir", str(tmp_path / "out"))
    assert status == 2 and fx.error_lines(err) == [f"error: {message}"]
    assert not os.path.exists(tmp_path / "out")


def test_skip_corrupt_skips_and_counts(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    (tmp_path / "gta" / "labels" / "00003.png").write_bytes(b"not a png at all")
    status, out, _ = fx.run_build(capsys, *_gta_args(tmp_path, "--skip_corrupt"))
    assert status == 0
    assert "train: 2 images" in out and "skipped corrupt: 1 (00003)" in out
    assert len(sources.open_split(str(tmp_path / "out"), "gta5/full", "train")) == 2


def test_size_mismatch_names_the_pair(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    label = tmp_path / "gta" / "labels" / "00001.png"
    fx.write_png(str(label), np.zeros((20, 40), np.uint8))
    status, _, err = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 2
    image = tmp_path / "gta" / "images" / "00001.png"
    assert fx.error_lines(err) == [
        f"error: image / label size mismatch: {image} is 40x24 but {label} is 40x20"
    ]
    assert not os.path.exists(tmp_path / "out")


def test_missing_folder_prints_the_expected_layout(tmp_path, capsys):
    fx.make_cityscapes(str(tmp_path / "cs"))
    for f in os.listdir(tmp_path / "cs" / "gtFine" / "val" / "frankfurt"):
        os.remove(tmp_path / "cs" / "gtFine" / "val" / "frankfurt" / f)
    os.rmdir(tmp_path / "cs" / "gtFine" / "val" / "frankfurt")
    os.rename(tmp_path / "cs" / "gtFine" / "val", tmp_path / "cs" / "gtFine" / "valid")
    status, _, err = fx.run_build(capsys, '--dataset', 'cityscapes', '--manual_dir', str(tmp_path / 'cs'),
                          '--data_dir', str(tmp_path / 'out'))  # fmt: skip
    assert status == 2
    assert f"missing folder {tmp_path / 'cs' / 'gtFine' / 'val'}" in err
    assert "Expected layout" in err and "_gtFine_labelIds.png" in err


def test_missing_manual_dir_and_missing_label(tmp_path, capsys):
    status, _, err = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 2 and "is not a directory" in err and "labels/00001.png" in err
    fx.make_gta(str(tmp_path / "gta"))
    os.remove(tmp_path / "gta" / "labels" / "00003.png")
    status, _, err = fx.run_build(capsys, *_gta_args(tmp_path))
    assert status == 2
    image, label = tmp_path / "gta" / "images" / "00003.png", tmp_path / "gta" / "labels"
    assert fx.error_lines(err) == [f"error: no label for image {image}: expected {label}/00003.png"]
    assert not os.path.exists(tmp_path / "out")


def test_synthia_missing_gt_folder(tmp_path, capsys):
    fx.make_synthia(str(tmp_path / "syn"))
    os.rename(tmp_path / "syn" / "GT", tmp_path / "syn" / "gt")
    status, _, err = fx.run_build(capsys, '--dataset', 'synthia', '--manual_dir', str(tmp_path / 'syn'),
                          '--data_dir', str(tmp_path / 'out'))  # fmt: skip
    assert status == 2 and "GT/LABELS/0000000.png" in err


def test_folder_without_class_table_prints_the_layout(tmp_path, capsys):
    fx.make_folder(str(tmp_path / "mine"))
    os.remove(tmp_path / "mine" / "classes.json")
    status, _, err = fx.run_build(capsys, "--dataset", "folder", "--manual_dir", str(tmp_path / "mine"),
                          "--data_dir", str(tmp_path / "out"))  # fmt: skip
    assert status == 2
    assert f"missing {tmp_path / 'mine' / 'classes.json'}" in err and "Expected layout" in err
