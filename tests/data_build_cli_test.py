"""The build CLI: summary, idempotent re-runs, and every bad-input path with its message."""

import os

import data_fixtures as fx
import numpy as np

from data_pipelines import build, sources


def _run(capsys, *args):
    status = build.main([*args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _gta_args(tmp_path, *extra):
    return ('--dataset', 'gta5', '--manual_dir', str(tmp_path / 'gta'),
            '--data_dir', str(tmp_path / 'out'), *extra)  # fmt: skip


def test_summary_progress_and_idempotent_rerun(tmp_path, capsys):
    raw = fx.make_gta(str(tmp_path / "gta"))
    raw_label = raw["00002"].copy()
    raw_label[5, :7] = 200  # an id outside the Cityscapes table
    fx.write_png(str(tmp_path / "gta" / "labels" / "00002.png"), raw_label)
    status, out, err = _run(capsys, *_gta_args(tmp_path))
    assert status == 0
    assert "gta5/train" in err and "3/3" in err and "img/s" in err and "ETA" in err
    assert "train: 3 images" in out
    assert "classes seen (19/19)" in out
    assert "unmapped ids: 7 pixels (id 200: 7) -> 255" in out
    split = sources.open_split(str(tmp_path / "out"), "gta5/full", "train")
    assert list(split[1]["label"][5, :7]) == [255] * 7
    records = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs)
    mtimes = [os.path.getmtime(p) for p in records]
    status, out, _ = _run(capsys, *_gta_args(tmp_path))
    assert status == 0 and "already built" in out and "train: 3 images" in out
    assert [os.path.getmtime(p) for p in records] == mtimes


def test_corrupt_image_names_the_file(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    bad = tmp_path / "gta" / "images" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    status, _, err = _run(capsys, *_gta_args(tmp_path))
    assert status == 2
    assert f"cannot decode image {bad}" in err and "--skip_corrupt" in err
    assert not os.path.exists(tmp_path / "out" / "gta5" / "full" / "1.0.0")


def test_skip_corrupt_skips_and_counts(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    (tmp_path / "gta" / "labels" / "00003.png").write_bytes(b"not a png at all")
    status, out, _ = _run(capsys, *_gta_args(tmp_path, "--skip_corrupt"))
    assert status == 0
    assert "train: 2 images" in out and "skipped corrupt: 1 (00003)" in out
    assert len(sources.open_split(str(tmp_path / "out"), "gta5/full", "train")) == 2


def test_size_mismatch_names_the_pair(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    label = tmp_path / "gta" / "labels" / "00001.png"
    fx.write_png(str(label), np.zeros((20, 40), np.uint8))
    status, _, err = _run(capsys, *_gta_args(tmp_path))
    assert status == 2
    image = tmp_path / "gta" / "images" / "00001.png"
    assert f"size mismatch: {image} is 40x24 but {label} is 40x20" in err


def test_missing_folder_prints_the_expected_layout(tmp_path, capsys):
    fx.make_cityscapes(str(tmp_path / "cs"))
    for f in os.listdir(tmp_path / "cs" / "gtFine" / "val" / "frankfurt"):
        os.remove(tmp_path / "cs" / "gtFine" / "val" / "frankfurt" / f)
    os.rmdir(tmp_path / "cs" / "gtFine" / "val" / "frankfurt")
    os.rename(tmp_path / "cs" / "gtFine" / "val", tmp_path / "cs" / "gtFine" / "valid")
    status, _, err = _run(capsys, '--dataset', 'cityscapes', '--manual_dir', str(tmp_path / 'cs'),
                          '--data_dir', str(tmp_path / 'out'))  # fmt: skip
    assert status == 2
    assert f"missing folder {tmp_path / 'cs' / 'gtFine' / 'val'}" in err
    assert "Expected layout" in err and "_gtFine_labelIds.png" in err


def test_missing_manual_dir_and_missing_label(tmp_path, capsys):
    status, _, err = _run(capsys, *_gta_args(tmp_path))
    assert status == 2 and "is not a directory" in err and "labels/00001.png" in err
    fx.make_gta(str(tmp_path / "gta"))
    os.remove(tmp_path / "gta" / "labels" / "00003.png")
    status, _, err = _run(capsys, *_gta_args(tmp_path))
    assert status == 2
    assert f"no label for image {tmp_path / 'gta' / 'images' / '00003.png'}" in err


def test_synthia_missing_gt_folder(tmp_path, capsys):
    fx.make_synthia(str(tmp_path / "syn"))
    os.rename(tmp_path / "syn" / "GT", tmp_path / "syn" / "gt")
    status, _, err = _run(capsys, '--dataset', 'synthia', '--manual_dir', str(tmp_path / 'syn'),
                          '--data_dir', str(tmp_path / 'out'))  # fmt: skip
    assert status == 2 and "GT/LABELS/0000000.png" in err


def test_folder_without_class_table_prints_the_layout(tmp_path, capsys):
    fx.make_folder(str(tmp_path / "mine"))
    os.remove(tmp_path / "mine" / "classes.json")
    status, _, err = _run(capsys, "--dataset", "folder", "--manual_dir", str(tmp_path / "mine"),
                          "--data_dir", str(tmp_path / "out"))  # fmt: skip
    assert status == 2
    assert f"missing {tmp_path / 'mine' / 'classes.json'}" in err and "Expected layout" in err
