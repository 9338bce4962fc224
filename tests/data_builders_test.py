"""Builds every dataset from fixtures in its original layout and reads it back pixel by pixel."""

import data_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from data_pipelines import build, image_io, labels, sources, synthetic_scenes, synthetic_shift


def _build(*args) -> int:
    return build.main([*args])


def _expected(raw, table=labels.CITYSCAPES_ID_TO_TRAIN_ID):
    return labels.make_lookup_table(table)[raw.astype(np.int64)]


def test_gta5_ids_class_pixels_and_order(tmp_path):
    raw = fx.make_gta(str(tmp_path / "gta"))
    assert _build('--dataset', 'gta5', '--manual_dir', str(tmp_path / 'gta'),
                  '--data_dir', str(tmp_path / 'out')) == 0  # fmt: skip
    split = sources.open_split(str(tmp_path / "out"), "gta5/full", "train")
    assert len(split) == 3
    for i, name in enumerate(sorted(raw)):
        example = split[i]
        assert example["name"] == name  # records keep the sorted file order
        assert example["image"].shape == (24, 40, 3) and example["label"].shape == (24, 40)
        assert list(example["label"][0, : len(fx.KNOWN_ROW)]) == fx.KNOWN_ROW_TRAIN_IDS
        np.testing.assert_array_equal(example["label"], _expected(raw[name]))
        pixels = labels.count_class_pixels(example["label"])
        np.testing.assert_array_equal(example["class_pixels"], pixels)
        np.testing.assert_array_equal(split.class_pixels[i], pixels)


def test_cityscapes_resize_keeps_val_labels_full_size(tmp_path):
    raw = fx.make_cityscapes(str(tmp_path / "cs"))
    assert _build('--dataset', 'cityscapes', '--manual_dir', str(tmp_path / 'cs'),
                  '--data_dir', str(tmp_path / 'out'), '--resize', '24x12') == 0  # fmt: skip
    train = sources.open_split(str(tmp_path / "out"), "cityscapes/24x12", "train")
    val = sources.open_split(str(tmp_path / "out"), "cityscapes/24x12", "val")
    assert [train[i]['name'] for i in range(3)] == [
        'aachen_000000_000019', 'aachen_000001_000019', 'bremen_000002_000019'
    ]  # fmt: skip
    example = train[0]
    assert example["image"].shape == (12, 24, 3) and example["label"].shape == (12, 24)
    full = _expected(raw[("train", "aachen_000000_000019")])
    np.testing.assert_array_equal(example["label"], full[::2, ::2])  # nearest, exact factor 2
    # class_pixels are counted at full resolution, as DAFormer's stats files.
    np.testing.assert_array_equal(example["class_pixels"], labels.count_class_pixels(full))
    assert val[0]["image"].shape == (12, 24, 3) and val[0]["label"].shape == (24, 48)
    np.testing.assert_array_equal(val[1]["label"], _expected(raw[("val", "lindau_000001_000019")]))


def test_synthia_reads_16bit_first_channel(tmp_path):
    raw = fx.make_synthia(str(tmp_path / "syn"))
    assert _build('--dataset', 'synthia', '--manual_dir', str(tmp_path / 'syn'),
                  '--data_dir', str(tmp_path / 'out')) == 0  # fmt: skip
    split = sources.open_split(str(tmp_path / "out"), "synthia/full", "train")
    for i, name in enumerate(sorted(raw)):
        label = split[i]["label"]
        row = list(label[0, : len(fx.SYNTHIA_KNOWN_ROW)])
        assert row == fx.SYNTHIA_KNOWN_ROW_TRAIN_IDS
        np.testing.assert_array_equal(label, _expected(raw[name], labels.SYNTHIA_ID_TO_TRAIN_ID))
        assert split[i]["class_pixels"][[9, 14, 16]].sum() == 0
    summary = sources.read_metadata(sources.dataset_dir(str(tmp_path / "out"), "synthia/full"))
    assert summary["summary"]["train"]["unknown_ids"] == {}  # 13 and 22 are known void ids
    assert summary["palette"] == [list(c) for c in labels.PALETTE]
    assert summary["summary"]["train"]["labelled"] is True


def test_dark_zurich_splits_and_correspondence(tmp_path):
    written = fx.make_dark_zurich(str(tmp_path / "dz"))
    assert _build('--dataset', 'dark_zurich', '--manual_dir', str(tmp_path / 'dz'),
                  '--data_dir', str(tmp_path / 'out')) == 0  # fmt: skip
    out = str(tmp_path / "out")
    night = sources.open_split(out, "dark_zurich/full", "train_night", with_label=False)
    assert [night[i]["name"] for i in range(2)] == written["night"]
    assert night[0]["corresp_day"] == "train/day/GOPR0350/GOPR0350_frame_000100"
    assert "label" not in night[0]
    day = sources.open_split(out, "dark_zurich/full", "train_day")
    assert (
        len(day) == 2 and day[0]["corresp_day"] == "" and set(np.unique(day[0]["label"])) == {255}
    )
    assert len(sources.open_split(out, "dark_zurich/full", "train_twilight")) == 1
    val = sources.open_split(out, "dark_zurich/full", "val")
    for i, (stem, raw) in enumerate(sorted(written["val"].items())):
        assert val[i]["name"] == stem
        np.testing.assert_array_equal(val[i]["label"], _expected(raw))


def test_folder_with_id_map_and_unlabelled_split(tmp_path, capsys):
    raw = fx.make_folder(str(tmp_path / "mine"))
    assert _build('--dataset', 'folder', '--manual_dir', str(tmp_path / 'mine'),
                  '--data_dir', str(tmp_path / 'out'), '--name', 'mine') == 0  # fmt: skip
    out = str(tmp_path / "out")
    train = sources.open_split(out, "folder/mine", "train")
    assert train.class_names == ("ground", "object", "sky") and train.class_pixels.shape == (3, 3)
    for i, name in enumerate(sorted(raw)):
        assert train[i]["name"] == name
        expected = np.choose(raw[name] // 10 - 1, [0, 1, 2, 255]).astype(np.uint8)
        np.testing.assert_array_equal(train[i]["label"], expected)
    meta = sources.read_metadata(sources.dataset_dir(out, "folder/mine"))
    assert meta["summary"]["train"]["unknown_ids"] == {}  # 40 is mapped to 255 explicitly
    # No colours in classes.json: the generated palette is stored.
    assert meta["palette"] == [list(c) for c in labels.generated_palette(3)]
    assert [meta["summary"][s]["labelled"] for s in ("train", "val")] == [True, False]
    assert "  val: 1 images\n    no labels\n" in capsys.readouterr().out
    val = sources.open_split(out, "folder/mine", "val")
    assert set(np.unique(val[0]["label"])) == {255} and val[0]["class_pixels"].sum() == 0


def test_synthetic_shift_is_deterministic_and_has_rare_classes(tmp_path):
    config = synthetic_shift.SyntheticShift.builder_configs["tiny"]
    image_a, label_a = synthetic_shift.generate_example(config, "target", "train", 3)
    image_b, label_b = synthetic_shift.generate_example(config, "target", "train", 3)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    source_image, _ = synthetic_shift.generate_example(config, "source", "train", 3)
    assert not np.array_equal(source_image, image_a)
    assert _build('--dataset', 'synthetic_shift', '--config', 'tiny',
                  '--data_dir', str(tmp_path / 'out')) == 0  # fmt: skip
    out = str(tmp_path / "out")
    split = sources.open_split(out, "synthetic_shift/tiny", "target_train")
    assert len(split) == 12 and split[0]["image"].shape == (64, 128, 3)
    np.testing.assert_array_equal(split[3]["label"], label_a)
    totals = split.class_pixels.sum(0)
    assert totals[16] == 0  # train never occurs
    shares = totals / totals.sum()
    assert {0, 2, 10, 13} <= set(np.flatnonzero(shares > 0.01))  # road, building, sky, car
    assert (shares[[5, 6, 7, 11]] < 0.02).all()  # pole, light, sign, person are rare


@pytest.mark.parametrize("dataset", ["gta5", "cityscapes", "synthia", "dark_zurich"])
def test_daformer_configs_exist(dataset):
    assert "daformer" in build.BUILDERS[dataset].builder_configs


def test_worker_processes_build_the_same_records(tmp_path):
    fx.make_gta(str(tmp_path / "gta"), count=5)
    for workers, out in (("0", "serial"), ("2", "parallel")):
        assert _build("--dataset", "gta5", "--manual_dir", str(tmp_path / "gta"),
                      "--data_dir", str(tmp_path / out), "--num_workers", workers) == 0  # fmt: skip
    serial = sources.open_split(str(tmp_path / "serial"), "gta5/full", "train")
    parallel = sources.open_split(str(tmp_path / "parallel"), "gta5/full", "train")
    np.testing.assert_array_equal(serial.class_pixels, parallel.class_pixels)
    for i in range(5):
        assert serial[i]["name"] == parallel[i]["name"]
        np.testing.assert_array_equal(serial[i]["image"], parallel[i]["image"])
        np.testing.assert_array_equal(serial[i]["label"], parallel[i]["label"])


def test_shift_strength_zero_renders_the_source_style():
    rng = np.random.default_rng(5)
    label, albedo, geometry = synthetic_scenes.sample_scene(rng, 32, 64)
    flat = synthetic_scenes.render_source(label, albedo)
    np.testing.assert_array_equal(
        synthetic_scenes.render_target(rng, label, albedo, geometry, strength=0.0), flat
    )
    shifted = synthetic_scenes.render_target(rng, label, albedo, geometry, strength=1.0)
    assert np.abs(shifted.astype(int) - flat).mean() > 20  # the default shift is large


def test_read_label_takes_ids_and_refuses_colours(tmp_path):
    ids = np.array([[7, 8, 26], [0, 255, 33]], np.uint8)
    grey, rgb_ids = str(tmp_path / "grey.png"), str(tmp_path / "rgb_ids.png")
    fx.write_png(grey, ids)
    fx.write_png(rgb_ids, np.stack([ids] * 3, -1))  # Cityscapes-style: the id in every channel
    palette = Image.fromarray(ids).convert("P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])  # colours != ids
    palette.save(tmp_path / "palette.png")
    for path in (grey, rgb_ids, str(tmp_path / "palette.png")):
        np.testing.assert_array_equal(image_io.read_label(path), ids)
    rgba = np.concatenate([np.stack([ids] * 3, -1), np.full((2, 3, 1), 255, np.uint8)], -1)
    rgba[1, 2, :3] = (0, 0, 142)  # car's Cityscapes colour
    Image.fromarray(rgba).save(tmp_path / "colour.png")
    colour = tmp_path / "colour.png"
    with pytest.raises(image_io.LabelFormatError) as raised:
        image_io.read_label(colour)
    assert str(raised.value) == (
        f"label {colour} is a colour image (RGBA, e.g. (0, 0, 142) at x=2, y=1): "
        "a label must be a single-channel (grey) or palette PNG of ids"
    )
    assert not isinstance(raised.value, image_io.CorruptImageError)  # --skip_corrupt keeps it
