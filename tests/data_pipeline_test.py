"""grain pipelines on in-memory sources: RCS, crops, determinism, resume, shards, workers."""

import math

import numpy as np
import pytest

from data_pipelines import pipeline, transforms
from data_pipelines.labels import count_class_pixels
from data_pipelines.rcs import RareClassSampler, RcsConfig, rcs_class_probabilities


def _source(n=12, height=32, width=48, seed=0):
    """Images filled with their index (so a crop says which image it came from); labels with a
    rare class 5 as a 6x6 square in every third image, on road (0) / building (2) halves."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        label = np.zeros((height, width), np.uint8)
        label[: height // 2] = 2
        label[rng.integers(0, height), :] = 10
        if i % 3 == 0:
            y = rng.integers(height // 4, height - height // 4 - 5)  # away from the edges
            x = rng.integers(width // 4, width - width // 4 - 5)
            label[y : y + 6, x : x + 6] = 5
        image = np.full((height, width, 3), i, np.uint8)
        examples.append({"image": image, "label": label, "class_pixels": count_class_pixels(label)})
    return examples


def test_rcs_probabilities_follow_the_daformer_formula():
    class_pixels = np.array([[100, 0, 5, 0], [0, 0, 5, 890]])  # totals 100, 0, 10, 890
    classes, probs = rcs_class_probabilities(class_pixels, 0.01)
    assert list(classes) == [2, 0, 3]  # present classes, rarest first
    freq = [10 / 1000, 100 / 1000, 890 / 1000]
    weights = [math.exp((1 - f) / 0.01 - (1 - freq[0]) / 0.01) for f in freq]
    np.testing.assert_allclose(probs, [w / sum(weights) for w in weights], rtol=1e-12)
    assert probs[0] > 0.99  # T = 0.01 puts nearly all mass on the rarest class


def test_rcs_sampler_draws_classes_by_probability_and_images_above_min_pixels():
    class_pixels = np.array([[5000, 10], [5000, 4000], [5000, 2500], [5000, 3001]])
    sampler = RareClassSampler(class_pixels, RcsConfig(temperature=1.0, min_pixels=3000))
    assert list(sampler.candidates[1]) == [1, 3]  # more than 3000 pixels, strictly
    rng = np.random.default_rng(0)
    draws = [sampler.sample(rng) for _ in range(4000)]
    share = np.mean([c == 1 for c, _ in draws])
    expected = sampler.probs[list(sampler.classes).index(1)]
    assert abs(share - expected) < 0.03
    assert {i for c, i in draws if c == 1} == {1, 3}


def test_rcs_without_a_candidate_fails_like_daformer():
    with pytest.raises(ValueError, match="no image with more than 3000 pixels"):
        RareClassSampler(np.array([[5000, 10]]), RcsConfig())


def test_rcs_crops_hold_the_sampled_rare_class():
    source = _source()
    # T = 0.001 makes class 5 (the rarest) the only draw; its crops need > 15 pixels of it.
    rcs = RcsConfig(temperature=0.001, min_pixels=30, min_crop_ratio=0.5)
    dataset = pipeline.source_dataset(source, batch_size=1, crop_size=(16, 16), scale=None,
                                      rcs=rcs, cat_max_ratio=1.0, seed=0)  # fmt: skip
    hits = sum((dataset[i]["label"] == 5).sum() > 15 for i in range(100))
    assert hits >= 95  # class 5 is the rarest; without re-crops a 16x16 crop rarely holds it
    uniform = pipeline.source_dataset(source, batch_size=1, crop_size=(16, 16), scale=None,
                                      rcs=None, cat_max_ratio=1.0, seed=0)  # fmt: skip
    assert sum((uniform[i]["label"] == 5).sum() > 15 for i in range(100)) < 30


def test_batches_have_static_shapes_and_both_image_formats():
    source = _source()
    kwargs = dict(batch_size=3, crop_size=(16, 24), scale=None, rcs=RcsConfig(min_pixels=30))
    floats = pipeline.source_dataset(source, **kwargs)[2]
    uint8 = pipeline.source_dataset(source, normalize=False, **kwargs)[2]
    assert floats["image"].shape == (3, 16, 24, 3) and floats["image"].dtype == np.float32
    assert floats["label"].shape == (3, 16, 24) and floats["label"].dtype == np.int32
    assert uint8["image"].dtype == np.uint8
    np.testing.assert_allclose(transforms.normalize(uint8["image"]), floats["image"])
    np.testing.assert_array_equal(uint8["label"], floats["label"])


def test_resize_and_pad_to_the_crop():
    source = _source(n=3, height=20, width=40)
    batch = pipeline.target_dataset(source, batch_size=2, crop_size=(16, 16), scale=(20, 10))[0]
    assert batch["image"].shape == (2, 16, 16, 3)
    assert (batch["label"][:, 10:] == 255).all()  # 20x10 image padded to 16 rows with ignore


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("use_rcs", [True, False])
def test_deterministic_for_a_seed_and_resumable(use_rcs):
    source = _source()
    rcs = RcsConfig(min_pixels=30) if use_rcs else None

    def make(seed, threads=2):
        dataset = pipeline.source_dataset(source, batch_size=2, crop_size=(16, 16), scale=None,
                                          rcs=rcs, seed=seed)  # fmt: skip
        return pipeline.make_iterator(dataset, num_threads=threads)

    first = _take(make(0), 6)
    _assert_same(first, _take(make(0, threads=1), 6))
    other = _take(make(1), 6)
    assert any(not np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
    iterator = make(0)
    _take(iterator, 3)
    state = iterator.get_state()
    resumed = make(0)
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), first[3:])


def test_processes_read_disjoint_blocks_of_the_single_process_batches():
    source = _source(n=12)  # rare class 5 in images 0, 3, 6, 9
    rcs = RcsConfig(min_pixels=30)
    common = dict(crop_size=(8, 8), scale=None, normalize=False, seed=5)
    for make in (
        lambda **kw: pipeline.target_dataset(source, **common, **kw),
        lambda **kw: pipeline.source_dataset(source, rcs=rcs, **common, **kw),
    ):
        single = make(batch_size=4)
        shares = [make(batch_size=2, process_index=p, process_count=2) for p in range(2)]
        for n in range(12):
            # The global batch that make_array_from_process_local_data assembles from the two
            # processes' local batches is exactly the one-process batch: process p holds rows
            # 2p, 2p + 1.
            for key in ("image", "label"):
                joined = np.concatenate([shares[0][n][key], shares[1][n][key]])
                np.testing.assert_array_equal(joined, single[n][key])
    # Target: one epoch (12 images = 3 global batches of 4) is read once, half by each process.
    shares = [
        pipeline.target_dataset(source, batch_size=2, process_index=p, process_count=2, **common)
        for p in range(2)
    ]
    seen = [sorted(int(shares[p][n]["image"][r, 0, 0, 0]) for n in range(3) for r in range(2))
            for p in range(2)]  # fmt: skip
    assert len(seen[0]) == len(seen[1]) == 6
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_val_pipeline_pads_every_process_to_the_same_batches():
    source = _source(n=7, height=20, width=40)
    seen = []
    for p in range(2):
        dataset = pipeline.val_dataset(source, batch_size=3, scale=(20, 10), process_index=p,
                                       process_count=2, normalize=False)  # fmt: skip
        assert len(dataset) == 2  # ceil(ceil(7 / 2) / 3) batches for both processes
        for i in range(len(dataset)):
            batch = dataset[i]
            assert batch["image"].shape == (3, 10, 20, 3)  # test scale
            assert batch["label"].shape == (3, 20, 40)  # full-resolution labels
            for image, label in zip(batch["image"], batch["label"], strict=True):
                if (label == 255).all():
                    assert image.max() == 0  # padding
                else:
                    seen.append(int(image[0, 0, 0]))
    assert sorted(seen) == list(range(7))


def test_worker_processes_give_the_same_batches():
    source = _source()
    dataset = pipeline.source_dataset(source, batch_size=2, crop_size=(16, 16), scale=None,
                                      rcs=RcsConfig(min_pixels=30), seed=3)  # fmt: skip
    _assert_same(
        _take(pipeline.make_iterator(dataset, num_workers=1), 4),
        _take(pipeline.make_iterator(dataset), 4),
    )
