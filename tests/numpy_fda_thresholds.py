"""Test oracle: a direct numpy transcription of FDA's multi-band pseudo-labelling
(YanchaoYang/FDA `getSudoLabel_multi.py: main()`), written for this project.

It follows the release on arrays already in memory: `predicted_label` and `predicted_prob`
[N, H, W] stored in float64 as the release stores them, a threshold per class from the sorted
confidences of the pixels predicted as that class (`np.int`, gone from numpy, is `int`), the 0.9
cap, then image by image and class by class the pixels below their class threshold set to 255 and
the result cast to uint8. A class with exactly one pixel indexes past the end (IndexError), as
the release does. `multiband_prediction` is the weighted mean of three models' softmax outputs
(channel-last here) and its argmax / max, without the release's resize.
"""

from __future__ import annotations

import numpy as np


def multiband_prediction(output1, output2, output3):
    """(label, prob) [..., H, W] of the release's weighted mean of three [..., H, W, C] outputs."""
    a, b = 0.3333, 0.3333
    output = a * output1 + b * output2 + (1.0 - a - b) * output3
    return np.argmax(output, axis=-1), np.max(output, axis=-1)


def thresholds(predicted_label, predicted_prob, num_classes=19):
    """[C] thresholds: per class the sorted confidence at round(n * 0.66), 0 if absent, <= 0.9."""
    predicted_label = np.asarray(predicted_label, np.float64)
    predicted_prob = np.asarray(predicted_prob, np.float64)
    thres = []
    for i in range(num_classes):
        x = predicted_prob[predicted_label == i]
        if len(x) == 0:
            thres.append(0)
            continue
        x = np.sort(x)
        thres.append(x[int(np.round(len(x) * 0.66))])
    thres = np.array(thres)
    thres[thres > 0.9] = 0.9
    return thres


def pseudo_labels(predicted_label, predicted_prob, thres, num_classes=19):
    """uint8 [N, H, W]: the labels with 255 where prob < the threshold of the pixel's class."""
    out = []
    for index in range(len(predicted_label)):
        label = np.asarray(predicted_label[index], np.float64).copy()
        prob = np.asarray(predicted_prob[index], np.float64)
        for i in range(num_classes):
            label[(prob < thres[i]) * (label == i)] = 255
        out.append(np.asarray(label, dtype=np.uint8))
    return np.stack(out)
