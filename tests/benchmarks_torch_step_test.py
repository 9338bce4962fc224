"""benchmarks/torch_step.py: the PyTorch reference step computes our step's losses (equal work)."""

import jax
import numpy as np
import pytest

from benchmarks import step_time, torch_step
from pgpc_jax.train_step import make_train_step

# A tiny source-only run without dropout (so both sides draw nothing), a real learning rate from
# the first step (no warm-up), so the second loss shows the first update of every group.
SETS = [
    "data.source.crop_size=(64, 64)",
    "data.target.crop_size=(64, 64)",
    "model.dropout_rate=0.0",
    "model.drop_path_rate=0.0",
    "optimizer.warmup_steps=0",
    "optimizer.learning_rate=1e-3",
]


@pytest.fixture(scope="module")
def setup():
    config = step_time.load_config("configs/synthetic.py:source_only", SETS)
    model, optimizer, state = step_time.build(config)
    src, tgt = step_time.random_batches(config, np.random.default_rng(3))
    reference = torch_step.TorchSourceOnlyStep(config, jax.device_get(state.student_variables))
    return config, model, optimizer, state, src, tgt, reference


def test_first_two_losses_equal_ours(setup):
    config, model, optimizer, state, src, tgt, reference = setup
    step = jax.jit(make_train_step(config, model, optimizer))
    ours = []
    for _ in range(2):
        state, metrics = step(state, src, tgt)
        ours.append(float(metrics["train/loss_src"]))
    x, y = reference.batch(src["image"], src["label"])
    theirs = [reference(x, y) for _ in range(2)]
    np.testing.assert_allclose(theirs[0], ours[0], rtol=1e-5)
    # The update moved the loss well beyond the tolerance, and both moved it the same way.
    assert abs(ours[1] - ours[0]) > 100 * 1e-5 * ours[0]
    np.testing.assert_allclose(theirs[1], ours[1], rtol=1e-4)


def test_parameter_groups_are_mmcv_s(setup):
    *_, reference = setup
    assert reference.group_names == ["default", "head", "norm"]
    decay = {
        g: pg["weight_decay"]
        for g, pg in zip(reference.group_names, reference.optimizer.param_groups)
    }
    assert decay == {"default": 0.01, "head": 0.01, "norm": 0.0}
