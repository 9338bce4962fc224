"""Dark Zurich day-night pairs (read from the correspondence CSVs of the real layout) and the
pipeline option that puts a paired image through the same resize, crop, flip and normalisation."""

import os

import data_fixtures as fx
import numpy as np
import pytest

from data_pipelines import build, dark_zurich, image_io, pipeline, transforms

NIGHT = "train/night/GOPR0356/GOPR0356_frame_{}"
DAY = "train/day/GOPR0350/GOPR0350_frame_{}"


def _write_corresp(root, rows):
    path = os.path.join(root, "corresp", "train", "night", "GOPR0356.csv")
    with open(path, "w") as f:
        f.writelines(f"{NIGHT.format(n)},{DAY.format(d)}\n" for n, d in rows)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fixture in Dark Zurich's layout, with crossed pairs (night i -> day 1 - i)."""
    root = str(tmp_path_factory.mktemp("dz"))
    written = fx.make_dark_zurich(root)
    _write_corresp(root, [("000001", "000101"), ("000002", "000100")])
    out = str(tmp_path_factory.mktemp("out"))
    assert build.main(["--dataset", "dark_zurich", "--manual_dir", root, "--data_dir", out]) == 0
    return root, out, written


def _day_file(root, stem):
    seq = stem.split("_")[0]
    return image_io.read_rgb(
        os.path.join(root, "rgb_anon", "train", "day", seq, stem + "_rgb_anon.png")
    )


def test_pairs_read_the_csv_day_image_for_each_night_image(built):
    root, out, written = built
    pairs = dark_zurich.open_day_night_pairs(out, "dark_zurich/full")
    assert len(pairs) == 2 and written["day"] == ["GOPR0350_frame_000100", "GOPR0350_frame_000101"]
    for i, day_stem in enumerate(["GOPR0350_frame_000101", "GOPR0350_frame_000100"]):
        example = pairs[i]
        assert example["name"] == written["night"][i]
        assert example["corresp_day"].endswith(day_stem)
        np.testing.assert_array_equal(example["day_image"], _day_file(root, day_stem))
        assert not np.array_equal(example["day_image"], example["image"])
        assert "label" not in example
    # Random images: the two day images differ, so a swapped pairing would fail above.
    assert not np.array_equal(pairs[0]["day_image"], pairs[1]["day_image"])


def test_night_image_without_a_row_is_one_clear_error(tmp_path):
    root = str(tmp_path / "dz")
    fx.make_dark_zurich(root)
    _write_corresp(root, [("000001", "000100")])
    out = str(tmp_path / "out")
    assert build.main(["--dataset", "dark_zurich", "--manual_dir", root, "--data_dir", out]) == 0
    with pytest.raises(dark_zurich.MissingCorrespondenceError) as error:
        dark_zurich.open_day_night_pairs(out, "dark_zurich/full")
    message = str(error.value)
    assert "GOPR0356_frame_000002_rgb_anon.png" in message and "1 of 2" in message
    assert "\n" not in message


def test_day_image_missing_from_the_day_split_is_one_clear_error(built):
    _, out, _ = built
    from data_pipelines import sources

    night = sources.open_split(out, "dark_zurich/full", "train_night", with_label=False)
    day = sources.open_split(out, "dark_zurich/full", "train_day", with_label=False)
    day_without_first = [day[1]]  # GOPR0350_frame_000101 only
    with pytest.raises(dark_zurich.MissingCorrespondenceError, match="frame_000100_rgb_anon.png"):
        dark_zurich.DayNightPairs(night, day_without_first)


def _paired_examples(rng, count, height, width):
    # The day image is the night image with its channels rotated: every transform acts per
    # channel, so the outputs must be the same rotation of each other, pixel for pixel.
    examples = []
    for i in range(count):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        examples.append({"image": image, "day_image": np.roll(image, 1, -1), "name": f"n{i}"})
    return examples


@pytest.mark.parametrize("scale", [None, (32, 18)])
def test_pipeline_gives_the_paired_image_the_same_resize_crop_and_flip(scale):
    rng = np.random.default_rng(0)
    examples = _paired_examples(rng, 4, 36, 64)
    kwargs = dict(batch_size=4, crop_size=(12, 20), scale=scale, seed=3, normalize=False)
    paired = pipeline.target_dataset(examples, paired_keys=("day_image",), **kwargs)
    plain = pipeline.target_dataset(examples, **kwargs)
    flips = set()
    for n in range(4):
        batch, reference = paired[n], plain[n]
        assert set(batch) == {"image", "label", "day_image"} and set(reference) == {
            "image",
            "label",
        }
        # The option changes nothing else: same images and labels as without it.
        np.testing.assert_array_equal(batch["image"], reference["image"])
        np.testing.assert_array_equal(batch["label"], reference["label"])
        assert batch["day_image"].shape == (4, 12, 20, 3) and batch["day_image"].dtype == np.uint8
        np.testing.assert_array_equal(batch["day_image"], np.roll(batch["image"], 1, -1))
        for row in batch["image"]:
            # Which crop and flip gave this row: search the (resized) sources.
            for example in examples:
                full, _ = transforms.rescale(example["image"], None, scale)
                for flip in (False, True):
                    view = full[:, ::-1] if flip else full
                    for y in range(view.shape[0] - 11):
                        for x in range(view.shape[1] - 19):
                            if np.array_equal(view[y : y + 12, x : x + 20], row):
                                flips.add(flip)
    assert flips == {False, True}  # both branches were exercised


def test_pipeline_normalises_the_paired_image_and_checks_its_size():
    rng = np.random.default_rng(1)
    examples = _paired_examples(rng, 2, 18, 32)
    for example in examples:
        example["day_image"] = example["image"].copy()
    dataset = pipeline.target_dataset(
        examples, batch_size=2, crop_size=(18, 32), scale=None, paired_keys=("day_image",)
    )
    batch = dataset[0]
    assert batch["day_image"].dtype == np.float32
    np.testing.assert_array_equal(batch["day_image"], batch["image"])
    examples[1]["day_image"] = examples[1]["image"][:, :30]
    with pytest.raises(ValueError, match="day_image is 30x18 .* its image is 32x18"):
        pipeline.target_dataset(
            examples, batch_size=2, crop_size=(18, 32), scale=None, paired_keys=("day_image",)
        )[0]
    with pytest.raises(ValueError, match="has no 'day_image'"):
        pipeline.target_dataset(
            [{"image": examples[0]["image"]}] * 2, batch_size=2, crop_size=(18, 32), scale=None,
            paired_keys=("day_image",),
        )[0]  # fmt: skip


def test_built_pairs_through_the_uncropped_night_pipeline(built):
    # SePiCo's night target: resize, no crop (crop = whole image), flip; day image alongside.
    root, out, written = built
    pairs = dark_zurich.open_day_night_pairs(out, "dark_zurich/full")
    dataset = pipeline.target_dataset(
        pairs, batch_size=2, crop_size=(9, 16), scale=(16, 9), flip_prob=0.0, normalize=False,
        paired_keys=("day_image",), seed=0,
    )  # fmt: skip
    batch = dataset[0]
    assert batch["image"].shape == batch["day_image"].shape == (2, 9, 16, 3)
    expected = {
        written["night"][0]: _day_file(root, "GOPR0350_frame_000101"),
        written["night"][1]: _day_file(root, "GOPR0350_frame_000100"),
    }
    night_resized = {
        stem: transforms.rescale(pairs[i]["image"], None, (16, 9))[0]
        for i, stem in enumerate(written["night"])
    }
    for row in range(2):
        stem = next(s for s, im in night_resized.items() if np.array_equal(im, batch["image"][row]))
        want = transforms.rescale(expected[stem], None, (16, 9))[0]
        np.testing.assert_array_equal(batch["day_image"][row], want)
