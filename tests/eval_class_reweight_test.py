"""Test-time class reweighting (`eval.class_reweight`, SePiCo's day-night test): the prediction is
the argmax of softmax x class weights at the network's input size, resized to the labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import cs2darkzurich, synthetic, tiny
from data_pipelines import labels
from pgpc_jax import evaluation, predict
from pgpc_jax.config_checks import ConfigError, check_config
from pgpc_jax.models import segmentor
from pgpc_jax.uda import day_night

K = labels.NUM_CLASSES


def test_the_day_night_config_reweights_with_the_released_strength():
    config = cs2darkzurich.get_config("sepico")
    assert config.eval.class_reweight == 0.16
    weights = evaluation.class_weights_of(config)
    np.testing.assert_allclose(weights, day_night.class_weights(strength=0.16), rtol=1e-6)
    # The formula on the released Dark Zurich frequencies: rarer classes weigh more.
    f = np.asarray(day_night.DARK_ZURICH_CLASS_FREQUENCIES, np.float64)
    want = (np.log(f).mean() - np.log(f)) / np.log(f).std(ddof=1) * 0.16 + 1
    np.testing.assert_allclose(weights, want, rtol=1e-5)
    assert evaluation.class_weights_of(cs2darkzurich.get_config("daformer")) is None


def test_evaluate_reweights_the_softmax_at_the_input_size_then_resizes():
    model = segmentor.build_segmentor(tiny.get_config().model)
    variables = segmentor.init_variables(model, jax.random.key(0))
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 32, 48, 3)).astype(np.float32)
    label = rng.integers(0, K, size=(2, 64, 96)).astype(np.int32)
    stride4 = jax.jit(model.apply)(variables, images)["logits"]
    x = torch.from_numpy(np.array(stride4, np.float64)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False)
    plain = F.interpolate(x, size=(64, 96), mode="bilinear", align_corners=False).argmax(1)
    # Weights large enough to change predictions: the test can fail.
    weights = np.linspace(0.5, 3.0, K)
    scores = torch.softmax(x, 1) * torch.from_numpy(weights)[None, :, None, None]
    want = F.interpolate(scores, size=(64, 96), mode="bilinear", align_corners=False).argmax(1)
    assert (want != plain).float().mean() > 0.05
    visuals, plain_visuals = [], []
    common = dict(num_classes=K, num_visualizations=2)
    evaluation.evaluate(model, variables, [dict(image=images, label=label)],
                        class_weights=weights, visualizations=visuals, **common)  # fmt: skip
    evaluation.evaluate(model, variables, [dict(image=images, label=label)],
                        visualizations=plain_visuals, **common)  # fmt: skip
    for i in range(2):
        np.testing.assert_array_equal(visuals[i]["pred"], labels.colorize(want[i].numpy()))
        np.testing.assert_array_equal(plain_visuals[i]["pred"], labels.colorize(plain[i].numpy()))
    # predict (the Dark Zurich test submission) reweights the same way.
    predictor = predict.make_predictor(model, tuple(weights))
    np.testing.assert_array_equal(
        np.argmax(predictor(variables, images[0], (64, 96)), -1), want[0].numpy()
    )
    np.testing.assert_allclose(
        evaluation.reweight_scores(jnp.asarray(stride4), weights),
        jax.nn.softmax(stride4, -1) * weights,
        rtol=1e-6,
    )


def test_reweighting_needs_the_19_cityscapes_classes():
    config = synthetic.get_config("daformer")
    config.eval.class_reweight = 0.16
    config.model.num_classes = 7
    with pytest.raises(ConfigError, match="eval.class_reweight=0.16"):
        check_config(config)
    config.eval.class_reweight = -1.0
    with pytest.raises(ConfigError, match="eval.class_reweight=-1.0"):
        check_config(config)
