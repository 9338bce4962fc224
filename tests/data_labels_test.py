"""Tests of the label tables: Cityscapes against cityscapesscripts, SYNTHIA as DAFormer, subsets."""

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
